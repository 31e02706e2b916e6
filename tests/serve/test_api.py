import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from aifab.nn.sampling import SamplingParams
from aifab.serve.api import create_app
from aifab.serve.engine import Done, Engine, Event, Request
from aifab.serve.loaded import LoadedModel
from aifab.store import Store
from aifab.web import BackgroundServer
from serving import MODEL, WAIT_S, assert_error, body, slowed, stream, tokens, wait_until

# --- completions -----------------------------------------------------------------------------------------------


def test_completion_has_the_openai_shape_and_consistent_usage(client: httpx.Client, loaded: LoadedModel) -> None:
    r = client.post("/v1/completions", json=body())
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["model"] == MODEL
    assert data["id"].startswith("cmpl-") and isinstance(data["created"], int)
    [choice] = data["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str)
    usage = data["usage"]
    assert usage["prompt_tokens"] == len(loaded.encode("def function_"))
    assert 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 12


def test_greedy_completions_are_deterministic(client: httpx.Client) -> None:
    texts = {client.post("/v1/completions", json=body()).json()["choices"][0]["text"] for _ in range(3)}
    assert len(texts) == 1


@pytest.mark.parametrize("extra", [{}, {"max_tokens": 1}, {"prompt": ["return value"]}])
def test_stream_text_equals_non_stream_text(client: httpx.Client, extra: dict[str, Any]) -> None:
    whole = client.post("/v1/completions", json=body(**extra)).json()
    events = stream(client, body(**extra))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert tokens(last["usage"]) == tokens(whole["usage"])
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


def test_stop_string_cuts_the_text(client: httpx.Client) -> None:
    full = client.post("/v1/completions", json=body()).json()["choices"][0]["text"]
    assert len(full) >= 4, f"the tiny model produced too little text to test stops: {full!r}"
    stop = full[2:4]
    for payload in (body(stop=stop), body(stop=["zzzz", stop])):
        data = client.post("/v1/completions", json=payload).json()
        assert data["choices"][0]["text"] == full[: full.index(stop)]
        assert data["choices"][0]["finish_reason"] == "stop"
        streamed = [json.loads(e) for e in stream(client, payload)[:-1]]
        assert "".join(c["choices"][0]["text"] for c in streamed) == full[: full.index(stop)]


def test_openai_client(server: BackgroundServer) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=WAIT_S)
    whole = oai.completions.create(model=MODEL, prompt="def function_", max_tokens=12, temperature=0)
    assert whole.model == MODEL and whole.object == "text_completion"
    assert whole.usage is not None
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(
        oai.completions.create(model=MODEL, prompt="def function_", max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert tokens(chunks[-1].usage) == tokens(whole.usage)
    assert [m.id for m in oai.models.list()] == [MODEL]
    with pytest.raises(openai.BadRequestError) as exc:
        oai.completions.create(model=MODEL, prompt="def", max_tokens=0)
    assert exc.value.status_code == 400


# --- models and health -----------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client: httpx.Client) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "list"
    [card] = data["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "aifab"
    assert isinstance(card["created"], int) and card["created"] > 0


def test_healthz(client: httpx.Client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["model"] == MODEL


@pytest.mark.parametrize("ref", ["tiny", "tiny:1", "tiny@latest"])
def test_the_model_may_be_named_as_it_was_loaded(trained: tuple[Store, str], ref: str) -> None:
    store, _ = trained
    lm = LoadedModel.load(store, ref)
    assert lm.id == MODEL and lm.names == {"tiny", "tiny:1", "tiny@latest"}
    engine = Engine(lm)
    try:
        with BackgroundServer(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=WAIT_S) as c:
            for name in ("tiny", "tiny:1", "tiny@latest"):
                r = c.post("/v1/completions", json=body(model=name, max_tokens=2))
                assert r.status_code == 200, r.text
                assert r.json()["model"] == MODEL
            for name in ("tiny:2", "tiny@best", "other", ""):
                assert_error(c.post("/v1/completions", json=body(model=name)), 400, "model")
    finally:
        engine.close()


# --- bad requests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10_000}, "max_tokens"),  # more than the 32-token context
        ({"max_tokens": 30}, "max_tokens"),  # fits the context alone, not with the prompt
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"n": 2}, "n"),
        ({"bogus": 1}, "bogus"),
        ({"echo": True, "stream": True}, "echo"),  # echo is answered whole (tests/serve/test_echo.py)
        ({"prompt": "def " * 40}, "prompt"),  # longer than the context
        ({"prompt": ""}, "prompt"),  # nothing to continue
        ({"prompt": []}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "nope"}, "model"),
    ],
)
def test_bad_field_is_a_400_naming_it(client: httpx.Client, change: dict[str, Any], param: str) -> None:
    assert_error(client.post("/v1/completions", json=body(**change)), 400, param)


@pytest.mark.parametrize("field", ["prompt", "model"])
def test_missing_field_is_a_400_naming_it(client: httpx.Client, field: str) -> None:
    payload = body()
    del payload[field]
    assert_error(client.post("/v1/completions", json=payload), 400, field)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_temperature_is_a_400(client: httpx.Client, value: str) -> None:
    raw = f'{{"model": "{MODEL}", "prompt": "x", "temperature": {value}}}'.encode()
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, "temperature")


