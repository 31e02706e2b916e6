"""The control plane with the local executor: runs, retries, cancels, refusals, lost and killed attempts, and a
restart of the control plane itself (in a subprocess, SIGKILLed while a job runs)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from aifab.errors import AifabError
from aifab.jobs import records
from aifab.jobs.attempt import LAUNCH_FILE, read_json
from aifab.jobs.control import ControlPlane, ControlSettings
from aifab.jobs.launch import proc_start_ticks
from aifab.jobs.records import JobSpec
from aifab.schedule.state import Node
from aifab.store import Store
from helpers import until

POOL = [Node("n1", (0,), 2.0, 8.0)]


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


@pytest.fixture
def cp(store: Store) -> Iterator[ControlPlane]:
    plane = ControlPlane(store, ControlSettings(POOL, poll_s=0.05, cancel_grace_s=5.0))
    yield plane
    for job in records.list_jobs(store, ("running",)):  # never leave a process behind
        if job.handle:
            plane.executor.kill(job.handle)
    plane.close()


def log_text(store: Store, job_id: int) -> str:
    path = records.log_path(store, job_id)
    return path.read_text(errors="replace") if path.exists() else ""


def events(store: Store, job_id: int) -> list[str]:
    return [e.event for e in records.events(store, job_id)]


def test_a_job_runs_with_its_log_and_result(store: Store, cp: ControlPlane) -> None:
    code = """
        import os
        from aifab.jobs import attempt
        print("hello from", os.environ["AIFAB_JOB_ID"], "gpus", repr(os.environ["CUDA_VISIBLE_DEVICES"]))
        attempt.write_result({"answer": 42, "attempt": attempt.current().attempt})
    """
    job_id = cp.submit(JobSpec(name="hello", command=py(code), gpus=1, cpus=1))
    info = cp.wait(job_id, timeout_s=60)
    assert (info.status, info.exit_code, info.attempts) == ("succeeded", 0, 1)
    assert info.result == {"answer": 42, "attempt": 1}
    assert info.placement is not None and info.placement["gpu_ids"] == [0]
    assert info.attained_gpu_s > 0
    log = records.log_path(store, job_id).read_text()
    assert f"=== job {job_id} attempt 1 started" in log
    assert f"hello from {job_id} gpus '0'" in log
    assert events(store, job_id) == ["submitted", "placed", "started", "succeeded"]


def test_a_failing_job_is_retried_with_backoff_then_failed(store: Store, cp: ControlPlane) -> None:
    code = 'import os, sys; print("attempt", os.environ["AIFAB_JOB_ATTEMPT"]); sys.exit(3)'
    job_id = cp.submit(JobSpec(command=py(code), max_retries=2, backoff_s=0.1))
    info = cp.wait(job_id, timeout_s=60)
    assert (info.status, info.attempts, info.exit_code, info.error) == ("failed", 3, 3, "exit code 3")
    trail = records.events(store, job_id)
    retries = [e.detail for e in trail if e.event == "retrying"]
    assert [(r["attempt"], r["delay_s"]) for r in retries] == [(1, 0.1), (2, 0.2)]  # doubling backoff
    assert [e.event for e in trail].count("started") == 3
    assert trail[-1].event == "failed"
    log = records.log_path(store, job_id).read_text()
    assert [f"attempt {n}" in log for n in (1, 2, 3)] == [True] * 3


def test_cancel_a_pending_and_a_running_job(store: Store, cp: ControlPlane) -> None:
    pending = cp.submit(JobSpec(command=py("pass")))
    records.cancel(store, pending)
    running = cp.submit(JobSpec(command=py("import time; print('up', flush=True); time.sleep(300)")))
    until(lambda: "up" in log_text(store, running), "job to run", tick=cp.tick)
    handle = records.get(store, running).handle
    assert handle is not None
    records.cancel(store, running)
    info = cp.wait(running, timeout_s=60)
    assert (info.status, info.exit_code) == ("cancelled", -signal.SIGTERM)
    assert cp.executor.poll(handle) == -signal.SIGTERM  # the process is gone
    assert records.get(store, pending).status == "cancelled" and records.get(store, pending).attempts == 0


def test_an_oversize_request_is_refused_at_submit_naming_the_job(store: Store, cp: ControlPlane) -> None:
    with pytest.raises(AifabError, match=r"job 'giant' can never run on this pool: asks for 4 GPUs"):
        cp.submit(JobSpec(name="giant", command=["true"], gpus=4))
    with pytest.raises(AifabError, match=r"job 'hungry'.*64 GB of memory"):
        cp.submit({"name": "hungry", "command": ["true"], "memory_gb": 64})
    assert records.list_jobs(store) == []


def test_a_command_that_cannot_start_fails_with_127(store: Store, cp: ControlPlane) -> None:
    info = cp.wait(cp.submit(JobSpec(command=["/nonexistent/program"])), timeout_s=60)
    assert (info.status, info.exit_code) == ("failed", 127)
    assert "cannot start '/nonexistent/program'" in records.log_path(store, info.id).read_text()


def test_one_control_plane_per_store(store: Store, cp: ControlPlane) -> None:
    with pytest.raises(AifabError, match=f"another control plane \\(pid {os.getpid()}\\)"):
        ControlPlane(store, ControlSettings(POOL))


def _child_pid(store: Store, job_id: int) -> int:
    info = read_json(records.job_dir(store.home, job_id) / LAUNCH_FILE)
    assert isinstance(info, dict)
    return int(info["child_pid"])


SLEEP_ON_FIRST_ATTEMPT = """
    import os, time
    print("attempt", os.environ["AIFAB_JOB_ATTEMPT"], flush=True)
    if os.environ["AIFAB_JOB_ATTEMPT"] == "1":
        time.sleep(300)
