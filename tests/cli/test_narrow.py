"""Every table verb on an 80-column terminal: numbers and ids print whole, never cut to an ellipsis.

The store holds figures of the sizes a real factory reaches (megajoules of training, a billion tokens, costs of
a fraction of a cent, a 12-hex run id), the kind that 80 columns used to cut to `5.306e…` and `estima…`.
"""

import io
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console

from aifab.store import Store
from aifab.store.lineage import link
from aifab.store.schema import Job, LedgerEntry, ModelAlias, ModelVersion, Run
from helpers import cli_env, dataset_row

WIDTH = 80
RUN_ID = "3f9a1c2b7d4e"  # a run id as the trainer draws it: 12 hex digits
CREATED = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)
# (stage, subject kind, subject id, energy J, estimated, deployment, tokens in, tokens out)
LEDGER = [
    ("data", "dataset", "1", 1234.5678, True, None, 0, 987_654_321),
    ("train", "run", RUN_ID, 5_306_123.4, False, None, 123_456_789, 0),
    ("evaluate", "run", RUN_ID, 53.06, False, None, 12_345, 0),
    ("serve", "model", "1", 12.5, False, "dep-1a2b3c4d", 1_234, 5_678),
    ("serve-idle", "model", "1", 3.25, True, "dep-1a2b3c4d", 0, 0),
]
LONG_ERROR = "exit code 1: RuntimeError: CUDA out of memory while allocating the optimizer state on node gpu-07"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = Store(tmp_path_factory.mktemp("narrow") / "home")
    with store.db.session() as s:
        s.add(
            dataset_row(
                name="code-corpus",
                version=1,
                files=12_345,
                bytes=1_234_567_890,
                documents=1_234_567,
                tokens=987_654_321,
                train_tokens=888_888_888,
                val_tokens=98_765_433,
                created_at=CREATED,
            )
        )
        s.flush()
        summary = {"steps": 12_000, "val_loss_final": 2.345, "tokens_per_s": 123_456.7}
        s.add(
            Run(
                id=RUN_ID,
                kind="train",
                status="completed",
                dataset_version_id=1,
                elapsed_s=1234.5,
                summary=summary,
                created_at=CREATED,
            )
        )
        s.flush()
        s.add(
            ModelVersion(
                name="code-model",
                version=12,
                run_id=RUN_ID,
                weights_digest="c" * 64,
                tokenizer_digest="d" * 64,
                params_count=124_439_808,
                metrics={"val_loss": 2.345},
                created_at=CREATED,
            )
        )
        s.flush()
        s.add_all([ModelAlias(name="code-model", alias=a, model_version_id=1) for a in ("latest", "prod")])
        link(s, ("dataset", 1), ("run", RUN_ID), "input")
        link(s, ("run", RUN_ID), ("model", 1), "produced")
        for stage, kind, id_, j, est, dep, tokens_in, tokens_out in LEDGER:
            s.add(
                LedgerEntry(
                    stage=stage,
                    subject_kind=kind,
                    subject_id=id_,
                    device="cpu",
                    sampler="rapl",
                    estimated=est,
                    elapsed_s=j / 100,
                    device_s=j / 100,
                    energy_j=j,
                    cost_usd=j * 1e-8,
                    co2_g=j * 1e-4,
                    tokens_in=tokens_in,
                    tokens_out=tokens_out,
                    deployment=dep,
                )
            )
        s.add(
            Job(
                name="train-code-model",
                project="research",
                priority=5,
                kind="train",
                status="running",
                command=["aifab", "train"],
                gpus=8,
                node="gpu-07",
                submitted_at=CREATED,
            )
        )
        s.add(
            Job(
                name="tokenize",
                project="default",
                kind="data",
                status="failed",
                command=["aifab", "ingest"],
                error=LONG_ERROR,
                submitted_at=CREATED,
            )
        )
    store.close()
    return store.home


