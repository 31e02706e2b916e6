"""The Ray executor under the control plane, on a local multi-node Ray cluster: a job runs with its log and
result, a preempted job exits EXIT_PREEMPTED and is requeued, and a real CPU training job whose node is killed is
requeued and finishes its run from the checkpoint on the surviving node.

One cluster serves the module: a head with no CPUs (nothing runs there) and two workers with 1 CPU, 1 (fake) GPU
and the custom resource `aifab_worker` each. Ray detects a dead node within about 1.5 s (health checks tightened).
The node-kill test removes a worker, so it comes last.
"""

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aifab.jobs import records
from aifab.jobs.attempt import LAUNCH_FILE, STATE_FILE, read_json
from aifab.jobs.control import ControlPlane, ControlSettings
from aifab.jobs.records import JobSpec
from aifab.store import Store
from helpers import until

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

WORKER = {"aifab_worker": 1.0}
FACTORY = """\
name: rayjob
model: {n_layer: 2, n_head: 2, d_model: 32, context_len: 32}
training: {batch_size: 8, eval_every: 100000, checkpoint_every: 25, device: cpu, warmup_steps: 5}
"""
STEPS = 600


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    fast_death = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500}
    fast_death["health_check_failure_threshold"] = 3  # a dead node is noticed in about 1.5 s
    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": fast_death}
    )
    for _ in range(2):
        c.add_node(num_cpus=1, num_gpus=1, resources=WORKER, memory=2 * 1024**3)
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture
def plane(cluster: Any, store: Store) -> Iterator[Callable[..., ControlPlane]]:
    """Makes the control plane of `store` with a RayExecutor on the workers (or the first `nodes` of them)."""
    from aifab.jobs.ray_executor import RayExecutor, ray_nodes

    made: list[ControlPlane] = []

    def make(nodes: int | None = None) -> ControlPlane:
        def pool() -> list[Any]:
            return ray_nodes(WORKER)[:nodes]

        made.append(
            ControlPlane(
                store,
                ControlSettings(
                    pool(),
                    poll_s=0.05,
                    preempt_grace_s=60.0,
                    refresh_nodes=pool,
                    refresh_every_s=0.2,  # the node-loss test expects the dead node out of the pool soon
                ),
                RayExecutor(store.home, WORKER),
            )
        )
        return made[-1]

    yield make
    for cp in made:
        for job in records.list_jobs(store, ("running",)):  # never leave an actor or a process behind
            if job.handle:
                cp.executor.kill(job.handle)
        cp.close()


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def log_text(store: Store, job_id: int) -> str:
    path = records.log_path(store, job_id)
    return path.read_text(errors="replace") if path.exists() else ""


def events(store: Store, job_id: int) -> list[str]:
    return [e.event for e in records.events(store, job_id)]


def test_a_job_runs_on_ray_with_its_log_and_result(store: Store, plane: Callable[..., ControlPlane]) -> None:
    cp = plane()
    code = """
        import os
        from aifab.jobs import attempt
        print("hello from", os.environ["AIFAB_JOB_ID"], "gpus", repr(os.environ["CUDA_VISIBLE_DEVICES"]))
        attempt.write_result({"answer": 42, "attempt": attempt.current().attempt})
    """
    job_id = cp.submit(JobSpec(name="hello", command=py(code), gpus=1, cpus=1, memory_gb=0.5))
    info = cp.wait(job_id, timeout_s=60)
    log = log_text(store, job_id)
    assert (info.status, info.exit_code, info.attempts, info.executor) == ("succeeded", 0, 1, None), log
    assert info.result == {"answer": 42, "attempt": 1}
    assert re.search(rf"=== job {job_id} attempt 1 started \S+ on 192\.0\.2\.2-\w{{8}} gpus \[0\] \(ray\) ===", log)
    assert f"hello from {job_id} gpus '0'" in log  # Ray's GPU assignment
    assert events(store, job_id) == ["submitted", "placed", "started", "succeeded"]
    started = next(e.detail for e in records.events(store, job_id) if e.event == "started")
    assert started["handle"].startswith("ray:aifab-") and started["handle"].endswith(f":{job_id}:1")
    assert cp.executor.poll(started["handle"]) == 0  # the actor is released; exit.json still answers


PREEMPTIBLE = """
    import os, signal, sys, time
    if os.environ["AIFAB_JOB_ATTEMPT"] != "1":
        print("second attempt: done", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM, checkpointed", flush=True), sys.exit(75)))
    print("waiting for SIGTERM", flush=True)
    while True:
        time.sleep(0.05)
"""


