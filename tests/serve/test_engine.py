import threading
from collections.abc import Iterator

import pytest

from aifab.nn.generate import generate
from aifab.nn.sampling import SamplingParams
from aifab.serve.engine import Delta, Done, Engine, Event, QueueFull, Request, TextAssembler
from aifab.serve.loaded import LoadedModel
from aifab.store import Store

WAIT_S = 30  # generous upper bound for a request to finish; never a timing assertion


class ByteTokenizer:
    """Each id is a fixed byte string; decode replaces invalid UTF-8 the way a byte-level BPE decoder does."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def feed(asm: TextAssembler, ids: list[int]) -> list[str]:
    """Add ids one by one until a stop, then finish; return every delta, empty ones included."""
    out = []
    for i in ids:
        out.append(asm.add(i))
        if asm.stopped:
            break
    out.append(asm.finish())
    return out


# --- TextAssembler ---------------------------------------------------------------------------------------------


def test_deltas_concatenate_to_the_final_decode() -> None:
    pieces = [b"def", b" f", b"(x", b"):", b"\n ", b" return", b" x"]
    tok = ByteTokenizer(pieces)
    asm = TextAssembler(tok, ())
    deltas = feed(asm, list(range(len(pieces))))
    assert "".join(deltas) == tok.decode(list(range(len(pieces)))) == "def f(x):\n  return x"
    assert not asm.stopped
    assert deltas[0] == "def"  # without stop strings nothing is held back


@pytest.mark.parametrize(
    ("pieces", "stop", "expected"),
    [
        ([b"hello", b" wor", b"ld", b" again"], "world", "hello "),  # the stop spans two tokens
        ([b"he", b"llo", b" w", b"orl", b"d!"], "lo w", "hel"),  # the stop starts mid-token
        ([b"abc", b"ST", b"OP", b"def"], "STOP", "abc"),
        ([b"abcSTOPdef"], "STOP", "abc"),  # one token holds the stop and text after it
        ([b"a", b"b", b"c"], "c", "ab"),
    ],
)
def test_stop_string_truncates_and_nothing_past_it_is_emitted(pieces: list[bytes], stop: str, expected: str) -> None:
    tok = ByteTokenizer([*pieces, b"MORE"])
    asm = TextAssembler(tok, ("never", stop))
    emitted = ""
    for i in range(len(pieces) + 1):
        emitted += asm.add(i)
        assert expected.startswith(emitted), f"emitted {emitted!r} runs past the stop"
        if asm.stopped:
            break
    emitted += asm.finish()
    assert asm.stopped
    assert emitted == expected == asm.text


def test_partial_stop_is_held_then_released_when_it_does_not_complete() -> None:
    tok = ByteTokenizer([b"one ", b"STO", b"P", b"PED"])
    asm = TextAssembler(tok, ("STOPS",))
    deltas = feed(asm, [0, 1, 2, 3])
    assert not asm.stopped
    assert all("STO" not in d for d in deltas[:3])  # "STO", "STOP" could still become "STOPS"
    assert "".join(deltas) == "one STOPPED"


@pytest.mark.parametrize("text", ["é", "😀", "naïve café 😀 ok", "日本語"])
def test_multibyte_characters_split_across_tokens_never_emit_replacement(text: str) -> None:
    raw = text.encode()
    pieces = [raw[i : i + 1] for i in range(len(raw))]  # worst case: one byte per token
    asm = TextAssembler(ByteTokenizer(pieces), ())
    deltas = feed(asm, list(range(len(pieces))))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_multibyte_with_a_stop_string() -> None:
    raw = "café😀 fin".encode()
    pieces = [raw[i : i + 1] for i in range(len(raw))]
    asm = TextAssembler(ByteTokenizer(pieces), (" fin",))
    deltas = feed(asm, list(range(len(pieces))))
    assert asm.stopped
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "café😀"


def test_real_tokenizer_splits_emoji_without_replacement(loaded: LoadedModel) -> None:
    text = "é😀 naïve"
    ids = loaded.encode(text)
    assert len(ids) > len(text.split())  # byte-level BPE splits the rare characters
    asm = TextAssembler(loaded.tokenizer, ())
    deltas = feed(asm, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


# --- Engine with the tiny trained model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(trained: tuple[Store, str]) -> LoadedModel:
    store, ref = trained
    return LoadedModel.load(store, ref)


@pytest.fixture
def engine(loaded: LoadedModel) -> Iterator[Engine]:
    e = Engine(loaded)
    yield e
    e.close()


class Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, Done):
            self.done.set()

    def result(self) -> tuple[str, Done]:
        assert self.done.wait(WAIT_S), "the engine never finished the request"
        *deltas, last = self.events
        assert isinstance(last, Done) and all(isinstance(d, Delta) for d in deltas)
        return "".join(d.text for d in deltas if isinstance(d, Delta)), last


def direct_greedy(lm: LoadedModel, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """What the engine should produce: generate() with EOT prepended, cut at the first EOT."""
    out = []
    for t in generate(lm.model, [lm.eot_id, *prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0)):
        if t == lm.eot_id:
            break
        out.append(t)
    return out


def test_loaded_model_knows_its_names(loaded: LoadedModel) -> None:
    assert loaded.id == "tiny:1"
    assert loaded.names == {"tiny", "tiny:1", "tiny@latest"}
    assert loaded.context_len == 32
    assert loaded.tokenizer.id_to_token(loaded.eot_id) == "<|endoftext|>"


@pytest.mark.parametrize("prompt", ["def function_", "return value"])
def test_greedy_engine_result_equals_direct_generate(engine: Engine, loaded: LoadedModel, prompt: str) -> None:
    prompt_ids = loaded.encode(prompt)
    expected = direct_greedy(loaded, prompt_ids, 12)
    c = Collector()
    engine.submit(Request(prompt_ids, SamplingParams(max_tokens=12, temperature=0), c))
    text, done = c.result()
    assert text == loaded.tokenizer.decode(expected)
    assert done.completion_tokens == len(expected)
    assert done.prompt_tokens == len(prompt_ids)
    assert done.finish_reason == ("length" if len(expected) == 12 else "stop")
    assert done.error is None


def test_seeded_requests_are_reproducible(engine: Engine, loaded: LoadedModel) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=42)
    results = []
    for _ in range(2):
        c = Collector()
        engine.submit(Request(loaded.encode("def"), params, c))
        results.append(c.result())
    (text0, done0), (text1, done1) = results
    assert text0 == text1
    assert (done0.finish_reason, done0.completion_tokens) == (done1.finish_reason, done1.completion_tokens)


def test_stop_string_ends_the_request(engine: Engine, loaded: LoadedModel) -> None:
    prompt_ids = loaded.encode("def function_")
    full = loaded.tokenizer.decode(direct_greedy(loaded, prompt_ids, 12))
    assert len(full) >= 4, f"the tiny model produced too little text to test stops: {full!r}"
    stop = full[2:4]
    c = Collector()
    engine.submit(Request(prompt_ids, SamplingParams(max_tokens=12, temperature=0, stop=(stop,)), c))
    text, done = c.result()
    assert text == full[: full.index(stop)]
    assert done.finish_reason == "stop"


def test_cancel_mid_stream_stops_early(engine: Engine, loaded: LoadedModel) -> None:
    prompt_ids = loaded.encode("def function_")
    assert len(direct_greedy(loaded, prompt_ids, 20)) == 20, "precondition: greedy output runs to max_tokens"
    c = Collector()
    req = Request(prompt_ids, SamplingParams(max_tokens=20, temperature=0), c)

    def emit(event: Event) -> None:
        c(event)
        if isinstance(event, Delta):
            req.cancelled.set()

    req.emit = emit
    engine.submit(req)
    _, done = c.result()
    assert done.finish_reason == "cancelled"
    assert 1 <= done.completion_tokens < 20


def test_cancel_before_start_produces_no_text(engine: Engine, loaded: LoadedModel) -> None:
    c = Collector()
    req = Request(loaded.encode("def"), SamplingParams(max_tokens=20, temperature=0), c)
    req.cancelled.set()
    engine.submit(req)
    text, done = c.result()
    assert (text, done.finish_reason, done.completion_tokens) == ("", "cancelled", 0)


def test_a_failing_request_gets_an_error_and_the_engine_lives_on(engine: Engine, loaded: LoadedModel) -> None:
    c = Collector()
    engine.submit(Request(loaded.encode("def"), SamplingParams(max_tokens=loaded.context_len), c))
    _, done = c.result()
    assert done.finish_reason == "error"
    assert done.error is not None and "context" in done.error
    c2 = Collector()
    engine.submit(Request(loaded.encode("def"), SamplingParams(max_tokens=3, temperature=0), c2))
    assert c2.result()[1].finish_reason in ("length", "stop")
    assert engine.running == 0


def test_queue_full_is_raised_at_once(loaded: LoadedModel) -> None:
    engine = Engine(loaded, max_queue=1)
    entered, release = threading.Event(), threading.Event()

    def blocking_emit(event: Event) -> None:
        entered.set()
        release.wait(WAIT_S)

    try:
        params = SamplingParams(max_tokens=5, temperature=0)
        engine.submit(Request(loaded.encode("def"), params, blocking_emit))
        assert entered.wait(WAIT_S)  # the worker holds the first request
        assert engine.running == 1
        waiting = Collector()
        engine.submit(Request(loaded.encode("def"), params, waiting))  # fills the one queue slot
        with pytest.raises(QueueFull, match=r"queue is full \(1 requests waiting\)"):
            engine.submit(Request(loaded.encode("def"), params, Collector()))
    finally:
        release.set()
    assert waiting.result()[1].finish_reason in ("length", "stop")
    engine.close()
