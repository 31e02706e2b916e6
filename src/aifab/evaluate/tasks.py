"""Evaluation tasks: the YAML schema of a task file, loading and checking one, and rendering its examples.

A task file, in the spirit of lm-evaluation-harness (docs/evaluate.md has the reference):

    name: capitals
    output_type: multiple_choice        # loglikelihood | multiple_choice | loglikelihood_rolling | generate_until
    dataset: {path: capitals.jsonl}     # JSONL, CSV or Parquet beside the task file; or {registered: NAME[:VERSION]}
    input: "The capital of {{ country }} is"
    choices: "{{ options }}"            # one expression giving a list, or a list of templates
    gold: "{{ answer }}"                # the right choice's index or text
    fewshot: 2
    metrics: [acc, acc_norm]

`load_task(path, store)` validates all of it before any model is loaded: the schema (unknown keys, wrong types,
the keys an output type needs, metrics it can compute), that the dataset exists and has rows, and that every
template renders on the first row. Any problem raises TaskError with one line `file:line: key: problem`.
`render_examples(task, limit)` renders the examples a run scores (few-shot context included), again naming the
row and key of a template that fails. A task's digest is the sha256 of its definition and its dataset's digest.
"""

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from aifab.errors import AifabError
from aifab.evaluate.metrics import is_metric
from aifab.evaluate.templates import TemplateFailure, check_syntax, choices_of, gold_index, render
from aifab.store import Store
from aifab.store.names import NAME_RE
from aifab.yamlfile import YamlDoc, describe, line_of, read_yaml

OutputType = Literal["loglikelihood", "multiple_choice", "loglikelihood_rolling", "generate_until"]
# what each output type can compute; `pass@k` stands for pass@<code.k>
ALLOWED_METRICS: dict[str, tuple[str, ...]] = {
    "loglikelihood": ("acc", "perplexity", "bits_per_byte"),
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood_rolling": ("bits_per_byte", "perplexity"),
    "generate_until": ("exact_match", "pass@k"),
}
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "loglikelihood": ("acc", "perplexity"),
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood_rolling": ("bits_per_byte", "perplexity"),
    "generate_until": ("exact_match",),
}
# the template keys each output type needs, besides `input`
NEEDS: dict[str, tuple[str, ...]] = {
    "loglikelihood": ("target",),
    "multiple_choice": ("choices", "gold"),
    "loglikelihood_rolling": (),
    "generate_until": ("target",),
}


class TaskError(AifabError):
    """A task file that cannot be evaluated: missing, malformed, invalid, or its dataset or templates fail."""


def _template(source: str) -> str:
    try:
        return check_syntax(source)
    except TemplateFailure as e:
        raise ValueError(str(e)) from None


