"""The engine: one worker thread that owns the model and turns queued requests into text events.

Contract: `submit()` enqueues a request or raises `QueueFull` at once when `max_queue` requests wait.
The worker emits `Delta` events (new text) and exactly one `Done` event per request, through the
request's `emit` callback, which must not block. Setting `request.cancelled` ends the request at its
next token. The foundation serves one sequence at a time; continuous batching replaces `_run_one`.
"""

import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aifab.errors import ServeError
from aifab.serve.generate import generate
from aifab.serve.sampling import SamplingParams
from aifab.store import Store
from aifab.tokens import end_of_text_id


class QueueFull(Exception):
    pass


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens), "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = Delta | Done


@dataclass
class Request:
    prompt_ids: list[int]  # the user's prompt, without the EOT that marks a document start
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class LoadedModel:
    id: str  # "name:version", what /v1/models lists
    names: frozenset[str]  # every model string a request may use to mean this model
    model: Any
    tokenizer: Any
    eot_id: int
    context_len: int
    created_at: int

    @classmethod
    def load(cls, store: Store, ref: str) -> "LoadedModel":
        from tokenizers import Tokenizer

        from aifab.nn.weights import from_bytes
        from aifab.registry.models import aliases_of, resolve

        mv = resolve(store, ref)
        model = from_bytes(store.artifacts.get_bytes(mv.weights_digest)).eval()
        tok = Tokenizer.from_str(store.artifacts.get_bytes(mv.tokenizer_digest).decode())
        mid = f"{mv.name}:{mv.version}"
        # the bare name too: this server holds one version of it, so "demo" can only mean that one
        names = {mid, ref, mv.name, *(f"{mv.name}@{a}" for a in aliases_of(store, mv.id))}
        try:
            eot = end_of_text_id(tok)
        except ValueError as e:
            raise ServeError(f"{mid}: {e}") from None
        return cls(
            mid,
            frozenset(names),
            model,
            tok,
            eot,
            model.config.context_len,
            int(mv.created_at.timestamp()),
        )

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text).ids
        return ids


class TextAssembler:
    """Turns a growing list of token ids into text deltas, so streamed and whole responses match exactly.

    Holds back a trailing partial UTF-8 character, and text that could be the start of a stop string.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False
        self.text = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._emit(len(self.text))
        safe = len(self.text.rstrip("\ufffd")) - self.hold
        return self._emit(safe)

    def finish(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : upto], upto
        return out


class Engine:
    def __init__(self, loaded: LoadedModel, max_queue: int = 64) -> None:
        self.loaded = loaded
        self.queue: queue.Queue[Request | None] = queue.Queue(maxsize=max_queue)
        self.running = 0
        self._thread = threading.Thread(target=self._worker, name="aifab-engine", daemon=True)
        self._thread.start()

    def submit(self, req: Request) -> None:
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise QueueFull(f"the queue is full ({self.queue.maxsize} requests waiting)") from None

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=5)

    def _worker(self) -> None:
        while (req := self.queue.get()) is not None:
            self.running = 1
            try:
                self._run_one(req)
            except Exception as e:  # a bad request must not kill the engine; it gets an error event
                with contextlib.suppress(Exception):  # nor may a listener that is already gone
                    req.emit(Done("error", len(req.prompt_ids), 0, error=f"{type(e).__name__}: {e}"))
            finally:
                self.running = 0

    def _run_one(self, req: Request) -> None:
        lm = self.loaded
        asm = TextAssembler(lm.tokenizer, req.params.stop)
        finish, n = "length", 0
        for token in generate(lm.model, [lm.eot_id, *req.prompt_ids], req.params):
            if req.cancelled.is_set():
                finish = "cancelled"
                break
            if token == lm.eot_id:
                finish = "stop"
                break
            n += 1
            if delta := asm.add(token):
                req.emit(Delta(delta))
            if asm.stopped:
                finish = "stop"
                break
        if tail := asm.finish():
            req.emit(Delta(tail))
        req.emit(Done(finish, len(req.prompt_ids), n))
