"""The stage contracts and the small pieces of the stage bodies: typed outputs refuse what lacks a field, a task
that is not one is a one-line error, cached outputs of an older shape are a miss, and the train body refuses an
unknown executor before any compute."""

import json
from dataclasses import asdict, fields
from pathlib import Path

import pytest

from aifab.errors import AifabError
from aifab.meter.ledger import Meter, Prices
from aifab.pipeline.cache import outputs_exist
from aifab.pipeline.contracts import DataOutput, EvalOutput, StageError, StageInput, Task, TrainOutput
from aifab.pipeline.stages import TrainRequest, budget_check, first_reason, train_stage
from aifab.spec import BudgetsSpec, ModelSpec, TrainingSpec
from aifab.store import Store
from helpers import aifab

PRICES = {"electricity_usd_per_kwh": 0.1, "grid_co2_g_per_kwh": 400.0, "pue": 1.2}


def eval_output() -> EvalOutput:
    return EvalOutput("run1", "d" * 64, 2.5, 12.2, 640, [{"prompt": "def ", "completion": "f():"}])


def test_an_output_survives_its_json_round_trip() -> None:
    out = eval_output()
    assert EvalOutput.from_json(json.loads(json.dumps(out.to_json()))) == out


def test_an_output_that_lacks_a_field_names_it() -> None:
    body = eval_output().to_json()
    del body["perplexity"], body["samples"]
    with pytest.raises(StageError, match="EvalOutput lacks perplexity, samples"):
        EvalOutput.from_json(body)
    with pytest.raises(StageError, match="must be a JSON object, got list"):
        EvalOutput.from_json([1, 2])


def test_a_task_round_trips_and_a_malformed_one_is_refused() -> None:
    task = Task("p", "evaluate", "evaluate", {"seed": 0}, {"train": StageInput("train", {"run_id": "r"})}, PRICES, "/x")
    assert Task.from_json(json.loads(json.dumps(task.to_json()))) == task
    assert task.upstream("train") == {"run_id": "r"}
    with pytest.raises(StageError, match="needs one `uses: data` stage upstream, got 0"):
        task.upstream("data")
    broken = task.to_json()
    del broken["prices"]
    with pytest.raises(StageError, match="--task is not a stage task"):
        Task.from_json(broken)


def test_aifab_stage_run_refuses_a_task_that_is_not_one(tmp_path: Path) -> None:
    proc = aifab("stage", "run", "--task", '{"stage": "x"}', home=tmp_path / "home")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --task is not a stage task") and "Traceback" not in proc.stderr


def test_cached_outputs_of_an_older_shape_are_a_miss(store: Store) -> None:
    """An older aifab's data outputs (no `files`, `elapsed_s`...) cannot feed today's train stage: rerun."""
    old = {"dataset_version_id": 1, "dataset": "d:1", "manifest_digest": "m", "tokenizer_digest": "t"}
    assert outputs_exist(store, "data", old) is False
    assert outputs_exist(store, "evaluate", eval_output().to_json()) is True  # evaluate leaves nothing else


def test_the_output_shapes_hold_what_the_trainer_and_ingest_report() -> None:
    """The train and data outputs are built from the trainer's and ingest's results field by field."""
    from aifab.data.ingest import IngestResult
    from aifab.train.trainer import TrainResult

    assert {f.name for f in fields(TrainResult)} <= {f.name for f in fields(TrainOutput)}
    shared = {f.name for f in fields(DataOutput)} & {f.name for f in fields(IngestResult)}
    assert shared >= {"dataset_version_id", "files", "tokens", "vocab_size", "elapsed_s"}


def test_stop_checks_combine_and_budgets_stop_training(store: Store) -> None:
    class Counter:
        name, device, estimated = "counter", "cpu", True

        def __init__(self) -> None:
            self.j = 0.0

        def energy_j(self) -> float:
            self.j += 10.0
            return self.j

        def busy_s(self) -> float:
            return 0.0

    meter = Meter(store.db, Prices(**PRICES), Counter())
    assert budget_check(meter, BudgetsSpec()) is None  # no budget: no check at all
    check = budget_check(meter, BudgetsSpec(energy_j=25.0))
    assert check is not None
    assert [check(), check(), check()] == [None, None, "energy budget"]  # 10, 20, then 30 J since it began
    assert first_reason(None, lambda: None, lambda: "preempted", lambda: "late")() == "preempted"
    assert first_reason()() is None


def test_the_train_body_refuses_an_unknown_executor_before_any_compute(store: Store) -> None:
    meter = Meter(store.db, Prices(**PRICES))
    req = TrainRequest(1, ModelSpec(), TrainingSpec(steps=1), executor="slurm")
    with pytest.raises(AifabError, match="unknown executor 'slurm': choose one of local, ray"):
        train_stage(store, meter, req)
    assert asdict(req)["executor"] == "slurm"
