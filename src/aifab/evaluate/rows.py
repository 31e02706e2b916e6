"""The rows of a task's local dataset file: JSONL (one object a line), CSV (a header row) or Parquet.

`read_rows(path)` returns the rows as dicts and the sha256 of the file's bytes (part of the task's digest, so an
edited dataset is a different task). Every problem is a ValueError of one line naming the row or line at fault;
the caller puts the task file's name and line in front of it.
"""

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".csv", ".parquet")
MAX_BYTES = 1 << 30  # an evaluation set is read whole: refuse anything larger than 1 GiB


def read_rows(path: Path) -> tuple[list[dict[str, Any]], str]:
    """(rows, sha256 of the file). ValueError for a missing, oversize, unreadable or malformed file, an unknown
    suffix, a row that is not an object, or a file without rows."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"dataset file {str(path)!r} must end in {', '.join(SUFFIXES)}")
    if not path.exists():
        raise ValueError(f"dataset file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"dataset path {str(path)!r} is not a regular file")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ValueError(f"dataset file {str(path)!r} is {size:,} bytes; the limit is {MAX_BYTES:,}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read dataset file {str(path)!r}: {e.strerror or e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if suffix == ".jsonl":
        rows = _jsonl(data, path)
    elif suffix == ".csv":
        rows = _csv(data, path)
    else:
        rows = _parquet(path)
    if not rows:
        raise ValueError(f"dataset file {str(path)!r} has no rows")
    return rows, digest


def _text(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"dataset file {str(path)!r} is not UTF-8 (byte {e.start})") from None


def _jsonl(data: bytes, path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(_text(data, path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path.name} line {n}: not valid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path.name} line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _csv(data: bytes, path: Path) -> list[dict[str, Any]]:
    try:
        reader = csv.DictReader(io.StringIO(_text(data, path), newline=""))
        rows = [dict(r) for r in reader]
    except csv.Error as e:
        raise ValueError(f"{path.name}: malformed CSV: {e}") from None
    for n, row in enumerate(rows, 2):
        if None in row:  # more cells than the header names
            raise ValueError(f"{path.name} line {n}: more cells than the header has columns")
    return rows


def _parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path.name}: not a readable Parquet file: {' '.join(str(e).split())[:200]}") from None
    return rows
