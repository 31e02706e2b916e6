"""How engine events become the OpenAI-shaped bodies the API answers with: a whole response, or server-sent
event chunks. The TypedDicts below are the wire contract (what clients such as the `openai` package parse)."""

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import NotRequired, TypedDict

from aifab.nn.sampling import TokenLogprob
from aifab.serve.engine import Delta, Done, Event
from aifab.serve.engine import Request as EngineRequest
from aifab.serve.loaded import LoadedModel


class Usage(TypedDict):
    """OpenAI usage, plus aifab's extension fields: the request's energy and its electricity cost."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    energy_j: float
    cost_usd: float
    energy_estimated: bool  # True when no energy counter exists and the sampler estimates


class CompletionLogprobs(TypedDict):
    """OpenAI's legacy logprobs. With echo, the prompt's tokens come first and the first of them has null in
    both lists, as OpenAI sends it (the `openai` package's generated types say float there: its client parses
    the null as sent, but a strict `model_validate` refuses it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]  # per token: alternative text -> its logprob
    text_offset: list[int]  # where each token's text starts, in characters


class CompletionChoice(TypedDict):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: str | None  # None in every stream chunk but the last


class Completion(TypedDict):
    """A text_completion, whole or one stream chunk (only the last chunk carries usage)."""

    id: str
    created: int
    model: str
    object: str
    choices: list[CompletionChoice]
    usage: NotRequired[Usage]


class ChatLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]  # the token's text as UTF-8


class ChatTokenLogprob(ChatLogprob):
    top_logprobs: list[ChatLogprob]


class ChatLogprobs(TypedDict):
    content: list[ChatTokenLogprob]


class ChatMessageOut(TypedDict, total=False):
    """The assistant's message, whole (both keys) or as a stream delta (role in the first chunk only, content
    in chunks that carry text)."""

    role: str
    content: str


class ChatChoice(TypedDict):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(TypedDict):
    id: str
    created: int
    model: str
    object: str
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(TypedDict):
    id: str
    created: int
    model: str
    object: str
    choices: list[ChatChunkChoice]
    usage: NotRequired[Usage]  # the last chunk only


Body = Completion | ChatCompletion | ChatCompletionChunk


class Healthz(TypedDict):
    status: str
    model: str
    queued: int
    running: int
    replica: str  # host:pid of the process that answered (Ray Serve has several)


class ModelCard(TypedDict):
    id: str
    object: str
    created: int
    owned_by: str
    max_model_len: int


class ModelList(TypedDict):
    object: str
    data: list[ModelCard]


def usage(done: Done, estimated: bool) -> Usage:
    return total_usage([done], estimated)


def total_usage(dones: list[Done], estimated: bool) -> Usage:
    """The usage of several requests answered as one (a batch of prompts): every figure summed."""
    prompt, completion = sum(d.prompt_tokens for d in dones), sum(d.completion_tokens for d in dones)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "energy_j": sum(d.energy_j for d in dones),
        "cost_usd": sum(d.cost_usd for d in dones),
        "energy_estimated": estimated,
    }


@dataclass(frozen=True)
class EchoedPrompt:
    """A prompt to put before its completion: its text as the client sent it (or the decoded token ids), and
    its tokens."""

    text: str
    ids: list[int]


