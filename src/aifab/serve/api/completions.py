"""The completions endpoint beyond one plain text prompt: prompts sent as token ids (checked against the model's
vocabulary), a batch of prompts (one engine request each, answered together), and echo (each prompt before its
completion, its tokens scored when `logprobs` is asked). These are answered whole: `CompletionRequest.conflict`
refuses stream for them.

A batch is not a new kind of engine work: its prompts are concurrent requests, which the engine batches with
whatever else it is running, and its response sums their usage (energy and cost included)."""

import asyncio
from collections.abc import Callable

from fastapi.responses import JSONResponse, Response

from aifab.nn.generate import ContextError, check_fits
from aifab.serve.api.responses import CompletionFormat, EchoedPrompt
from aifab.serve.api.schemas import CompletionRequest
from aifab.serve.engine import Delta, Done, Engine, Event, QueueFull
from aifab.serve.engine import Request as EngineRequest
from aifab.serve.loaded import LoadedModel
from aifab.web import error


def encode_prompts(body: CompletionRequest, lm: LoadedModel) -> list[list[int]] | JSONResponse:
    """Each prompt's token ids (a string through the model's tokenizer), or the 400 that names the field at
    fault: fields refused together, a token id outside the vocabulary, or a prompt that does not fit the
    context with its max_tokens (a batch's message says which prompt)."""
    if (conflict := body.conflict()) is not None:
        field, problem = conflict
        return error(400, f"{field}: {problem}", field)
    prompts = body.prompts()
    encoded = []
    for i, prompt in enumerate(prompts):
        which = f"prompt {i}: " if len(prompts) > 1 else ""
        if isinstance(prompt, str):
            ids = lm.encode(prompt)
        else:
            ids = prompt
            bad = next((t for t in ids if not 0 <= t < lm.vocab_size), None)
            if bad is not None:
                vocab = f"0..{lm.vocab_size - 1}"
                return error(400, f"prompt: {which}token id {bad} is outside the vocabulary ({vocab})", "prompt")
        try:
            check_fits(len(ids), body.limit(), lm.context_len, prefix_tokens=len(lm.prefix_ids))
        except ContextError as e:
            field = "prompt" if e.part == "prompt" else body.limit_field()
            return error(400, f"{field}: {which}{e}", field)
        encoded.append(ids)
    return encoded


async def complete_many(
    engine: Engine, body: CompletionRequest, prompts: list[list[int]], timeout_s: float
) -> Response:
    """Run each of `prompts` (from `encode_prompts`) as its own engine request and answer with one choice per
    prompt, in order, and their summed usage. 429 when the engine's queue cannot take them all (those already
    queued are cancelled), 500 when the engine fails one, 504 when they are not all done within `timeout_s`;
    every request is cancelled when this returns or is cancelled (the client went away)."""
    lm, loop = engine.loaded, asyncio.get_running_loop()
    params = body.sampling_params()
    queues: list[asyncio.Queue[Event]] = [asyncio.Queue() for _ in prompts]
    reqs = [
        EngineRequest(ids, params, _emitter(loop, q), prompt_logprobs=body.prompt_logprobs())
        for ids, q in zip(prompts, queues, strict=True)
    ]
    try:
        try:
            for req in reqs:
                engine.submit(req)
        except QueueFull as e:
            return error(429, str(e), kind="rate_limit_error", headers={"Retry-After": "1"})
        try:
            async with asyncio.timeout(timeout_s):
                results = await asyncio.gather(*(_collect(q) for q in queues))
        except TimeoutError:
            return error(504, f"request exceeded {timeout_s:.0f} s", kind="server_error")
    finally:
        for req in reqs:  # a no-op for the finished; frees the engine of the rest
            req.cancelled.set()
    failed = next((done.error for _, done in results if done.error is not None), None)
    if failed is not None:
        return error(500, failed, kind="server_error")
    fmt = CompletionFormat(lm, engine.meter.estimated)
    choices = []
    for i, (prompt, ids, (deltas, done)) in enumerate(zip(body.prompts(), prompts, results, strict=True)):
        echo = None
        if body.echo:
            echo = EchoedPrompt(prompt if isinstance(prompt, str) else lm.tokenizer.decode(ids), ids)
        choices.append(fmt.choice(deltas, done, body.logprobs is not None, i, echo))
    return JSONResponse(fmt.batch(choices, [done for _, done in results]))


def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Event]) -> Callable[[Event], None]:
    def emit(event: Event) -> None:  # called on the engine thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    return emit


async def _collect(events: asyncio.Queue[Event]) -> tuple[list[Delta], Done]:
    deltas = []
    while isinstance(event := await events.get(), Delta):
        deltas.append(event)
    return deltas, event
