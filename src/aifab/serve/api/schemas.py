"""The request bodies the API accepts, as pydantic models. Validation here is the whole of the 400s on fields:
an unknown field, a value out of range or of the wrong type fails here, and `routes` names the field."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from aifab.nn.sampling import SamplingParams

MAX_TOP_LOGPROBS = 20  # OpenAI's own limit for chat top_logprobs
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


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
        return self.max_tokens or DEFAULT_MAX_TOKENS

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
    """POST /v1/completions: one prompt (a string, or a list holding one)."""

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
