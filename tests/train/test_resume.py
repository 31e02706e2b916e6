import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from aifab.data.ingest import ingest
from aifab.errors import NotFound, TrainError
from aifab.spec import DataSpec, TrainingSpec
from aifab.store import Store
from aifab.store.schema import Run, RunMetric
from aifab.train.checkpoint import MARKER, checkpoints
from aifab.train.trainer import PREEMPTED, resume, train
from helpers import TINY_MODEL, TINY_TOKENIZER, aifab, cli_env, write_corpus

STEPS = TrainingSpec(
    steps=23, seconds=None, batch_size=4, eval_every=5, eval_batches=2, checkpoint_every=5, warmup_steps=3
)


@pytest.fixture
def dataset(store: Store, corpus: Path) -> int:
    return ingest(store, "tiny", DataSpec(sources=[str(corpus)], val_fraction=0.2), TINY_TOKENIZER).dataset_version_id


def history(store: Store, run_id: str) -> dict[str, list[tuple[int, float]]]:
    with store.db.session() as s:
        rows = list(s.scalars(select(RunMetric).where(RunMetric.run_id == run_id)))
    out: dict[str, list[tuple[int, float]]] = {}
    for m in sorted(rows, key=lambda m: (m.key, m.step)):
        out.setdefault(m.key, []).append((m.step, m.value))
    return out


def crash_after(store: Store, dataset: int, steps_before_crash: int) -> str:
    """Start a run that dies (as a failure) after `steps_before_crash` steps; return its id."""
    calls = iter(range(10_000))

    def crash() -> str | None:
        if next(calls) >= steps_before_crash:
            raise RuntimeError("node lost")
        return None

    with pytest.raises(RuntimeError, match="node lost"):
        train(store, dataset, TINY_MODEL, STEPS, stop_check=crash)
    with store.db.session() as s:
        (run,) = s.scalars(select(Run).where(Run.status == "failed")).all()
        return run.id


def test_a_crashed_run_resumes_to_the_same_losses_and_weights(store: Store, dataset: int) -> None:
    full = train(store, dataset, TINY_MODEL, STEPS)
    run_id = crash_after(store, dataset, 13)  # checkpoints at 5 and 10; steps 11-13 are lost
    r = resume(store, run_id)
    assert r.run_id == run_id and r.steps == 23 and r.tokens == full.tokens
    resumed, uninterrupted = history(store, run_id), history(store, full.run_id)
    # the rates are timings (they differ run to run); every other series is bit-identical
    rates = ("tokens_per_s", "mfu")
    assert [s for s, _ in resumed.pop("tokens_per_s")] == list(range(1, 24))  # one per step: none lost or doubled
    assert {k: v for k, v in resumed.items() if k not in rates} == {
        k: v for k, v in uninterrupted.items() if k not in rates
    }
    assert r.checkpoint_digest == full.checkpoint_digest
    assert r.val_loss_initial == full.val_loss_initial and r.val_loss_final == full.val_loss_final
    with store.db.session() as s:
        run = s.get(Run, run_id)
        assert run is not None and run.status == "completed" and run.error is None
    assert [step for step, _ in checkpoints(store.work_dir("runs", run_id, "checkpoints"))] == [15, 20, 23]


def test_a_preempted_run_names_itself_at_once_and_resumes_where_it_stopped(store: Store, dataset: int) -> None:
    """Preemption (the control plane wants the devices): the stop saves a checkpoint, the run is `preempted`,
    not completed, and resuming it finishes the same run. `on_run` names the run before the first step."""
    named: list[str] = []
    calls = iter(range(10_000))
    stopped = train(
        store, dataset, TINY_MODEL, STEPS, stop_check=lambda: PREEMPTED if next(calls) >= 7 else None,
        on_run=named.append,
    )  # fmt: skip
    assert named == [stopped.run_id] and stopped.stopped_by == PREEMPTED and stopped.steps == 7
    with store.db.session() as s:
        run = s.get(Run, stopped.run_id)
        assert run is not None and run.status == PREEMPTED
    again: list[str] = []
    r = resume(store, stopped.run_id, on_run=again.append)
    assert again == [stopped.run_id] and r.run_id == stopped.run_id and r.steps == 23
    assert [s for s, _ in history(store, r.run_id)["train_loss"]] == list(range(1, 24))
    with store.db.session() as s:
        run = s.get(Run, r.run_id)
        assert run is not None and run.status == "completed"


def test_a_torn_newest_checkpoint_falls_back_to_the_previous(
    store: Store, dataset: int, capsys: pytest.CaptureFixture[str]
) -> None:
    full = train(store, dataset, TINY_MODEL, STEPS)
    run_id = crash_after(store, dataset, 17)
    ckpt_dir = store.work_dir("runs", run_id, "checkpoints")
    (ckpt_dir / "step-000015" / MARKER).unlink()
    r = resume(store, run_id)
    assert "warning: skipping checkpoint" in capsys.readouterr().err
    assert history(store, run_id)["train_loss"] == history(store, full.run_id)["train_loss"]
    assert r.checkpoint_digest == full.checkpoint_digest


