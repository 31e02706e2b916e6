"""The CLI verbs: `aifab eval`, `aifab models show`, `aifab models compare`. One run is the real command in a
subprocess; the others call the same entry point in this process (a new interpreter per call costs seconds)."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aifab.store import Store
from evalkit import counting_model, random_model, register_model, write_task
from helpers import aifab as subprocess_aifab


@pytest.fixture
def aifab(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> object:
    """`aifab ARGS` in this process: (exit code, stdout, stderr) as a CompletedProcess."""
    from aifab.cli import common, main

    monkeypatch.setitem(common._state, "home", None)  # put back afterwards: --home sets it for the process

    def run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["aifab", "--home", str(home), *args])
        monkeypatch.setenv("AIFAB_NO_PROGRESS", "1")
        code = 0
        try:
            main()
        except SystemExit as e:
            code = int(e.code or 0)
        got = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, got.out, got.err)

    return run


TASK = """
    name: counting
    output_type: multiple_choice
    dataset: {path: data.jsonl}
    input: "{{ c }}"
    choices: "{{ o }}"
    gold: "{{ g }}"
    target_delimiter: ""
"""
ROWS = [{"c": "abc", "o": ["def", "xyz"], "g": 0}, {"c": "klm", "o": ["qqq", "nop"], "g": 1}]


def test_eval_show_and_compare(store: Store, tmp_path: Path, aifab: Any) -> None:
    home = store.home
    counting = register_model(store, counting_model(), "count")
    noise = register_model(store, random_model(), "count")
    task = write_task(tmp_path / "tasks", TASK, ROWS)
    first = subprocess_aifab("eval", counting, "--task", str(task), home=home)
    assert first.returncode == 0, first.stderr
    assert "counting" in first.stdout and "acc_norm" in first.stdout and "count:1: run " in first.stdout
    second = aifab("eval", noise, "--task", str(task), "--json", home=home)
    assert second.returncode == 0, second.stderr
    body = json.loads(second.stdout.strip().splitlines()[-1])
    assert body["model"] == "count:2" and {r["metric"] for r in body["results"]} == {"acc", "acc_norm"}

    show = aifab("models", "show", counting, home=home)
    assert show.returncode == 0, show.stderr
    assert "count:1" in show.stdout and "acc_norm" in show.stdout and "not served yet" in show.stdout
    card = json.loads(aifab("models", "show", counting, "--json", home=home).stdout.strip().splitlines()[-1])
    assert {(r["task"], r["metric"]) for r in card["results"]} == {("counting", "acc"), ("counting", "acc_norm")}
    assert card["results"][0]["value"] == 1.0

    compare = aifab("models", "compare", noise, counting, home=home)
    assert compare.returncode == 0, compare.stderr
    assert "count:2" in compare.stdout and "b - a" in compare.stdout
    cmp = json.loads(aifab("models", "compare", noise, counting, "--json", home=home).stdout.strip().splitlines()[-1])
    assert [r["metric"] for r in cmp["rows"]] == ["acc", "acc_norm"]
    assert all(r["diff"] == r["b"] - r["a"] and r["same_task"] for r in cmp["rows"])
    assert [r["better"] for r in cmp["rows"]] == ["b", "b"]  # b, the counting model, answers both
    assert cmp["efficiency"]["a"]["j_per_token"] is None  # never served


def test_bad_inputs_get_one_line_and_exit_2(store: Store, tmp_path: Path, aifab: Any) -> None:
    home = store.home
    ref = register_model(store, counting_model(), "count")
    bad = write_task(tmp_path, TASK.replace("multiple_choice", "ranking"), ROWS)
    for args, expected in [
        (("eval", ref, "--task", str(bad)), f"error: {bad}:2: output_type: Input should be"),
        (("eval", ref, "--task", str(tmp_path / "none.yaml")), f"error: {tmp_path / 'none.yaml'}: file not found"),
        (("eval", ref, "--suite", "nope"), "error: unknown suite 'nope'"),
        (("eval", "ghost", "--suite", "heldout"), "error: unknown model 'ghost'"),
        (("models", "show", "ghost:3"), "error: unknown model 'ghost:3'"),
        (("models", "compare", ref, "ghost"), "error: unknown model 'ghost'"),
    ]:
        r = aifab(*args, home=home)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), (args, r.stderr)
    r = aifab("eval", ref, "--task", str(bad), "--limit", "0", home=home)
    assert r.returncode == 2 and "Traceback" not in r.stderr
