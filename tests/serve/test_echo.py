"""What loglikelihood harnesses send to /v1/completions: echo with logprobs (the prompt's tokens scored),
max_tokens 0, token-id prompts and batches of them. The reference is a plain forward pass of the model."""

import dataclasses
import threading
from typing import Any

import httpx
import openai
import pydantic
import pytest
import torch
from openai.types import Completion

from aifab.nn.sampling import SamplingParams
from aifab.serve.api import create_app
from aifab.serve.api.schemas import MAX_PROMPTS
from aifab.serve.engine import Delta, Done, Engine, Event, Request
from aifab.serve.loaded import LoadedModel
from aifab.web import BackgroundServer
from serving import MODEL, WAIT_S, assert_error, body, slowed, wait_until

PROMPT = "def function_(x):"


def direct(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """log_softmax of one forward pass over the model's prefix and `ids`: row j scores ids[j + 1]."""
    with torch.inference_mode():
        logits, _ = lm.model(torch.tensor([[*lm.prefix_ids, *ids]], device=lm.device))
    p = len(lm.prefix_ids)
    return torch.log_softmax(logits[0, p : p + len(ids) - 1].float(), dim=-1)


def tolerance(lm: LoadedModel) -> float:
    """1e-4 in fp32 (the CPU); bf16 (CUDA) rounds the packed and the plain forward pass differently."""
    return 1e-4 if next(lm.model.parameters()).dtype == torch.float32 else 0.1


def assert_scores(lm: LoadedModel, ids: list[int], token_logprobs: list[Any], top: list[Any], n_top: int) -> None:
    """The prompt's part of an echo response equals the direct computation: null first, then each token's
    log-probability and its n_top best alternatives."""
    want, tol = direct(lm, ids), tolerance(lm)
    assert token_logprobs[0] is None and top[0] is None
    assert len(token_logprobs) >= len(ids)
    for j in range(1, len(ids)):
        assert token_logprobs[j] == pytest.approx(float(want[j - 1, ids[j]]), abs=tol)
        best = torch.topk(want[j - 1], n_top).values.tolist()
        assert sorted(top[j].values(), reverse=True) == pytest.approx(best, abs=tol)


def echo(client: httpx.Client, **kw: Any) -> dict[str, Any]:
    r = client.post("/v1/completions", json=body(echo=True, **kw))
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


# --- the engine ------------------------------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.deltas: list[Delta] = []
        self.done: Done | None = None
        self.finished = threading.Event()

    def __call__(self, event: Event) -> None:
        if isinstance(event, Delta):
            self.deltas.append(event)
        else:
            self.done = event
            self.finished.set()

    def scores(self) -> list[float]:
        return [e.logprob for d in self.deltas for e in d.prompt_logprobs]

    def tokens(self) -> list[int]:
        return [e.token for d in self.deltas for e in d.logprobs]


def run(engine: Engine, *reqs: tuple[list[int], SamplingParams, int | None]) -> list[Sink]:
    sinks = [Sink() for _ in reqs]
    for (ids, params, n_top), sink in zip(reqs, sinks, strict=True):
        engine.submit(Request(ids, params, sink, prompt_logprobs=n_top))
    assert all(s.finished.wait(WAIT_S) for s in sinks)
    return sinks


@pytest.mark.parametrize("chunk_tokens", [512, 7, 1])
def test_prompt_scores_survive_chunked_prefill_and_batching(lm: LoadedModel, chunk_tokens: int) -> None:
    """A 100-token prompt prefilled in chunks, sharing steps with a plain request: its scores equal the
    forward pass's, and the plain request gets the tokens it gets alone."""
    words = ["def", "return", "value", "other", "self", "class", "import", "for"]
    long = lm.encode(" ".join(words[(j * 3) % len(words)] for j in range(60)))[:100]
    plain = lm.encode("import value for")
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    engine = Engine(lm, chunk_tokens=chunk_tokens)
    try:
        [alone] = run(engine, (plain, greedy, None))
        scored, other = run(engine, (long, SamplingParams(max_tokens=0, logprobs=2), 2), (plain, greedy, None))
    finally:
        engine.close()
    want = direct(lm, long)
    expected = [float(want[j - 1, long[j]]) for j in range(1, len(long))]
    assert scored.scores() == pytest.approx(expected, abs=1e-4)
    assert all(len(e.top) == 2 for d in scored.deltas for e in d.prompt_logprobs)
    assert scored.done is not None and scored.done.finish_reason == "length"
    assert scored.done.completion_tokens == 0 and scored.done.prompt_tokens == len(long)
    assert scored.done.ttft_s is None  # nothing was generated
    assert other.tokens() == alone.tokens() and other.deltas and not other.deltas[0].prompt_logprobs


def test_an_eos_ending_a_scored_prompt_keeps_its_entry(lm: LoadedModel) -> None:
    """lm-evaluation-harness sends max_tokens 1 and drops the last entry as the generated token: when that
    token is the EOS it still has its entry, so the prompt's last score is not what is dropped."""
    ids = lm.encode("return value")
    eos = int(direct(lm, [*ids, 0])[-1].argmax())  # the greedy next token, made the model's EOS
    engine = Engine(dataclasses.replace(lm, stop_ids=frozenset({eos})))
    try:
        [sink] = run(engine, (ids, SamplingParams(max_tokens=1, temperature=0, logprobs=1), 1))
    finally:
        engine.close()
    assert sink.done is not None and sink.done.finish_reason == "stop" and sink.done.completion_tokens == 0
    assert len(sink.scores()) == len(ids) - 1 and sink.tokens() == [eos]


# --- the API ---------------------------------------------------------------------------------------------------


def test_echo_logprobs_equal_a_direct_forward_pass(client: httpx.Client, loaded: LoadedModel) -> None:
    ids = loaded.encode(PROMPT)
    data = echo(client, prompt=PROMPT, logprobs=3, max_tokens=0)
    [choice] = data["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length" and choice["index"] == 0
    assert lp["tokens"] == [loaded.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == len(ids)
    assert_scores(loaded, ids, lp["token_logprobs"], lp["top_logprobs"], 3)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert data["usage"]["prompt_tokens"] == len(ids) and data["usage"]["completion_tokens"] == 0
    assert data["usage"]["energy_j"] >= 0


def test_echo_then_generated_tokens(client: httpx.Client, loaded: LoadedModel) -> None:
    """With max_tokens, the prompt's entries come first, then the generated ones, which are those of the same
    request without echo; the text is the prompt and then the completion."""
    plain = client.post("/v1/completions", json=body(prompt=PROMPT, max_tokens=4, ignore_eos=True, logprobs=1))
    gen = plain.json()["choices"][0]
    data = echo(client, prompt=PROMPT, max_tokens=4, ignore_eos=True, logprobs=1)
    [choice] = data["choices"]
    n = len(loaded.encode(PROMPT))
    assert choice["text"] == PROMPT + gen["text"] and data["usage"]["completion_tokens"] == 4
    assert choice["logprobs"]["tokens"][n:] == gen["logprobs"]["tokens"]
    tol = tolerance(loaded)
    assert choice["logprobs"]["token_logprobs"][n:] == pytest.approx(gen["logprobs"]["token_logprobs"], abs=tol)
    for got, want in zip(choice["logprobs"]["top_logprobs"][n:], gen["logprobs"]["top_logprobs"], strict=True):
        assert got.keys() == want.keys() and list(got.values()) == pytest.approx(list(want.values()), abs=tol)
    assert echo(client, prompt=PROMPT, max_tokens=4, ignore_eos=True)["choices"][0]["logprobs"] is None


def test_token_id_prompts_and_batches(client: httpx.Client, loaded: LoadedModel) -> None:
    texts = [PROMPT, "return value", "x"]
    ids = [loaded.encode(t) for t in texts]
    as_text = echo(client, prompt=texts[0], logprobs=2, max_tokens=0)["choices"][0]
    as_ids = echo(client, prompt=ids[0], logprobs=2, max_tokens=0)["choices"][0]
    assert as_ids["logprobs"] == as_text["logprobs"]
    batch = echo(client, prompt=ids, logprobs=2, max_tokens=0)
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2]
    for i, choice in enumerate(batch["choices"]):
        lp = choice["logprobs"]
        assert choice["text"] == loaded.tokenizer.decode(ids[i])
        assert_scores(loaded, ids[i], lp["token_logprobs"], lp["top_logprobs"], 2)
    assert batch["usage"]["prompt_tokens"] == sum(map(len, ids))
    # a batch without echo: each choice is what its prompt gets alone (greedy)
    strings = client.post("/v1/completions", json=body(prompt=texts, max_tokens=3)).json()
    for i, text in enumerate(texts):
        alone = client.post("/v1/completions", json=body(prompt=text, max_tokens=3)).json()
        assert strings["choices"][i]["text"] == alone["choices"][0]["text"]
        assert strings["choices"][i]["index"] == i
    assert strings["usage"]["prompt_tokens"] == sum(map(len, ids))


def test_a_prompt_may_fill_the_context_when_only_scored(client: httpx.Client, loaded: LoadedModel) -> None:
    room = loaded.context_len - len(loaded.prefix_ids)
    full = [loaded.encode("def")[0]] * room
    data = echo(client, prompt=full, logprobs=0, max_tokens=0)
    assert len(data["choices"][0]["logprobs"]["token_logprobs"]) == room
    assert all(t == {} for t in data["choices"][0]["logprobs"]["top_logprobs"][1:])
    for longer, max_tokens in ((full, 1), ([*full, full[0]], 0)):  # no room for a token, or for the prompt
        r = client.post("/v1/completions", json=body(prompt=longer, echo=True, max_tokens=max_tokens))
        assert_error(r, 400, "prompt")


def test_loglikelihood_as_lm_evaluation_harness_reads_it(client: httpx.Client, loaded: LoadedModel) -> None:
    """The request local-completions sends for loglikelihood (a batch of token lists, max_tokens 1, echo) and
    its reading of the answer: the continuation's entries are token_logprobs[ctxlen:-1]."""
    pairs = [("def function_", "(x):"), ("return", " value")]
    tokens = [loaded.encode(c) + loaded.encode(x) for c, x in pairs]
    payload = {"model": MODEL, "prompt": tokens, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234}
    r = client.post("/v1/completions", json={**payload, "echo": True})
    assert r.status_code == 200, r.text
    for choice, (context, _), ids in zip(r.json()["choices"], pairs, tokens, strict=True):
        ctxlen = len(loaded.encode(context))
        got = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
        want = direct(loaded, ids)
        expected = sum(float(want[j - 1, ids[j]]) for j in range(ctxlen, len(ids)))
        assert got == pytest.approx(expected, abs=len(ids) * tolerance(loaded))
        greedy = all(
            tok == max(top.values())
            for tok, top in zip(
                choice["logprobs"]["token_logprobs"][ctxlen:-1],
                choice["logprobs"]["top_logprobs"][ctxlen:-1],
                strict=True,
            )
        )
        assert greedy == all(int(want[j - 1].argmax()) == ids[j] for j in range(ctxlen, len(ids)))


# --- the official client's types -------------------------------------------------------------------------------


def validation_errors(data: dict[str, Any]) -> set[tuple[Any, ...]]:
    try:
        Completion.model_validate(data)
    except pydantic.ValidationError as e:
        return {tuple(err["loc"]) for err in e.errors()}
    return set()


def test_responses_parse_as_the_openai_types(client: httpx.Client) -> None:
    """Every field has the openai package's type, except the null that scores an echoed prompt's first token:
    OpenAI sends it so, and its generated types say float there (the client itself parses it as sent)."""
    for payload in (body(), body(prompt=["a", "b"]), body(prompt=[5, 6], echo=True), body(logprobs=2)):
        data = client.post("/v1/completions", json=payload).json()
        assert validation_errors(data) == set(), payload
    data = echo(client, prompt=[[5, 6, 7], [8, 9]], logprobs=1, max_tokens=1)
    nulls = {("choices", i, "logprobs", k, 0) for i in (0, 1) for k in ("token_logprobs", "top_logprobs")}
    assert validation_errors(data) == nulls


def test_openai_client_scores_prompts(server: BackgroundServer, loaded: LoadedModel) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=WAIT_S)
    ids = [loaded.encode(PROMPT), loaded.encode("return value")]
    out = oai.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=0, temperature=0)
    assert isinstance(out, Completion) and [c.index for c in out.choices] == [0, 1]
    for choice, prompt in zip(out.choices, ids, strict=True):
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        assert choice.finish_reason == "length"
        assert_scores(loaded, prompt, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs or [], 1)
    one = oai.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=2, temperature=0)
    assert one.choices[0].text.startswith(PROMPT) and one.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=2, stream=True)


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [1, 2.5]}, "prompt"),
        ({"prompt": [True]}, "prompt"),
        ({"prompt": [1, 10**6]}, "prompt"),  # outside the vocabulary
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": [[1], [2, 10**6]]}, "prompt"),
        ({"prompt": [[1]] * (MAX_PROMPTS + 1)}, "prompt"),
        ({"prompt": ["a"] * (MAX_PROMPTS + 1)}, "prompt"),
        ({"prompt": [[1], [1] * 40]}, "prompt"),  # the second is longer than the context
        ({"echo": True, "stream": True}, "echo"),
        ({"prompt": ["a", "b"], "stream": True}, "prompt"),
        ({"echo": "maybe"}, "echo"),
        ({"echo": True, "logprobs": 21}, "logprobs"),
        ({"echo": True, "logprobs": -1}, "logprobs"),
        ({"echo": True, "max_tokens": -1}, "max_tokens"),
        ({"echo": True, "max_tokens": 30}, "max_tokens"),  # the prompt fits alone, not with 30 new tokens
        ({"max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ({"echo": True, "n": 2}, "n"),
    ],
)
def test_bad_field_is_a_400_naming_it(client: httpx.Client, change: dict[str, Any], param: str) -> None:
    assert_error(client.post("/v1/completions", json=body(**change)), 400, param)