def test_terminate_preempts_a_ray_job_which_is_requeued(
    store: Store, plane: Callable[..., ControlPlane], cluster: Any
) -> None:
    from aifab.jobs.ray_executor import RayExecutor

    cp = plane(nodes=1)  # one GPU in the pool: the high-priority job must preempt the low one
    low = cp.submit(JobSpec(name="low", command=py(PREEMPTIBLE), gpus=1, preemptible=True, kind="train"))
    until(lambda: "waiting for SIGTERM" in log_text(store, low), "the low job to run", tick=cp.tick)
    handle = records.get(store, low).handle
    assert handle is not None
    # another driver (a restarted control plane) finds the attempt by its handle alone
    other = subprocess.run(
        py(f"""
            from pathlib import Path
            from aifab.jobs.ray_executor import RayExecutor
            ex = RayExecutor(Path({str(store.home)!r}))
            print(ex.reattach({handle!r}), ex.poll({handle!r}))
        """),
        capture_output=True, text=True, timeout=60, env={**os.environ, "RAY_ADDRESS": cluster.address},
    )  # fmt: skip
    assert other.stdout.split() == ["True", "None"], other.stderr[-2000:]
    high = cp.submit(JobSpec(name="high", command=py("print('high ran')"), gpus=1, priority=10))
    assert cp.wait(high, timeout_s=60).status == "succeeded"
    done = cp.wait(low, timeout_s=60)
    log = log_text(store, low)
    assert (done.status, done.attempts, done.preemptions) == ("succeeded", 2, 1), log
    preempted = next(e.detail for e in records.events(store, low) if e.event == "preempted")
    assert preempted["exit_code"] == 75  # EXIT_PREEMPTED: SIGTERM reached the job's process, not a kill
    assert "got SIGTERM, checkpointed" in log and "second attempt: done" in log
    assert RayExecutor(store.home, WORKER).reattach(handle) is False  # that attempt's actor is gone


def test_a_control_plane_with_another_executor_refuses_ray_jobs(store: Store) -> None:
    from aifab.errors import AifabError
    from aifab.schedule.state import Node
    from helpers import aifab

    job_id = records.submit(store, JobSpec(command=["true"]))
    records.transition(store, job_id, "placed", status="running", executor="ray", handle=f"ray:aifab-x:{job_id}:1")
    with pytest.raises(AifabError, match=f"job {job_id} runs on the ray executor, not local: .*--executor ray"):
        ControlPlane(store, ControlSettings([Node("n1", (), 1.0, 1.0)]))
    assert records.get(store, job_id).status == "running"  # nothing touched
    bad = aifab("controller", "--executor", "k8s", home=store.home)
    assert bad.returncode != 0 and "unknown executor 'k8s': choose local or ray" in bad.stderr


@pytest.mark.slow
def test_a_training_job_survives_the_loss_of_its_node(
    store: Store, plane: Callable[..., ControlPlane], cluster: Any, tmp_path: Path
) -> None:
    from aifab.data.ingest import ingest
    from aifab.spec import DataSpec
    from aifab.store.schema import Run
    from aifab.train.checkpoint import latest_complete
    from helpers import TINY_TOKENIZER, write_corpus

    ingest(store, "tiny", DataSpec(sources=[str(write_corpus(tmp_path / "corpus"))], val_fraction=0.2), TINY_TOKENIZER)
    factory = tmp_path / "factory.yaml"
    factory.write_text(FACTORY)
    cmd = [sys.executable, "-m", "aifab", "train", "--dataset", "tiny", "--model", str(factory)]
    cmd += ["--config", str(factory), "--name", "survivor", "--steps", str(STEPS)]
    cp = plane()
    job_id = cp.submit(JobSpec(name="train", command=cmd, cpus=1, memory_gb=0.5, kind="train", env={"COLUMNS": "200"}))
    jdir = records.job_dir(store.home, job_id)
    run_id: list[str] = []

    def checkpointed() -> bool:
        run_id[:] = [(read_json(jdir / STATE_FILE) or {}).get("run_id")]
        return bool(run_id[0]) and latest_complete(store.work_dir("runs", run_id[0], "checkpoints")) is not None

    until(checkpointed, "a checkpoint of the training run", tick=cp.tick, timeout_s=120)
    first = read_json(jdir / LAUNCH_FILE)
    assert isinstance(first, dict) and first["attempt"] == 1
    doomed = next(n for n in cluster.worker_nodes if n.node_id == first["node_id"])
    cluster.remove_node(doomed, allow_graceful=False)  # the node dies: raylet, worker, actor and job process
    ckpt = latest_complete(store.work_dir("runs", run_id[0], "checkpoints"))
    assert ckpt is not None and 0 < ckpt.step < STEPS  # killed mid-run, after a checkpoint

    done = cp.wait(job_id, timeout_s=120)
    log = log_text(store, job_id)
    assert (done.status, done.attempts) == ("succeeded", 2), log[-3000:]
    trail = records.events(store, job_id)
    assert [e.event for e in trail] == ["submitted", "placed", "started", "lost", "placed", "started", "succeeded"]
    lost = next(e.detail for e in trail if e.event == "lost")
    assert (lost["attempt"], lost["exit_code"]) == (1, None)
    second = read_json(jdir / LAUNCH_FILE)
    assert isinstance(second, dict) and second["attempt"] == 2 and second["node_id"] != first["node_id"]
    alive = {n.name for n in cp.nodes}  # the pool was read again: the dead node is out of it
    assert len(alive) == 1 and not any(name.endswith(first["node_id"][:8]) for name in alive)
    assert f"resuming run {run_id[0]}" in log  # the same run, from its newest checkpoint
    assert read_json(jdir / STATE_FILE)["run_id"] == run_id[0]
    with store.db.session() as s:
        run = s.get(Run, run_id[0])
        assert run is not None
        assert (run.status, run.summary["steps"]) == ("completed", STEPS)
        assert s.query(Run).count() == 1  # no second run was started
    assert f"(run {run_id[0]})" in log  # registered from the resumed run
    assert str(first["child_pid"]) not in _live_pids()  # the lost attempt's process went with its node


def _live_pids() -> set[str]:
    return {p.name for p in Path("/proc").iterdir() if p.name.isdigit()}
