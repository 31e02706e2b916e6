"""Jinja templates of evaluation tasks, rendered in a sandbox: a task file may come from anyone.

The environment is Jinja's SandboxedEnvironment (no attribute access to Python internals, no calling unsafe
methods) with StrictUndefined, so a misspelt field is an error rather than an empty string. A row's fields are
the template's variables, and the whole row is `doc` too (for keys that are not identifiers: `doc["a-b"]`).

`choices` of a multiple-choice task is either a list of templates (one per choice) or a single `{{ expression }}`
that evaluates to a list (`{{ options }}`, `{{ doc.choices.text }}`); `gold` renders to the index of the right
choice or to its text.
"""

import re
from collections.abc import Mapping
from functools import cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

ONE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>(?:(?!\}\}).)*)\}\}\s*$", re.DOTALL)


class TemplateFailure(ValueError):
    """A template that does not compile or does not render on a row; the message says why, in one line."""


@cache
def environment() -> SandboxedEnvironment:
    # keep_trailing_newline: a target of "x\n" stays "x\n"; autoescape off: this is text, not HTML
    return SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if not isinstance(e, TemplateError) else text or type(e).__name__


def check_syntax(source: str) -> str:
    """The template itself when it compiles; TemplateFailure with Jinja's complaint otherwise."""
    try:
        environment().parse(source)
    except TemplateError as e:
        raise TemplateFailure(f"template does not compile: {_one_line(e)}") from None
    return source


@cache
def _compiled(source: str) -> Any:
    return environment().from_string(source)


def render(source: str, row: Mapping[str, Any]) -> str:
    """The template rendered on one row; TemplateFailure names an undefined field or a runtime error."""
    try:
        text: str = _compiled(source).render({**row, "doc": row})
    except Exception as e:  # a sandbox violation, an undefined name, a type error inside the template
        raise TemplateFailure(f"template fails: {_one_line(e)}") from None
    return text


def choices_of(spec: str | list[str], row: Mapping[str, Any]) -> list[str]:
    """The choices of one row: each template of a list rendered, or the one expression's list."""
    if isinstance(spec, list):
        out = [render(t, row) for t in spec]
    else:
        m = ONE_EXPRESSION.match(spec)
        if m is None:
            raise TemplateFailure("choices must be a list of templates or one {{ expression }} giving a list")
        try:
            value = environment().compile_expression(m.group("expr"), undefined_to_none=False)(**row, doc=row)
        except Exception as e:
            raise TemplateFailure(f"template fails: {_one_line(e)}") from None
        if not isinstance(value, list | tuple) or not all(isinstance(v, str | int | float) for v in value):
            raise TemplateFailure(f"choices must evaluate to a list of strings, got {type(value).__name__}")
        out = [str(v) for v in value]
    if len(out) < 2:
        raise TemplateFailure(f"a multiple-choice example needs at least 2 choices, got {len(out)}")
    return out


def gold_index(source: str, row: Mapping[str, Any], choices: list[str]) -> int:
    """The index of the right choice: `gold` rendered to an index, or to the text of one of the choices."""
    text = render(source, row).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < len(choices):
            raise TemplateFailure(f"gold index {index} is out of range for {len(choices)} choices")
        return index
    for i, choice in enumerate(choices):
        if choice.strip() == text:
            return i
    raise TemplateFailure(f"gold {text[:60]!r} is neither an index nor one of the choices")
