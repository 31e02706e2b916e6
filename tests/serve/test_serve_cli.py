"""`aifab serve` with a canary and a followed alias, as a user runs it: bad options are one line before anything
loads; a real server splits requests, follows the alias, and writes each version's ledger rows."""

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from aifab.errors import AifabError
from aifab.registry.models import set_alias
from aifab.store import Store
from aifab.store.schema import LedgerEntry
from helpers import aifab, cli_env, one_line_error, until
from serving import WAIT_S, two_versions


@pytest.fixture(scope="module")
def home(trained: tuple[Store, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A store with tiny:1 (prod), tiny:2 (candidate) and tiny:3 (broken)."""
    store = two_versions(trained, tmp_path_factory.mktemp("cli") / "home")
    yield store.home
    store.close()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["tiny:1", "--canary", "tiny@candidate", "--canary-percent", "150"], ["between 0 and 100, not 150"]),
        (["tiny:1", "--canary", "tiny@candidate", "--canary-percent", "-5"], ["between 0 and 100, not -5"]),
        (["tiny:1", "--canary", "tiny@candidate", "--canary-percent", "ten"], ["--canary-percent", "'ten'"]),
        (["tiny:1", "--canary", "tiny@candidate", "--canary-percent", "nan"], ["--canary-percent", "'nan'"]),
        (["tiny:1", "--canary-percent", "10"], ["--canary-percent needs --canary"]),
        (["tiny:1", "--canary", "nosuch@prod"], ["unknown model 'nosuch@prod'"]),
        (["tiny:1", "--canary", "tiny:9"], ["unknown model 'tiny:9'"]),
        (["tiny:1", "--canary", "../etc"], ["model name", "../etc"]),
        (["tiny:1", "--canary", "tiny@"], ["alias"]),
        (["tiny:1", "--canary", "tiny:1"], ["--canary tiny:1 is the model served already"]),
        (["tiny@prod", "--follow-interval", "0"], ["--follow-interval must be a positive number", "not 0"]),
        (["tiny@prod", "--follow-interval", "soon"], ["--follow-interval must be a number", "'soon'"]),
        (["tiny@prod", "--executor", "ray"], ["--executor ray does not follow aliases", "--no-follow"]),
        (["tiny:1", "--executor", "ray", "--canary", "tiny@candidate"], ["--canary needs --executor local"]),
        (["tiny:1", "--canary", "tiny@broken"], ["tiny:3 cannot be loaded", "safetensors"]),
    ],
)
def test_bad_canary_and_follow_options_are_refused_in_one_line(
    home: Path, args: list[str], fragments: list[str]
) -> None:
    from aifab.cli import app

    got = CliRunner().invoke(app, ["--home", str(home), "serve", *args, "--port", "0"])
    assert isinstance(got.exception, AifabError), (got.output, got.exception)
    message = str(got.exception)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_a_bad_canary_percent_is_one_line_from_the_real_command(home: Path) -> None:
    proc = aifab("serve", "tiny@prod", "--canary", "tiny@candidate", "--canary-percent", "101", home=home)
    one_line_error(proc, "--canary-percent must be between 0 and 100, not 101")


@pytest.mark.slow
def test_the_command_splits_follows_and_charges_each_version(home: Path, tmp_path: Path) -> None:
    """`aifab serve tiny@prod --canary tiny@candidate --canary-percent 50`: both versions answer; when prod
    moves to the canary's version the first engine (on the main thread) drains and stops; SIGTERM ends it all,
    and the ledger has each version's rows under one deployment."""
    store = Store(home)
    set_alias(store, "tiny:1", "prod")
    set_alias(store, "tiny:2", "candidate")
    log = tmp_path / "serve.err"
    cmd = [sys.executable, "-m", "aifab", "serve", "tiny@prod", "--canary", "tiny@candidate", "--canary-percent", "50"]
    cmd += ["--follow-interval", "0.1", "--port", "0", "--max-batch", "4"]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=cli_env(home), stdout=subprocess.DEVNULL, stderr=err)
    try:
        url = wait_for(proc, log, r"on (http://\S+)/v1")
        with httpx.Client(base_url=url, timeout=WAIT_S) as c:
            body = {"model": "tiny", "prompt": "def", "max_tokens": 2, "temperature": 0}
            assert sorted(c.post("/v1/completions", json=body).json()["model"] for _ in range(4)) == [
                "tiny:1", "tiny:1", "tiny:2", "tiny:2",
            ]  # fmt: skip
            set_alias(store, "tiny:2", "prod")
            wait_for(proc, log, r"(tiny:1 finished its requests and stopped)")
            assert {c.post("/v1/completions", json=body).json()["model"] for _ in range(4)} == {"tiny:2"}
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny:2"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT_S) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "serving tiny:1 (tiny@prod), tiny:2 (tiny@candidate, 50%) on http" in text, text
    assert "tiny@prod moved to tiny:2: serving it now; tiny:1 finishes its 0 requests in flight" in text
    deployment = re.search(r"deployment (dep-[0-9a-f]{8})", text)
    assert deployment is not None
    with store.db.session() as s:
        query = select(LedgerEntry.subject_id, func.count()).where(
            LedgerEntry.stage == "serve", LedgerEntry.deployment == deployment[1]
        )
        assert dict(s.execute(query.group_by(LedgerEntry.subject_id)).all()) == {"1": 2, "2": 6}
    store.close()


def wait_for(proc: "subprocess.Popen[bytes]", log: Path, pattern: str) -> str:
    """The first group of `pattern` once the server's stderr has it (the server must still be running)."""
    found: list[str] = []

    def seen() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        m = re.search(pattern, log.read_text())
        if m:
            found.append(m[1])
        return bool(m)

    until(seen, pattern, timeout_s=120)  # the server imports torch and loads two models first
    return found[0]
