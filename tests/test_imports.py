"""`import aifab` must stay cheap: neither torch nor ray may load with it (nor with the CLI's entry module)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["aifab", "aifab.spec", "aifab.store", "aifab.cli"])
def test_import_does_not_pull_heavy_modules(module: str) -> None:
    code = f"import sys, {module}; print(' '.join(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import {module} pulled in: {out.stdout.strip()}"


def test_nn_imports_nothing_else_of_aifab() -> None:
    """nn/ is pure PyTorch: importing it must not load the store, data, train or serve packages."""
    code = (
        "import sys, aifab.nn.transformer, aifab.nn.weights; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('aifab.') and not m.startswith('aifab.nn'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    ("stage", "forbidden"),
    [
        ("aifab.data.ingest", ("aifab.train", "aifab.serve")),
        ("aifab.train.trainer", ("aifab.data", "aifab.serve")),
        ("aifab.serve.api", ("aifab.data", "aifab.train")),
        ("aifab.meter.ledger", ("aifab.data", "aifab.train", "aifab.serve", "aifab.nn")),
    ],
)
def test_stages_do_not_import_each_other(stage: str, forbidden: tuple[str, ...]) -> None:
    code = f"import sys, {stage}; print(' '.join(sorted(m for m in sys.modules if m.startswith({forbidden!r}))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{stage} imports {out.stdout.strip()}"
