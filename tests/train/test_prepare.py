"""`prepare` decides a run without writing anything: the start mode, the window, the device and the strategy."""

from pathlib import Path

import pytest
from sqlalchemy import select

from aifab.data.ingest import ingest
from aifab.spec import DataSpec, TrainingSpec
from aifab.store import Store
from aifab.store.schema import Run, RunMetric, RunStatus
from aifab.train.prepare import RunParams, choose_strategy, prepare
from aifab.train.trainer import train
from helpers import TINY_MODEL, TINY_TOKENIZER

STEPS = TrainingSpec(steps=14, seconds=None, batch_size=4, eval_every=100, eval_batches=1, checkpoint_every=7)


@pytest.fixture
def dataset(store: Store, corpus: Path) -> int:
    return ingest(store, "tiny", DataSpec(sources=[str(corpus)], val_fraction=0.2), TINY_TOKENIZER).dataset_version_id


def test_a_fresh_setup_is_decided_without_a_run_row(store: Store, dataset: int) -> None:
    setup = prepare(store, dataset, TINY_MODEL, STEPS)
    assert (setup.start, setup.strategy, setup.window, setup.run_id) == ("fresh", "single", 32, None)
    assert setup.config.vocab_size == TINY_TOKENIZER.vocab_size and setup.lora is None
    assert 0 < setup.need_bytes <= setup.have_bytes and setup.trainable_params == setup.n_params
    assert setup.params.init is None and setup.params.training == STEPS
    with store.db.session() as s:
        assert s.scalars(select(Run)).all() == []


def test_preparing_a_resume_leaves_the_failed_run_as_it_was(store: Store, dataset: int) -> None:
    """The run is reopened (metrics after the checkpoint dropped, status running) only once the run starts."""
    calls = iter(range(100))

    def crash() -> str | None:
        if next(calls) >= 12:  # after step 12: the checkpoint at 7 survives, the metrics to step 10 were written
            raise RuntimeError("node lost")
        return None

    with pytest.raises(RuntimeError):
        train(store, dataset, TINY_MODEL, STEPS, stop_check=crash)
    with store.db.session() as s:
        (run,) = s.scalars(select(Run)).all()
        run_id, status = run.id, run.status
        steps = sorted({m.step for m in s.scalars(select(RunMetric).where(RunMetric.run_id == run_id))})
    assert status == RunStatus.FAILED == "failed" and steps[-1] == 10
    setup = prepare(store, dataset, TINY_MODEL, STEPS, resume_run_id=run_id)
    assert setup.start == "resume" and setup.run_id == run_id
    assert setup.resume_from is not None and setup.resume_from.step == 7
    assert setup.resume_state is not None and setup.resume_state.run_id == run_id
    with store.db.session() as s:
        run = s.get(Run, run_id)
        assert run is not None and run.status == "failed"
        after = sorted({m.step for m in s.scalars(select(RunMetric).where(RunMetric.run_id == run_id))})
    assert after == steps


def test_the_strategy_follows_the_spec_and_the_memory_floor() -> None:
    auto, fsdp = TrainingSpec(), TrainingSpec(parallel="fsdp")
    assert choose_strategy(auto, 1, fits_one_device=False) == "single"
    assert choose_strategy(auto, 2, fits_one_device=True) == "ddp"
    assert choose_strategy(auto, 2, fits_one_device=False) == "fsdp"
    assert choose_strategy(fsdp, 2, fits_one_device=True) == "fsdp"
    assert choose_strategy(TrainingSpec(parallel="ddp"), 2, fits_one_device=False) == "ddp"


def test_run_params_keep_their_json_keys_and_read_runs_without_a_window() -> None:
    from aifab.nn.config import LoraConfig, ModelConfig
    from aifab.train.prepare import FineTune

    config = ModelConfig(vocab_size=300, n_layer=2, n_head=2, d_model=32, context_len=64)
    init = FineTune("base:1", "w" * 64, "t" * 64, LoraConfig(rank=2)).to_params()
    params = RunParams(config, STEPS, 7, 32, init)
    stored = params.to_json()
    assert list(stored) == ["model", "training", "dataset_version_id", "window", "init"]
    assert stored["model"] == config.to_dict() and stored["training"] == STEPS.model_dump()
    assert RunParams.from_json(stored) == params and params.lora == LoraConfig(rank=2)
    old = RunParams.from_json({"model": config.to_dict(), "training": {}, "dataset_version_id": 7})
    assert (old.window, old.init, old.lora) == (64, None, None)
