"""The shape of the codebase, checked: short modules, no reaching into another module's private names, the
import rules of the rooms (DESIGN.md, docs/architecture.md), and no import cycles.

Each rule is a function over the source tree, so the tests below can show that a rule fails on a tree that
breaks it (a 501-line module, a private import, a forbidden import) as well as pass on ours.
"""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 500

# Which aifab packages (or top-level modules) each package may import: DESIGN.md's "rules for the rooms".
# errors is everyone's; spec (factory.yaml), console, tokens and cluster are named where used. A package may
# always import itself.
BASE = {"errors"}
ALLOWED: dict[str, set[str]] = {
    "store": BASE,
    "nn": set(),  # pure PyTorch: nothing else of aifab
    "meter": BASE | {"store"},
    "registry": BASE | {"store"},
    "schedule": BASE,  # pure: the simulator and the control plane drive the same objects
    "plan": BASE | {"store", "meter", "spec", "registry"},  # reads the ledger, the catalog and a model
    "data": BASE | {"spec", "store", "console", "cluster", "tokens", "registry"},
    "train": BASE | {"spec", "store", "console", "cluster", "nn", "meter"},
    "serve": BASE | {"spec", "store", "cluster", "tokens", "nn", "meter", "registry", "web"},
    # generation lives in nn/, so evaluate needs nothing of serve/; it meters its own energy and reads gates' spec;
    # tokens: a model's end-of-text token, which starts and ends its texts
    "evaluate": BASE | {"store", "nn", "meter", "registry", "spec", "console", "yamlfile", "tokens"},
    "jobs": BASE | {"store", "schedule", "cluster", "spec", "web"},  # never pipeline/: jobs know no stages
    "pipeline": BASE
    | {
        "spec",
        "store",
        "console",
        "meter",
        "registry",
        "data",
        "train",
        "evaluate",
        "serve",
        "jobs",
        "schedule",
        "web",
    },
}


def modules(root: Path) -> Iterator[tuple[str, Path]]:
    """(dotted name, path) of every module under root/aifab."""
    for path in sorted((root / "aifab").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def imports(path: Path, *, module_level_only: bool = False) -> Iterator[tuple[int, str, list[str]]]:
    """(line, imported module, names imported from it) for every absolute aifab import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "aifab":
            assert node.module is not None
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "aifab":
                    yield node.lineno, alias.name, []


def room(module: str) -> str:
    """aifab.serve.api.routes -> serve; aifab.errors -> errors."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "aifab"


def long_modules(root: Path) -> list[str]:
    out = []
    for name, path in modules(root):
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            out.append(f"{name}: {lines} lines")
    return out


def private_imports(root: Path) -> list[str]:
    """`from aifab.x import _name` where _name is another module's private name (dunders are fine)."""
    out = []
    for name, path in modules(root):
        for line, module, names in imports(path):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and module != name:
                    out.append(f"{name}:{line} imports {module}.{n}")
    return out


def forbidden_imports(root: Path) -> list[str]:
    """Imports that break a room's rule (ALLOWED), and any import of cli/ or ui/ from outside them."""
    out = []
    for name, path in modules(root):
        me = room(name)
        for line, module, names in imports(path):
            targets = [room(f"{module}.{n}") for n in names] if module == "aifab" else [room(module)]
            for target in targets:
                if target == me:
                    continue
                if target in ("cli", "ui") and me not in ("cli", "ui", "__main__"):
                    out.append(f"{name}:{line} imports {module} (nothing imports the faces)")
                elif me in ALLOWED and target not in ALLOWED[me]:
                    out.append(f"{name}:{line} imports {module} ({me}/ may import {sorted(ALLOWED[me]) or 'nothing'})")
    return out


def import_cycles(root: Path) -> list[str]:
    """Cycles among module-level imports (those run at import time), each as a path of modules."""
    names = {name for name, _ in modules(root)}
    graph: dict[str, set[str]] = {}
    for name, path in modules(root):
        deps = set()
        for _, module, imported in imports(path, module_level_only=True):
            # `from aifab.pkg import mod` imports the module aifab.pkg.mod when there is one
            subs = {f"{module}.{n}" for n in imported} & names
            deps |= subs or ({module} & names)
        graph[name] = deps - {name}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1 and not dep.startswith(node + ".") and not node.startswith(dep + "."):
                cycles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


# ---- the rules hold on our tree ------------------------------------------------------------------------------


def test_no_module_is_over_500_lines() -> None:
    assert long_modules(SRC) == []


def test_no_module_imports_another_modules_private_name() -> None:
    assert private_imports(SRC) == []


def test_the_rooms_import_only_what_design_allows() -> None:
    assert forbidden_imports(SRC) == []


def test_module_level_imports_have_no_cycle() -> None:
    assert import_cycles(SRC) == []


def test_every_package_has_a_rule() -> None:
    """A new package must say what it may import (a face, cli/ or ui/, may import anything)."""
    packages = {p.name for p in (SRC / "aifab").iterdir() if (p / "__init__.py").exists()}
    assert packages - set(ALLOWED) - {"cli", "ui"} == set()


# ---- and each rule fails on a tree that breaks it ------------------------------------------------------------


def write(root: Path, rel: str, text: str) -> None:
    path = root / "aifab" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_501_line_module_fails_the_length_rule(tmp_path: Path) -> None:
    write(tmp_path, "store/ok.py", "x = 1\n" * 500)
    assert long_modules(tmp_path) == []
    write(tmp_path, "store/long.py", "x = 1\n" * 501)
    assert long_modules(tmp_path) == ["aifab.store.long: 501 lines"]


def test_a_private_import_fails_the_private_rule(tmp_path: Path) -> None:
    write(tmp_path, "schedule/state.py", "_hidden = 1\n")
    write(tmp_path, "schedule/policy.py", "from aifab.schedule.state import __all__\n")
    assert private_imports(tmp_path) == []
    write(tmp_path, "schedule/policy.py", "def f():\n    from aifab.schedule.state import _hidden\n")
    assert private_imports(tmp_path) == ["aifab.schedule.policy:2 imports aifab.schedule.state._hidden"]


@pytest.mark.parametrize(
    ("rel", "text", "expected"),
    [
        ("nn/model.py", "from aifab.store import Store\n", "aifab.nn.model:1 imports aifab.store"),
        ("evaluate/run.py", "def f():\n    import aifab.serve.engine\n", "aifab.evaluate.run:2 imports aifab.serve"),
        ("train/loop.py", "from aifab import data\n", "aifab.train.loop:1 imports aifab"),
        ("jobs/control.py", "from aifab.pipeline.dag import Stage\n", "aifab.jobs.control:1 imports aifab.pipeline"),
        ("meter/ledger.py", "from aifab.cli.common import out\n", "aifab.meter.ledger:1 imports aifab.cli.common"),
    ],
)
def test_a_forbidden_import_fails_the_room_rule(tmp_path: Path, rel: str, text: str, expected: str) -> None:
    write(tmp_path, rel, text)
    found = forbidden_imports(tmp_path)
    assert len(found) == 1 and found[0].startswith(expected)


def test_an_import_cycle_is_found(tmp_path: Path) -> None:
    write(tmp_path, "data/a.py", "from aifab.data.b import x\ny = 1\n")
    write(tmp_path, "data/b.py", "x = 1\ndef f():\n    from aifab.data.a import y\n")  # inside a function: no cycle
    assert import_cycles(tmp_path) == []
    write(tmp_path, "data/b.py", "from aifab.data import a\nx = 1\n")
    assert import_cycles(tmp_path) == ["aifab.data.a -> aifab.data.b -> aifab.data.a"]
