"""The HTTP face of the engine: OpenAI-compatible completions, models, health. Thin on purpose.

Errors use the OpenAI shape `{"error": {"message", "type", "param", "code"}}`: 400 for a bad field
(named in `param`), 401 without the API key, 413 for an oversize body, 429 when the queue is full.
"""

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from aifab.serve.engine import Delta, Done, Engine, Event, QueueFull
from aifab.serve.engine import Request as EngineRequest
from aifab.serve.sampling import SamplingParams

MAX_BODY_BYTES = 1 << 20
REQUEST_TIMEOUT_S = 300.0


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str | list[str]
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    stream_options: dict[str, bool] | None = None
    # accepted for client compatibility at their neutral values only
    echo: Literal[False] = False
    logprobs: None = None
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt is supported per request")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def error(
    status: int,
    message: str,
    param: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


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
    engine: Engine,
    *,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
) -> FastAPI:
    lm = engine.loaded
    app = FastAPI(title="aifab", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.middleware("http")
    async def require_key(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(401, "missing or wrong API key", kind="authentication_error")
        return await call_next(request)

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

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": lm.id, "queued": engine.queue.qsize(), "running": engine.running}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": lm.id, "object": "model", "created": lm.created_at, "owned_by": "aifab"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> JSONResponse | StreamingResponse:
        if body.model not in lm.names:
            return error(400, f"model: unknown model {body.model!r}; this server serves {lm.id!r}", "model")
        prompt_ids = lm.encode(body.text())
        room = lm.context_len - 1  # one position holds the document-start token
        if len(prompt_ids) >= room:
            return error(
                400, f"prompt: {len(prompt_ids)} tokens leave no room in the {lm.context_len}-token context", "prompt"
            )
        if len(prompt_ids) + body.max_tokens > room:
            return error(
                400,
                f"max_tokens: {body.max_tokens} + {len(prompt_ids)} prompt tokens exceed the "
                f"{lm.context_len}-token context",
                "max_tokens",
            )
        params = SamplingParams(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=body.stops(),
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        req = EngineRequest(prompt_ids, params, emit)
        try:
            engine.submit(req)
        except QueueFull as e:
            return error(429, str(e), kind="rate_limit_error", headers={"Retry-After": "1"})
        head = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": lm.id,
        }
        deadline = loop.time() + request_timeout_s

        async def next_event() -> Event:
            try:
                return await asyncio.wait_for(events.get(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                req.cancelled.set()
                return Done("timeout", len(prompt_ids), 0, error=f"request exceeded {request_timeout_s:.0f} s")

        if body.stream:
            return StreamingResponse(_sse(head, next_event, req), media_type="text/event-stream")
        parts: list[str] = []
        try:
            while isinstance(event := await next_event(), Delta):
                parts.append(event.text)
        finally:
            req.cancelled.set()  # no-op when finished; frees the engine if this handler was cancelled
        if event.error is not None:
            return error(504 if event.finish_reason == "timeout" else 500, event.error, kind="server_error")
        choice = {"text": "".join(parts), "index": 0, "logprobs": None, "finish_reason": event.finish_reason}
        return JSONResponse({**head, "choices": [choice], "usage": _usage(event)})

    return app


def _usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


async def _sse(
    head: dict[str, Any], next_event: Callable[[], Awaitable[Event]], req: EngineRequest
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text delta, a last chunk with finish_reason and usage, then [DONE]."""
    try:
        while True:
            event = await next_event()
            if isinstance(event, Delta):
                choice = {"text": event.text, "index": 0, "logprobs": None, "finish_reason": None}
                yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
                continue
            if event.error is not None:
                yield f"data: {json.dumps({'error': {'message': event.error, 'type': 'server_error'}})}\n\n"
            else:
                choice = {"text": "", "index": 0, "logprobs": None, "finish_reason": event.finish_reason}
                yield f"data: {json.dumps({**head, 'choices': [choice], 'usage': _usage(event)})}\n\n"
            yield "data: [DONE]\n\n"
            return
    finally:
        req.cancelled.set()  # the client went away or we are done: free the engine either way
