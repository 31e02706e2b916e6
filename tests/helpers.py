"""Helpers shared by tests: a tiny model shape and a tiny corpus writer."""

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from aifab.spec import ModelSpec, TokenizerSpec
from aifab.store.schema import DatasetVersion

# A small model that trains in a couple of seconds on one core.
TINY_MODEL = ModelSpec(n_layer=2, n_head=2, d_model=32, context_len=32)
TINY_TOKENIZER = TokenizerSpec(vocab_size=300, min_frequency=2)


def write_corpus(root: Path, n_files: int = 12) -> Path:
    """A few Python-like files plus markdown, text and jsonl, with enough repetition to learn from."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = "\n".join(
            textwrap.dedent(f"""
            def function_{i}_{j}(value, other=None):
                \"\"\"Return the value plus {j}.\"\"\"
                if other is None:
                    other = {j}
                return value + other
            """)
            for j in range(6)
        )
        (root / f"module_{i}.py").write_text(body)
    (root / "README.md").write_text("# Tiny corpus\n\nThis corpus exists for tests.\n" * 5)
    (root / "notes.txt").write_text("plain text notes about functions and values\n" * 10)
    (root / "docs.jsonl").write_text(
        '{"text": "a json document about return values"}\n{"text": "another json document"}\n'
    )
    return root


def dataset_row(**overrides: object) -> DatasetVersion:
    """A DatasetVersion row with plausible counts, for tests of the store rather than the data line."""
    fields: dict[str, object] = {
        "name": "corpus",
        "version": 1,
        "manifest_digest": "a" * 64,
        "tokenizer_digest": "b" * 64,
        "files": 3,
        "bytes": 1000,
        "documents": 10,
        "tokens": 500,
        "train_tokens": 450,
        "val_tokens": 50,
        "params": {"extensions": [".py"], "val_fraction": 0.1},
    }
    return DatasetVersion(**{**fields, **overrides})


def cli_env(home: Path) -> dict[str, str]:
    """The environment a CLI subprocess runs in: this store's home, no progress bars, a wide terminal."""
    env = {**os.environ, "AIFAB_HOME": str(home), "AIFAB_NO_PROGRESS": "1", "COLUMNS": "200"}
    env.pop("AIFAB_DB", None)
    return env


def aifab(*args: str, home: Path, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real `aifab` command in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "aifab", *args],
        capture_output=True,
        text=True,
        env=cli_env(home),
        cwd=cwd,
        timeout=timeout,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """The command failed with exit code 2 and one `error:` line, its last, holding every fragment."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr  # progress may precede it, nothing follows
    for fragment in fragments:
        assert fragment in errors[0]


def until(
    check: Callable[[], object], what: str, *, tick: Callable[[], None] | None = None, timeout_s: float = 60.0
) -> None:
    """Wait until `check()` is truthy, calling `tick()` (e.g. one control-plane round) between looks; fail the
    test naming `what` at the deadline. A bound on waits that normally take moments, never a timing check."""
    import time

    import pytest

    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        if tick is not None:
            tick()
        time.sleep(0.05)
