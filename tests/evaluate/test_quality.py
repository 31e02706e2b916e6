"""The issue's test: a model trained like `make demo` (the tiny preset on the Python standard library's source, the
demo's optimizer settings; here a 3 MB slice and 60 steps, so it runs in about a minute) scores measurably above a
random-weights model of the same shape on the heldout suite's two tasks."""

import math
from pathlib import Path

import pytest

from aifab.evaluate.harness import evaluate_model
from aifab.evaluate.results import MetricResult
from aifab.spec import DataSpec, ModelSpec, TokenizerSpec, TrainingSpec
from aifab.store import Store


def margin(a: MetricResult, b: MetricResult) -> float:
    """The combined standard error of two independent results."""
    return math.sqrt((a.stderr or 0.0) ** 2 + (b.stderr or 0.0) ** 2)


@pytest.mark.slow
def test_a_trained_model_beats_random_weights_on_the_heldout_suite(tmp_path: Path) -> None:
    import torch

    from aifab.data.ingest import ingest
    from aifab.nn.config import ModelConfig
    from aifab.nn.transformer import Transformer, num_params
    from aifab.nn.weights import to_bytes
    from aifab.registry.models import register
    from aifab.train.trainer import train

    store = Store(tmp_path / "home")
    ds = ingest(store, "stdlib", DataSpec(max_bytes=3_000_000, val_fraction=0.15), TokenizerSpec())
    tr = train(store, ds.dataset_version_id, ModelSpec(), TrainingSpec(steps=60, seconds=None))
    common = {"tokenizer_digest": tr.tokenizer_digest, "config": tr.model_config, "metrics": {},
              "dataset_version_id": ds.dataset_version_id}  # fmt: skip
    register(store, "demo", weights_digest=tr.checkpoint_digest, params_count=tr.params, run_id=tr.run_id, **common)
    torch.manual_seed(0)
    noise = Transformer(ModelConfig.from_dict(tr.model_config))
    register(store, "noise", weights_digest=store.artifacts.put_bytes(to_bytes(noise)), params_count=num_params(noise),
             **common)  # fmt: skip

    trained = {(r.task, r.metric): r for r in evaluate_model(store, "demo", suites=["heldout"], progress=False).results}
    random_ = {
        (r.task, r.metric): r for r in evaluate_model(store, "noise", suites=["heldout"], progress=False).results
    }
    bpb = ("heldout-bpb", "bits_per_byte")
    assert trained[bpb].value < random_[bpb].value - 3 * margin(trained[bpb], random_[bpb])
    acc = ("heldout-next-line", "acc")
    assert trained[acc].value > random_[acc].value + 2 * margin(trained[acc], random_[acc])
    assert trained[acc].examples >= 100
    store.close()
