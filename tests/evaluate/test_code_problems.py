"""The built-in Python code problems: well formed, shipped with the package, and checked in the sandbox (every
canonical body passes its own tests, and a wrong body fails them)."""

import ast
import doctest
import json
import re
import tomllib
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatch
from pathlib import Path

import pytest

from aifab.errors import DataError
from aifab.evaluate.code_problems import FIELDS, CodeProblem, builtin_problems, check_completion, load_code_problems

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def problems() -> list[CodeProblem]:
    return load_code_problems()


def test_forty_problems_with_unique_ids_in_order(problems: list[CodeProblem]) -> None:
    assert len(problems) == 40
    assert [p.task_id for p in problems] == [f"aifab-code/{i}" for i in range(40)]
    assert len({p.entry_point for p in problems}) == 40


def test_each_prompt_and_canonical_body_is_valid_python(problems: list[CodeProblem]) -> None:
    for p in problems:
        tree = ast.parse(p.program(p.canonical), filename=p.task_id)
        functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert [f.name for f in functions] == [p.entry_point], p.task_id
        assert ast.get_docstring(functions[0]), p.task_id
        assert p.prompt.endswith('"""\n'), f"{p.task_id}: the prompt ends with its docstring"
        assert all(line.startswith("    ") for line in p.canonical.splitlines() if line), p.task_id
        tests = ast.parse(p.test, filename=f"{p.task_id} test")
        assert [n.name for n in tests.body if isinstance(n, ast.FunctionDef)] == ["check"], p.task_id
        asserts = sum(isinstance(n, ast.Assert) for n in ast.walk(tests))
        assert 3 <= asserts <= 6, f"{p.task_id}: {asserts} asserts"


def test_each_docstring_example_holds_for_the_canonical_body(problems: list[CodeProblem]) -> None:
    """Our own code, so run in this process: the example in the prompt agrees with the tests' idea of right."""
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for p in problems:
        namespace: dict[str, object] = {}
        exec(compile(p.program(p.canonical), p.task_id, "exec"), namespace)
        examples = doctest.DocTestFinder().find(namespace[p.entry_point], p.entry_point, globs=namespace)
        assert sum(len(t.examples) for t in examples) == 1, p.task_id
        for t in examples:
            assert runner.run(t, out=lambda _: None).failed == 0, p.task_id


def test_every_canonical_body_passes_and_a_wrong_one_fails_in_the_sandbox(problems: list[CodeProblem]) -> None:
    """80 sandboxed runs, 4 at a time: run_tests is safe to call from threads."""
    with ThreadPoolExecutor(4) as pool:
        right = list(pool.map(lambda p: check_completion(p, p.canonical), problems))
        wrong = list(pool.map(lambda p: check_completion(p, "    return None\n"), problems))
    failures = [
        f"{p.task_id}: {r.status} {r.output_tail[-300:]}" for p, r in zip(problems, right, strict=True) if not r.passed
    ]
    assert failures == []
    assert [p.task_id for p, r in zip(problems, wrong, strict=True) if r.status != "failed"] == []


def test_the_problems_ship_with_the_package() -> None:
    """setuptools' package-data covers the file, and importlib.resources finds it where aifab is installed."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["aifab"]
    for name in ("evaluate/suites/python_code.jsonl", "evaluate/suites/README.md"):
        assert any(fnmatch(name, pattern) for pattern in patterns), name
    assert builtin_problems().is_file()
    readme = (ROOT / "src" / "aifab" / "evaluate" / "suites" / "README.md").read_text()
    assert "python_code.jsonl" in readme and "Apache-2.0" in readme


def test_the_problems_are_our_own_words(problems: list[CodeProblem]) -> None:
    """A guard against pasting from the public sets: none of their signature phrases or names appear."""
    text = "\n".join(p.prompt + p.test for p in problems)
    for phrase in ("HumanEval", "METADATA", "Write a function", "def candidate", "has_close_elements"):
        assert phrase not in text


def write_lines(path: Path, *objs: object) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


GOOD = {"task_id": "t/0", "prompt": "def f():\n", "canonical": "    return 1\n", "test": "x", "entry_point": "f"}


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        (["{not json"], r":1: not valid JSON"),
        ([[1, 2]], r":1: expected a JSON object, got list"),
        (
            [GOOD, {k: v for k, v in GOOD.items() if k != "test"}],
            r":2: key 'test' must be a non-empty string \(missing\)",
        ),
        ([{**GOOD, "prompt": 3}], r":1: key 'prompt' must be a non-empty string \(int 3\)"),
        ([{**GOOD, "entry_point": "f()"}], r":1: key 'entry_point' is not a Python name"),
        ([GOOD, "", GOOD], r":3: key 'task_id' repeats 't/0'"),
        ([""], r"no code problems"),
    ],
)
def test_a_malformed_problems_file_names_file_line_and_key(tmp_path: Path, lines: list[object], says: str) -> None:
    path = write_lines(tmp_path / "problems.jsonl", *lines)
    with pytest.raises(DataError, match=says) as info:
        load_code_problems(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_a_missing_problems_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "absent.jsonl"))):
        load_code_problems(tmp_path / "absent.jsonl")


def test_a_loaded_problem_keeps_every_field(tmp_path: Path) -> None:
    (problem,) = load_code_problems(write_lines(tmp_path / "one.jsonl", GOOD))
    assert [getattr(problem, k) for k in FIELDS] == [GOOD[k] for k in FIELDS]
