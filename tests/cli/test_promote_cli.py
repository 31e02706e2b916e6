"""`aifab models alias | rollback | history | promotion` and `aifab promote`'s refusals of bad input, through the
command's entry point (in this process, for speed; the end-to-end test runs the real command): every move
recorded with its reason, rollback one line, bad input one line and nothing stored."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aifab.registry.aliases import alias_history, record_promotion
from aifab.registry.models import register, resolve
from aifab.store import Store


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, store: Store) -> object:
    """`aifab --home HOME ARGS...` through `aifab.cli.main`, as the installed command runs it."""
    from aifab.cli import main

    monkeypatch.setenv("COLUMNS", "200")

    def aifab(*args: str) -> Ran:
        monkeypatch.setattr(sys, "argv", ["aifab", "--home", str(store.home), *args])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        got = capsys.readouterr()
        return Ran(code, got.out, got.err)

    return aifab


def _register(store: Store, n: int) -> None:
    for _ in range(n):
        w, t = store.artifacts.put_bytes(b"w"), store.artifacts.put_bytes(b"t")
        register(store, "m", weights_digest=w, tokenizer_digest=t, config={}, params_count=1, metrics={})


def _one_line_error(proc: object, text: str) -> None:
    assert proc.returncode != 0, proc.stdout  # type: ignore[attr-defined]
    err = proc.stderr.strip()  # type: ignore[attr-defined]
    assert err.startswith("error: ") and text in err and "\n" not in err and "Traceback" not in err, err


def test_alias_moves_rollback_and_history_through_the_cli(store: Store, run: Any) -> None:
    _register(store, 2)
    assert run("models", "alias", "m:1", "prod").returncode == 0
    assert run("models", "alias", "m:2", "prod").returncode == 0
    back = run("models", "rollback", "m", "--alias", "prod")
    assert back.returncode == 0 and back.stdout.strip() == "m@prod -> m:1 (rolled back)"
    assert resolve(store, "m@prod").version == 1
    history = run("models", "history", "m", "--alias", "prod", "--json")
    rows = json.loads(history.stdout)
    assert [(r["from"], r["to"], r["reason"], r["promotion"]) for r in rows] == [
        ("-", "m:1", "set", None),
        ("m:1", "m:2", "set", None),
        ("m:2", "m:1", "rollback", None),
    ]
    table = run("models", "history", "m")
    assert table.returncode == 0 and table.stdout.count("rollback") == 1 and "alias moves of m" in table.stdout
    _one_line_error(run("models", "rollback", "m", "--alias", "prod"), "no earlier holder")
    _one_line_error(run("models", "rollback", "m", "--alias", "staging"), "m@staging is not set")
    assert len(alias_history(store, "m")) == 3  # refusals recorded nothing


def test_a_stored_promotion_is_shown_with_every_gate(store: Store, run: Any) -> None:
    _register(store, 1)
    verdict = {
        "gate": "t/acc", "kind": "metric", "bound": "min", "measured": 0.2, "threshold": 0.3, "champion": None,
        "passed": False, "reason": "gate t/acc: 0.2 < 0.3 (min)",
    }  # fmt: skip
    pid = record_promotion(
        store, name="m", alias="prod", candidate_id=resolve(store, "m:1").id, champion_id=None, verdicts=[verdict],
        passed=False, force=False, expected_holder_id=None,
    ).promotion_id  # fmt: skip
    shown = run("models", "promotion", str(pid))
    assert (
        shown.returncode == 0 and "refused" in shown.stdout and "FAIL" in shown.stdout and "0.2 < 0.3" in shown.stdout
    )
    body = json.loads(run("models", "promotion", str(pid), "--json").stdout)
    assert body["candidate"] == "m:1" and body["moved"] is False and body["gates"] == [verdict]
    _one_line_error(run("models", "promotion", "99"), "no promotion 99")


def test_promote_refuses_a_config_without_gates_and_bad_input_in_one_line(
    store: Store, tmp_path: Path, run: Any
) -> None:
    _register(store, 1)
    _one_line_error(
        run("promote", "m:1", "--alias", "prod", "--config", str(tmp_path / "nope.yaml")),
        "nope.yaml: file not found",
    )
    plain = tmp_path / "factory.yaml"
    plain.write_text("name: m\n")
    _one_line_error(run("promote", "m:1", "--alias", "prod", "--config", str(plain)), "no `gates:` section")
    bad = tmp_path / "bad.yaml"
    bad.write_text("gates:\n  checks:\n    - {metric: t/accuracy, min: 1}\n")
    _one_line_error(
        run("promote", "m:1", "--alias", "prod", "--config", str(bad)),
        "bad.yaml:3: gates.checks.0.metric: unknown metric 'accuracy'",
    )
    gated = tmp_path / "gated.yaml"
    gated.write_text("gates:\n  checks: [{metric: t/acc, min: 0.1}]\n")
    _one_line_error(run("promote", "m:7", "--alias", "prod", "--config", str(gated)), "unknown model 'm:7'")
    _one_line_error(run("promote", "m:1", "--alias", "../x", "--config", str(gated)), "invalid alias")
    assert alias_history(store, "m") == []
