"""The built-in Python code problems (suites/python_code.jsonl) and how one completion of one is checked.

Each line of the file is one problem: `task_id`, `prompt` (imports, the def line and a docstring), `canonical`
(a correct body, indented as it would follow the prompt), `test` (code defining `check(candidate)` with its
asserts) and `entry_point` (the function's name). A model completes the prompt with a body; the program the
sandbox runs is the prompt followed by that body. suites/README.md gives the problems' provenance.
"""

import json
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from aifab.errors import DataError
from aifab.evaluate.sandbox import SandboxResult, run_tests

FIELDS = ("task_id", "prompt", "canonical", "test", "entry_point")


@dataclass(frozen=True)
class CodeProblem:
    task_id: str
    prompt: str  # imports, the def line and the docstring, ending in a newline
    canonical: str  # a correct body: the reference for exact match, and proof that the tests can pass
    test: str  # defines check(candidate)
    entry_point: str  # the function check() is given

    def program(self, completion: str) -> str:
        """The program the sandbox runs for a completion of this problem's prompt."""
        return self.prompt + completion


def builtin_problems() -> Traversable:
    """The shipped problems' file, found through the installed package (a wheel, an sdist or a checkout)."""
    return resources.files("aifab") / "evaluate" / "suites" / "python_code.jsonl"


def load_code_problems(path: Path | Traversable | None = None) -> list[CodeProblem]:
    """Read and validate problems from a JSONL file (the built-in ones by default).

    Raises DataError, naming the file, line and key, for a missing file, a line that is not a JSON object,
    a missing or non-string field, an entry point that is not an identifier, or a repeated task_id."""
    path = builtin_problems() if path is None else path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the code problems: {e}") from None
    problems: list[CodeProblem] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in FIELDS:
            if not isinstance(obj.get(key), str) or not obj[key]:
                got = "missing" if key not in obj else f"{type(obj[key]).__name__} {obj[key]!r:.40}"
                raise DataError(f"{where}: key {key!r} must be a non-empty string ({got})")
        if not obj["entry_point"].isidentifier():
            raise DataError(f"{where}: key 'entry_point' is not a Python name: {obj['entry_point']!r}")
        if obj["task_id"] in seen:
            raise DataError(f"{where}: key 'task_id' repeats {obj['task_id']!r}")
        seen.add(obj["task_id"])
        problems.append(CodeProblem(*(obj[key] for key in FIELDS)))
    if not problems:
        raise DataError(f"{path}: no code problems in the file")
    return problems


def check_completion(
    problem: CodeProblem, completion: str, *, timeout_s: float = 5.0, memory_mb: int = 512
) -> SandboxResult:
    """Run the prompt followed by `completion` against the problem's tests in the sandbox."""
    return run_tests(
        problem.program(completion),
        problem.test,
        entry_point=problem.entry_point,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
    )