def test_resume_never_unpickles(store: Store, dataset: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    run_id = crash_after(store, dataset, 7)

    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("unpickling is forbidden")

    for mod, attr in ((pickle, "loads"), (pickle, "load"), (torch, "load")):
        monkeypatch.setattr(mod, attr, refuse)
    assert resume(store, run_id).steps == 23


def test_resume_refuses_unknown_completed_and_checkpointless_runs(store: Store, dataset: int) -> None:
    with pytest.raises(NotFound, match="unknown training run"):
        resume(store, "nosuchrun")
    done = train(store, dataset, TINY_MODEL, STEPS.model_copy(update={"steps": 3}))
    with pytest.raises(TrainError, match="already completed"):
        resume(store, done.run_id)
    early = crash_after(store, dataset, 2)  # dies before its first checkpoint
    with pytest.raises(TrainError, match="no complete checkpoint"):
        resume(store, early)


def test_a_time_budget_counts_the_time_before_the_crash(store: Store, dataset: int) -> None:
    run_id = crash_after(store, dataset, 12)
    ckpt = store.work_dir("runs", run_id, "checkpoints") / "step-000010" / "state.json"
    state = json.loads(ckpt.read_text())
    state["elapsed_s"] = 1e6  # pretend the first session used far more than the budget
    ckpt.write_text(json.dumps(state))
    r = resume(store, run_id, seconds=5.0)
    assert r.stopped_by == "seconds" and r.steps == 10  # nothing left to spend: it stops at the checkpoint


# ---- the real thing: a real process, a real SIGKILL ------------------------------------------------------

RESUME_STEPS = 100
CONFIG = f"""
data:
  val_fraction: 0.2
tokenizer:
  vocab_size: {TINY_TOKENIZER.vocab_size}
  min_frequency: {TINY_TOKENIZER.min_frequency}
model:
  n_layer: {TINY_MODEL.n_layer}
  n_head: {TINY_MODEL.n_head}
  d_model: {TINY_MODEL.d_model}
  context_len: {TINY_MODEL.context_len}
training:
  steps: {RESUME_STEPS}
  seconds: null
  batch_size: 4
  eval_every: 10
  eval_batches: 2
  checkpoint_every: 5
  warmup_steps: 5
"""


def complete_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in a directory another process is writing and pruning."""
    try:
        names = os.listdir(ckpt_dir)
    except FileNotFoundError:
        return []
    return [int(n[5:]) for n in names if n.startswith("step-") and (ckpt_dir / n / MARKER).exists()]


def run_history(home: Path, run_id: str) -> dict[str, Any]:
    shown = aifab("runs", "show", run_id, "--json", home=home)
    assert shown.returncode == 0, shown.stderr
    body: dict[str, Any] = json.loads(shown.stdout.strip().splitlines()[-1])
    return body


@pytest.mark.slow
def test_a_run_killed_with_sigkill_at_a_random_step_resumes_bit_identically(tmp_path: Path) -> None:
    home, cfg = tmp_path / "home", tmp_path / "factory.yaml"
    cfg.write_text(CONFIG)
    corpus = write_corpus(tmp_path / "corpus")
    assert aifab("ingest", str(corpus), "--name", "tiny", "--config", str(cfg), home=home).returncode == 0
    args = ("train", "--dataset", "tiny", "--model", str(cfg), "--config", str(cfg), "--name", "m", "--json")

    full = aifab(*args, home=home)
    assert full.returncode == 0, full.stderr
    full_run = json.loads(full.stdout.strip().splitlines()[-1])

    victim = subprocess.Popen(
        [sys.executable, "-m", "aifab", *args],
        env=cli_env(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    runs = home / "work" / "runs"
    target = random.randrange(5, RESUME_STEPS - 30, 5)  # a random checkpoint, then a random step after it
    deadline = time.monotonic() + 120
    while True:
        assert victim.poll() is None and time.monotonic() < deadline, f"training ended before step {target}"
        mine = [d for d in runs.glob("*") if d.name != full_run["run_id"]] if runs.is_dir() else []
        if mine and max(complete_steps(mine[0] / "checkpoints"), default=0) >= target:
            break
        time.sleep(0.002)
    time.sleep(random.uniform(0.0, 0.04))  # a few steps at most
    assert victim.poll() is None, "training finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    run_id = mine[0].name
    killed = run_history(home, run_id)
    assert killed["status"] == "running"  # what SIGKILL leaves behind: no handler ran
    steps_before = len(killed["metrics"].get("train_loss", []))
    assert steps_before < RESUME_STEPS

    resumed = aifab("train", "--resume", run_id, "--name", "m", "--json", home=home)
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["run_id"] == run_id and result["steps"] == RESUME_STEPS

    a, b = run_history(home, full_run["run_id"]), run_history(home, run_id)
    assert b["status"] == "completed"
    for key in ("train_loss", "lr", "val_loss"):
        want = [(p["step"], p["value"]) for p in a["metrics"][key]]
        got = [(p["step"], p["value"]) for p in b["metrics"][key]]
        assert got == want, key  # bit-identical, every step, no duplicates
    assert len(b["metrics"]["train_loss"]) == RESUME_STEPS
    assert result["checkpoint_digest"] == full_run["checkpoint_digest"]

    models = aifab("models", "--name", "m", home=home)
    assert models.returncode == 0 and "m:1" in models.stdout and "m:2" in models.stdout and run_id in models.stdout

    again = aifab("train", "--resume", run_id, "--name", "m", home=home)
    assert again.returncode == 2 and "already completed" in again.stderr and "Traceback" not in again.stderr
    unknown = aifab("train", "--resume", "nosuchrun", "--name", "m", home=home)
    assert unknown.returncode == 2 and "unknown training run" in unknown.stderr


def test_train_cli_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cases = [
        (("--dataset", "tiny", "--model", "tiny", "--steps", "3", "--seconds", "3"), "one budget"),
        (("--dataset", "tiny", "--model", "huge"), "unknown model 'huge'"),
        (("--dataset", "tiny", "--model", str(tmp_path / "missing.yaml")), "file not found"),
        (("--model", "tiny"), "--dataset is required"),
        (("--dataset", "nosuch", "--model", "tiny"), "unknown dataset 'nosuch'"),
        (("--resume", "abc", "--dataset", "tiny"), "drop --dataset"),
    ]
    for args, message in cases:
        r = aifab("train", "--name", "m", *args, home=home)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
