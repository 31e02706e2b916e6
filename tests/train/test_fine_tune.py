"""Fine-tuning from a registered model (in full and with LoRA), and the refusals that come before any compute."""

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from sqlalchemy import select

from aifab.data.ingest import ingest
from aifab.errors import TrainError
from aifab.nn.config import LoraConfig
from aifab.nn.lora import apply_lora, load_lora_state, merge_lora
from aifab.nn.transformer import Transformer
from aifab.nn.weights import from_bytes
from aifab.registry.models import register
from aifab.spec import DataSpec, ModelSpec, TokenizerSpec, TrainingSpec
from aifab.store import Store
from aifab.store.schema import DatasetVersion, Run
from aifab.train.checkpoint import checkpoints
from aifab.train.trainer import FineTune, TrainResult, resume, train
from helpers import TINY_MODEL, TINY_TOKENIZER, write_corpus

STEPS = TrainingSpec(steps=12, seconds=None, batch_size=4, eval_every=4, eval_batches=2, checkpoint_every=5)


@pytest.fixture
def dataset(store: Store, corpus: Path) -> int:
    return ingest(store, "tiny", DataSpec(sources=[str(corpus)], val_fraction=0.2), TINY_TOKENIZER).dataset_version_id


def register_result(store: Store, name: str, r: TrainResult) -> FineTune:
    mv = register(
        store,
        name,
        weights_digest=r.checkpoint_digest,
        tokenizer_digest=r.tokenizer_digest,
        config=r.model_config,
        params_count=r.params,
        metrics={},
        run_id=r.run_id,
    )
    return FineTune(f"{mv.name}:{mv.version}", mv.weights_digest, mv.tokenizer_digest)


@pytest.fixture
def base(store: Store, dataset: int) -> tuple[FineTune, TrainResult]:
    """A model trained briefly from scratch and registered as base:1, the starting point of the fine-tunes."""
    r = train(store, dataset, TINY_MODEL, STEPS.model_copy(update={"steps": 20}))
    return register_result(store, "base", r), r


def weights(store: Store, digest: str) -> dict[str, torch.Tensor]:
    return st_load(store.artifacts.get_bytes(digest))


def test_full_fine_tune_starts_from_the_base_weights_and_lowers_the_loss(
    store: Store, dataset: int, base: tuple[FineTune, TrainResult]
) -> None:
    ft, base_run = base
    r = train(store, dataset, ModelSpec(), STEPS.model_copy(update={"lr": 1e-3}), base=ft)
    # the same validation batches through the same weights: the fine-tune starts where the base ended
    assert r.val_loss_initial == base_run.val_loss_final
    assert r.val_loss_final < r.val_loss_initial
    assert r.model_config == base_run.model_config and r.lora_digest is None
    with store.db.session() as s:
        run = s.get(Run, r.run_id)
        assert run is not None
        assert run.params["init"] == {"model": "base:1", "weights_digest": ft.weights_digest, "lora": None}
    changed = weights(store, r.checkpoint_digest)
    assert all(not torch.equal(changed[k], v) for k, v in weights(store, ft.weights_digest).items() if v.dim() >= 2)


def test_lora_trains_only_the_adapters_and_registers_merged_weights(
    store: Store, dataset: int, base: tuple[FineTune, TrainResult]
) -> None:
    ft, base_run = base
    lora = LoraConfig(rank=4, alpha=8.0)
    r = train(
        store, dataset, ModelSpec(), STEPS.model_copy(update={"lr": 1e-2}), base=FineTune(**{**vars(ft), "lora": lora})
    )
    assert r.val_loss_initial == base_run.val_loss_final  # B starts at zero: the adapters change nothing yet
    assert r.val_loss_final < r.val_loss_initial
    assert r.params == base_run.params  # the merged model has the base's shape
    before, after = weights(store, ft.weights_digest), weights(store, r.checkpoint_digest)
    assert before.keys() == after.keys()
    adapted = {k for k in before if k.endswith((".wqkv.weight", ".wo.weight"))}
    assert adapted and all(not torch.equal(before[k], after[k]) for k in adapted)
    assert all(torch.equal(before[k], after[k]) for k in before.keys() - adapted)  # the base stayed frozen
    # the adapters alone, applied to the base and merged, give the registered weights
    assert r.lora_digest is not None
    model = apply_lora(from_bytes(store.artifacts.get_bytes(ft.weights_digest)), lora)
    load_lora_state(model, weights(store, r.lora_digest))
    merged = merge_lora(model).state_dict()
    for k, v in after.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)
    assert from_bytes(store.artifacts.get_bytes(r.checkpoint_digest)).config.to_dict() == r.model_config


