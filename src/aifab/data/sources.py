"""Sources: turn directories, files and globs into documents that keep their provenance.

A file's format follows its logical suffix, its name less a trailing `.gz` or `.zst`: `.jsonl` gives one document
per line (its `text_field`), `.csv` and `.parquet` one per row (their column), anything else is a text or code file
and gives one document. Every document carries its file's path, the byte offset (or row index) of its record and
the sha256 of the file's on-disk bytes.

Bad files never stop a run: a binary, undecodable, empty or unreadable file, or one with a line longer than
`max_line_bytes`, is skipped whole and counted by reason in `ReadStats`. A bad record (malformed JSON, a missing
field or column) raises `DataError` naming `file:line`, since it means the data is not what the user thinks it is;
with `skip_bad` it is skipped and counted instead. A record whose text is blank is dropped without a count.

Memory stays bounded: JSONL and CSV stream line by line through the decompressor (twice: once to check the file,
once to parse it), Parquet by record batch. A text file is one document, so it is read whole.
"""

from __future__ import annotations

import codecs
import csv
import glob as globlib
import gzip
import hashlib
import io
import json
import os
import re
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import zstandard

from aifab.errors import DataError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from aifab.spec import DataSpec

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", ".git", ".venv", "node_modules"})
COMPRESSIONS = (".gz", ".zst")
CHUNK = 1 << 20  # read size for streaming: large enough that per-call overhead vanishes, small enough to bound memory
HEAD_BYTES = 8192  # a NUL byte this early means a binary file (the heuristic git and grep use)
PARQUET_BATCH_ROWS = 1024
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Errors that mean a file (or its compressed stream) cannot be read; OSError covers permissions and BadGzipFile.
UNREADABLE: tuple[type[Exception], ...] = (OSError, EOFError, zlib.error, zstandard.ZstdError)
_Stream = gzip.GzipFile | io.BufferedReader  # what _decompressing returns: buffered, line-iterable bytes
_Records = Iterator[tuple[str, int]]  # (text, offset) from a format's parser


def stdlib_source() -> str:
    """The Python standard library's own source tree on this machine (the default corpus)."""
    return sysconfig.get_paths()["stdlib"]


@dataclass(frozen=True)
class Document:
    """One document and where it came from. Curation may replace `text`; provenance never changes."""

    text: str
    source: str  # the file's path
    offset: int  # byte offset of the record in the (decompressed) file, or the row index for CSV and Parquet
    source_sha256: str  # sha256 of the file's bytes as stored on disk


@dataclass(frozen=True)
class SourceOptions:
    """Where each format keeps its text, and how strict to be about bad records and long lines."""

    text_field: str = "text"  # JSONL
    csv_column: str = "text"
    parquet_column: str = "text"
    skip_bad: bool = False  # skip and count malformed records instead of raising DataError
    max_line_bytes: int = 1 << 20  # a file with a longer line is skipped whole (minified or generated data)

    @classmethod
    def from_spec(cls, data: DataSpec) -> SourceOptions:
        return cls(data.jsonl_text_field, data.csv_column, data.parquet_column, data.skip_bad, data.max_line_bytes)


@dataclass
class ReadStats:
    """Running counts of a read. `files` and `bytes` count files read (bytes as stored on disk); `skipped` maps a
    reason to the files skipped for it, or the records for "malformed" and "missing_field" (JSONL records, CSV and
    Parquet files)."""

    files: int = 0
    bytes: int = 0
    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    file_skips: int = 0  # how many of `skipped` are whole files

    @property
    def skipped_files(self) -> int:
        return self.file_skips

    def skip(self, reason: str, *, whole_file: bool = True) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.file_skips += whole_file

    def count_file(self, nbytes: int) -> None:
        self.files += 1
        self.bytes += nbytes


def logical_suffix(path: Path) -> str:
    """The suffix that names a file's format, lower-cased: ".jsonl" for a.jsonl.gz, ".txt" for y.TXT.zst."""
    name = path.name.lower()
    for ext in COMPRESSIONS:
        if name.endswith(ext):
            return PurePath(name.removesuffix(ext)).suffix
    return PurePath(name).suffix


