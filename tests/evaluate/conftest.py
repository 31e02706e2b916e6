"""Fixtures of the evaluation tests: the code sandbox and the python-code problems, real or stood in."""

import importlib.util
import sys
from pathlib import Path

import pytest

from evalkit import stand_in_sandbox, write_problems


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sandbox module: aifab's own when it is there, else a stand-in with its interface."""
    if importlib.util.find_spec("aifab.evaluate.sandbox") is None:
        monkeypatch.setitem(sys.modules, "aifab.evaluate.sandbox", stand_in_sandbox())


@pytest.fixture
def problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox: None) -> Path:
    """Three stand-in python-code problems in place of the shipped ones."""
    from aifab.evaluate import suites

    path = write_problems(tmp_path / "python_code.jsonl")
    monkeypatch.setattr(suites, "PYTHON_CODE", path)
    return path
