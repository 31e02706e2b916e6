"""Job records and the in-job helpers: validation names the field, each change is one row plus an event."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from aifab.errors import AifabError, NotFound
from aifab.jobs import attempt, records
from aifab.jobs.records import EventKind, JobConflict, JobSpec, JobStatus
from aifab.schedule.state import Share
from aifab.store import Store
from aifab.store.schema import Job, JobEvent


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"command": []}, "command"),
        ({"command": ["x"], "gpus": -1}, "gpus"),
        ({"command": ["x"], "cpus": float("nan")}, "cpus"),
        ({"command": ["x"], "project": "no spaces"}, "project"),
        ({"command": ["x"], "kind": "party"}, "kind"),
        ({"command": ["x"], "env": {"AIFAB_JOB_ID": "3"}}, "env"),
        ({"command": ["x"], "colour": "red"}, "colour"),
    ],
)
def test_bad_spec_names_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(AifabError, match=f"job spec: {field}"):
        JobSpec.parse(data)


def test_submit_writes_a_pending_row_and_its_event(store: Store) -> None:
    job_id = records.submit(store, JobSpec(command=["/bin/echo", "hi"], priority=3, project="research"))
    info = records.get(store, job_id)
    assert (info.status, info.name, info.priority, info.project, info.attempts) == ("pending", "echo", 3, "research", 0)
    assert info.log_path == str(store.home / "jobs" / str(job_id) / "job.log")
    assert [e.event for e in records.events(store, job_id)] == ["submitted"]
    assert info.to_dict()["submitted_at"].startswith(str(info.submitted_at.year))


def test_transition_only_from_the_expected_state(store: Store) -> None:
    job_id = records.submit(store, JobSpec(command=["true"]))
    assert not records.transition(store, job_id, "succeeded", expect=("running",), status="succeeded")
    assert records.get(store, job_id).status == "pending"
    assert records.transition(store, job_id, "placed", {"attempt": 1}, expect=("pending",), status="running")
    assert records.get(store, job_id).status == "running"
    assert [e.event for e in records.events(store, job_id)] == ["submitted", "placed"]


def test_cancel_pending_running_and_finished(store: Store) -> None:
    pending = records.submit(store, JobSpec(command=["true"]))
    assert records.cancel(store, pending).status == "cancelled"
    assert records.cancel(store, pending).status == "cancelled"  # again: a no-op
    running = records.submit(store, JobSpec(command=["true"]))
    records.transition(store, running, "placed", expect=("pending",), status="running")
    info = records.cancel(store, running)
    assert (info.status, info.cancel_requested) == ("running", True)  # the control plane stops it
    done = records.submit(store, JobSpec(command=["true"]))
    records.transition(store, done, "succeeded", status="succeeded")
    with pytest.raises(JobConflict, match=f"job {done} already succeeded"):
        records.cancel(store, done)
    with pytest.raises(NotFound, match="unknown job 999"):
        records.get(store, 999)


def test_list_and_counts(store: Store) -> None:
    ids = [records.submit(store, JobSpec(command=["true"], project=p)) for p in ("a", "b", "a")]
    records.cancel(store, ids[0])
    assert [j.id for j in records.list_jobs(store)] == ids
    assert [j.id for j in records.list_jobs(store, ("pending",), project="a")] == [ids[2]]
    assert [j.id for j in records.list_jobs(store, limit=2)] == ids[1:]
    assert records.counts_by_status(store) == {"cancelled": 1, "pending": 2}


def test_attempt_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AIFAB_JOB_ID", "AIFAB_JOB_ATTEMPT", "AIFAB_JOB_DIR"):
        monkeypatch.delenv(key, raising=False)
    assert attempt.current() is None
    with pytest.raises(AifabError, match="not inside a job"):
        attempt.remember("k", 1)
    monkeypatch.setenv("AIFAB_JOB_DIR", str(tmp_path / "job"))
    monkeypatch.setenv("AIFAB_JOB_ID", "x")
    with pytest.raises(AifabError, match="must be integers"):
        attempt.current()
    monkeypatch.setenv("AIFAB_JOB_ID", "7")
    monkeypatch.setenv("AIFAB_JOB_ATTEMPT", "2")
    assert attempt.current() == attempt.Attempt(7, 2, tmp_path / "job")
    assert attempt.recall("run_id") is None
    attempt.remember("run_id", "abc")
    attempt.remember("step", 5)
    assert (attempt.recall("run_id"), attempt.recall("step")) == ("abc", 5)
    attempt.write_result({"digest": "d"})
    assert attempt.read_json(tmp_path / "job" / attempt.RESULT_FILE) == {"digest": "d"}
    with pytest.raises(AifabError, match="JSON object"):
        attempt.write_result(["not", "a", "dict"])  # type: ignore[arg-type]
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["result.json", "state.json"]  # no temp left


def test_preemption_check_turns_sigterm_into_a_stop_reason() -> None:
    before = signal.getsignal(signal.SIGTERM)
    try:
        check = attempt.preemption_check()
        assert check() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert check() == "preempted"
    finally:
        signal.signal(signal.SIGTERM, before)


def test_totals_count_preemptions_and_retries_over_every_job(store: Store) -> None:
    a, b = (records.submit(store, JobSpec(command=["true"])) for _ in range(2))
    assert records.totals(store) == records.JobTotals(preemptions=0, retries=0)
    records.transition(store, a, "preempted", {"attempt": 1}, preemptions=2)
    records.transition(store, b, "preempted", {"attempt": 1}, preemptions=1)
    for job_id in (a, b, b):
        records.transition(store, job_id, "retrying", {"attempt": 1})
    assert records.totals(store) == records.JobTotals(preemptions=3, retries=3)


def test_statuses_and_events_keep_the_strings_of_stored_rows_and_of_the_api(store: Store) -> None:
    assert [s.value for s in JobStatus] == ["pending", "running", "succeeded", "failed", "cancelled"]
    assert records.TERMINAL == ("succeeded", "failed", "cancelled") and records.ACTIVE == ("pending", "running")
    job_id = records.submit(store, JobSpec(command=["true"]))
    records.cancel(store, job_id)
    with store.db.session() as s:
        stored = s.scalar(select(Job.status).where(Job.id == job_id))
        trail = list(s.scalars(select(JobEvent.event).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
    assert (type(stored), stored, trail) == (str, "cancelled", ["submitted", "cancelled"])
    shown = json.loads(json.dumps(records.describe(store, job_id)))
    assert (shown["status"], [e["event"] for e in shown["events"]]) == ("cancelled", ["submitted", "cancelled"])
    assert sorted(shown["events"][0]) == ["at", "detail", "event"]
    assert shown["events"][0]["at"] == records.events(store, job_id)[0].at.isoformat()


def test_a_placement_is_stored_as_json_and_read_back(store: Store) -> None:
    placement = (Share("a", (0, 1), 4.0, 8.0), Share("b", (3,), 2.0, 4.0))
    where = records.placement_record(placement)
    assert where == {
        "node": "a",
        "gpu_ids": [0, 1, 3],
        "shares": [
            {"node": "a", "gpu_ids": [0, 1], "cpus": 4.0, "memory_gb": 8.0},
            {"node": "b", "gpu_ids": [3], "cpus": 2.0, "memory_gb": 4.0},
        ],
    }
    job_id = records.submit(store, JobSpec(command=["true"]))
    assert records.get(store, job_id).shares() == ()
    records.transition(store, job_id, EventKind.PLACED, status=JobStatus.RUNNING, placement=where)
    assert records.get(store, job_id).shares() == placement


def test_jobs_never_import_pipelines() -> None:
    """pipeline -> jobs -> schedule: importing every module of jobs/ loads no pipeline module."""
    modules = ", ".join(
        f"aifab.jobs.{m}"
        for m in ("records", "control", "executors", "ray_executor", "launch", "attempt", "service", "client")
    )
    code = f"import sys, {modules}; print(' '.join(sorted(m for m in sys.modules if m.startswith('aifab.pipeline'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