def test_a_batch_names_the_prompt_at_fault(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json=body(prompt=[[1], [2, 10**6]], echo=True, max_tokens=0))
    assert r.json()["error"]["message"].startswith("prompt: prompt 1: token id 1000000 is outside the vocabulary")


def test_a_batch_bigger_than_the_queue_is_a_429_and_leaves_nothing_running(loaded: LoadedModel) -> None:
    engine = Engine(loaded, max_queue=2, start=False)  # nobody takes from the queue: the third prompt is refused
    try:
        with BackgroundServer(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=WAIT_S) as c:
            assert_error(c.post("/v1/completions", json=body(prompt=["a", "b", "c"])), 429, None, "rate_limit_error")
        queued = [engine.queue.get_nowait() for _ in range(2)]
        assert all(r is not None and r.cancelled.is_set() for r in queued)
    finally:
        engine.close()


def test_a_batch_past_the_timeout_is_a_504_and_frees_the_engine(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(loaded)
    reasons = slowed(engine, monkeypatch)  # 50 ms a step: 25 steps run far past the 0.2 s timeout
    long = {"max_tokens": 25, "ignore_eos": True, "echo": True, "logprobs": 1}
    try:
        with BackgroundServer(create_app(engine, request_timeout_s=0.2)) as srv:
            with httpx.Client(base_url=srv.url, timeout=WAIT_S) as c:
                r = c.post("/v1/completions", json=body(prompt=[[5, 6], [7]], **long))
            assert_error(r, 504, None, kind="server_error")
            wait_until(lambda: len(reasons) == 2, "the engine to drop the batch")
        assert reasons == ["cancelled", "cancelled"]
    finally:
        engine.close()
