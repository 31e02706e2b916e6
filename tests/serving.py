"""Helpers for the serving tests: request bodies for the tiny model, SSE parsing, OpenAI error checks, slowed
engine steps."""

import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from aifab.serve.engine import Engine

WAIT_S = 30  # an upper bound for waits that normally take milliseconds; never a timing assertion
MODEL = "tiny:1"


def stream(client: httpx.Client, payload: dict[str, Any], path: str = "/v1/completions") -> list[str]:
    """POST with stream on; the SSE data lines."""
    with client.stream("POST", path, json={**payload, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_data(r)


def body(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "def function_", "max_tokens": 12, "temperature": 0, **kw}


def sse_data(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def assert_error(r: httpx.Response, status: int, param: str | None, kind: str = "invalid_request_error") -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == kind
    assert err["param"] == param
    if param is not None:
        assert err["message"].startswith(f"{param}:")


def wait_until(cond: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


TOKEN_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def tokens(usage: Any) -> dict[str, int]:
    """The OpenAI token counts of a usage (a dict or the openai client's object), without aifab's energy fields,
    which differ between two runs of the same request."""
    get = usage.get if isinstance(usage, dict) else lambda k: getattr(usage, k)
    return {k: get(k) for k in TOKEN_KEYS}


def two_versions(trained: Any, home: Any) -> Any:
    """A store of its own at `home` holding three versions of `tiny`, cheaply (no training): 1 the trained
    tiny model (`tiny@prod`), 2 the same shape with random weights (`tiny@candidate`), so the two answer
    differently, and 3 registered with weights that do not load (its "weights" are the tokenizer's JSON)."""
    import torch

    from aifab.nn.config import ModelConfig
    from aifab.nn.transformer import Transformer
    from aifab.nn.weights import to_bytes
    from aifab.registry.models import register, resolve
    from aifab.store import Store

    src, ref = trained
    mv = resolve(src, ref)
    store = Store(home)
    weights = store.artifacts.put_bytes(src.artifacts.get_bytes(mv.weights_digest))
    tokenizer = store.artifacts.put_bytes(src.artifacts.get_bytes(mv.tokenizer_digest))
    torch.manual_seed(2)
    other = store.artifacts.put_bytes(to_bytes(Transformer(ModelConfig.from_dict(mv.config))))
    for digest, alias in ((weights, "prod"), (other, "candidate"), (tokenizer, "broken")):
        register(
            store, "tiny", weights_digest=digest, tokenizer_digest=tokenizer, config=mv.config,
            params_count=mv.params_count, metrics={}, aliases=(alias,),
        )  # fmt: skip
    return store


def slowed(engine: "Engine", monkeypatch: pytest.MonkeyPatch, step_s: float = 0.05) -> list[str]:
    """Make every engine step take at least `step_s`, so a stream lasts long enough to walk away from;
    returns the finish reasons of the requests the engine ends, as it ends them."""
    execute, finish = engine._execute, engine._finish
    reasons: list[str] = []

    def slow(step: Any) -> Any:
        time.sleep(step_s)
        return execute(step)

    def record(seq: Any, reason: str, error: str | None = None) -> None:
        reasons.append(reason)
        finish(seq, reason, error)

    monkeypatch.setattr(engine, "_execute", slow)
    monkeypatch.setattr(engine, "_finish", record)
    return reasons
