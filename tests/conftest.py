"""Shared fixtures: an empty store, a tiny corpus, and (once per session) a tiny trained, registered model."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from aifab.spec import DataSpec, TrainingSpec
from aifab.store import Store
from helpers import TINY_MODEL, TINY_TOKENIZER, write_corpus

os.environ.setdefault("AIFAB_NO_PROGRESS", "1")
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Each pytest-xdist worker (`make test`) takes its share of the cores for torch's OpenMP threads, and so do the
    # CLI processes it starts, which inherit this. Left at one thread per core, 2 workers on 2 cores ran a
    # CPU-bound subset 1.2-3x slower: threads spin waiting for a core the other worker holds. torch is not imported
    # yet (`import aifab` must not import it), so this is read when it is.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // int(workers))))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "home")
    yield s
    s.close()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, str]]:
    """A store holding one registered tiny model, `tiny:1` (alias `tiny@latest`). Built once per session."""
    from aifab.data.ingest import ingest
    from aifab.registry.models import register
    from aifab.train.trainer import train

    base = tmp_path_factory.mktemp("trained")
    s = Store(base / "home")
    ds = ingest(s, "tiny", DataSpec(sources=[str(write_corpus(base / "corpus"))], val_fraction=0.2), TINY_TOKENIZER)
    tr = train(
        s,
        ds.dataset_version_id,
        TINY_MODEL,
        TrainingSpec(steps=30, seconds=None, batch_size=8, eval_every=10),
    )
    register(
        s,
        "tiny",
        weights_digest=tr.checkpoint_digest,
        tokenizer_digest=tr.tokenizer_digest,
        config=tr.model_config,
        params_count=tr.params,
        metrics={},
        run_id=tr.run_id,
        dataset_version_id=ds.dataset_version_id,
        aliases=("latest",),
    )
    yield s, "tiny:1"
    s.close()