def test_malformed_json_is_a_400(client: httpx.Client) -> None:
    r = client.post("/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_body_over_the_limit_is_a_413(engine: Engine) -> None:
    app = create_app(engine, max_body_bytes=1000)
    padding = "x" * 1200
    payload = json.dumps(body(user=padding)).encode()

    def chunks() -> Iterator[bytes]:  # no content-length: httpx sends it chunked
        for i in range(0, len(payload), 100):
            yield payload[i : i + 100]

    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=WAIT_S) as c:
        assert_error(c.post("/v1/completions", content=payload), 413, None, kind="request_too_large")
        r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        assert_error(r, 413, None, kind="request_too_large")
        assert c.post("/v1/completions", json=body(user="x" * 100)).status_code == 200  # under the limit


# --- API key ---------------------------------------------------------------------------------------------------


def test_api_key_is_required_once_set(engine: Engine) -> None:
    with BackgroundServer(create_app(engine, api_key="sekrit")) as srv, httpx.Client(base_url=srv.url) as c:
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "sekrit"}):
            for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/healthz")):
                r = c.request(method, path, json=body() if method == "POST" else None, headers=headers)
                assert_error(r, 401, None, kind="authentication_error")
        good = {"authorization": "Bearer sekrit"}
        assert c.post("/v1/completions", json=body(max_tokens=2), headers=good).status_code == 200
        assert c.get("/v1/models", headers=good).status_code == 200
        oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekrit", max_retries=0, timeout=WAIT_S)
        assert oai.completions.create(model=MODEL, prompt="def", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()


# --- load and disconnects --------------------------------------------------------------------------------------


def test_queue_full_is_a_429_with_retry_after(loaded: LoadedModel) -> None:
    engine = Engine(loaded, max_queue=1)
    entered, release = threading.Event(), threading.Event()
    done = [threading.Event(), threading.Event()]

    def blocking(event: Event) -> None:  # the worker thread waits inside the first request's first event
        entered.set()
        release.wait(WAIT_S)
        if isinstance(event, Done):
            done[0].set()

    params = SamplingParams(max_tokens=2, temperature=0)
    try:
        with BackgroundServer(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=WAIT_S) as c:
            engine.submit(Request(loaded.encode("def"), params, blocking))
            assert entered.wait(WAIT_S)  # the worker is busy with the first request
            engine.submit(Request(loaded.encode("def"), params, lambda e: isinstance(e, Done) and done[1].set()))
            r = c.post("/v1/completions", json=body())  # the queue holds one request: this one is refused
            assert_error(r, 429, None, kind="rate_limit_error")
            assert r.headers["retry-after"] == "1"
            release.set()
            assert all(d.wait(WAIT_S) for d in done)  # the admitted requests are still served
            assert c.post("/v1/completions", json=body(max_tokens=2)).status_code == 200
            assert 'aifab_rejected_requests_total{model="tiny:1"} 1.0' in c.get("/metrics").text
    finally:
        release.set()
        engine.close()


LONG = {"max_tokens": 25, "ignore_eos": True, "prompt": "def"}  # 25 steps of 50 ms, whatever the model says


def test_client_disconnect_mid_stream_frees_its_slot(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(loaded)
    reasons = slowed(engine, monkeypatch)
    try:
        with BackgroundServer(create_app(engine)) as srv:
            with (
                httpx.Client(base_url=srv.url, timeout=WAIT_S) as c,
                c.stream("POST", "/v1/completions", json=body(stream=True, **LONG)) as r,
            ):
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                assert engine.running == 1
            # the client and its connection are gone: the slot is free well before the 25 steps would end
            wait_until(lambda: engine.running == 0, "the engine to drop the abandoned request")
            assert reasons == ["cancelled"]
            with httpx.Client(base_url=srv.url, timeout=WAIT_S) as c:
                assert 'aifab_running_requests{model="tiny:1"} 0.0' in c.get("/metrics").text
                r2 = c.post("/v1/completions", json=body(max_tokens=2))
                assert r2.status_code == 200 and r2.json()["usage"]["completion_tokens"] >= 1
    finally:
        engine.close()


def test_request_timeout_is_a_504_and_frees_the_engine(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(loaded)
    reasons = slowed(engine, monkeypatch)
    try:
        app = create_app(engine, request_timeout_s=0.2)
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=WAIT_S) as c:
            assert_error(c.post("/v1/completions", json=body(**LONG)), 504, None, kind="server_error")
            wait_until(lambda: len(reasons) == 1, "the engine to drop the timed-out request")
            events = stream(c, body(**LONG))
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["type"] == "server_error"
            wait_until(lambda: len(reasons) == 2, "the engine to drop the timed-out stream")
        assert reasons == ["cancelled", "cancelled"]
    finally:
        engine.close()


def test_healthz_reports_queue_and_running(client: httpx.Client, engine: Engine) -> None:
    data = client.get("/healthz").json()
    assert data["queued"] == 0 and data["running"] == 0
