import math
from pathlib import Path

import pytest
from sqlalchemy import select

from aifab.data.ingest import ingest
from aifab.errors import TrainError
from aifab.spec import DataSpec, ModelSpec, TrainingSpec
from aifab.store import Store
from aifab.store.lineage import upstream
from aifab.store.schema import Run, RunMetric
from aifab.train.lr import lr_at
from aifab.train.trainer import model_config_for, train
from helpers import TINY_MODEL, TINY_TOKENIZER

STEPS = TrainingSpec(steps=12, seconds=None, batch_size=4, eval_every=5, checkpoint_every=5, warmup_steps=2)


@pytest.fixture
def dataset(store: Store, corpus: Path) -> int:
    return ingest(store, "tiny", DataSpec(sources=[str(corpus)], val_fraction=0.2), TINY_TOKENIZER).dataset_version_id


def metrics(store: Store, run_id: str, key: str) -> list[tuple[int, float]]:
    with store.db.session() as s:
        rows = s.scalars(select(RunMetric).where(RunMetric.run_id == run_id, RunMetric.key == key))
        return sorted((m.step, m.value) for m in rows)


def test_a_run_records_status_history_checkpoint_and_lineage(store: Store, dataset: int) -> None:
    from aifab.nn.weights import from_bytes

    r = train(store, dataset, TINY_MODEL, STEPS)
    assert r.steps == 12 and r.stopped_by == "steps" and r.tokens == 12 * 4 * 32
    with store.db.session() as s:
        run = s.get(Run, r.run_id)
        assert run is not None
        assert run.status == "completed" and run.checkpoint_digest == r.checkpoint_digest
        assert run.elapsed_s is not None and run.started_at is not None and run.ended_at is not None
        assert run.params["training"]["steps"] == 12
        assert upstream(s, "run", r.run_id) == [("dataset", str(dataset), "input")]
    assert [step for step, _ in metrics(store, r.run_id, "train_loss")] == list(range(1, 13))
    assert [step for step, _ in metrics(store, r.run_id, "val_loss")] == [0, 5, 10, 12]
    lrs = [v for _, v in metrics(store, r.run_id, "lr")]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[2]  # warmup, then decay
    model = from_bytes(store.artifacts.get_bytes(r.checkpoint_digest))
    assert model.config.to_dict() == r.model_config


def test_training_lowers_validation_loss(store: Store, dataset: int) -> None:
    r = train(store, dataset, TINY_MODEL, STEPS.model_copy(update={"steps": 40, "lr": 1e-2}))
    assert r.val_loss_final < r.val_loss_initial * 0.9


def test_same_seed_same_losses(store: Store, dataset: int) -> None:
    a = train(store, dataset, TINY_MODEL, STEPS)
    b = train(store, dataset, TINY_MODEL, STEPS)
    assert metrics(store, a.run_id, "train_loss") == metrics(store, b.run_id, "train_loss")
    assert a.checkpoint_digest == b.checkpoint_digest


def test_stop_check_ends_the_run_after_at_least_one_step(store: Store, dataset: int) -> None:
    r = train(store, dataset, TINY_MODEL, STEPS, stop_check=lambda: "energy budget")
    assert (r.steps, r.stopped_by) == (1, "energy budget")


def test_time_budget_ends_the_run(store: Store, dataset: int) -> None:
    r = train(store, dataset, TINY_MODEL, STEPS.model_copy(update={"steps": None, "seconds": 0.5}))
    assert r.stopped_by == "seconds" and r.steps >= 1


def test_a_failure_marks_the_run_failed(store: Store, dataset: int) -> None:
    def boom() -> str | None:
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        train(store, dataset, TINY_MODEL, STEPS, stop_check=boom)
    with store.db.session() as s:
        (run,) = s.scalars(select(Run)).all()
        assert run.status == "failed" and run.error is not None and "disk on fire" in run.error


def test_bad_inputs_fail_before_any_run_exists(store: Store, dataset: int) -> None:
    with pytest.raises(TrainError, match="dataset too small"):
        train(store, dataset, ModelSpec(n_layer=1, n_head=1, d_model=8, context_len=100_000), STEPS)
    with pytest.raises(TrainError, match="divisible"):
        train(store, dataset, ModelSpec(n_head=3, d_model=32, context_len=16), STEPS)
    with pytest.raises(TrainError, match="does not exist"):
        train(store, 999, TINY_MODEL, STEPS)
    with pytest.raises(TrainError, match="budget"):
        train(store, dataset, TINY_MODEL, STEPS.model_copy(update={"steps": None, "seconds": None}))
    with store.db.session() as s:
        assert s.scalars(select(Run)).all() == []


def test_model_config_for_applies_overrides_to_the_preset() -> None:
    cfg = model_config_for(ModelSpec(preset="tiny", n_layer=2), vocab_size=500)
    assert (cfg.vocab_size, cfg.n_layer, cfg.d_model) == (500, 2, 128)


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    assert lr_at(0, 0.0, 1.0, 4, 0.1) == pytest.approx(0.25)
    assert lr_at(3, 0.0, 1.0, 4, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 0.0, 1.0, 4, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 0.5, 1.0, 4, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert lr_at(10, 1.0, 1.0, 4, 0.1) == pytest.approx(0.1)
    assert lr_at(10, 7.0, 1.0, 4, 0.1) == pytest.approx(0.1)  # progress past the budget stays at the floor