def list_files(sources: list[str], extensions: list[str]) -> list[Path]:
    """Every regular file named by `sources`, sorted and de-duplicated. Directories are walked (not following
    symlinks), keeping files whose logical suffix is in `extensions`, so compressed variants come along; named
    files and glob matches are kept as is. Raises DataError for a missing path or a glob that matches nothing."""
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
                # is_file() rules out FIFOs and sockets, whose reads would block the run forever.
                if logical_suffix(p) in exts and not p.is_symlink() and p.is_file():
                    found.add(p)
    return sorted(found)


def file_sha256(path: Path) -> str:
    """sha256 (hex) of the file's bytes as stored on disk. Raises OSError if it cannot be read."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_documents(
    files: list[Path], opts: SourceOptions, max_bytes: int | None = None, stats: ReadStats | None = None
) -> Iterator[Document]:
    """Yield the documents of `files` in order (files as given, records in file order), stopping before the next
    file once `stats.bytes` (on-disk bytes read) reaches `max_bytes`. Bad files are skipped and counted in
    `stats`; bad records raise DataError unless `opts.skip_bad`."""
    stats = stats if stats is not None else ReadStats()
    for path in files:
        if max_bytes is not None and stats.bytes >= max_bytes:
            return
        yield from read_file(path, opts, stats)


def read_file(path: Path, opts: SourceOptions, stats: ReadStats) -> Iterator[Document]:
    """Yield the documents of one file and count it in `stats`: as read, or as skipped with its reason before any
    of its documents is yielded. Raises DataError for a bad record unless `opts.skip_bad`."""
    name = path.name.lower()
    compression = next((ext for ext in COMPRESSIONS if name.endswith(ext)), "")
    suffix = logical_suffix(path)
    if suffix == ".parquet":
        yield from _read_parquet(path, compression, opts, stats)
    elif suffix in (".jsonl", ".csv"):
        yield from _read_records(path, compression, suffix, opts, stats)
    else:
        yield from _read_text(path, compression, opts, stats)


def _read_text(path: Path, compression: str, opts: SourceOptions, stats: ReadStats) -> Iterator[Document]:
    # A text file is one document, so it is held whole anyway: read, hash and check it in memory.
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data = _decompress_all(raw, compression)
    except UNREADABLE:
        return stats.skip("unreadable")
    scan = _Scan(opts.max_line_bytes, decode=False)
    scan.feed(data)
    problem = scan.finish()
    if problem is None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            problem = "invalid_utf8"
        else:
            problem = None if text.strip() else "empty"  # Unicode whitespace too, which the byte scan misses
    if problem is not None:
        return stats.skip(problem)
    stats.count_file(len(raw))
    stats.documents += 1
    yield Document(text, str(path), 0, hashlib.sha256(raw).hexdigest())


def _read_records(
    path: Path, compression: str, suffix: str, opts: SourceOptions, stats: ReadStats
) -> Iterator[Document]:
    # Pass 1 hashes the file and checks its whole decompressed stream, so a bad file is skipped whole
    # before any of its documents is yielded instead of being cut off at its first bad line. Pass 2 parses. Both
    # stream, so memory stays bounded by the longest line, not by the file.
    scan = _Scan(opts.max_line_bytes, decode=True)
    try:
        sha, size = file_sha256(path), path.stat().st_size
        with open(path, "rb", buffering=0) as f, _decompressing(f, compression) as stream:
            while scan.problem is None and (chunk := stream.read(CHUNK)):
                scan.feed(chunk)
    except UNREADABLE:
        return stats.skip("unreadable")
    if (problem := scan.finish()) is not None:
        return stats.skip(problem)
    parse = _jsonl_records if suffix == ".jsonl" else _csv_records
    try:
        with open(path, "rb", buffering=0) as f, _decompressing(f, compression) as stream:
            for text, offset in parse(path, stream, size, opts, stats):
                stats.documents += 1
                yield Document(text, str(path), offset, sha)
    except UNREADABLE:
        stats.skip("unreadable")  # changed on disk since pass 1; documents already yielded are kept


def _jsonl_records(path: Path, stream: _Stream, size: int, opts: SourceOptions, stats: ReadStats) -> _Records:
    """(text, byte offset of its line) for each line whose `opts.text_field` is a non-blank string."""
    stats.count_file(size)
    key = opts.text_field
    offset = 0
    for lineno, line in enumerate(stream, 1):
        start, offset = offset, offset + len(line)
        if not line.strip():
            continue
        try:
            row = json.loads(line)  # bytes in: no str copy of the line, and a UTF-8 BOM is accepted
        except (json.JSONDecodeError, RecursionError) as e:
            _bad(opts, stats, f"{path}:{lineno}: malformed JSON: {getattr(e, 'msg', 'nested too deep')}", "malformed")
            continue
        value = row.get(key) if isinstance(row, dict) else None
        if not isinstance(value, str):
            problem = (
                f"field {key!r} is {type(value).__name__}, expected a string"
                if isinstance(row, dict) and key in row
                else f"no {key!r} field (set data.jsonl_text_field)"
            )
            _bad(opts, stats, f"{path}:{lineno}: {problem}", "missing_field")
        elif b"\\u" in line and LONE_SURROGATE.search(value):  # JSON "\ud800" decodes to text UTF-8 cannot hold
            _bad(opts, stats, f"{path}:{lineno}: field {key!r} holds a lone surrogate escape", "malformed")
        elif value.strip():
            yield value, start


def _csv_records(path: Path, stream: _Stream, size: int, opts: SourceOptions, stats: ReadStats) -> _Records:
    """(text, 0-based data row) for each non-blank value of `opts.csv_column`; blank lines are not rows. A header
    without the column skips the file (skip_bad) or raises DataError naming line 1."""
    # The default 128 KiB field limit would reject ordinary long documents; it is process-wide and only ever raised.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    col = opts.csv_column
    with io.TextIOWrapper(stream, encoding="utf-8-sig", newline="") as text:  # -sig: spreadsheets write a BOM
        reader = csv.reader(text)
        try:
            header = next(reader, [])
        except csv.Error as e:
            return _bad(opts, stats, f"{path}:{reader.line_num}: malformed CSV header: {e}", "malformed", True)
        if col not in header:
            problem = f"{path}:{reader.line_num}: no column {col!r} in the header {header} (set data.csv_column)"
            return _bad(opts, stats, problem, "missing_field", True)
        stats.count_file(size)
        index = header.index(col)
        row_index = 0
        while True:
            try:
                row = next(reader, None)
            except csv.Error as e:
                _bad(opts, stats, f"{path}:{reader.line_num}: malformed CSV: {e}", "malformed")
                continue
            if row is None:
                return
            if not row:
                continue
            if index >= len(row):
                _bad(opts, stats, f"{path}:{reader.line_num}: row has {len(row)} fields, no {col!r}", "malformed")
            elif row[index].strip():
                yield row[index], row_index
            row_index += 1


def _read_parquet(path: Path, compression: str, opts: SourceOptions, stats: ReadStats) -> Iterator[Document]:
    import pyarrow as pa  # heavy: imported only once a Parquet file is read
    import pyarrow.parquet as pq

    col = opts.parquet_column
    try:
        with open(path, "rb") as f:
            # A Parquet reader needs random access, so a compressed file is decompressed into memory.
            if compression:
                raw = f.read()
                size, sha = len(raw), hashlib.sha256(raw).hexdigest()
                source: Any = pa.BufferReader(_decompress_all(raw, compression))
            else:
                size, sha, source = os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest(), f
            if size == 0:
                return stats.skip("empty")
            pf = pq.ParquetFile(source)
            if pf.metadata.num_rows == 0:
                return stats.skip("empty")
            schema = pf.schema_arrow
            if col not in schema.names:
                problem = f"{path}:1: no column {col!r} in {schema.names} (set data.parquet_column)"
                return _bad(opts, stats, problem, "missing_field", True)
            if not (pa.types.is_string(kind := schema.field(col).type) or pa.types.is_large_string(kind)):
                return _bad(opts, stats, f"{path}:1: column {col!r} is {kind}, expected strings", "missing_field", True)

            def batches() -> Iterator[Any]:  # bounded memory: about one row group's column chunk at a time
                return iter(pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[col]))

            # Pass 1 decodes every batch, since a corrupt page or invalid UTF-8 only shows on decode: a bad file is
            # then skipped whole, before any of its documents is yielded.
            for batch in batches():
                try:
                    batch.column(0).validate(full=True)
                except pa.ArrowInvalid:
                    return stats.skip("invalid_utf8")
            stats.count_file(size)
            row = 0
            for batch in batches():
                for value in batch.column(0).to_pylist():
                    if value is not None and value.strip():
                        stats.documents += 1
                        yield Document(value, str(path), row, sha)
                    row += 1
    except (*UNREADABLE, pa.ArrowException):
        stats.skip("unreadable")


def _bad(opts: SourceOptions, stats: ReadStats, problem: str, reason: str, whole_file: bool = False) -> None:
    """A bad record, or a file whose header or schema lacks the column: DataError, or skipped with skip_bad."""
    if not opts.skip_bad:
        raise DataError(problem)
    stats.skip(reason, whole_file=whole_file)


class _Scan:
    """Whole-file checks fed a file's decompressed bytes in order. `problem` is the first found: "binary" (a NUL
    byte in the first 8 KB), "invalid_utf8" (only with `decode`), "line_too_long" or, at `finish`, "empty"."""

    def __init__(self, max_line_bytes: int, *, decode: bool) -> None:
        self.problem: str | None = None
        self._limit = max_line_bytes
        self._head = b""
        self._line = 0  # length of the line still open at the end of what was fed
        self._blank = True
        self._utf8 = codecs.getincrementaldecoder("utf-8")() if decode else None

    def feed(self, data: bytes) -> None:
        if self.problem is not None:
            return
        if len(self._head) < HEAD_BYTES:
            self._head += data[: HEAD_BYTES - len(self._head)]
            if b"\0" in self._head:
                self.problem = "binary"
                return
        if self._utf8 is not None:
            try:
                self._utf8.decode(data)
            except UnicodeDecodeError:
                self.problem = "invalid_utf8"
                return
        self._blank = self._blank and not data.strip()
        if not self._line_fits(data):
            self.problem = "line_too_long"

    def _line_fits(self, data: bytes) -> bool:
        limit = self._limit
        first = data.find(b"\n")
        if first < 0:
            self._line += len(data)
            return self._line <= limit
        last = data.rfind(b"\n")
        if self._line + first > limit:
            return False
        # Lines wholly inside the chunk can only be too long when the span holding them is; the split runs in C.
        if last - first - 1 > limit and max(map(len, data[first + 1 : last].split(b"\n"))) > limit:
            return False
        self._line = len(data) - last - 1
        return self._line <= limit

    def finish(self) -> str | None:
        if self.problem is None and self._utf8 is not None:
            try:
                self._utf8.decode(b"", final=True)  # a file may end inside a multi-byte character
            except UnicodeDecodeError:
                self.problem = "invalid_utf8"
        if self.problem is None and self._blank:
            self.problem = "empty"
        return self.problem


class _ZstdReader(io.RawIOBase):
    """Streaming zstd decompression of `raw`, frame after frame. Unlike zstandard's own stream_reader, a stream cut
    off inside a frame raises ZstdError instead of quietly ending short."""

    def __init__(self, raw: io.RawIOBase | io.BytesIO) -> None:
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def next_block(self) -> bytes:
        """The next decompressed bytes, b"" at the end of the stream."""
        while True:
            data = self._raw.read(CHUNK)
            if not data:
                if self._in_frame:
                    raise zstandard.ZstdError("zstd stream is truncated")
                return b""
            out = []
            while data:
                self._in_frame = True
                out.append(self._obj.decompress(data))
                if not self._obj.eof:
                    break
                data, self._obj, self._in_frame = self._obj.unused_data, self._dctx.decompressobj(), False
            if block := b"".join(out):
                return block

    def readinto(self, buffer: WriteableBuffer) -> int:
        if not self._out:
            self._out = memoryview(self.next_block())
        with memoryview(buffer) as view:
            n = min(len(view), len(self._out))
            view[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


def _decompressing(raw: io.RawIOBase, compression: str) -> _Stream:
    """A buffered, line-iterable reader of `raw`'s decompressed bytes."""
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == ".zst":
        return io.BufferedReader(_ZstdReader(raw), CHUNK)
    return io.BufferedReader(raw, CHUNK)


def _decompress_all(raw: bytes, compression: str) -> bytes:
    if compression == ".gz":
        return gzip.decompress(raw)
    if compression == ".zst":
        reader = _ZstdReader(io.BytesIO(raw))
        return b"".join(iter(reader.next_block, b""))
    return raw
