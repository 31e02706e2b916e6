"""`aifab serve MODEL --engine ray --replicas 2`: two engine replicas behind one endpoint on a local Ray,
with the same API (driven by the official `openai` client), and a clean stop on SIGTERM."""

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import Select, func, select

from aifab.store import Store
from aifab.store.schema import LedgerEntry
from helpers import cli_env
from serving import MODEL

pytest.importorskip("ray.serve")
pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

START_S = 120  # Ray, its Serve controller and proxy, and two replicas that each load the model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_replicas_behind_one_endpoint(trained: tuple[Store, str], tmp_path: Path) -> None:
    store, _ = trained
    port = free_port()
    env = {**cli_env(store.home), "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "aifab", "serve", MODEL, "--engine", "ray", "--replicas", "2", "--port", str(port)]
    log = (tmp_path / "serve.err").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        with httpx.Client(base_url=url, timeout=10) as c:
            while True:
                assert proc.poll() is None, (tmp_path / "serve.err").read_text()[-3000:]
                assert time.monotonic() < deadline, "Ray Serve did not come up"
                # the line comes once every replica is up (the proxy answers as soon as the first one is)
                if "with 2 Ray Serve replicas" in (tmp_path / "serve.err").read_text():
                    break
                time.sleep(0.5)
            assert c.get("/healthz").status_code == 200
            replicas = {c.get("/healthz").json()["replica"] for _ in range(30)}
            assert len(replicas) == 2  # the proxy spreads requests over both engines
            bad = c.post("/v1/completions", json={"model": MODEL, "prompt": "def", "max_tokens": 0})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
        oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        whole = oai.completions.create(model=MODEL, prompt="def function_", max_tokens=8, temperature=0)
        again = oai.completions.create(model=MODEL, prompt="def function_", max_tokens=8, temperature=0)
        assert whole.choices[0].text == again.choices[0].text  # greedy: the same text from either replica
        chunks = list(
            oai.completions.create(model=MODEL, prompt="def function_", max_tokens=8, temperature=0, stream=True)
        )
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
        chat = oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "def"}], max_tokens=4, temperature=0
        )
        assert chat.choices[0].message.role == "assistant" and chat.usage is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=90) == 0, (tmp_path / "serve.err").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    # every replica stamps its ledger rows with the deployment id of the startup line; counted once the
    # replicas have stopped, which flushes what they hold (while they run, they flush every second)
    found = re.search(r"deployment (dep-[0-9a-f]{8})", (tmp_path / "serve.err").read_text())
    assert found is not None
    query = select(func.count(LedgerEntry.id)).where(LedgerEntry.stage == "serve", LedgerEntry.deployment == found[1])
    assert _count(store, query) == 4  # whole, again, the stream and the chat; the 400 is not charged


def _count(store: Store, query: Select[tuple[int]]) -> int:
    """The count in the SQLite file under the store's home, which is where the server writes: its environment
    (`cli_env`) drops AIFAB_DB, whatever database this test process's stores were pointed at."""
    from aifab.store.db import Database

    db = Database(f"sqlite:///{store.home / 'aifab.db'}")
    try:
        with db.session() as s:
            return int(s.scalar(query) or 0)
    finally:
        db.close()
