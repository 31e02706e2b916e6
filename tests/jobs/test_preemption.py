"""Preemption round trip with a real CPU training job: SIGTERM -> checkpoint -> EXIT_PREEMPTED -> requeue ->
the higher-priority job runs -> the same run resumes from its checkpoint and finishes."""

import re
import sys
from pathlib import Path

import pytest

from aifab.data.ingest import ingest
from aifab.jobs import records
from aifab.jobs.attempt import STATE_FILE, read_json
from aifab.jobs.control import ControlPlane, ControlSettings
from aifab.jobs.records import JobSpec
from aifab.schedule.state import Node
from aifab.spec import DataSpec
from aifab.store import Store
from aifab.store.schema import Run
from helpers import TINY_TOKENIZER, until, write_corpus

FACTORY = """\
name: pre
model: {n_layer: 2, n_head: 2, d_model: 32, context_len: 32}
training: {batch_size: 8, eval_every: 100000, checkpoint_every: 100000, device: cpu, warmup_steps: 5}
"""
STEPS = 400


@pytest.mark.slow
def test_a_training_job_is_preempted_requeued_and_resumes_its_run(store: Store, tmp_path: Path) -> None:
    ingest(store, "tiny", DataSpec(sources=[str(write_corpus(tmp_path / "corpus"))], val_fraction=0.2), TINY_TOKENIZER)
    factory = tmp_path / "factory.yaml"
    factory.write_text(FACTORY)
    train_cmd = [sys.executable, "-m", "aifab", "train", "--dataset", "tiny", "--model", str(factory)]
    train_cmd += ["--config", str(factory), "--name", "pre", "--steps", str(STEPS)]
    # one GPU id (fake: the trainer runs on CPU) is the only slot, so the two jobs cannot run side by side
    cp = ControlPlane(store, ControlSettings([Node("n1", (0,), 4.0, 16.0)], poll_s=0.05))
    try:
        wide = {"COLUMNS": "200"}  # the trainer's report on one line each
        low = cp.submit(
            JobSpec(name="low", command=train_cmd, gpus=1, priority=0, preemptible=True, kind="train", env=wide)
        )
        state = records.job_dir(store.home, low) / STATE_FILE
        until(lambda: (read_json(state) or {}).get("run_id"), "the training run to exist", tick=cp.tick, timeout_s=180)
        run_id = read_json(state)["run_id"]
        high = cp.submit(JobSpec(name="high", command=[sys.executable, "-c", "print('high ran')"], gpus=1, priority=10))
        done_high = cp.wait(high, timeout_s=180)
        assert done_high.status == "succeeded"
        assert records.get(store, low).status in ("pending", "running")  # requeued, maybe restarted already
        done_low = cp.wait(low, timeout_s=300)
    finally:
        for job in records.list_jobs(store, ("running",)):
            if job.handle:
                cp.executor.kill(job.handle)
        cp.close()

    log = records.log_path(store, low).read_text()
    assert done_low.status == "succeeded", log[-3000:]
    assert (done_low.attempts, done_low.preemptions) == (2, 1)
    trail = [e.event for e in records.events(store, low)]
    assert trail.count("preempting") == 1 and trail.count("preempted") == 1
    preempted = next(e.detail for e in records.events(store, low) if e.event == "preempted")
    assert preempted["exit_code"] == 75  # EXIT_PREEMPTED: checkpointed, not killed
    # the high-priority job ran while the training job waited
    high_events = records.events(store, high)
    assert high_events[1].at > next(e.at for e in records.events(store, low) if e.event == "preempted")
    # attempt 1 stopped at a step > 0 with a checkpoint; attempt 2 resumed that run, not a new one
    stopped = re.search(rf"run {run_id} preempted at step (\d+)", log)
    assert stopped is not None, log[-3000:]
    assert 0 < int(stopped.group(1)) < STEPS
    assert f"resuming run {run_id}" in log
    assert read_json(records.job_dir(store.home, low) / STATE_FILE)["run_id"] == run_id
    with store.db.session() as s:
        run = s.get(Run, run_id)
        assert run is not None
        assert (run.status, run.summary["steps"], run.summary["stopped_by"]) == ("completed", STEPS, "steps")
        assert s.query(Run).count() == 1  # no second run was started
    assert f"(run {run_id})" in log  # registered from the resumed run
