"""YAML files validated by pydantic, with errors a user can go straight to: `file:line: key: problem`.

`read_yaml(path, error)` reads a file and parses it (`parse_yaml`) into plain data plus the composed node tree,
whose marks give each key's line. `describe(exc, root, path)` turns a pydantic ValidationError into one line that
names the file, the line of the deepest key along the error's location, the dotted key and the problem (with the
offending value when it is a scalar). `line_of(root, loc)` is that line alone, for errors found after validation
(a template that fails to render, a dataset that does not exist). factory.yaml (spec.py) and evaluation task
files (evaluate/tasks.py) share these.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from aifab.errors import AifabError


@dataclass(frozen=True)
class YamlDoc:
    """A parsed YAML file: its data (None for an empty file) and the node tree that knows each key's line."""

    data: Any
    root: yaml.Node | None


def read_yaml(path: Path, error: type[AifabError]) -> YamlDoc:
    """Read and parse `path`; `error` (an AifabError subclass) names a missing, unreadable or malformed file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read: {e}") from None
    return parse_yaml(text, path, error)


def parse_yaml(text: str, path: Path, error: type[AifabError]) -> YamlDoc:
    """Parse YAML text (safe loader: plain data only); malformed YAML raises `error` with its line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{path}:{line}: malformed YAML: {problem}") from None
    return YamlDoc(data, root)


def describe(exc: ValidationError, root: yaml.Node | None, path: Path) -> str:
    """The first error of `exc` as `file:line: key: problem`, plus how many more there are."""
    errors = exc.errors()
    first = errors[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif (
        first["type"] != "missing"
        and "input" in first
        and not isinstance(first["input"], dict | list)
        and repr(first["input"]) not in msg  # our own validators already quote the value
    ):
        msg = f"{msg} (got {first['input']!r})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{path}:{line_of(root, loc)}: {key}: {msg}{more}"


def line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    """1-based line of the deepest YAML node along `loc` (the parent, when the key itself is missing)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    line = key_node.start_mark.line + 1
                    child = value_node
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line