def narrow(home: Path, *args: str) -> str:
    """stdout of `aifab ARGS` on an 80-column terminal, checked for an ellipsis and for lines over 80 cells."""
    env = {**cli_env(home), "COLUMNS": str(WIDTH)}
    proc = subprocess.run([sys.executable, "-m", "aifab", *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return whole(proc.stdout)


def whole(text: str) -> str:
    assert "…" not in text and "..." not in text, text
    assert all(cell_len(line) <= WIDTH for line in text.splitlines()), text
    return text


def has(text: str, *fragments: str) -> None:
    missing = [f for f in fragments if f not in text]
    assert not missing, f"{missing} not whole in:\n{text}"


@pytest.mark.parametrize(
    ("by", "fragments"),
    [
        ("stage", ["serve-idle", "5.31 MJ", "$0.0531", "531 g", "123 M", "988 M", "estimate", "measured"]),
        ("dataset", ["code-corpus:1", "1.23 kJ", "$1.23e-5", "988 M", "estimate"]),
        ("run", [RUN_ID, "5.31 MJ", "$0.0531", "123 M", "14.7 h", "measured"]),
        ("model", ["code-model:12", "5.31 MJ", "15.8 J", "$0.0531", "988 M", "estimate"]),
        ("deployment", ["dep-1a2b3c4d", "15.8 J", "$1.58e-7", "1,234", "5,678"]),
    ],
)
def test_ledger(home: Path, by: str, fragments: list[str]) -> None:
    has(narrow(home, "ledger", "--by", by), *fragments, "total")


def test_models(home: Path) -> None:
    has(narrow(home, "models"), "code-model:12", "124 M", "2.345", "latest", "prod", RUN_ID, "5.31 MJ", "15.8 J",
        "2026-11-26")  # fmt: skip


def test_datasets(home: Path) -> None:
    has(narrow(home, "datasets"), "code-corpus:1", "12.3 k", "1.23 GB", "1.23 M", "988 M", "889 M", "98.8 M")


def test_runs(home: Path) -> None:
    has(narrow(home, "runs"), RUN_ID, "completed", "12.0 k", "2.345", "123 k", "20.6 min", "2026-11-26")


def test_status(home: Path) -> None:
    out = narrow(home, "status")
    has(out, "train-code-model", "research", "gpu-07", "11-26 09:30", "times in UTC")
    has(out, "RuntimeError:", "optimizer")  # the failed job's error wraps at spaces: its words stay whole


def test_plan(home: Path) -> None:
    has(narrow(home, "plan", "--power-gw", "1", "--gpu", "H100"), "653,594", "$47.5 B", "$32.7 B", "8.8 TWh",
        "0.81 million", "5.62e+16", "$0.149", "0.468")  # fmt: skip


def rendered(renderable: object) -> str:
    console = Console(width=WIDTH, file=io.StringIO(), color_system=None)
    console.print(renderable)
    file = console.file
    assert isinstance(file, io.StringIO)
    return whole(file.getvalue())


def test_demo_report(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from aifab.cli import demo

    console = Console(width=WIDTH, file=io.StringIO(), color_system=None)
    monkeypatch.setattr(demo, "out", console)
    home = tmp_path / "a-store-under-a-rather-long-directory-name" / "that-keeps-going" / "home"
    from aifab.pipeline.contracts import DataOutput, EvalOutput, RegisterOutput, TrainOutput
    from aifab.pipeline.line import LineReport, ServedRequest

    data = DataOutput(
        dataset_version_id=12,
        dataset="demo:12",
        manifest_digest="m" * 64,
        tokenizer_digest="t" * 64,
        files=12_345,
        bytes=1_234_567_890,
        documents=12_000,
        skipped_files=3,
        tokens=987_654_321,
        train_tokens=888_888_888,
        val_tokens=98_765_433,
        vocab_size=32_000,
        elapsed_s=12.3,
    )
    train = TrainOutput(
        run_id="0123456789ab",
        checkpoint_digest="c" * 64,
        tokenizer_digest="t" * 64,
        manifest_digest="m" * 64,
        dataset_version_id=12,
        model_config={"n_layer": 12, "d_model": 768, "context_len": 1024},
        params=124_439_808,
        steps=12_000,
        tokens=123_456_789,
        elapsed_s=1234.5,
        tokens_per_s=100_005.5,
        val_loss_initial=10.4,
        val_loss_final=2.345,
        stopped_by="steps",
        mfu=None,
        lora_digest=None,
        base_model=None,
        resumed_from_step=0,
    )
    evaluate = EvalOutput(
        run_id="0123456789ab",
        checkpoint_digest="c" * 64,
        val_loss=2.345,
        perplexity=10.4,
        val_tokens=98_765_433,
        samples=[{"prompt": "def add(", "completion": "a, b):\n    return a + b"}],
    )
    report = LineReport(
        data=data,
        train=train,
        evaluate=evaluate,
        model=RegisterOutput(12, "demo:12", ["latest"]),
        serve_command="aifab serve demo:12",
        requests=[ServedRequest("def", "x", 0.123, 3, 32, 260.2, True)],
        energy_j=5_306_123.4,
        cost_usd=0.0531,
        co2_g=530.6,
        energy_estimated=False,
        energy_sampler="rapl",
        device="cpu",
        elapsed_s=1300.0,
        home=str(home),
    )
    demo.print_report(report)
    file = console.file
    assert isinstance(file, io.StringIO)
    out = whole(file.getvalue())
    has(out, "12,345 files", "987,654,321 tokens", "124.44M parameters", "123,456,789 tokens", "5,306.12 kJ",
        "$0.053100", "aifab serve demo:12")  # fmt: skip
    assert str(home) in out.replace("\n", "").replace(" ", "")  # a path longer than its column folds, whole


def test_pipeline_summary() -> None:
    from aifab.cli.run import summary_table

    stages = [
        {"stage": "ingest", "status": "cached", "key": "9f8e7d6c5b4a39281706", "job_id": 1234,
         "error": None, "outputs": {"dataset": "code-corpus:1"}},
        {"stage": "train", "status": "failed", "key": "0a1b2c3d4e5f60718293", "job_id": 1235,
         "error": LONG_ERROR, "outputs": {}},
    ]  # fmt: skip
    out = rendered(summary_table({"pipeline": "factory", "stages": stages}, dry_run=False))
    has(out, "9f8e7d6c5b4a", "0a1b2c3d4e5f", "1234", "1235", "dataset code-corpus:1", "RuntimeError:", "gpu-07")


def test_ingest_stage_table() -> None:
    from aifab.cli.data import stage_table

    stages = {
        "read": {"files": 12_345, "documents": 1_234_567, "skipped": {"binary": 12, "too-large": 3}},
        "dedup": {"docs_in": 1_234_567, "docs_out": 1_034_567, "bytes_removed": 123_456_789_012,
                  "reasons": {"exact-duplicate": 150_000, "near-duplicate": 50_000}},
    }  # fmt: skip
    has(rendered(stage_table(stages)), "12,345 files", "1,234,567", "1,034,567", "123,456,789,012", "150,000")
