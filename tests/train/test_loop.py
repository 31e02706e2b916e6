"""The loop's pure parts: when it stops, how much of the budget is spent, and what a run's summary holds."""

from dataclasses import asdict, fields

import pytest

from aifab.spec import TrainingSpec
from aifab.store.schema import RunStatus
from aifab.train.loop import LoopState, budget_used, stop_reason
from aifab.train.record import RunSummary
from aifab.train.trainer import PREEMPTED, TrainResult


def never() -> str | None:
    return None


def test_the_first_budget_reached_stops_the_run() -> None:
    both = TrainingSpec(steps=10, seconds=60.0)
    assert stop_reason(9, 59.0, both, never) == ""
    assert stop_reason(10, 1.0, both, never) == "steps"
    assert stop_reason(3, 60.0, both, never) == "seconds"
    assert stop_reason(3, 1.0, both, lambda: "energy budget") == "energy budget"
    reason = stop_reason(3, 1.0, both, lambda: PREEMPTED)
    assert reason == "preempted" and type(reason) is str  # stored and sent as JSON: a plain string


def test_budget_used_is_the_larger_share() -> None:
    assert budget_used(5, 0.0, TrainingSpec(steps=10, seconds=None)) == 0.5
    assert budget_used(5, 30.0, TrainingSpec(steps=10, seconds=40.0)) == 0.75
    assert budget_used(0, 20.0, TrainingSpec(steps=None, seconds=40.0)) == 0.5


def test_a_step_advances_the_counters() -> None:
    state = LoopState(t0=0.0)
    state.advance(2.5, 0.1, 128)
    state.advance(2.0, 0.2, 128)
    assert (state.step, state.tokens, state.loss) == (2, 256, 2.0)
    assert state.train_s == pytest.approx(0.3)


def test_the_summary_keys_are_the_stored_contract() -> None:
    """Run.summary is read by key elsewhere (the CLI, tests, the orchestrator): its keys do not change."""
    keys = [f.name for f in fields(RunSummary)]
    assert keys == [
        "steps", "tokens", "train_loss_final", "val_loss_initial", "val_loss_final", "tokens_per_s", "train_s",
        "stopped_by", "mfu", "flops_per_token", "peak_flops", "device", "dtype", "compiled", "window",
        "lora_digest",
    ]  # fmt: skip
    summary = RunSummary(3, 96, 4.0, 5.0, 4.5, 10.0, 9.6, "steps", None, 100, None, "cpu", "fp32", False, 32, None)
    assert list(asdict(summary)) == keys
    # every summary field a TrainResult carries has the same name there
    shared = {f.name for f in fields(TrainResult)} & set(keys)
    assert shared == {"steps", "tokens", "tokens_per_s", "val_loss_initial", "val_loss_final", "stopped_by", "mfu",
                      "lora_digest"}  # fmt: skip


def test_run_statuses_are_the_stored_strings() -> None:
    assert [s.value for s in RunStatus] == ["running", "completed", "failed", "preempted"]
    assert PREEMPTED == RunStatus.PREEMPTED == "preempted"
