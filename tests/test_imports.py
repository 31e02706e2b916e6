"""`import aifab` must stay cheap: neither torch nor ray may load with it (nor with the CLI's entry module)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("module", ["aifab", "aifab.spec", "aifab.store", "aifab.cli"])
def test_import_does_not_pull_heavy_modules(module: str) -> None:
    code = f"import sys, {module}; print(' '.join(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import {module} pulled in: {out.stdout.strip()}"


def test_nn_imports_nothing_else_of_aifab() -> None:
    """nn/ is pure PyTorch: importing it must not load the store, data, train or serve packages."""
    code = (
        "import sys, aifab.nn.transformer, aifab.nn.weights, aifab.nn.generate, aifab.nn.sampling, aifab.nn.hf, "
        "aifab.nn.lora; "
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


def test_evaluate_does_not_import_serve() -> None:
    """evaluate/ generates through nn/, never through the serving package: not when imported, and not in the
    imports its functions make when called (found by reading its source)."""
    code = (
        "import sys, aifab.evaluate, aifab.nn.generate, aifab.nn.sampling; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('aifab.serve'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"aifab.evaluate loads {out.stdout.strip()}"
    root = Path(__file__).resolve().parents[1] / "src" / "aifab" / "evaluate"
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]  # so `from aifab import serve` counts
            found += [f"{path.name}: {n}" for n in names if n == "aifab.serve" or n.startswith("aifab.serve.")]
    assert not found, f"evaluate/ imports serve/: {found}"
