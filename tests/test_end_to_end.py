"""The whole line on a tiny corpus through the real CLI, then the model served by `aifab serve` over HTTP."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import aifab, cli_env, write_corpus

pytestmark = pytest.mark.slow

SPEC = """\
name: demo
data:
  sources: [corpus]
  val_fraction: 0.2
tokenizer: {vocab_size: 300}
model: {n_layer: 2, n_head: 2, d_model: 32, context_len: 32}
training: {steps: 60, seconds: null, batch_size: 8, lr: 0.01, eval_every: 20}
evaluation: {batches: 2, prompts: ["def "], max_new_tokens: 8}
serving: {requests: 2, max_tokens: 8}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`aifab demo --config factory.yaml --json ARGS` on the tiny corpus; the report is its last line."""
    write_corpus(tmp_path / "corpus")
    (tmp_path / "factory.yaml").write_text(SPEC)
    demo = aifab("demo", "--config", "factory.yaml", "--json", *args, home=tmp_path / "home", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    return demo, json.loads(demo.stdout.strip().splitlines()[-1])


def test_demo_then_serve(tmp_path: Path) -> None:
    demo, report = run_demo(tmp_path)
    assert report["data"]["files"] == 15 and report["data"]["bytes"] > 10_000 and report["data"]["tokens"] > 1000
    assert report["model"]["params"] > 10_000 and report["model"]["ref"] == "demo:1"
    assert report["train"]["tokens_per_s"] > 0 and report["train"]["steps"] == 60
    assert report["train"]["val_loss_final"] < report["train"]["val_loss_initial"]
    assert report["energy_j"] > 0 and report["cost_usd"] > 0 and report["energy_estimated"] is True
    assert [r["stream_matches"] for r in report["serving"]["requests"]] == [True, True]
    assert "aifab --home" in report["serving"]["command"] and "serve demo:1" in report["serving"]["command"]
    assert "aifab demo report" in demo.stdout and "estimated" in demo.stdout

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "aifab", "serve", "demo@latest", "--port", str(port)],
            env=cli_env(tmp_path / "home"),
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["demo:1"]
        body = {"model": "demo", "prompt": "def function_", "max_tokens": 12, "temperature": 0}
        resp = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        whole = resp.json()
        assert whole["usage"]["completion_tokens"] >= 1
        assert whole["usage"]["total_tokens"] == whole["usage"]["prompt_tokens"] + whole["usage"]["completion_tokens"]
        parts = []
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
            lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            parts.extend(c["text"] for c in json.loads(line[6:])["choices"])
        assert "".join(parts) == whole["choices"][0]["text"]
    finally:
        server.terminate()
        server.wait(timeout=15)


def test_demo_without_serving_on_a_time_budget(tmp_path: Path) -> None:
    """--no-serve skips the server and prints the command that starts one; --train-seconds overrides the spec."""
    demo, report = run_demo(tmp_path, "--no-serve", "--train-seconds", "1")
    assert "requests" not in report["serving"]
    show = aifab("runs", "show", report["train"]["run_id"], "--json", home=tmp_path / "home")
    assert json.loads(show.stdout)["params"]["training"]["seconds"] == 1.0
    assert "serve it: aifab --home" in demo.stdout
