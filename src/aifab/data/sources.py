"""Sources: turn directories, files and globs into documents.

A document is the text of one file, or of one line of a .jsonl file (its `text_field`). Files that are
not valid UTF-8 are skipped and counted, since a code tree often holds a few; a malformed .jsonl line is
an error that names the file and line, since it means the dump is not what the user thinks it is.
"""

import glob as globlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aifab.errors import DataError

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", ".git", ".venv", "node_modules"})


def stdlib_source() -> str:
    """The Python standard library's own source tree on this machine (the default corpus)."""
    return sysconfig.get_paths()["stdlib"]


@dataclass(frozen=True)
class Document:
    source: str  # "path" or "path:line" for .jsonl
    text: str


def list_files(sources: list[str], extensions: list[str]) -> list[Path]:
    """Every file named by `sources`, sorted and de-duplicated. Directories are walked (not following
    symlinks), keeping files whose suffix is in `extensions`; named files and glob matches are kept as is."""
    exts = {e.lower() for e in extensions}
    found: set[Path] = set()
    for source in sources:
        if any(c in source for c in "*?["):
            matches = [Path(p) for p in globlib.glob(source, recursive=True)]
            if not matches:
                raise DataError(f"data glob {source!r} matches no files")
            found.update(p for p in matches if p.is_file())
            continue
        path = Path(source)
        if not path.exists():
            raise DataError(f"data path {source!r} does not exist")
        if path.is_file():
            found.add(path)
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
            for fn in filenames:
                p = Path(dirpath, fn)
                if p.suffix.lower() in exts and not p.is_symlink():
                    found.add(p)
    return sorted(found)


@dataclass
class ReadStats:
    files: int = 0
    bytes: int = 0
    documents: int = 0
    skipped_files: int = 0


def read_documents(
    files: list[Path], text_field: str = "text", max_bytes: int | None = None, stats: ReadStats | None = None
) -> Iterator[Document]:
    """Yield documents from `files` in order, stopping once `max_bytes` of text has been read."""
    stats = stats if stats is not None else ReadStats()
    for path in files:
        if max_bytes is not None and stats.bytes >= max_bytes:
            return
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_files += 1
            continue
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}") from None
        stats.files += 1
        stats.bytes += len(raw)
        if path.suffix.lower() == ".jsonl":
            for doc in _jsonl_documents(path, text, text_field):
                stats.documents += 1
                yield doc
        elif text.strip():
            stats.documents += 1
            yield Document(str(path), text)


def _jsonl_documents(path: Path, text: str, field: str) -> Iterator[Document]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
        if not isinstance(row, dict) or field not in row:
            raise DataError(f"{path}:{lineno}: no {field!r} field (set data.jsonl_text_field)")
        value = row[field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno}: field {field!r} is {type(value).__name__}, expected a string")
        if value.strip():
            yield Document(f"{path}:{lineno}", value)
