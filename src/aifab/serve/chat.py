"""Chat messages -> one prompt string, by the model's chat template.

An imported model brings its template from `tokenizer_config.json` (kept in the registry at import). It is
Jinja, rendered the way Hugging Face `apply_chat_template` renders it: a sandboxed environment with
`trim_blocks` and `lstrip_blocks`, the variables `messages`, `add_generation_prompt`, `bos_token` and
`eos_token`, and `raise_exception(msg)` for templates that refuse a conversation (their message becomes a 400).

A model without a template (every model trained here from raw text) uses `DEFAULT_TEMPLATE`: one
"Role: text" paragraph per message and a closing "Assistant:" for the model to continue. A base model has
never seen a chat format, so the plainest one that reads like a transcript works best.
"""

from datetime import datetime
from functools import lru_cache
from typing import Any

DEFAULT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class TemplateError(ValueError):
    """The template refused the conversation, or could not be rendered; the message says why."""


def _raise(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render(messages: list[dict[str, Any]], template: str | None, special_tokens: dict[str, str]) -> str:
    """The prompt for `messages` (dicts with at least role and content), ending where the assistant speaks."""
    from jinja2 import TemplateError as JinjaError

    try:
        compiled = _compile(template or DEFAULT_TEMPLATE)
        text: str = compiled.render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=special_tokens.get("bos_token", ""),
            eos_token=special_tokens.get("eos_token", ""),
        )
    except TemplateError:
        raise
    except JinjaError as e:
        raise TemplateError(f"the model's chat template failed: {e}") from None
    return text
