"""The engine: one loop that owns the model and serves many requests at once by continuous batching.

Contract: `submit()` enqueues a request or raises `QueueFull` at once when `max_queue` requests wait. The
worker emits `Delta` events (new text) and exactly one `Done` event per request, through the request's `emit`
callback, which must not block. Setting `request.cancelled` ends the request, and frees its batch slot, at the
engine's next step.

Each engine step is schedule -> execute -> update:
- schedule (`Scheduler.schedule`): waiting requests take free KV-cache slots (up to `max_batch`); every
  running sequence that has its prompt in the cache decodes one token; what is left of the step's token
  budget (`chunk_tokens`) goes to prompt chunks, oldest request first. So a long prompt is prefilled over
  several steps while the others keep decoding (chunked prefill), and no step is longer than the budget.
- execute: one forward pass over all the step's tokens packed into one row (`serve.kv`), with logits only
  where a next token is due (each decode token, and the last token of a finished prompt).
- update: sample each due token with its request's own parameters, stream its text, and finish the
  requests that hit EOS, a stop string, max_tokens or a cancel, freeing their slots for the next step.

A request that asks to score its prompt (`Request.prompt_logprobs`, for `echo` in the API) also gets logits at
its prompt chunks' positions; their log-probabilities go out in one `Delta` before its first token. Other
requests' steps compute exactly what they did without it. With `max_tokens` 0 such a request ends ("length")
once its prompt is scored, generating nothing.

Around each execute, the meter (`serve.metering`) charges the step's energy to its requests by their tokens
in it; a finished request's `Done` carries its energy and cost.
"""

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aifab.errors import ServeError
from aifab.nn.generate import ContextError, check_fits
from aifab.nn.sampling import SamplingParams, TokenLogprob, logprobs_of, make_generator, sample, score_tokens
from aifab.serve.loaded import LoadedModel
from aifab.serve.metering import ServeMeter
from aifab.serve.metrics import ServeMetrics

FLUSH_S = 1.0  # how often finished requests' charges go to the meter's sink (the ledger)


class QueueFull(Exception):
    pass


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens generated since the last delta, when requested
    # the prompt's tokens after its first, each scored given those before it (prompt_logprobs requests only;
    # one delta carries them all, before any generated token)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens), "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    energy_j: float = 0.0  # this request's share of the steps it took part in (serve.metering)
    cost_usd: float = 0.0
    ttft_s: float | None = None  # arrival to first generated token, as the engine saw it (None: no token)
    tpot_s: float | None = None  # mean time per output token after the first (None: fewer than 2 tokens)


Event = Delta | Done


@dataclass
class Request:
    prompt_ids: list[int]  # the user's prompt, without the EOT that marks a document start
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_logprobs: int | None = None  # score the prompt, with this many alternatives per token (None: don't)
    arrival: float = field(default_factory=time.monotonic)


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


@dataclass
class Sequence:
    """A request that holds a KV-cache slot: its tokens, how many are in the cache, and its output so far."""

    req: Request
    slot: int
    ids: list[int]  # prefix + prompt, then each generated token
    asm: TextAssembler
    generator: Any
    cached: int = 0  # tokens of `ids` whose keys and values are in the slot
    generated: int = 0
    first_token_at: float | None = None
    energy_j: float = 0.0
    device_s: float = 0.0
    last_token_at: float = 0.0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_start: int = 0  # index in `ids` of the prompt's first token (after the model's prefix)
    # the prompt's scores so far, while a prompt_logprobs request is prefilling; None once sent (or not asked)
    prompt_scores: list[TokenLogprob] | None = None

    @property
    def prefilling(self) -> bool:
        return self.generated == 0 and self.cached < len(self.ids)  # after that, each step caches one token


@dataclass(frozen=True)
class Step:
    """What one forward pass computes: decode tokens first, then prompt chunks (sequence, start, length)."""

    decode: list[Sequence]
    chunks: list[tuple[Sequence, int, int]]

    @property
    def tokens(self) -> int:
        return len(self.decode) + sum(n for _, _, n in self.chunks)