Template = Annotated[str, AfterValidator(_template)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DatasetSpec(_Section):
    """Exactly one of `path` (a local file, relative to the task file) or `registered` (a dataset version)."""

    path: str | None = Field(default=None, min_length=1, description="JSONL, CSV or Parquet, beside the task file.")
    registered: str | None = Field(default=None, min_length=1, description="NAME or NAME:VERSION of a dataset.")
    split: Literal["val"] = Field(default="val", description="Of a registered dataset: only its held-out split.")

    @model_validator(mode="after")
    def _one_source(self) -> "DatasetSpec":
        if (self.path is None) == (self.registered is None):
            raise ValueError("give exactly one of `path` (a local file) or `registered` (a dataset version)")
        return self


class GenerationSpec(_Section):
    until: list[str] = Field(default_factory=lambda: ["\n\n"], description="Stop at the first of these strings.")
    max_tokens: int = Field(default=128, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0: greedy.")
    seed: int = 0


class CodeSpec(_Section):
    """A code task: the completion (input + generated text) is run in the sandbox, then `tests`, whose
    check(candidate) is called with the program's function `entry_point`."""

    tests: Template = Field(description="Test code defining check(candidate), rendered per row.")
    entry_point: Template = Field(default="{{ entry_point }}", description="The function check() is called with.")
    k: int = Field(default=1, ge=1, le=100)
    samples: int = Field(default=1, ge=1, le=200, description="Completions per problem (>= k).")
    timeout_s: float = Field(default=5.0, gt=0, le=120)
    memory_mb: int = Field(default=512, ge=64, le=16384)  # the interpreter alone maps about 30 MB


class TaskSpec(_Section):
    name: str = Field(pattern=NAME_RE.pattern, description="The task's name in results (1-64 letters, digits, ._-).")
    output_type: OutputType
    dataset: DatasetSpec
    input: Template
    target: Template | None = None
    choices: list[Template] | Template | None = None
    gold: Template | None = None
    description: str = Field(default="", description="Plain text put before the few-shot examples.")
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    fewshot: int = Field(default=0, ge=0, le=64)
    fewshot_seed: int = 1234
    metrics: list[str] | None = Field(default=None, min_length=1)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    code: CodeSpec | None = None

    def metric_names(self) -> list[str]:
        """The metrics this task reports, `pass@k` spelled with its k."""
        names = list(self.metrics or DEFAULT_METRICS[self.output_type])
        k = self.code.k if self.code is not None else 1
        return [f"pass@{k}" if m == "pass@k" else m for m in names]


def problems(spec: TaskSpec) -> tuple[tuple[str | int, ...], str] | None:
    """The first combination of keys the schema alone cannot refuse: (location, problem), or None."""
    kind = spec.output_type
    for key in NEEDS[kind]:
        if getattr(spec, key) is None:
            return (key,), f"required for output_type {kind}"
    for i, metric in enumerate(spec.metrics or ()):
        generic = "pass@k" if metric.startswith("pass@") else metric
        if metric != "pass@k" and not is_metric(metric):
            return ("metrics", i), f"unknown metric {metric!r}"
        if generic not in ALLOWED_METRICS[kind]:
            return ("metrics", i), f"{kind} cannot compute {metric!r} (it can: {', '.join(ALLOWED_METRICS[kind])})"
    wants_code = any(m.startswith("pass@") for m in spec.metric_names())
    if wants_code and spec.code is None:
        return ("metrics",), "pass@k runs tests: add a `code:` section"
    if spec.code is not None:
        if kind != "generate_until":
            return ("code",), "only a generate_until task runs code"
        k = max(int(m.split("@")[1]) for m in spec.metric_names() if m.startswith("pass@")) if wants_code else 1
        if spec.code.samples < k:
            return ("code", "samples"), f"pass@{k} needs at least {k} samples per problem"
        if spec.code.samples > 1 and spec.generation.temperature == 0:
            return ("code", "samples"), "several samples per problem need generation.temperature > 0"
    if kind == "loglikelihood_rolling" and spec.fewshot:
        return ("fewshot",), "a loglikelihood_rolling task scores whole documents: no few-shot"
    return None


@dataclass
class Task:
    """A validated task with its rows, ready to render: from a file, or built in (`suite` set)."""

    spec: TaskSpec
    rows: list[dict[str, Any]]
    digest: str  # sha256 of the definition and of the dataset
    source: str  # the task file, or "built-in"
    suite: str | None = None
    dataset_version_id: int | None = None  # a registered dataset the rows come from
    notes: list[str] = field(default_factory=list)  # what a user should know about the rows (held-out drops)
    root: Any = None  # the YAML node tree, for the lines of later errors

    def where(self, *loc: str) -> str:
        """`file:line: key` for an error about `loc` of this task."""
        key = ".".join(loc)
        if self.root is None:
            return f"{self.source} ({self.spec.name}): {key}"
        return f"{self.source}:{line_of(self.root, loc)}: {key}"


@dataclass(frozen=True)
class Example:
    """One rendered example: what the model is given and what it is scored against."""

    index: int  # the row's position in the dataset
    context: str  # description, few-shot examples and input
    target: str | None = None  # loglikelihood and generate_until: the reference (without target_delimiter)
    choices: tuple[str, ...] = ()  # multiple_choice
    gold: int | None = None
    tests: str | None = None  # code: test code that defines check(candidate)
    entry_point: str | None = None  # code: the function check() is given


def load_task(path: str | Path, store: Store | None = None) -> Task:
    """Read, validate and check one task file; TaskError with `file:line: key: problem` on any fault. A task
    on a registered dataset needs the store to find it (and its held-out documents)."""
    path = Path(path)
    doc = read_yaml(path, TaskError)
    if not isinstance(doc.data, dict):
        got = "an empty file" if doc.data is None else type(doc.data).__name__
        raise TaskError(f"{path}:1: a task file must be a mapping of keys, got {got}")
    try:
        spec = TaskSpec.model_validate(doc.data)
    except ValidationError as e:
        raise TaskError(describe(e, doc.root, path)) from None
    found = problems(spec)
    if found is not None:
        loc, msg = found
        # a key that is not there is a problem of the output type that needs it: point at that line
        line = line_of(doc.root, loc if loc[0] in doc.data else ("output_type",))
        raise TaskError(f"{path}:{line}: {'.'.join(map(str, loc))}: {msg}")
    definition = hashlib.sha256(path.read_bytes()).hexdigest()
    task = _with_rows(spec, doc, path, store, definition)
    if len(task.rows) <= spec.fewshot:
        raise TaskError(
            f"{task.where('fewshot')}: {spec.fewshot} few-shot examples need more than {len(task.rows)} rows"
        )
    render_examples(task, 1)  # every template on the first row
    return task


def _with_rows(spec: TaskSpec, doc: YamlDoc, path: Path, store: Store | None, definition: str) -> Task:
    from aifab.evaluate.rows import read_rows

    ds = spec.dataset
    if ds.path is not None:
        file = Path(ds.path).expanduser()
        file = file if file.is_absolute() else path.parent / file
        try:
            rows, data_digest = read_rows(file)
        except ValueError as e:
            raise TaskError(f"{path}:{line_of(doc.root, ('dataset', 'path'))}: dataset.path: {e}") from None
        digest = hashlib.sha256(f"{definition}\n{data_digest}".encode()).hexdigest()
        return Task(spec, rows, digest, str(path), root=doc.root)
    assert ds.registered is not None
    where = f"{path}:{line_of(doc.root, ('dataset', 'registered'))}: dataset.registered"
    if store is None:
        raise TaskError(f"{where}: a registered dataset needs the store to read it from")
    from aifab.evaluate.heldout import held_out
    from aifab.store.datasets import resolve_dataset

    try:
        held = held_out(store, resolve_dataset(store.db, ds.registered))
    except AifabError as e:
        raise TaskError(f"{where}: {e}") from None
    rows = [{"text": text} for text in held.documents]
    data = f"{held.curated_digest}\n{ds.split}\n{held.val_fraction}"
    digest = hashlib.sha256(f"{definition}\n{data}".encode()).hexdigest()
    task = Task(spec, rows, digest, str(path), None, held.dataset_version_id, root=doc.root)
    if held.leaked:
        task.notes.append(f"{held.leaked} held-out documents of {held.dataset} also occur in training: left out")
    return task


def builtin_task(spec: TaskSpec, rows: list[dict[str, Any]], suite: str, data_digest: str) -> Task:
    """A built-in suite's task: its spec (validated like a file's) and rows made in code. The digest covers the
    definition and `data_digest` (the items' source and how they were made)."""
    found = problems(spec)
    if found is not None:
        raise ValueError(f"built-in task {spec.name}: {'.'.join(map(str, found[0]))}: {found[1]}")
    definition = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    digest = hashlib.sha256(f"{definition}\n{data_digest}".encode()).hexdigest()
    return Task(spec, rows, digest, "built-in", suite)


def render_examples(task: Task, limit: int | None) -> list[Example]:
    """The first `limit` rows (all when None) rendered, few-shot context included. TaskError names the row and
    key of a template that fails."""
    spec, rows = task.spec, task.rows
    picked = range(len(rows) if limit is None else min(limit, len(rows)))
    out = []
    for i in picked:
        try:
            out.append(_example(spec, rows, i))
        except _KeyFailure as e:
            row = i if e.row is None else e.row
            raise TaskError(f"{task.where(*e.loc)}: row {row + 1}: {e.problem}") from None
    return out


class _KeyFailure(Exception):
    def __init__(self, loc: tuple[str, ...], problem: str, row: int | None = None) -> None:
        super().__init__(problem)
        self.loc, self.problem, self.row = loc, problem, row  # row: a few-shot row, when it is the one at fault


def _render(loc: tuple[str, ...], source: str, row: dict[str, Any]) -> str:
    try:
        return render(source, row)
    except TemplateFailure as e:
        raise _KeyFailure(loc, str(e)) from None


def _answer(spec: TaskSpec, row: dict[str, Any]) -> tuple[str | None, tuple[str, ...], int | None]:
    """(target, choices, gold index) of one row, as its output type has them."""
    if spec.output_type == "multiple_choice":
        assert spec.choices is not None and spec.gold is not None
        try:
            choices = choices_of(spec.choices, row)
        except TemplateFailure as e:
            raise _KeyFailure(("choices",), str(e)) from None
        try:
            gold = gold_index(spec.gold, row, choices)
        except TemplateFailure as e:
            raise _KeyFailure(("gold",), str(e)) from None
        return None, tuple(choices), gold
    if spec.target is not None:
        return _render(("target",), spec.target, row), (), None
    return None, (), None


def _example(spec: TaskSpec, rows: list[dict[str, Any]], i: int) -> Example:
    row = rows[i]
    target, choices, gold = _answer(spec, row)
    own = _render(("input",), spec.input, row)  # before the few-shot rows: a fault of this row is named as its own
    parts = []
    if spec.fewshot:
        others = [j for j in range(len(rows)) if j != i]
        for j in random.Random(spec.fewshot_seed + i).sample(others, spec.fewshot):
            try:
                shot_target, shot_choices, shot_gold = _answer(spec, rows[j])
                shot = _render(("input",), spec.input, rows[j])
            except _KeyFailure as e:
                raise _KeyFailure(e.loc, e.problem, j) from None
            answer = shot_choices[shot_gold] if shot_gold is not None else shot_target or ""
            parts.append(shot + spec.target_delimiter + answer)
    parts.append(own)
    context = spec.description + spec.fewshot_delimiter.join(parts)
    tests = entry = None
    if spec.code is not None:
        entry = _render(("code", "entry_point"), spec.code.entry_point, row).strip()
        if not entry.isidentifier():
            raise _KeyFailure(("code", "entry_point"), f"entry point {entry[:60]!r} is not a Python name")
        tests = _render(("code", "tests"), spec.code.tests, row)
    return Example(i, context, target, choices, gold, tests, entry)
