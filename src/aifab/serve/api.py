"""The HTTP face of the engine: OpenAI-compatible completions and chat completions, models, health and
Prometheus metrics. Thin on purpose: validation and formatting here, everything else in the engine.

Errors use the OpenAI shape `{"error": {"message", "type", "param", "code"}}`: 400 for a bad field
(named in `param`), 401 without the API key, 413 for an oversize body, 429 when the queue is full.
"""

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from aifab.serve.chat import render
from aifab.serve.engine import Delta, Done, Engine, Event, QueueFull
from aifab.serve.engine import Request as EngineRequest
from aifab.serve.loaded import LoadedModel
from aifab.serve.sampling import SamplingParams, TokenLogprob
from aifab.serve.server import error, require_bearer

MAX_BODY_BYTES = 1 << 20
REQUEST_TIMEOUT_S = 300.0
MAX_TOP_LOGPROBS = 20  # OpenAI's own limit for chat top_logprobs


class _Sampling(BaseModel):
    """The fields completions and chat share. Unknown fields are a 400 naming them."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    stream_options: dict[str, bool] | None = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens past EOS (benchmarks use it)
    # accepted for client compatibility at their neutral values only
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def limit(self) -> int:
        return self.max_tokens or 16

    def n_logprobs(self) -> int | None:
        """None: no logprobs; else how many alternatives to report per token."""
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: Literal[False] = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt is supported per request")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def n_logprobs(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id...: passed to the template as they are

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused (this server is text-only)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {part.get('type')!r} is not supported (text only)")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 16

    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


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

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": lm.id,
            "queued": engine.queue.qsize(),
            "running": engine.running,
            "replica": f"{socket.gethostname()}:{os.getpid()}",  # which process answered (Ray Serve has several)
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": lm.id, "object": "model", "created": lm.created_at, "owned_by": "aifab"}
        card["max_model_len"] = lm.context_len
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Response:
        if (bad := _check_model(body)) is not None:
            return bad
        return await _generate(body, lm.encode(body.text()), "prompt", _CompletionFormat(lm, engine.meter.estimated))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest) -> Response:
        if (bad := _check_model(body)) is not None:
            return bad
        try:
            messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in body.messages]
            text = render(messages, lm.chat_template, lm.special_tokens)
        except ValueError as e:  # a non-text content part, or the template's own refusal
            return error(400, f"messages: {e}", "messages")
        # a template writes the special tokens it wants (its BOS among them): the tokenizer adds none
        ids: list[int] = lm.tokenizer.encode(text, add_special_tokens=lm.chat_template is None).ids
        return await _generate(body, ids, "messages", _ChatFormat(lm, engine.meter.estimated))

    def _check_model(body: _Sampling) -> JSONResponse | None:
        if body.model not in lm.names:
            return error(400, f"model: unknown model {body.model!r}; this server serves {lm.id!r}", "model")
        return None

    async def _generate(body: _Sampling, prompt_ids: list[int], prompt_field: str, fmt: "_Format") -> Response:
        room = lm.context_len - len(lm.prefix_ids)
        if len(prompt_ids) >= room:
            return error(
                400,
                f"{prompt_field}: {len(prompt_ids)} tokens leave no room in the {lm.context_len}-token context",
                prompt_field,
            )
        limit_field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        if len(prompt_ids) + body.limit() > room:
            return error(
                400,
                f"{limit_field}: {body.limit()} + {len(prompt_ids)} prompt tokens exceed the "
                f"{lm.context_len}-token context",
                limit_field,
            )
        params = SamplingParams(
            max_tokens=body.limit(),
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=body.stops(),
            logprobs=body.n_logprobs(),
            ignore_eos=body.ignore_eos,
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
        deadline = loop.time() + request_timeout_s

        async def next_event() -> Event:
            try:
                return await asyncio.wait_for(events.get(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                req.cancelled.set()
                return Done("timeout", len(prompt_ids), 0, error=f"request exceeded {request_timeout_s:.0f} s")

        if body.stream:
            return StreamingResponse(_sse(fmt, next_event, req), media_type="text/event-stream")
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


def _usage(done: Done, estimated: bool) -> dict[str, Any]:
    """OpenAI usage, plus aifab's extension fields: the request's energy and its electricity cost."""
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "energy_j": done.energy_j,
        "cost_usd": done.cost_usd,
        "energy_estimated": estimated,  # True when no energy counter exists and the sampler estimates
    }


class _Format:
    """How engine events become one endpoint's OpenAI objects: a whole response or stream chunks."""

    object_whole = object_chunk = ""

    def __init__(self, lm: LoadedModel, estimated: bool) -> None:
        self.lm, self.estimated = lm, estimated
        self.head = {"id": self.new_id(), "created": int(time.time()), "model": lm.id}

    def new_id(self) -> str:
        return f"cmpl-{uuid.uuid4().hex[:24]}"

    def token_text(self, token: int) -> str:
        text: str = self.lm.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def whole(self, deltas: list[Delta], done: Done, logprobs: bool) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(self, delta: Delta | None, done: Done | None, first: bool) -> dict[str, Any]:
        raise NotImplementedError


