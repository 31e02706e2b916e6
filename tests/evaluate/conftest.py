"""Fixtures of the evaluation tests."""

from pathlib import Path

import pytest

from evalkit import write_problems


@pytest.fixture
def problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Three code problems whose outcome the counting model decides, in place of the shipped ones."""
    from aifab.evaluate import suites

    path = write_problems(tmp_path / "python_code.jsonl")
    monkeypatch.setattr(suites, "PYTHON_CODE", path)
    return path
