"""The request bodies the API accepts, as pydantic models. Validation here is the whole of the 400s on fields:
an unknown field, a value out of range or of the wrong type fails here, and `routes` names the field."""

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from aifab.nn.sampling import SamplingParams

MAX_TOP_LOGPROBS = 20  # OpenAI's own limit for chat top_logprobs
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
# prompts in one completions request: each becomes an engine request, so a batch is capped below the engine's
# default queue (64) and a harness's usual batch sizes fit
MAX_PROMPTS = 32

Prompt = str | list[str] | list[int] | list[list[int]]


class SamplingFields(BaseModel):
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
        """How many tokens to generate at most."""
        return DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    def limit_field(self) -> str:
        """The field that set `limit()`, which a 400 about the token budget names."""
        return "max_tokens"

    def n_logprobs(self) -> int | None:
        """None: no logprobs; else how many alternatives to report per token."""
        return None

    def sampling_params(self) -> SamplingParams:
        """What the engine samples this request with."""
        return SamplingParams(
            max_tokens=self.limit(),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stops(),
            logprobs=self.n_logprobs(),
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `prompt` is a string, a list of token ids, or a batch: a list of strings or of
    token-id lists, answered with one choice each (`index` in the batch's order; `n` stays 1).

    `echo` puts each prompt before its completion; with `logprobs` as well, the prompt's tokens are scored
    too (the first has no score: nothing precedes it), which is what loglikelihood-based harnesses read, and
    `max_tokens` may be 0 to score the prompt alone. Token ids are checked against the model's vocabulary by
    the route, which knows it; `conflict()` names the combinations of fields that are refused."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]  # Prompt, strictly
    max_tokens: int | None = Field(default=None, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Prompt) -> Prompt:
        if isinstance(v, str):
            return v
        if not v:
            raise ValueError("the list is empty; send a string, token ids, or a list of either")
        if not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
            raise ValueError(f"{len(v)} prompts exceed the limit of {MAX_PROMPTS} per request")
        empty = next((i for i, p in enumerate(v) if isinstance(p, list) and not p), None)
        if empty is not None:
            raise ValueError(f"prompt {empty} is an empty list of token ids")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts in order: a string or token ids each."""
        v = self.prompt
        if isinstance(v, str):
            return [v]
        if isinstance(v[0], int):  # one prompt, as token ids (the validator let no mixed list through)
            return [v]
        return list(cast(list[str | list[int]], v))

    def conflict(self) -> tuple[str, str] | None:
        """The field and the problem, when fields that are each valid are refused together; else None."""
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "0 is allowed only with echo (to score the prompt without generating)"
        if self.stream and self.echo:
            return "echo", "echo is not supported with stream; ask without stream"
        if self.stream and len(self.prompts()) > 1:
            return "prompt", "a batch of prompts cannot be streamed; send one prompt, or ask without stream"
        return None

    def n_logprobs(self) -> int | None:
        return self.logprobs

    def prompt_logprobs(self) -> int | None:
        """How many alternatives to report per prompt token, when the prompt is to be scored; else None."""
        return self.logprobs if self.echo else None


class ChatMessage(BaseModel):
    """One message of a chat. Fields beyond role and content (name, tool_call_id...) go to the template as
    they are."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    # a string, or OpenAI content parts ({"type": "text", "text": ...}; other types are refused by `text()`)
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; ValueError for a content part other than text (this server is text-only)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {part.get('type')!r} is not supported (text only)")
            parts.append(part["text"])
        return "".join(parts)

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template sees it: every field it was sent with, its content as plain text."""
        return {**self.model_dump(exclude_none=True), "content": self.text()}


class ChatRequest(SamplingFields):
    """POST /v1/chat/completions: at least one message; `max_completion_tokens` wins over `max_tokens`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    def limit_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
