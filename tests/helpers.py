"""Helpers shared by tests: a tiny model shape and a tiny corpus writer."""

import textwrap
from pathlib import Path

from aifab.spec import ModelSpec, TokenizerSpec

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
