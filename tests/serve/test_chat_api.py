"""Chat completions, logprobs, /metrics and overload, through HTTP and the official `openai` client."""

import asyncio
import dataclasses
import json
import time
from typing import Any

import httpx
import openai
import pytest

from aifab.serve.api import create_app
from aifab.serve.chat import DEFAULT_TEMPLATE, TemplateError, render
from aifab.serve.engine import Engine
from aifab.serve.loaded import LoadedModel
from aifab.web import BackgroundServer
from serving import MODEL, WAIT_S, assert_error, body, stream, tokens, wait_until

CHAT = "/v1/chat/completions"


def chat(**kw: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "def"}]  # the tiny model's context is 32 tokens
    return {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, **kw}


def test_chat_completion_has_the_openai_shape(client: httpx.Client, loaded: LoadedModel) -> None:
    r = client.post(CHAT, json=chat())
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-") and data["model"] == MODEL
    [choice] = data["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    # the default template, then the tokenizer: that is the prompt the model saw
    text = render(chat()["messages"], None, {})
    assert text == "User: def\n\nAssistant:"
    usage = data["usage"]
    assert usage["prompt_tokens"] == len(loaded.encode(text))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_stream_equals_whole(client: httpx.Client) -> None:
    whole = client.post(CHAT, json=chat()).json()
    events = stream(client, chat(), CHAT)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert tokens(chunks[-1]["usage"]) == tokens(whole["usage"])


def test_openai_client_chat_whole_and_streamed(server: BackgroundServer) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=WAIT_S)
    messages: Any = [{"role": "user", "content": "def"}]
    whole = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.usage is not None
    parts = oai.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(parts)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert tokens(chunks[-1].usage) == tokens(whole.usage)
    lp = oai.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = lp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == lp.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.logprob  # greedy: the chosen token is the most likely
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=[], max_tokens=4)


def test_completion_logprobs(client: httpx.Client) -> None:
    data = client.post("/v1/completions", json=body(max_tokens=5, logprobs=3)).json()
    lp = data["choices"][0]["logprobs"]
    n = data["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert all(
        len(top) <= 3 and max(top.values()) >= chosen
        for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"], strict=True)
    )
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"max_completion_tokens": 10_000}, "max_completion_tokens"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"temperature": -1}, "temperature"),
        ({"model": "other"}, "model"),
        ({"messages": [{"role": "user", "content": "def " * 40}]}, "messages"),  # longer than the context
    ],
)
def test_bad_chat_field_is_a_400_naming_it(client: httpx.Client, change: dict[str, Any], param: str) -> None:
    assert_error(client.post(CHAT, json=chat(**change)), 400, param)


# --- chat templates --------------------------------------------------------------------------------------------