class Scheduler:
    """Pure bookkeeping, no tensors: which sequences hold slots and what the next step computes.

    A sequence is prefilling until its whole prompt is in the cache; the step that caches the prompt's last
    token also yields its first output token. From then on it decodes: each step caches the token it sampled
    last and yields the next one.
    """

    def __init__(self, slots: int, chunk_tokens: int) -> None:
        self.free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.running: list[Sequence] = []  # in admission order: the oldest prompt is prefilled first
        self.chunk_tokens = chunk_tokens

    def admit(self, make: Callable[[int], Sequence]) -> Sequence:
        seq = make(self.free.pop())
        self.running.append(seq)
        return seq

    def release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.free.append(seq.slot)

    def schedule(self) -> Step:
        decode = [s for s in self.running if not s.prefilling]
        budget = max(self.chunk_tokens - len(decode), 1)  # a prompt always advances, even under full decode
        chunks = []
        for s in self.running:
            if budget == 0:
                break
            if s.prefilling:
                n = min(len(s.ids) - s.cached, budget)
                chunks.append((s, s.cached, n))
                budget -= n
        return Step(decode, chunks)


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        max_queue: int = 64,
        max_batch: int = 32,
        chunk_tokens: int = 512,
        metrics: ServeMetrics | None = None,
        start: bool = True,
        compile: bool = False,
        meter: ServeMeter | None = None,
        graphs: bool | None = None,
    ) -> None:
        """With `start`, the engine runs on a thread of its own; else the caller runs `run()` on its thread.

        `graphs` (default: on CUDA) runs decode-only steps in static shapes through `serve.graphs`, replayed
        from CUDA graphs captured at start; `graphs=True` on CPU runs the same static-shape steps eagerly.

        On CPU, run the engine on the thread that loaded the model when speed matters (`aifab serve` does):
        PyTorch's OpenMP pools are per thread, and once a second thread has one, GNU OpenMP stops spinning
        between parallel regions, which made each small matmul of a decode step several times slower.
        """
        import torch

        from aifab.serve.graphs import DecodeGraphs
        from aifab.serve.kv import SlotCache

        if max_batch < 1 or chunk_tokens < 1:
            raise ServeError(f"max_batch ({max_batch}) and chunk_tokens ({chunk_tokens}) must be at least 1")
        self.loaded, self.max_batch, self._torch = loaded, max_batch, torch
        self.queue: queue.Queue[Request | None] = queue.Queue(maxsize=max_queue)
        self.scheduler = Scheduler(max_batch, chunk_tokens)
        self.metrics = metrics or ServeMetrics(loaded.id)
        self.metrics.watch(self.queue.qsize, lambda: self.running)
        self.meter = meter or ServeMeter()
        dtype = next(loaded.model.parameters()).dtype
        self.cache = SlotCache(loaded.model.config, max_batch, loaded.context_len, loaded.device, dtype)
        if graphs is None:
            graphs = loaded.device.type == "cuda"
        self.graphs: DecodeGraphs | None = None
        if graphs:  # decode-only steps (the steady state) in static shapes, from CUDA graphs where there is CUDA
            self.graphs = DecodeGraphs(loaded.model, self.cache, capture=True, compile=compile)
        # else decode-only steps through torch.compile: fused kernels instead of a few hundred small ops per
        # step; steps with prompt chunks stay eager (their shapes vary too much to be worth it)
        self._decode_fwd = torch.compile(loaded.model, dynamic=True) if compile and not graphs else loaded.model
        if compile and not graphs:
            self.cache.fast_single = False
            self._warm_up()
        self._stop = threading.Event()
        self.stopped = threading.Event()  # set when the loop has ended (after `close()`) and the meter is flushed
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self.run, name="aifab-engine", daemon=True)
            self._thread.start()

    def _warm_up(self) -> None:
        """Compile the decode step now, for one row and for several, so no request waits for it. The rows
        written are those of free slots, which the next sequence to take them overwrites before reading."""
        from aifab.serve.kv import StepLayout

        torch, dev = self._torch, self.loaded.device
        for rows in sorted({1, min(2, self.max_batch)}):
            layout = StepLayout([(slot, 0) for slot in range(rows)], [], self.max_batch, dev)
            self.cache.layout = layout
            with torch.inference_mode():
                idx = torch.zeros(1, rows, dtype=torch.long, device=dev)
                self._decode_fwd(idx, cache=self.cache, positions=layout.positions, logits_at=torch.arange(rows))
        self.cache.layout = None

    @property
    def running(self) -> int:
        """Requests holding a batch slot."""
        return len(self.scheduler.running)

    def submit(self, req: Request) -> None:
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            self.metrics.rejected.inc()
            raise QueueFull(f"the queue is full ({self.queue.maxsize} requests waiting)") from None

    def close(self) -> None:
        """End the loop at its next step: the requests running get `Done("cancelled")`, queued ones nothing
        (`serve.fleet` closes an engine only once every request it took is done). Joins the engine's thread
        when the engine started it (`start=True`); else returns at once."""
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)  # wake an idle worker
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # --- the worker thread -------------------------------------------------------------------------------

    def run(self) -> None:
        """The engine loop, on the calling thread, until `close()`; sets `stopped` when it ends."""
        try:
            self._loop()
        finally:
            self.stopped.set()

    def _loop(self) -> None:
        flushed = time.monotonic()
        while not self._stop.is_set():
            self._take_new()
            if time.monotonic() - flushed > FLUSH_S:
                self.meter.flush()
                flushed = time.monotonic()
            step = self._reap_and_schedule()
            if step is None:
                continue
            self._credit(self.meter.step_started())
            shares = [(s, 1) for s in step.decode] + [(seq, n) for seq, _, n in step.chunks]
            try:
                sampled = self._execute(step)
            except Exception as e:  # a failing step fails its requests, not the engine
                self._book(shares)
                failed = {id(s): s for s, _ in shares}
                for seq in failed.values():
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
                continue
            self._book(shares)
            self._update(step, sampled)
        for seq in list(self.scheduler.running):  # shutting down: nobody is left waiting
            self._finish(seq, "cancelled")
        self._credit(self.meter.settle())  # the last window (idle) is booked too
        self.meter.flush()

    def _book(self, shares: list[tuple[Sequence, int]]) -> None:
        """Tell the meter the step ended (it charges energy to sequences when it reads the counter: see
        serve.metering) and split the step's device time over its sequences by their tokens in it."""
        self._credit(self.meter.step_finished(shares))
        total, step_s = sum(n for _, n in shares), self.meter.last_step_s
        for seq, n in shares:
            seq.device_s += step_s * n / total if total else 0.0

    def _credit(self, credits: list[tuple[Any, float]]) -> None:
        for seq, joules in credits:
            seq.energy_j += joules
        self.metrics.request_energy.inc(sum(j for _, j in credits))
        self.metrics.idle_energy.inc(self.meter.take_idle_j())

    def _take_new(self) -> None:
        """Move queued requests into free slots; block while there is nothing at all to do."""
        sched = self.scheduler
        while sched.free:
            try:
                req = self.queue.get(timeout=0.1) if not sched.running else self.queue.get_nowait()
            except queue.Empty:
                return
            if req is None:
                return
            self._admit(req)

    def _admit(self, req: Request) -> None:
        lm = self.loaded
        ids = [*lm.prefix_ids, *req.prompt_ids]
        problem = None
        try:
            check_fits(len(req.prompt_ids), req.params.max_tokens, lm.context_len, prefix_tokens=len(lm.prefix_ids))
        except ContextError as e:
            problem = str(e)
        if problem or req.cancelled.is_set():
            reason = "error" if problem else "cancelled"
            self._emit(req, Done(reason, len(req.prompt_ids), 0, error=f"ValueError: {problem}" if problem else None))
            self.metrics.finished(reason)
            return
        generator = make_generator(req.params, lm.device)
        scores: list[TokenLogprob] | None = None if req.prompt_logprobs is None else []
        self.scheduler.admit(
            lambda slot: Sequence(
                req,
                slot,
                ids,
                TextAssembler(lm.tokenizer, req.params.stop),
                generator,
                prompt_start=len(lm.prefix_ids),
                prompt_scores=scores,
            )
        )

    def _reap_and_schedule(self) -> Step | None:
        for seq in [s for s in self.scheduler.running if s.req.cancelled.is_set()]:
            self._finish(seq, "cancelled")
        step = self.scheduler.schedule()
        return step if step.tokens else None

    def _execute(self, step: Step) -> list[tuple[Sequence, Any]]:
        """One forward pass; returns the sequences due a token with their logits (V,) rows."""
        from aifab.serve.kv import Chunk, StepLayout

        torch = self._torch
        tokens: list[int] = []
        decode = [(s.slot, s.cached) for s in step.decode]
        tokens += [s.ids[s.cached] for s in step.decode]
        chunks, due, at = [], list(step.decode), list(range(len(step.decode)))
        spans: list[tuple[list[TokenLogprob], list[int], int]] = []  # (scores to extend, tokens scored, n_top)
        scored_at: list[int] = []
        for seq, start, n in step.chunks:
            chunks.append(Chunk(seq.slot, start, n, len(tokens)))
            if seq.prompt_scores is not None:  # position i's logits score token i + 1: the prompt's after its first
                lo, hi = max(start, seq.prompt_start), min(start + n, len(seq.ids) - 1)
                if hi > lo:
                    spans.append((seq.prompt_scores, seq.ids[lo + 1 : hi + 1], seq.req.prompt_logprobs or 0))
                    scored_at += range(len(tokens) + lo - start, len(tokens) + hi - start)
            tokens += seq.ids[start : start + n]
            if start + n == len(seq.ids):  # the prompt is all cached: its last position gives the first token
                due.append(seq)
                at.append(len(tokens) - 1)
        dev = self.loaded.device
        with torch.inference_mode():
            if self.graphs is not None and not step.chunks:
                by_slot = self.graphs.step([(s.slot, s.ids[s.cached], s.cached) for s in step.decode])
                logits = by_slot[torch.tensor([s.slot for s in step.decode], device=dev)][None]  # a copy
            else:
                layout = StepLayout(decode, chunks, self.max_batch, dev)
                self.cache.layout = layout
                idx = torch.tensor([tokens], device=dev)
                logits_at = torch.tensor(at + scored_at, device=dev) if due or spans else None
                fwd = self._decode_fwd if not step.chunks else self.loaded.model
                logits, _ = fwd(idx, cache=self.cache, positions=layout.positions, logits_at=logits_at)
                self.cache.layout = None
        for s in step.decode:
            s.cached += 1
        for seq, _, n in step.chunks:
            seq.cached += n
        self.metrics.steps.inc()
        self.metrics.prompt_tokens.inc(sum(n for _, _, n in step.chunks))
        row = len(due)  # the scored positions' logits follow the due ones
        for scores, targets, n_top in spans:
            scores += score_tokens(logits[0, row : row + len(targets)], targets, n_top)
            row += len(targets)
        return list(zip(due, logits[0, : len(due)].float(), strict=True)) if due else []

    def _update(self, step: Step, sampled: list[tuple[Sequence, Any]]) -> None:
        lm, now = self.loaded, time.monotonic()
        greedy = [i for i, (s, _) in enumerate(sampled) if s.req.params.temperature == 0]
        argmax = {}
        if greedy:  # one argmax for every greedy row
            rows = self._torch.stack([sampled[i][1] for i in greedy])
            argmax = dict(zip(greedy, rows.argmax(-1).tolist(), strict=True))
        for i, (seq, row) in enumerate(sampled):
            params = seq.req.params
            if seq.prompt_scores is not None:  # the prompt is all scored: its scores go out before any token
                self._emit(seq.req, Delta("", prompt_logprobs=tuple(seq.prompt_scores)))
                seq.prompt_scores = None
            if params.max_tokens == 0:  # only the prompt's scores were asked for
                self._finish(seq, "length")
                continue
            token = argmax[i] if i in argmax else sample(row, params, seq.generator)
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.metrics.ttft.observe(now - seq.req.arrival)
            seq.last_token_at = now
            if token in lm.stop_ids and not params.ignore_eos:
                if seq.req.prompt_logprobs is not None and params.logprobs is not None:
                    # a scored prompt's reader expects the generated token's entry last, and slices it off
                    # (lm-evaluation-harness sends max_tokens 1): the EOS is that token here
                    seq.pending_logprobs.append(logprobs_of(row, token, params.logprobs))
                self._finish(seq, "stop")
                continue
            seq.ids.append(token)
            seq.generated += 1
            self.metrics.generated_tokens.inc()
            if params.logprobs is not None:
                seq.pending_logprobs.append(logprobs_of(row, token, params.logprobs))
            text = seq.asm.add(token)
            if text:
                self._emit(seq.req, Delta(text, tuple(seq.pending_logprobs)))
                seq.pending_logprobs.clear()
            if seq.asm.stopped:
                self._finish(seq, "stop")
            elif seq.generated >= params.max_tokens:
                self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self.scheduler.release(seq)
        if error is None:
            tail = seq.asm.finish()
            if tail or seq.pending_logprobs:
                self._emit(seq.req, Delta(tail, tuple(seq.pending_logprobs)))
        ttft_s = None if seq.first_token_at is None else seq.first_token_at - seq.req.arrival
        tpot_s = None
        if seq.generated > 1 and seq.first_token_at is not None:
            tpot_s = (seq.last_token_at - seq.first_token_at) / (seq.generated - 1)
            self.metrics.tpot.observe(tpot_s)
        self.metrics.finished(reason)
        if self.meter.open_steps:  # its last steps' energy is not read yet: read it, so the bill is whole
            self._credit(self.meter.settle())
        bill = self.meter.charge(
            seq.energy_j, len(seq.req.prompt_ids), seq.generated, time.monotonic() - seq.req.arrival, seq.device_s
        )
        done = Done(reason, len(seq.req.prompt_ids), seq.generated, error, bill.energy_j, bill.cost_usd, ttft_s, tpot_s)
        self._emit(seq.req, done)

    @staticmethod
    def _emit(req: Request, event: Event) -> None:
        with contextlib.suppress(Exception):  # a listener that is already gone must not stop the engine
            req.emit(event)
