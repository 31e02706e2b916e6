"""The built-in evaluation suites: shipped with aifab, offline, the same on every machine (docs/evaluate.md
gives their provenance).

- `heldout`: `heldout-bpb` (bits per byte on held-out documents) and `heldout-next-line` (4-way multiple
  choice: which line comes next), both cut from the validation split of a registered dataset version, by
  default the one the model was trained on (suites/heldout.py).
- `python-code`: complete a function body from its signature and docstring (the problems in
  python_code.jsonl), scored by exact match with the reference body and by pass@1 in the sandbox.

`SUITES` names each suite's tasks; `build_suite` makes their Task objects. Each task has a default example
limit (`DEFAULT_LIMITS`), sized so a demo model is scored in well under a minute on 2 CPU cores.
"""

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from aifab.errors import AifabError, DataError
from aifab.evaluate.heldout import HeldOut
from aifab.evaluate.tasks import CodeSpec, DatasetSpec, GenerationSpec, Task, TaskSpec, builtin_task
from aifab.store import Store
from aifab.store.schema import DatasetVersion

if TYPE_CHECKING:
    from aifab.evaluate.suites.heldout import Items

SUITES: dict[str, tuple[str, ...]] = {
    "heldout": ("heldout-bpb", "heldout-next-line"),
    "python-code": ("python-code",),
}
DEFAULT_SUITES = ("heldout", "python-code")
DEFAULT_LIMITS: dict[str, int | None] = {"heldout-bpb": 48, "heldout-next-line": 200, "python-code": None}
PYTHON_CODE = Path(__file__).parent / "python_code.jsonl"
# where a generated function body ends: the next top-level statement (HumanEval's stop strings)
CODE_UNTIL = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n@"]


def suite_tasks(name: str) -> tuple[str, ...]:
    """The task names of a built-in suite; an AifabError names an unknown suite and the known ones."""
    try:
        return SUITES[name]
    except KeyError:
        raise AifabError(f"unknown suite {name!r} (built-in suites: {', '.join(SUITES)})") from None


def needs_dataset(name: str) -> bool:
    """Whether a suite draws its items from a registered dataset version."""
    return name == "heldout"


def build_suite(name: str, store: Store | None = None, dataset: DatasetVersion | None = None) -> list[Task]:
    """The tasks of suite `name`; `heldout` needs the store and the dataset version its items come from."""
    suite_tasks(name)
    if name == "heldout":
        if store is None or dataset is None:
            raise ValueError("the heldout suite needs a store and a dataset version")
        from aifab.evaluate.suites.heldout import cached_items

        return tasks_of(cached_items(store, dataset))
    return [python_code_task()]


def heldout_tasks(held: HeldOut) -> list[Task]:
    """The heldout suite's tasks, built from held-out documents now (build_suite reuses earlier builds)."""
    from aifab.evaluate.suites.heldout import items_of

    return tasks_of(items_of(held))


def tasks_of(items: "Items") -> list[Task]:
    from aifab.evaluate.suites.heldout import BUILDER

    data = f"{items.curated_digest} val_fraction={items.val_fraction} {BUILDER}"
    dataset = DatasetSpec(registered=items.dataset)
    bpb = TaskSpec(
        name="heldout-bpb", output_type="loglikelihood_rolling", dataset=dataset, input="{{ text }}",
        metrics=["bits_per_byte", "perplexity"],
    )  # fmt: skip
    next_line = TaskSpec(
        name="heldout-next-line", output_type="multiple_choice", dataset=dataset, input="{{ context }}",
        choices="{{ choices }}", gold="{{ gold }}", target_delimiter="\n", metrics=["acc", "acc_norm"],
    )  # fmt: skip
    out = []
    for spec, rows, dropped, what in (
        (bpb, items.docs, items.dropped_docs, "held-out documents"),
        (next_line, items.items, items.dropped_items, "next-line items"),
    ):
        if not rows:
            raise AifabError(f"dataset {items.dataset} has too few held-out documents for {spec.name}")
        task = builtin_task(spec, list(rows), "heldout", data)
        task.dataset_version_id = items.dataset_version_id
        if dropped:
            task.notes.append(f"{dropped} {what} of {items.dataset} occur in its training split: left out")
        out.append(task)
    return out


def python_code_task(path: Path | None = None) -> Task:
    """The python-code task on the problems file (default: the 40 shipped with aifab, suites/README.md)."""
    from aifab.evaluate.code_problems import load_code_problems

    path = path or PYTHON_CODE
    try:
        problems = load_code_problems(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except (DataError, OSError) as e:
        raise AifabError(f"the python-code suite cannot read its problems: {e}") from None
    rows = [asdict(p) for p in problems]
    spec = TaskSpec(
        name="python-code", output_type="generate_until", dataset=DatasetSpec(path=path.name), input="{{ prompt }}",
        target="{{ canonical }}", target_delimiter="", metrics=["exact_match", "pass@k"],
        generation=GenerationSpec(until=CODE_UNTIL, max_tokens=128),
        code=CodeSpec(tests="{{ test }}", entry_point="{{ entry_point }}", k=1, samples=1, timeout_s=5.0),
    )  # fmt: skip
    return builtin_task(spec, rows, "python-code", digest)
