from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from aifab.data.ingest import ingest
from aifab.errors import TrainError
from aifab.meter.catalog import cpu_peak_flops, gpu_peak_flops
from aifab.spec import DataSpec, TrainingSpec
from aifab.store import Store
from aifab.store.schema import Run
from aifab.store.shards import TokenShards
from aifab.train.device import flops_per_token, resolve_device
from aifab.train.trainer import train
from helpers import TINY_MODEL, TINY_TOKENIZER

STEPS = TrainingSpec(
    steps=3, seconds=None, batch_size=4, eval_every=100, eval_batches=1, checkpoint_every=100, warmup_steps=1
)


@pytest.fixture
def dataset(store: Store, corpus: Path) -> int:
    return ingest(store, "tiny", DataSpec(sources=[str(corpus)], val_fraction=0.2), TINY_TOKENIZER).dataset_version_id


def weights(store: Store, digest: str) -> dict[str, Any]:
    from aifab.nn.weights import from_bytes

    return dict(from_bytes(store.artifacts.get_bytes(digest)).state_dict())


def test_grad_accumulation_equals_one_big_batch(store: Store, dataset: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """k micro-batches of b windows give the step one batch of k*b windows gives: in sequential order, loader
    batch s of k*b windows is exactly micro-batches s*k .. s*k+k-1 of b windows."""
    import torch

    original = TokenShards.loader

    def sequential(self: TokenShards, split: str, batch_size: int, context_len: int, **kw: Any) -> Any:
        return original(self, split, batch_size, context_len, **{**kw, "order": "sequential"})

    monkeypatch.setattr(TokenShards, "loader", sequential)
    big = train(store, dataset, TINY_MODEL, STEPS.model_copy(update={"batch_size": 4}))
    acc = train(store, dataset, TINY_MODEL, STEPS.model_copy(update={"batch_size": 2, "grad_accum_steps": 2}))
    assert acc.tokens == big.tokens == 3 * 4 * 32
    assert acc.checkpoint_digest != big.checkpoint_digest  # summed in another order, so not bit-identical ...
    wa, wb = weights(store, acc.checkpoint_digest), weights(store, big.checkpoint_digest)
    for k in wb:  # ... but equal to float rounding
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_cuda_without_cuda_is_one_line_before_any_run(store: Store, dataset: int) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(TrainError, match="no CUDA device") as exc:
        train(store, dataset, TINY_MODEL, STEPS.model_copy(update={"device": "cuda"}))
    assert "\n" not in str(exc.value)
    with store.db.session() as s:
        assert s.scalars(select(Run)).all() == []


@pytest.mark.parametrize("key,value", [("dtype", "fp16"), ("device", "tpu"), ("grad_accum_steps", 0)])
def test_bad_values_are_refused_by_the_spec(key: str, value: Any) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TrainingSpec.model_validate({key: value})


def test_auto_resolves_to_fp32_uncompiled_on_cpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    d = resolve_device(TrainingSpec())
    assert (d.type, d.dtype, d.compile) == ("cpu", "fp32", False)
    assert d.peak_flops is not None and d.peak_flops > 0


def test_mfu_is_reported_in_the_result_and_summary(store: Store, dataset: int) -> None:
    r = train(store, dataset, TINY_MODEL, STEPS)
    assert r.mfu is not None and 0 < r.mfu < 1
    with store.db.session() as s:
        run = s.get(Run, r.run_id)
        assert run is not None
        assert run.summary["mfu"] == r.mfu and run.summary["flops_per_token"] > 0
        assert run.summary["dtype"] == "fp32" and run.summary["compiled"] is False


def test_flop_and_peak_estimates() -> None:
    # GPT-2 124M: about 6 * 124M + 12 * 12 * 768 * 1024 = 0.86 GFLOP per token
    assert flops_per_token(124_000_000, 12, 768, 1024) == 6 * 124_000_000 + 12 * 12 * 768 * 1024
    assert cpu_peak_flops(2, 2.0, 16) == 2 * 2.0e9 * 2 * 16 * 2
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert gpu_peak_flops("Some Future GPU", "bf16") is None


def test_bf16_autocast_trains_on_cpu(store: Store, dataset: int) -> None:
    r = train(store, dataset, TINY_MODEL, STEPS.model_copy(update={"dtype": "bf16", "device": "cpu"}))
    assert r.steps == 3 and r.val_loss_final == r.val_loss_final  # not NaN


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
def test_compile_works_on_cpu(store: Store, dataset: int) -> None:
    import torch

    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is unavailable")
    plain = train(store, dataset, TINY_MODEL, STEPS.model_copy(update={"compile": False}))
    compiled = train(store, dataset, TINY_MODEL, STEPS.model_copy(update={"compile": True}))
    assert compiled.steps == 3
    # same weights to float rounding: compile fuses kernels but computes the same function
    assert compiled.val_loss_final == pytest.approx(plain.val_loss_final, rel=1e-3)
    with store.db.session() as s:
        run = s.get(Run, compiled.run_id)
        assert run is not None and run.summary["compiled"] is True
