"""Continuous batching: whatever else shares a step, each request gets the tokens it would get alone.

The reference is `generate()`, the single-sequence path with its own KV cache, run once per request. The
engine packs many sequences (decodes and prompt chunks) into each forward pass, so these tests vary what
shares the steps: batch sizes, chunk budgets that split prompts, requests that arrive mid-decode, and slots
reused after others finish. Token ids are compared (through logprobs), not just text.
"""

import copy
import dataclasses
import threading
import time
from typing import Any

import pytest
import torch

from aifab.nn.generate import generate
from aifab.nn.sampling import SamplingParams
from aifab.serve.engine import Delta, Done, Engine, Event, Request, Scheduler, Sequence
from aifab.serve.loaded import LoadedModel

WAIT_S = 60  # an upper bound for waits that normally take milliseconds; never a timing assertion


def prompts(lm: LoadedModel, n: int) -> list[list[int]]:
    """n prompts of varied lengths (1 to 16 words: a few to about 50 tokens), deterministic."""
    words = ["def", "return", "value", "other", "self", "class", "import", "for", "while", "if", "else", "none"]
    out = []
    for i in range(n):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(1 + (i * 11) % 16))
        out.append(lm.encode(text))
    return out


def reference(lm: LoadedModel, prompt: list[int], max_tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return list(generate(lm.model, [*lm.prefix_ids, *prompt], params))


class Tokens:
    """Collects one request's generated token ids (from logprobs) and its Done."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.done: Done | None = None
        self.finished = threading.Event()

    def __call__(self, event: Event) -> None:
        if isinstance(event, Delta):
            self.ids += [e.token for e in event.logprobs]
        else:
            self.done = event
            self.finished.set()


def run_all(engine: Engine, reqs: list[tuple[list[int], SamplingParams]], gap_s: float = 0.0) -> list[Tokens]:
    sinks = []
    for prompt, params in reqs:
        sinks.append(Tokens())
        engine.submit(Request(prompt, params, sinks[-1]))
        if gap_s:
            time.sleep(gap_s)  # later requests arrive while earlier ones decode
    for s in sinks:
        assert s.finished.wait(WAIT_S), "the engine never finished a request"
    return sinks


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static-shape decode"])
@pytest.mark.parametrize(
    ("max_batch", "chunk_tokens", "n", "gap_s"),
    [
        (1, 512, 4, 0.0),  # one at a time: the slot is reused
        (4, 512, 9, 0.0),  # full batches, whole-prompt prefill
        (8, 7, 12, 0.0),  # prompts split into 7-token chunks, mixed with decodes in the same steps
        (16, 16, 10, 0.002),  # staggered arrivals join a running batch
    ],
)
def test_greedy_tokens_equal_the_single_request_run(
    lm: LoadedModel, max_batch: int, chunk_tokens: int, n: int, gap_s: float, graphs: bool
) -> None:
    """With `graphs`, decode-only steps run in the static shapes of CUDA graphs (serve.graphs), eagerly here."""
    ps = prompts(lm, n)
    want = [reference(lm, p, GREEDY.max_tokens) for p in ps]
    engine = Engine(lm, max_queue=64, max_batch=max_batch, chunk_tokens=chunk_tokens, graphs=graphs)
    try:
        got = run_all(engine, [(p, GREEDY) for p in ps], gap_s)
    finally:
        engine.close()
    for i, (sink, expected) in enumerate(zip(got, want, strict=True)):
        assert sink.done is not None and sink.done.finish_reason == "length", sink.done
        assert sink.ids == expected, f"request {i} ({len(ps[i])}-token prompt) diverged from its lone run"
        assert sink.done.completion_tokens == GREEDY.max_tokens and sink.done.prompt_tokens == len(ps[i])
    assert engine.running == 0


def test_prompt_chunks_share_steps_with_decodes(lm: LoadedModel) -> None:
    """With a 7-token budget, a long prompt takes several steps, and requests already decoding keep getting a
    token in each of them."""
    engine = Engine(lm, max_batch=4, chunk_tokens=7)
    steps: list[tuple[int, list[int]]] = []
    execute = engine._execute

    def spy(step: Any) -> Any:
        steps.append((len(step.decode), [n for _, _, n in step.chunks]))
        return execute(step)

    engine._execute = spy  # type: ignore[method-assign]
    try:
        short, long = lm.encode("def"), prompts(lm, 40)[-1]
        assert len(long) > 20
        first = run_all(engine, [(short, GREEDY)])  # warm: then the long one arrives alone
        steps.clear()
        sinks = run_all(engine, [(short, GREEDY), (long, GREEDY)], gap_s=0.01)
    finally:
        engine.close()
    assert first[0].ids == sinks[0].ids == reference(lm, short, GREEDY.max_tokens)
    assert sinks[1].ids == reference(lm, long, GREEDY.max_tokens)
    mixed = [(d, c) for d, c in steps if d and c]
    assert mixed, f"no step mixed decodes with a prompt chunk: {steps}"
    assert all(d + sum(c) <= 7 for d, c in steps if c), "a step went over the token budget"


def test_seeded_sampling_is_the_same_alone_and_batched(lm: LoadedModel) -> None:
    params = [SamplingParams(max_tokens=16, temperature=0.9, top_k=40, seed=s, logprobs=0) for s in range(6)]
    ps = prompts(lm, 6)
    engine = Engine(lm, max_batch=1)
    try:
        alone = [run_all(engine, [(p, sp)])[0].ids for p, sp in zip(ps, params, strict=True)]
    finally:
        engine.close()
    engine = Engine(lm, max_batch=6, chunk_tokens=9)
    try:
        together = [s.ids for s in run_all(engine, list(zip(ps, params, strict=True)))]
    finally:
        engine.close()
    assert together == alone
    assert len({tuple(t) for t in alone}) == 6


def test_no_more_than_max_batch_requests_run_at_once(lm: LoadedModel) -> None:
    engine = Engine(lm, max_batch=3)
    seen: list[int] = []
    execute = engine._execute

    def spy(step: Any) -> Any:
        seen.append(engine.running)
        return execute(step)

    engine._execute = spy  # type: ignore[method-assign]
    try:
        run_all(engine, [(p, GREEDY) for p in prompts(lm, 8)])
    finally:
        engine.close()
    assert max(seen) == 3


def test_logprobs_are_the_models_own(lm: LoadedModel) -> None:
    """The reported log-probabilities are log_softmax of the logits the lone run sees, and the top list is
    sorted and led by the greedy token."""
    prompt = prompts(lm, 3)[2]
    sink = Tokens()
    events: list[Delta] = []

    def both(e: Event) -> None:
        if isinstance(e, Delta):
            events.append(e)
        sink(e)

    engine = Engine(lm)
    try:
        engine.submit(Request(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3), both))
        assert sink.finished.wait(WAIT_S)
    finally:
        engine.close()
    entries = [e for d in events for e in d.logprobs]
    assert len(entries) == 5
    with torch.inference_mode():
        logits, _ = lm.model(torch.tensor([[*lm.prefix_ids, *prompt]]))
    want = torch.log_softmax(logits[0, -1].float(), -1)
    first = entries[0]
    assert first.logprob == pytest.approx(float(want[first.token]), abs=1e-4)
    assert first.top[0][0] == first.token == int(want.argmax())
    assert [lp for _, lp in first.top] == sorted((lp for _, lp in first.top), reverse=True)


# --- the scheduler alone ---------------------------------------------------------------------------------------


def seq(slot: int, prompt_len: int) -> Sequence:
    req = Request(list(range(prompt_len)), SamplingParams(), lambda e: None)
    return Sequence(req, slot, list(range(prompt_len)), asm=None, generator=None)  # type: ignore[arg-type]


def test_scheduler_gives_decodes_first_then_prompt_chunks_oldest_first() -> None:
    s = Scheduler(slots=4, chunk_tokens=10)
    a = s.admit(lambda slot: seq(slot, 3))
    b = s.admit(lambda slot: seq(slot, 12))
    c = s.admit(lambda slot: seq(slot, 5))
    assert (a.slot, b.slot, c.slot) == (0, 1, 2)
    step = s.schedule()
    assert step.decode == [] and [(x.slot, start, n) for x, start, n in step.chunks] == [(0, 0, 3), (1, 0, 7)]
    a.cached, b.cached = 3, 7
    a.ids.append(99)  # a sampled its first token: from now on it decodes
    a.generated = 1
    step = s.schedule()
    assert step.decode == [a]
    assert [(x.slot, start, n) for x, start, n in step.chunks] == [(1, 7, 5), (2, 0, 4)]
    assert step.tokens == 10


def test_scheduler_reuses_a_released_slot_and_always_advances_a_prompt() -> None:
    s = Scheduler(slots=2, chunk_tokens=2)
    a = s.admit(lambda slot: seq(slot, 1))
    b = s.admit(lambda slot: seq(slot, 1))
    assert s.free == []
    s.release(a)
    c = s.admit(lambda slot: seq(slot, 4))
    assert c.slot == a.slot
    for x in (b,):
        x.cached, x.generated = 1, 1
        x.ids.append(7)
    busy = Scheduler(slots=3, chunk_tokens=2)
    d1, d2 = (busy.admit(lambda slot: seq(slot, 1)) for _ in range(2))
    for x in (d1, d2):
        x.cached, x.generated = 1, 1
        x.ids.append(7)
    p = busy.admit(lambda slot: seq(slot, 5))
    step = busy.schedule()  # two decodes fill the 2-token budget, yet the prompt still gets a token
    assert step.decode == [d1, d2] and [(x, start, n) for x, start, n in step.chunks] == [(p, 0, 1)]


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(lm: LoadedModel) -> None:
    engine = Engine(lm, max_batch=4, start=False)  # run by hand below, so the fault lands in a known step
    execute, calls = engine._execute, []

    def faulty(step: Any) -> Any:
        calls.append(step)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return execute(step)

    engine._execute = faulty  # type: ignore[method-assign]
    sinks = [Tokens(), Tokens()]
    for prompt, sink in zip(prompts(lm, 2), sinks, strict=True):
        engine.submit(Request(prompt, GREEDY, sink))
    worker = threading.Thread(target=engine.run, daemon=True)
    worker.start()
    try:
        for s in sinks:
            assert s.finished.wait(WAIT_S)
            assert s.done is not None and s.done.finish_reason == "error"
            assert s.done.error == "RuntimeError: device lost"
        after = run_all(engine, [(prompts(lm, 3)[2], GREEDY)])[0]
        assert after.done is not None and after.done.finish_reason == "length"
        assert engine.running == 0
    finally:
        engine.close()
        worker.join(WAIT_S)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
@pytest.mark.slow
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static-shape decode"])
def test_compiled_decode_gives_the_same_greedy_tokens(lm: LoadedModel, graphs: bool) -> None:
    """`aifab serve --compile`: decode steps run through torch.compile (compiled at start, for one row and for
    several; with `graphs`, in the static shapes that CUDA graphs capture); the tokens are the eager engine's."""
    ps = prompts(lm, 6)
    want = [reference(lm, p, GREEDY.max_tokens) for p in ps]
    engine = Engine(lm, max_batch=4, chunk_tokens=16, compile=True, graphs=graphs)
    try:
        got = run_all(engine, [(p, GREEDY) for p in ps], gap_s=0.002)
    finally:
        engine.close()
    assert [s.ids for s in got] == want


# --- on a GPU: the same decode steps replayed from captured CUDA graphs ------------------------------------


def test_graph_buckets_are_powers_of_two_up_to_the_limit() -> None:
    from aifab.serve.graphs import bucket_for, buckets

    assert buckets(32) == [1, 2, 4, 8, 16, 32] and buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert buckets(2048, 64) == [64, 128, 256, 512, 1024, 2048] and buckets(10, 64) == [10]
    assert [bucket_for(n, buckets(48)) for n in (1, 3, 33, 48)] == [1, 4, 48, 48]


def on_cuda(lm: LoadedModel) -> LoadedModel:
    """The random model on the GPU in fp32 (no TF32), so greedy tokens can be compared exactly."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.backends.cuda.matmul.allow_tf32 = False
    return dataclasses.replace(lm, model=copy.deepcopy(lm.model).to("cuda"))


@pytest.mark.gpu
def test_replayed_graphs_give_the_eager_logits(lm: LoadedModel) -> None:
    """Every (rows, keys) bucket's graph, replayed on fresh inputs, gives the logits of the eager forward over the
    same rows; a step whose slots skip rows (dummy rows in between) too."""
    from aifab.serve.graphs import DecodeGraphs
    from aifab.serve.kv import SlotCache

    gl = on_cuda(lm)
    model, dev = gl.model, gl.device
    cache = SlotCache(model.config, 8, gl.context_len, dev, torch.float32)
    graphs = DecodeGraphs(model, cache, capture=True)
    assert graphs.capture and len(graphs.graphs) == len(graphs.row_sizes) * len(graphs.key_sizes)
    eager = DecodeGraphs(model, cache, capture=False)  # same cache, same static-shape code, not captured
    gen = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    for rows in ([(0, 5, 0)], [(0, 7, 3), (1, 9, 70)], [(2, 11, 100), (5, 3, 1), (7, 1, 127)]):
        for slot, _, p in rows:  # fill the keys the rows will read with random values, as a prefill would
            for layer in range(model.config.n_layer):
                cache.k[layer][slot, :, :p] = torch.randn(cache.k[layer][slot, :, :p].shape, generator=gen).to(dev)
                cache.v[layer][slot, :, :p] = torch.randn(cache.v[layer][slot, :, :p].shape, generator=gen).to(dev)
        rows = [(s, t % V, p) for s, t, p in rows]
        with torch.inference_mode():
            want = eager.step(rows).clone()
            got = graphs.step(rows).clone()
        slots = [s for s, _, _ in rows]
        torch.testing.assert_close(got[slots], want[slots], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores:UserWarning")  # inductor's advice; fp32 on purpose
@pytest.mark.parametrize("compile_", [False, True], ids=["graphs", "compiled graphs"])
def test_engine_on_cuda_graphs_gives_the_single_request_tokens(lm: LoadedModel, compile_: bool) -> None:
    gl = on_cuda(lm)
    ps = prompts(gl, 10)
    want = [reference(gl, p, GREEDY.max_tokens) for p in ps]
    engine = Engine(gl, max_batch=8, chunk_tokens=16, compile=compile_)
    assert engine.graphs is not None and engine.graphs.capture
    try:
        got = run_all(engine, [(p, GREEDY) for p in ps], gap_s=0.002)
    finally:
        engine.close()
    assert [s.ids for s in got] == want
