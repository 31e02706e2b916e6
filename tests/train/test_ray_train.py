"""`aifab train --engine ray`: the same run on 2 Ray Train workers of a local Ray cluster.

The workers join Ray Train's gloo group and split every global batch as torchrun's ranks do, so their losses
must follow the single-process run; a refused config and a resumed run behave as they do locally. Each
command starts (and stops) its own local Ray, as a user's does.
"""

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import select

from aifab.store import Store
from aifab.store.schema import ModelVersion, Run, RunMetric
from helpers import aifab, write_corpus

pytest.importorskip("ray.train.torch")
pytestmark = pytest.mark.ray

CONFIG = """
data: {val_fraction: 0.2}
tokenizer: {vocab_size: 300}
model: {n_layer: 2, n_head: 2, d_model: 32, context_len: 32}
training: {batch_size: BATCH, eval_every: 5, eval_batches: 2, checkpoint_every: 5}
"""


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(home, cwd) with dataset `c` ingested and factory.yaml (batch 4) / odd.yaml (batch 3) written."""
    cwd = tmp_path_factory.mktemp("ray_train")
    write_corpus(cwd / "corpus")
    (cwd / "factory.yaml").write_text(CONFIG.replace("BATCH", "4"))
    (cwd / "odd.yaml").write_text(CONFIG.replace("BATCH", "3"))
    home = cwd / "home"
    assert aifab("ingest", "corpus", "--name", "c", "-c", "factory.yaml", home=home, cwd=cwd).returncode == 0
    return home, cwd


@pytest.fixture(autouse=True)
def quick_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # Ray Train notices finished workers sooner
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local Ray per command, whatever the caller's shell has


def train(home: Path, cwd: Path, *args: str) -> dict[str, object]:
    proc = aifab("train", *args, "--json", home=home, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def metric(home: Path, run_id: object, key: str = "train_loss") -> list[float]:
    store = Store(home)
    try:
        with store.db.session() as s:
            q = select(RunMetric.value).where(RunMetric.run_id == run_id, RunMetric.key == key)
            return list(s.scalars(q.order_by(RunMetric.step)))
    finally:
        store.close()


def test_two_ray_workers_follow_the_single_process_run(ingested: tuple[Path, Path]) -> None:
    home, cwd = ingested
    one = train(home, cwd, "-d", "c", "-c", "factory.yaml", "--name", "one", "--steps", "12")
    two = train(
        home,
        cwd,
        "-d",
        "c",
        "-c",
        "factory.yaml",
        "--name",
        "two",
        "--steps",
        "12",
        "--engine",
        "ray",
        "--workers",
        "2",
    )
    assert two["steps"] == 12 and two["tokens"] == one["tokens"]
    a, b = metric(home, one["run_id"]), metric(home, two["run_id"])
    assert len(a) == len(b) == 12
    assert a != pytest.approx([a[0]] * 12)  # the loss moved: the comparison means something
    assert b == pytest.approx(a, rel=1e-5, abs=1e-5)
    store = Store(home)
    try:
        with store.db.session() as s:
            run = s.get(Run, two["run_id"])
            assert run is not None and run.status == "completed" and run.checkpoint_digest == two["checkpoint_digest"]
            two_mv = s.scalars(select(ModelVersion).where(ModelVersion.name == "two")).one()
            assert two_mv.run_id == two["run_id"]  # the driver registered rank 0's result
        assert store.artifacts.exists(str(two["checkpoint_digest"]))
    finally:
        store.close()


def test_a_crashed_run_resumes_on_ray(ingested: tuple[Path, Path]) -> None:
    home, cwd = ingested
    first = train(home, cwd, "-d", "c", "-c", "factory.yaml", "--name", "crashy", "--steps", "10")
    store = Store(home)
    try:  # as if the process died after its step-10 checkpoint
        with store.db.session() as s:
            run = s.get(Run, first["run_id"])
            assert run is not None
            run.status = "failed"
    finally:
        store.close()
    resumed = train(home, cwd, "--resume", str(first["run_id"]), "--steps", "14", "--name", "crashy", "--engine", "ray")
    assert resumed["run_id"] == first["run_id"] and resumed["steps"] == 14
    losses = metric(home, first["run_id"])
    assert len(losses) == 14  # steps 1-10 from the first process, 11-14 from the two Ray workers


def test_a_refused_config_is_one_line_from_the_workers(ingested: tuple[Path, Path]) -> None:
    home, cwd = ingested
    proc = aifab(
        "train", "-d", "c", "-c", "odd.yaml", "--name", "odd", "--steps", "3", "--engine", "ray", home=home, cwd=cwd
    )
    assert proc.returncode == 2
    assert "batch_size 3 does not split over 2 processes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_more_workers_than_the_cluster_has_is_refused_not_queued(ingested: tuple[Path, Path]) -> None:
    home, cwd = ingested
    n = (os.cpu_count() or 1) + 1
    proc = aifab(
        "train", "-d", "c", "-c", "factory.yaml", "--name", "big", "--steps", "3", "--engine", "ray",
        "--workers", str(n), home=home, cwd=cwd, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"--workers {n} needs {n} CPUs" in proc.stderr