"""


def test_sigkill_of_the_job_process_is_retried_per_policy(store: Store, cp: ControlPlane) -> None:
    job_id = cp.submit(JobSpec(command=py(SLEEP_ON_FIRST_ATTEMPT), max_retries=1, backoff_s=0.0))
    until(lambda: "attempt 1" in log_text(store, job_id), "attempt 1", tick=cp.tick)
    os.kill(_child_pid(store, job_id), signal.SIGKILL)
    info = cp.wait(job_id, timeout_s=60)
    assert (info.status, info.attempts) == ("succeeded", 2)
    retry = next(e.detail for e in records.events(store, job_id) if e.event == "retrying")
    assert retry["error"] == "killed by SIGKILL"
    # without retries left, the same kill fails the job, and says why
    no_retry = cp.submit(JobSpec(command=py(SLEEP_ON_FIRST_ATTEMPT)))
    until(lambda: "attempt 1" in log_text(store, no_retry), "attempt", tick=cp.tick)
    os.kill(_child_pid(store, no_retry), signal.SIGKILL)
    info = cp.wait(no_retry, timeout_s=60)
    assert (info.status, info.error) == ("failed", "killed by SIGKILL")


def test_a_lost_launcher_requeues_and_its_orphan_is_killed(store: Store, cp: ControlPlane) -> None:
    job_id = cp.submit(JobSpec(command=py(SLEEP_ON_FIRST_ATTEMPT)))
    until(lambda: "attempt 1" in log_text(store, job_id), "attempt 1", tick=cp.tick)
    child = _child_pid(store, job_id)
    child_start = proc_start_ticks(child)
    handle = records.get(store, job_id).handle
    assert handle is not None
    os.kill(int(handle.split(":")[0]), signal.SIGKILL)  # the launcher: no exit.json will ever come
    info = cp.wait(job_id, timeout_s=60)
    assert (info.status, info.attempts) == ("succeeded", 2)
    assert "lost" in events(store, job_id)
    until(lambda: proc_start_ticks(child) != child_start, "the orphaned command to be killed", timeout_s=10)


CONTROLLER = """
import sys, threading
from aifab.jobs.control import ControlPlane, ControlSettings
from aifab.schedule.state import Node
from aifab.store import Store

