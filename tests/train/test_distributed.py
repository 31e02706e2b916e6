"""Data-parallel training through torchrun: 2 gloo processes on the CPU follow the single-process run.

Each rank computes half the rows of every global batch and gradients are averaged, so the per-step losses of
DDP and FSDP2 runs must match the single-process losses up to float rounding; rank 0 alone registers.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from aifab.store import Store
from aifab.store.schema import ModelVersion, Run, RunMetric
from helpers import aifab, cli_env, write_corpus

CONFIG = """
data: {val_fraction: 0.2}
tokenizer: {vocab_size: 300}
model: {n_layer: 2, n_head: 2, d_model: 32, context_len: 32}
training: {batch_size: 4, eval_every: 5, eval_batches: 2, checkpoint_every: 5, parallel: PARALLEL}
"""


def torchrun(home: Path, cwd: Path, *args: str) -> dict[str, object]:
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "aifab"]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=cli_env(home), cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone reports
    result: dict[str, object] = json.loads(lines[0])
    return result


def losses(home: Path, run_id: object) -> list[float]:
    store = Store(home)
    try:
        with store.db.session() as s:
            q = select(RunMetric.value).where(RunMetric.run_id == run_id, RunMetric.key == "train_loss")
            return list(s.scalars(q.order_by(RunMetric.step)))
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_run(tmp_path: Path, parallel: str) -> None:
    home = tmp_path / "home"
    write_corpus(tmp_path / "corpus")
    (tmp_path / "factory.yaml").write_text(CONFIG.replace("PARALLEL", parallel))
    assert aifab("ingest", "corpus", "--name", "c", "-c", "factory.yaml", home=home, cwd=tmp_path).returncode == 0
    single = aifab(
        "train", "-d", "c", "-c", "factory.yaml", "--name", "one", "--steps", "12", "--json", home=home, cwd=tmp_path
    )
    assert single.returncode == 0, single.stderr
    one = json.loads(single.stdout.strip().splitlines()[-1])
    two = torchrun(home, tmp_path, "train", "-d", "c", "-c", "factory.yaml", "--name", "two", "--steps", "12", "--json")
    assert two["steps"] == 12 and two["tokens"] == one["tokens"]
    a, b = losses(home, one["run_id"]), losses(home, two["run_id"])
    assert len(a) == len(b) == 12
    assert a != pytest.approx([a[0]] * 12)  # the loss moved: the comparison means something
    assert b == pytest.approx(a, rel=1e-5, abs=1e-5)
    assert two["val_loss_final"] == pytest.approx(one["val_loss_final"], rel=1e-5)
    store = Store(home)
    try:
        with store.db.session() as s:
            assert [m.name for m in s.scalars(select(ModelVersion).order_by(ModelVersion.id))] == ["one", "two"]
            run = s.get(Run, two["run_id"])
            assert run is not None and run.status == "completed"
    finally:
        store.close()
    if parallel != "fsdp":
        return
    # A checkpoint gathered from FSDP2 shards resumes in one plain process: as if the torchrun job had died
    # after its step-10 checkpoint, the lone process's steps 11-12 must be the single-process run's.
    shutil.rmtree(home / "work" / "runs" / str(two["run_id"]) / "checkpoints" / "step-000012")
    store = Store(home)
    try:
        with store.db.session() as s:
            run = s.get(Run, two["run_id"])
            assert run is not None
            run.status = "failed"
    finally:
        store.close()
    resumed = aifab("train", "--resume", str(two["run_id"]), "--name", "two", "--json", home=home, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    after = losses(home, two["run_id"])
    assert len(after) == 12 and after[:10] == b[:10]
    assert after[10:] == pytest.approx(a[10:], rel=1e-5, abs=1e-5)
