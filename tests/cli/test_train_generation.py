"""`aifab train` registers a fine-tune with its base's generation settings (BOS/EOS, chat template), also when the
fine-tune is resumed, and a model trained from scratch with none. Training itself is replaced by a stub: what is
tested is what the verb registers."""

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aifab.registry.models import register, resolve
from aifab.store import Store
from aifab.store.schema import Run
from aifab.train.trainer import TrainResult
from helpers import dataset_row

GENERATION = {
    "bos_token_id": 1,
    "eos_token_ids": [2, 32000],
    "add_bos": True,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "chat_template": "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}",
}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store with dataset `corpus`, model `base:1` (with GENERATION) and training stubbed out: each call adds
    a completed run `r<n>` whose result is registered by the verb."""
    import aifab.train.trainer as trainer

    home = tmp_path / "home"
    store = Store(home)
    weights = store.artifacts.put_bytes(b"weights")
    tokenizer = store.artifacts.put_bytes(b"tokenizer")
    with store.db.session() as s:
        s.add(dataset_row(name="corpus", tokenizer_digest=tokenizer))
    register(
        store,
        "base",
        weights_digest=weights,
        tokenizer_digest=tokenizer,
        config={},
        params_count=1,
        metrics={},
        generation=GENERATION,
    )
    store.close()

    def result(run_id: str) -> TrainResult:
        return TrainResult(run_id, weights, tokenizer, {}, 1, 1, 1, 0.1, 10.0, 2.0, 1.0, "steps")

    def fake_train(store: Store, *args: Any, base: Any = None, **kwargs: Any) -> TrainResult:
        with store.db.session() as s:
            run_id = f"r{len(s.query(Run).all()) + 1}"
            init = base.to_params() if base is not None else None
            s.add(Run(id=run_id, kind="train", status="completed", params={"init": init}))
        return result(run_id)

    def fake_resume(store: Store, run_id: str, **kwargs: Any) -> TrainResult:
        return result(run_id)

    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.setattr(trainer, "resume", fake_resume)
    return home


def train(home: Path, *args: str) -> None:
    from aifab.cli import app

    got = CliRunner().invoke(app, ["--home", str(home), "train", *args])
    assert got.exit_code == 0, (got.output, got.exception)


def generation_of(home: Path, ref: str) -> dict[str, Any] | None:
    store = Store(home)
    try:
        return resolve(store, ref).generation
    finally:
        store.close()


def test_a_fine_tune_inherits_its_base_generation_and_a_scratch_model_has_none(home: Path) -> None:
    train(home, "--dataset", "corpus", "--from", "base", "--name", "ft")
    assert generation_of(home, "ft:1") == GENERATION
    train(home, "--dataset", "corpus", "--model", "tiny", "--name", "scratch")
    assert generation_of(home, "scratch:1") == {}


def test_a_resumed_fine_tune_inherits_too(home: Path) -> None:
    train(home, "--dataset", "corpus", "--from", "base:1", "--name", "ft")  # run r1, from base:1
    train(home, "--dataset", "corpus", "--model", "tiny", "--name", "scratch")  # run r2, from scratch
    train(home, "--resume", "r1", "--name", "ft")
    assert generation_of(home, "ft:2") == GENERATION
    train(home, "--resume", "r2", "--name", "scratch")
    assert generation_of(home, "scratch:2") == {}