class ResponseFormat:
    """How engine events become one endpoint's OpenAI objects: a whole response or stream chunks. One instance
    per request: it holds the response's id and creation time, which every chunk repeats."""

    id_prefix = "cmpl-"

    def __init__(self, lm: LoadedModel, estimated: bool) -> None:
        self.lm, self.estimated = lm, estimated
        self.id, self.created = f"{self.id_prefix}{uuid.uuid4().hex[:24]}", int(time.time())

    def token_text(self, token: int) -> str:
        text: str = self.lm.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def whole(self, deltas: list[Delta], done: Done, logprobs: bool) -> Body:
        """The whole response to a request that streamed `deltas` and ended with `done`."""
        raise NotImplementedError

    def chunk(self, delta: Delta | None, done: Done | None, first: bool) -> Body:
        """One stream chunk: of `delta`'s text, or the last one (finish_reason and usage) when `done`."""
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    def _logprobs(self, entries: list[TokenLogprob], offset: int, unscored: int | None = None) -> CompletionLogprobs:
        """`entries` in the legacy shape, their text offsets counted from `offset`; `unscored` is a token listed
        first with null scores (an echoed prompt's first token)."""
        head: list[None] = [] if unscored is None else [None]
        tokens = [self.token_text(t) for t in ([] if unscored is None else [unscored])]
        tokens += [self.token_text(e.token) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [*head, *(e.logprob for e in entries)],
            "top_logprobs": [*head, *({self.token_text(t): lp for t, lp in e.top} for e in entries)],
            "text_offset": offsets,
        }

    def _body(self, choices: list[CompletionChoice]) -> Completion:
        return {
            "id": self.id,
            "created": self.created,
            "model": self.lm.id,
            "object": "text_completion",
            "choices": choices,
        }

    def choice(
        self, deltas: list[Delta], done: Done, logprobs: bool, index: int = 0, echo: EchoedPrompt | None = None
    ) -> CompletionChoice:
        """The choice of one request that streamed `deltas` and ended with `done`; with `echo`, its prompt
        comes first in the text and, scored, in the logprobs."""
        text = "".join(d.text for d in deltas)
        entries = [e for d in deltas for e in d.logprobs]
        lp = self._logprobs(entries, 0) if logprobs else None
        if echo is not None:
            text = echo.text + text
            scored = [e for d in deltas for e in d.prompt_logprobs]
            lp = self._logprobs(scored + entries, 0, unscored=echo.ids[0]) if logprobs else None
        return {"text": text, "index": index, "logprobs": lp, "finish_reason": done.finish_reason}

    def whole(self, deltas: list[Delta], done: Done, logprobs: bool) -> Completion:
        body = self._body([self.choice(deltas, done, logprobs)])
        body["usage"] = usage(done, self.estimated)
        return body

    def batch(self, choices: list[CompletionChoice], dones: list[Done]) -> Completion:
        """One response for several requests (a batch of prompts, or one echoed): their choices and usage."""
        body = self._body(choices)
        body["usage"] = total_usage(dones, self.estimated)
        return body

    def chunk(self, delta: Delta | None, done: Done | None, first: bool) -> Completion:
        body = self._body(
            [
                {
                    "text": delta.text if delta else "",
                    "index": 0,
                    "logprobs": self._logprobs(list(delta.logprobs), 0) if delta and delta.logprobs else None,
                    "finish_reason": done.finish_reason if done else None,
                }
            ]
        )
        if done:
            body["usage"] = usage(done, self.estimated)
        return body


class ChatFormat(ResponseFormat):
    id_prefix = "chatcmpl-"

    def _entry(self, token: int, logprob: float) -> ChatLogprob:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def _logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        content: list[ChatTokenLogprob] = [
            {**self._entry(e.token, e.logprob), "top_logprobs": [self._entry(t, lp) for t, lp in e.top]}
            for e in entries
        ]
        return {"content": content}

    def whole(self, deltas: list[Delta], done: Done, logprobs: bool) -> ChatCompletion:
        entries = [e for d in deltas for e in d.logprobs]
        choice: ChatChoice = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(d.text for d in deltas)},
            "logprobs": self._logprobs(entries) if logprobs else None,
            "finish_reason": done.finish_reason,
        }
        return {
            "id": self.id,
            "created": self.created,
            "model": self.lm.id,
            "object": "chat.completion",
            "choices": [choice],
            "usage": usage(done, self.estimated),
        }

    def chunk(self, delta: Delta | None, done: Done | None, first: bool) -> ChatCompletionChunk:
        message: ChatMessageOut = {"role": "assistant"} if first else {}
        if delta is not None:
            message["content"] = delta.text
        choice: ChatChunkChoice = {
            "index": 0,
            "delta": message,
            "logprobs": self._logprobs(list(delta.logprobs)) if delta and delta.logprobs else None,
            "finish_reason": done.finish_reason if done else None,
        }
        body: ChatCompletionChunk = {
            "id": self.id,
            "created": self.created,
            "model": self.lm.id,
            "object": "chat.completion.chunk",
            "choices": [choice],
        }
        if done:
            body["usage"] = usage(done, self.estimated)
        return body


async def sse(
    fmt: ResponseFormat, next_event: Callable[[], Awaitable[Event]], req: EngineRequest
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text delta, a last chunk with finish_reason and usage, then [DONE].
    An engine error becomes an error chunk before [DONE]. The request is cancelled when the stream ends, for
    whatever reason (the client went away, or it is done)."""
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