cp = ControlPlane(Store(sys.argv[1]), ControlSettings([Node("n1", (0,), 2.0, 8.0)], poll_s=0.05))
print("ready", flush=True)
cp.run(threading.Event())
"""


def test_control_plane_restart_reattaches_and_loses_no_job(store: Store, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    waits = py(f"""
        import os, time
        from aifab.jobs import attempt
        print("running", flush=True)
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.05)
        attempt.write_result({{"finished_by": os.getpid()}})
    """)
    quick = py("print('quick done')")
    ids = [records.submit(store, JobSpec(command=c, cpus=1)) for c in (waits, quick, quick, waits)]

    def start_controller() -> subprocess.Popen[str]:
        env = {**os.environ, "AIFAB_HOME": str(store.home)}
        p = subprocess.Popen([sys.executable, "-c", CONTROLLER, str(store.home)], env=env, text=True)
        return p

    first = start_controller()
    try:
        until(
            lambda: records.get(store, ids[0]).status == "running" and records.get(store, ids[0]).handle,
            "job 1 running",
        )
        first.kill()  # SIGKILL: no cleanup of any kind
        first.wait()
        handle = records.get(store, ids[0]).handle
        assert handle is not None
        running_before = {j.id for j in records.list_jobs(store, ("running",))}
        assert ids[0] in running_before
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert len(records.list_jobs(store)) == 4  # every row survived
    second = start_controller()
    try:
        until(lambda: "reattached" in events(store, ids[0]), "the new control plane to reattach job 1")
        gate.write_text("go")
        until(lambda: all(records.get(store, i).terminal for i in ids), "all jobs to finish")
    finally:
        second.kill()
        second.wait()
    finals = [records.get(store, i) for i in ids]
    assert [j.status for j in finals] == ["succeeded"] * 4
    first_job = finals[0]
    assert first_job.attempts == 1  # reattached, not rerun
    assert first_job.result is not None and first_job.result["finished_by"] > 0
    assert events(store, ids[0]) == ["submitted", "placed", "started", "reattached", "succeeded"]
    assert json.dumps([j.to_dict() for j in finals])  # rows are whole and serializable


def test_restart_reads_the_exit_of_a_job_that_ended_while_no_control_plane_ran(store: Store) -> None:
    plane = ControlPlane(store, ControlSettings(POOL, poll_s=0.05))
    job_id = plane.submit(JobSpec(command=py("import sys; print('bye'); sys.exit(5)")))
    until(lambda: records.get(store, job_id).handle, "job to start", tick=plane.tick)
    plane.close()  # gone before the job ends: the launcher writes exit.json meanwhile
    handle = records.get(store, job_id).handle
    assert handle is not None
    until(lambda: (records.job_dir(store.home, job_id) / "exit.json").exists(), "exit.json")
    with ControlPlane(store, ControlSettings(POOL, poll_s=0.05)) as again:  # recover() runs on start
        info = records.get(store, job_id)
        assert (info.status, info.exit_code, info.error) == ("failed", 5, "exit code 5")
        assert again.executor.poll(handle) == 5


def test_a_job_that_dies_of_the_preemption_sigterm_is_requeued(store: Store, cp: ControlPlane) -> None:
    low = cp.submit(JobSpec(name="low", command=py(SLEEP_ON_FIRST_ATTEMPT), gpus=1, preemptible=True))
    until(lambda: "attempt 1" in log_text(store, low), "the low-priority job to run", tick=cp.tick)
    high = cp.submit(JobSpec(name="high", command=py("print('high')"), gpus=1, priority=5))
    assert cp.wait(high, timeout_s=60).status == "succeeded"
    info = cp.wait(low, timeout_s=60)
    assert (info.status, info.attempts, info.preemptions) == ("succeeded", 2, 1)
    preempted = next(e.detail for e in records.events(store, low) if e.event == "preempted")
    assert preempted["exit_code"] == -signal.SIGTERM  # no checkpoint protocol, still requeued, not failed
    assert "retrying" not in events(store, low)


def test_a_serving_replica_and_training_share_the_pool(trained: tuple[Store, str]) -> None:
    """A real `aifab serve` replica and a training job each hold one GPU of a two-GPU pool (their own index in
    CUDA_VISIBLE_DEVICES). A higher-priority job then needs a GPU: the training is preempted, never the replica."""
    store, ref = trained
    plane = ControlPlane(store, ControlSettings([Node("box", (0, 1), 4.0, 16.0)], poll_s=0.05, cancel_grace_s=10.0))
    try:
        serve = plane.submit(
            JobSpec(
                command=[sys.executable, "-m", "aifab", "serve", ref, "--port", "0"],
                kind="serve",
                gpus=1,
                name="replica",
            )
        )
        show = "import os, time; print('gpu', os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(120)"
        train = plane.submit(JobSpec(command=py(show), kind="train", gpus=1, preemptible=True, name="train"))
        until(lambda: "serving" in log_text(store, serve), "the replica to serve", tick=plane.tick)
        until(lambda: "gpu" in log_text(store, train), "the training job to start", tick=plane.tick)
        gpus = {records.get(store, j).placement["gpu_ids"][0] for j in (serve, train)}  # type: ignore[index]
        assert gpus == {0, 1}
        assert f"gpu {records.get(store, train).placement['gpu_ids'][0]}" in log_text(store, train)  # type: ignore[index]
        urgent = plane.submit(JobSpec(command=py("print('urgent done')"), gpus=1, priority=10, name="urgent"))
        until(lambda: records.get(store, urgent).status == "succeeded", "the urgent job", tick=plane.tick)
        assert "preempted" in events(store, train)
        assert records.get(store, serve).status == "running" and "preempting" not in events(store, serve)
        records.cancel(store, serve)
        records.cancel(store, train)
        until(lambda: {records.get(store, j).status for j in (serve, train)} == {"cancelled"}, "both", tick=plane.tick)
    finally:
        for job in records.list_jobs(store, ("running",)):
            if job.handle:
                plane.executor.kill(job.handle)
        plane.close()