# the shape of a Llama-2 style template: the BOS token is the template's to write, and it refuses some orders
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' and loop.first %}{{ raise_exception('assistant cannot speak first') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_template_renders_with_the_models_special_tokens() -> None:
    text = render([{"role": "user", "content": "hi"}], TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"})
    assert text == "<s><|user|>hi</s><|assistant|>"
    with pytest.raises(TemplateError, match="assistant cannot speak first"):
        render([{"role": "assistant", "content": "hi"}], TEMPLATE, {})
    with pytest.raises(TemplateError, match="chat template failed"):
        render([{"role": "user", "content": "hi"}], "{{ messages[0].nope() }}", {})
    assert render([], DEFAULT_TEMPLATE, {}) == "Assistant:"
    two = [{"role": "system", "content": "Write Python."}, {"role": "user", "content": "def f"}]
    assert render(two, None, {}) == "System: Write Python.\n\nUser: def f\n\nAssistant:"


def test_the_models_own_template_shapes_the_prompt(loaded: LoadedModel) -> None:
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    # as an imported model: no document-start prefix, the template writes its own BOS
    lm = dataclasses.replace(loaded, chat_template=TEMPLATE, special_tokens=specials, prefix_ids=())
    engine = Engine(lm)
    try:
        with BackgroundServer(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=WAIT_S) as c:
            messages = [{"role": "user", "content": "def"}]
            r = c.post(CHAT, json=chat(messages=messages, max_tokens=2))
            assert r.status_code == 200, r.text
            text = "<|endoftext|><|user|>def<|endoftext|><|assistant|>"
            want = lm.tokenizer.encode(text, add_special_tokens=False).ids
            assert want[0] == lm.eot_id  # the template's BOS string became the special token itself
            assert r.json()["usage"]["prompt_tokens"] == len(want)
            refused = c.post(CHAT, json=chat(messages=[{"role": "assistant", "content": "x"}]))
            assert_error(refused, 400, "messages")
            assert "assistant cannot speak first" in refused.json()["error"]["message"]
    finally:
        engine.close()


# --- metrics and overload --------------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample in an exposition text."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted({"model": MODEL, **labels}.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            head, value = line.rsplit(" ", 1)
            got = ",".join(sorted(head[len(name) + 1 : -1].split(",")))
            if got == want:
                return float(value)
    raise AssertionError(f"no sample {name}{{{want}}} in /metrics")


def test_metrics_count_what_was_served(client: httpx.Client) -> None:
    before = client.get("/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    r = client.post("/v1/completions", json=body(max_tokens=5, ignore_eos=True)).json()
    assert r["usage"]["completion_tokens"] == 5
    after = client.get("/metrics").text
    b = before.text
    assert metric(after, "aifab_generation_tokens_total") - metric(b, "aifab_generation_tokens_total") == 5
    assert (
        metric(after, "aifab_prompt_tokens_total") - metric(b, "aifab_prompt_tokens_total")
        >= r["usage"]["prompt_tokens"]
    )
    assert metric(after, "aifab_requests_total", finish_reason="length") >= 1
    assert metric(after, "aifab_time_to_first_token_seconds_count") > metric(
        b, "aifab_time_to_first_token_seconds_count"
    )
    assert metric(after, "aifab_time_per_output_token_seconds_count") >= 1
    assert metric(after, "aifab_queue_depth") == 0 and metric(after, "aifab_running_requests") == 0


def test_overload_gets_429s_and_no_5xx_and_the_server_stays_healthy(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 concurrent requests against 8 queue places and 4 batch slots (each engine step slowed to 20 ms, so
    the queue really fills): some are refused at once with 429, every admitted one is served, none gets 5xx."""
    engine = Engine(loaded, max_queue=8, max_batch=4)
    execute = engine._execute

    def slow(step: Any) -> Any:
        time.sleep(0.02)
        return execute(step)

    monkeypatch.setattr(engine, "_execute", slow)

    async def flood(url: str) -> list[int]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=url, timeout=WAIT_S * 4, limits=limits) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json=body(max_tokens=4)) for _ in range(200)))
            bad = [r for r in rs if r.status_code not in (200, 429)]
            assert not bad, bad[0].text
            for r in rs:
                if r.status_code == 429:
                    assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
                else:
                    assert r.json()["usage"]["completion_tokens"] >= 1
            return [r.status_code for r in rs]

    try:
        with BackgroundServer(create_app(engine)) as srv:
            codes = asyncio.run(flood(srv.url))
            # the first 8 always find a queue place; how many more get in depends on when the engine admits
            assert codes.count(429) > 0 and codes.count(200) >= 8
            with httpx.Client(base_url=srv.url, timeout=WAIT_S) as c:
                wait_until(lambda: engine.running == 0 and engine.queue.qsize() == 0, "the engine to drain")
                assert c.get("/healthz").json()["status"] == "ok"
                assert metric(c.get("/metrics").text, "aifab_rejected_requests_total") == codes.count(429)
                assert c.post("/v1/completions", json=body(max_tokens=2)).status_code == 200
    finally:
        engine.close()