class _CompletionFormat(_Format):
    def _logprobs(self, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens = [self.token_text(e.token) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.token_text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def whole(self, deltas: list[Delta], done: Done, logprobs: bool) -> dict[str, Any]:
        entries = [e for d in deltas for e in d.logprobs]
        choice = {
            "text": "".join(d.text for d in deltas),
            "index": 0,
            "logprobs": self._logprobs(entries, 0) if logprobs else None,
            "finish_reason": done.finish_reason,
        }
        return {**self.head, "object": "text_completion", "choices": [choice], "usage": _usage(done, self.estimated)}

    def chunk(self, delta: Delta | None, done: Done | None, first: bool) -> dict[str, Any]:
        choice = {
            "text": delta.text if delta else "",
            "index": 0,
            "logprobs": self._logprobs(list(delta.logprobs), 0) if delta and delta.logprobs else None,
            "finish_reason": done.finish_reason if done else None,
        }
        out = {**self.head, "object": "text_completion", "choices": [choice]}
        return {**out, "usage": _usage(done, self.estimated)} if done else out


class _ChatFormat(_Format):
    def new_id(self) -> str:
        return f"chatcmpl-{uuid.uuid4().hex[:24]}"

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def _logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        content = [
            {**self._entry(e.token, e.logprob), "top_logprobs": [self._entry(t, lp) for t, lp in e.top]}
            for e in entries
        ]
        return {"content": content}

    def whole(self, deltas: list[Delta], done: Done, logprobs: bool) -> dict[str, Any]:
        entries = [e for d in deltas for e in d.logprobs]
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(d.text for d in deltas)},
            "logprobs": self._logprobs(entries) if logprobs else None,
            "finish_reason": done.finish_reason,
        }
        return {**self.head, "object": "chat.completion", "choices": [choice], "usage": _usage(done, self.estimated)}

    def chunk(self, delta: Delta | None, done: Done | None, first: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant"} if first else {}
        if delta is not None:
            message["content"] = delta.text
        choice = {
            "index": 0,
            "delta": message,
            "logprobs": self._logprobs(list(delta.logprobs)) if delta and delta.logprobs else None,
            "finish_reason": done.finish_reason if done else None,
        }
        out = {**self.head, "object": "chat.completion.chunk", "choices": [choice]}
        return {**out, "usage": _usage(done, self.estimated)} if done else out


async def _sse(fmt: _Format, next_event: Callable[[], Awaitable[Event]], req: EngineRequest) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text delta, a last chunk with finish_reason and usage, then [DONE]."""
    first = True
    try:
        while True:
            event = await next_event()
            if isinstance(event, Delta):
                yield f"data: {json.dumps(fmt.chunk(event, None, first))}\n\n"
                first = False
                continue
            if event.error is not None:
                yield f"data: {json.dumps({'error': {'message': event.error, 'type': 'server_error'}})}\n\n"
            else:
                yield f"data: {json.dumps(fmt.chunk(None, event, first))}\n\n"
            yield "data: [DONE]\n\n"
            return
    finally:
        req.cancelled.set()  # the client went away or we are done: free the engine either way
