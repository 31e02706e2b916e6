"""The routes of the HTTP API (completions, chat completions, models, health, metrics) and its middleware.
Thin on purpose: requests are validated by `schemas`, answered through `responses`, and everything else
happens in the engine.

Errors use the OpenAI shape `{"error": {"message", "type", "param", "code"}}`: 400 for a bad field
(named in `param`), 401 without the API key, 413 for an oversize body, 429 when the queue is full, 500 when
the engine fails a request and 504 when it runs past the timeout.
"""

import asyncio
import contextlib
import os
import socket
from collections.abc import MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from aifab.nn.generate import ContextError, check_fits
from aifab.serve.api.completions import complete_many, encode_prompts
from aifab.serve.api.responses import (
    ChatFormat,
    CompletionFormat,
    Healthz,
    ModelCard,
    ModelList,
    ResponseFormat,
    sse,
)
from aifab.serve.api.schemas import ChatRequest, CompletionRequest, SamplingFields
from aifab.serve.chat import render
from aifab.serve.engine import Delta, Done, Engine, Event, QueueFull
from aifab.serve.engine import Request as EngineRequest
from aifab.serve.fleet import Fleet, Lease, UnknownModel
from aifab.web import error, require_bearer

MAX_BODY_BYTES = 1 << 20
REQUEST_TIMEOUT_S = 300.0


class BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes with 413, whether or not it says its length."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = error(413, f"request body exceeds {self.limit} bytes", kind="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        seen, over, started = 0, False, False

        async def limited() -> Any:
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                over = True
                raise _TooLarge
            return message

        async def guarded(message: MutableMapping[str, Any]) -> None:
            # the framework may catch _TooLarge while reading the body and answer with its own error;
            # once the body is over the limit, only our 413 goes out
            nonlocal started
            if not over:
                started = True
                await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, limited, guarded)
        if over and not started:
            await too_big(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(
    served: Engine | Fleet,
    *,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
) -> FastAPI:
    """The app serving one engine's model, or a fleet's versions (`serve.fleet`: each request's `model` picks
    the version that answers, and the response's `model` names it). With `api_key`, every request needs it as
    a bearer token; a body over `max_body_bytes` is a 413; a request still running after `request_timeout_s`
    is cancelled (504, or an error chunk when streaming)."""
    fleet = served if isinstance(served, Fleet) else Fleet.single(served)
    app = FastAPI(title="aifab", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    require_bearer(app, api_key, "missing or wrong API key")

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        # the top-level field: deeper parts of loc are union members ("str") or list indexes, and a JSON
        # syntax error puts a character offset there
        loc = [p for p in first["loc"] if p != "body"]
        param = loc[0] if loc and isinstance(loc[0], str) else None
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown field"
        elif first["type"] == "json_invalid":
            msg = f"the body is not valid JSON ({first.get('ctx', {}).get('error', msg)})"
        return error(400, f"{param}: {msg}" if param else msg, param=param)

    @app.exception_handler(UnknownModel)
    async def unknown_model(_: Request, exc: UnknownModel) -> JSONResponse:
        return error(400, f"model: {exc}", "model")

    @app.get("/healthz", response_model=None)
    async def healthz() -> Healthz:
        engines = fleet.engines()  # retiring versions too: their requests are still being served
        return {
            "status": "ok",
            "model": fleet.served()[0].id,
            "queued": sum(e.queue.qsize() for e in engines),
            "running": sum(e.running for e in engines),
            "replica": f"{socket.gethostname()}:{os.getpid()}",
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(fleet.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=None)
    async def models() -> ModelList:
        cards: list[ModelCard] = [
            {
                "id": lm.id,
                "object": "model",
                "created": lm.created_at,
                "owned_by": "aifab",
                "max_model_len": lm.context_len,
            }
            for lm in fleet.served()
        ]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Response:
        # the lease covers a batch's requests, put straight on the engine, while this block lasts (see Lease)
        with fleet.pick(body.model) as lease:
            lm, engine = lease.loaded, lease.engine
            prompts = encode_prompts(body, lm)
            if isinstance(prompts, JSONResponse):
                return prompts
            if len(prompts) > 1 or body.echo:  # a batch, or an echo: answered whole (see api.completions)
                return await complete_many(engine, body, prompts, request_timeout_s)
            fmt = CompletionFormat(lm, engine.meter.estimated)
            return await _generate(lease, body, prompts[0], "prompt", fmt)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest) -> Response:
        with fleet.pick(body.model) as lease:
            lm, engine = lease.loaded, lease.engine
            try:
                text = render([m.for_template() for m in body.messages], lm.chat_template, lm.special_tokens)
            except ValueError as e:  # a non-text content part, or the template's own refusal
                return error(400, f"messages: {e}", "messages")
            # a template writes the special tokens it wants (its BOS among them): the tokenizer adds none
            ids: list[int] = lm.tokenizer.encode(text, add_special_tokens=lm.chat_template is None).ids
            return await _generate(lease, body, ids, "messages", ChatFormat(lm, engine.meter.estimated))

    async def _generate(
        lease: Lease, body: SamplingFields, prompt_ids: list[int], prompt_field: str, fmt: ResponseFormat
    ) -> Response:
        """Check the prompt fits, run the request through the engine of the version `lease` picked, and answer
        whole or as a stream. `prompt_field` is the request field the prompt came from, which a 400 about its
        length names."""
        lm = lease.loaded
        try:
            check_fits(len(prompt_ids), body.limit(), lm.context_len, prefix_tokens=len(lm.prefix_ids))
        except ContextError as e:
            field = prompt_field if e.part == "prompt" else body.limit_field()
            return error(400, f"{field}: {e}", field)
        params = body.sampling_params()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        req = EngineRequest(prompt_ids, params, emit)
        try:
            lease.submit(req)
        except QueueFull as e:
            return error(429, str(e), kind="rate_limit_error", headers={"Retry-After": "1"})
        deadline = loop.time() + request_timeout_s

        async def next_event() -> Event:
            try:
                return await asyncio.wait_for(events.get(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                req.cancelled.set()
                return Done("timeout", len(prompt_ids), 0, error=f"request exceeded {request_timeout_s:.0f} s")

        if body.stream:
            return StreamingResponse(sse(fmt, next_event, req), media_type="text/event-stream")
        deltas: list[Delta] = []
        try:
            while isinstance(event := await next_event(), Delta):
                deltas.append(event)
        finally:
            req.cancelled.set()  # no-op when finished; frees the engine if this handler was cancelled
        if event.error is not None:
            return error(504 if event.finish_reason == "timeout" else 500, event.error, kind="server_error")
        return JSONResponse(fmt.whole(deltas, event, params.logprobs is not None))

    return app