def test_a_crashed_lora_run_resumes_bit_identically(
    store: Store, dataset: int, base: tuple[FineTune, TrainResult]
) -> None:
    ft, _ = base
    tuned = FineTune(**{**vars(ft), "lora": LoraConfig(rank=2)})
    full = train(store, dataset, ModelSpec(), STEPS, base=tuned)
    calls = iter(range(10_000))

    def crash() -> str | None:
        if next(calls) >= 8:  # after step 8: the checkpoint at step 5 survives, steps 6-8 are lost
            raise RuntimeError("preempted")
        return None

    with pytest.raises(RuntimeError, match="preempted"):
        train(store, dataset, ModelSpec(), STEPS, stop_check=crash, base=tuned)
    with store.db.session() as s:
        (run_id,) = s.scalars(select(Run.id).where(Run.status == "failed")).all()
    r = resume(store, run_id)
    assert r.checkpoint_digest == full.checkpoint_digest and r.lora_digest == full.lora_digest
    assert r.val_loss_final == full.val_loss_final


def test_a_context_shorter_than_the_models_is_a_training_window(
    store: Store, dataset: int, base: tuple[FineTune, TrainResult]
) -> None:
    ft, base_run = base
    r = train(store, dataset, ModelSpec(context_len=16), STEPS.model_copy(update={"steps": 2}), base=ft)
    assert r.tokens == 2 * STEPS.batch_size * 16
    assert r.model_config["context_len"] == base_run.model_config["context_len"] == 32
    with pytest.raises(TrainError, match="training window 64 is longer than the model's context of 32"):
        train(store, dataset, ModelSpec(context_len=64), STEPS, base=ft)


def runs(store: Store) -> int:
    with store.db.session() as s:
        return len(s.scalars(select(Run.id)).all())


def test_a_dataset_with_another_tokenizer_is_refused_before_any_run(
    store: Store, dataset: int, base: tuple[FineTune, TrainResult], tmp_path: Path
) -> None:
    ft, _ = base
    other = ingest(
        store,
        "other",
        DataSpec(sources=[str(write_corpus(tmp_path / "other", n_files=6))], val_fraction=0.2),
        TokenizerSpec(vocab_size=280, min_frequency=2),
    ).dataset_version_id
    before = runs(store)
    with pytest.raises(TrainError, match=r"not tokenized with the tokenizer of base:1.*--tokenizer-from base:1"):
        train(store, other, ModelSpec(), STEPS, base=ft)
    assert runs(store) == before


def test_a_vocabulary_larger_than_the_models_is_refused(store: Store, dataset: int) -> None:
    with store.db.session() as s:
        ds = s.get(DatasetVersion, dataset)
        assert ds is not None
        tokenizer = ds.tokenizer_digest
    small = Transformer(TINY_CONFIG(vocab_size=100))
    from aifab.nn.weights import to_bytes

    mv = register(
        store,
        "narrow",
        weights_digest=store.artifacts.put_bytes(to_bytes(small)),
        tokenizer_digest=tokenizer,
        config=small.config.to_dict(),
        params_count=1,
        metrics={},
    )
    with pytest.raises(TrainError, match="vocabulary of 300 tokens but the model has 100"):
        train(store, dataset, ModelSpec(), STEPS, base=FineTune("narrow:1", mv.weights_digest, tokenizer))
    assert runs(store) == 0


def TINY_CONFIG(**overrides: Any) -> Any:
    from aifab.nn.config import ModelConfig

    return ModelConfig(**{"vocab_size": 300, "n_layer": 2, "n_head": 2, "d_model": 32, "context_len": 32, **overrides})


def test_a_model_that_cannot_fit_in_memory_is_refused_before_any_allocation(store: Store, dataset: int) -> None:
    huge = ModelSpec(n_layer=96, n_head=128, d_model=16384, context_len=32)  # ~310B parameters: >1 TB to train
    with pytest.raises(TrainError, match=r"cannot fit in memory: .* need at least [\d.]+ GB .* the cpu has"):
        train(store, dataset, huge, STEPS)
    assert runs(store) == 0


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    store: Store, dataset: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    forward = Transformer.forward
    calls = {"train": 0}

    def poisoned(self: Transformer, *args: Any, **kwargs: Any) -> Any:
        logits, loss = forward(self, *args, **kwargs)
        if self.training:
            calls["train"] += 1
            if calls["train"] >= 7:  # the 7th training step diverges
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(Transformer, "forward", poisoned)
    with pytest.raises(TrainError, match=r"loss became nan at step 7; .* last good checkpoint \(step 5\) is kept"):
        train(store, dataset, TINY_MODEL, STEPS)
    with store.db.session() as s:
        (run,) = s.scalars(select(Run)).all()
        assert run.status == "failed" and "loss became nan" in (run.error or "")
        assert run.checkpoint_digest is not None
        run_id = run.id
    assert [step for step, _ in checkpoints(store.work_dir("runs", run_id, "checkpoints"))] == [5]
