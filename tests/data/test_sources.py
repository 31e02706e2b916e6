import gzip
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from aifab.data import sources
from aifab.data.sources import (
    Document,
    ReadStats,
    SourceOptions,
    file_sha256,
    list_files,
    logical_suffix,
    read_documents,
    read_file,
    stdlib_source,
)
from aifab.errors import DataError
from aifab.spec import DataSpec

COMPRESSIONS = ["", ".gz", ".zst"]


def compress(data: bytes, compression: str) -> bytes:
    if compression == ".gz":
        return gzip.compress(data, mtime=0)
    if compression == ".zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


def write(path: Path, data: bytes, compression: str = "") -> Path:
    """Write `data` to `path` + `compression`, compressed; return the path written."""
    out = path.with_name(path.name + compression)
    out.write_bytes(compress(data, compression))
    return out


def parquet_bytes(rows: list[Any], column: str = "text", row_group_size: int = 2) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({column: rows, "id": list(range(len(rows)))}), buf, row_group_size=row_group_size)
    return buf.getvalue()


def invalid_utf8_parquet() -> bytes:
    """A Parquet string column holding b"\\xff", which pyarrow writes without checking and only fails on decode."""
    offsets = pa.array([0, 2, 3], pa.int32()).buffers()[1]
    column = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"ok\xff")])
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": column}), buf)
    return buf.getvalue()


def read(*files: Path, opts: SourceOptions | None = None) -> tuple[list[Document], ReadStats]:
    stats = ReadStats()
    return list(read_documents(list(files), opts or SourceOptions(), stats=stats)), stats


# --- listing ---------------------------------------------------------------------------------------------------------


def test_lists_supported_files_in_directories_sorted(corpus: Path) -> None:
    (corpus / "image.png").write_bytes(b"\x89PNG")
    (corpus / "__pycache__").mkdir()
    (corpus / "__pycache__" / "cached.py").write_text("x = 1\n")
    files = list_files([str(corpus)], [".py", ".md", ".txt", ".jsonl"])
    names = [f.name for f in files]
    assert "image.png" not in names and "cached.py" not in names
    assert {"README.md", "notes.txt", "docs.jsonl", "module_0.py"} <= set(names)
    assert files == sorted(files)


def test_lists_compressed_variants_by_logical_suffix(tmp_path: Path) -> None:
    for name in ["a.jsonl.gz", "b.py.zst", "c.TXT.GZ", "d.bin.gz", "e.gz", "f.py.bz2", "g.csv", "h.parquet.zst"]:
        (tmp_path / name).write_bytes(b"x")
    os.mkfifo(tmp_path / "pipe.py")  # reading a FIFO would block the run forever
    names = [f.name for f in list_files([str(tmp_path)], [".jsonl", ".py", ".txt", ".csv", ".parquet"])]
    assert names == ["a.jsonl.gz", "b.py.zst", "c.TXT.GZ", "g.csv", "h.parquet.zst"]


@pytest.mark.parametrize(
    ("name", "suffix"),
    [("a.jsonl.gz", ".jsonl"), ("x.py", ".py"), ("y.txt.zst", ".txt"), ("Z.CSV.GZ", ".csv"), ("e.gz", ""), ("m", "")],
)
def test_logical_suffix(name: str, suffix: str) -> None:
    assert logical_suffix(Path("dir.d", name)) == suffix


def test_globs_and_files_and_dedup(corpus: Path) -> None:
    files = list_files([str(corpus / "module_*.py"), str(corpus / "module_1.py")], [".py"])
    assert len(files) == 12  # module_1.py named twice, listed once


def test_missing_path_and_empty_glob_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        list_files([str(tmp_path / "nope")], [".py"])
    with pytest.raises(DataError, match="matches no files"):
        list_files([str(tmp_path / "*.nothing")], [".py"])


def test_symlinked_files_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.py"
    outside.write_text("secret = 1\n")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link.py").symlink_to(outside)
    (root / "real.py").write_text("x = 1\n")
    assert [f.name for f in list_files([str(root)], [".py"])] == ["real.py"]


# --- formats, compression and provenance -----------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_jsonl_documents_offsets_and_provenance(tmp_path: Path, compression: str) -> None:
    lines = [
        b'{"text": "first doc", "n": 1}\n',
        b"\n",
        b'{"text": "  "}\n',
        '{"text": "caf\u00e9 \u2603"}\r\n'.encode(),
    ]
    lines.append(b'{"text": "last, no newline"}')
    raw = b"".join(lines)
    path = write(tmp_path / "docs.jsonl", raw, compression)
    docs, stats = read(path)
    assert [d.text for d in docs] == ["first doc", "caf\u00e9 \u2603", "last, no newline"]  # blank text is dropped
    for doc, line in zip(docs, [lines[0], lines[3], lines[4]], strict=True):
        assert raw[doc.offset :].startswith(line)
        assert doc.source == str(path)
        assert doc.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    assert (stats.files, stats.documents, stats.bytes, stats.skipped) == (1, 3, path.stat().st_size, {})


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_csv_rows_with_quoted_newlines_and_bom(tmp_path: Path, compression: str) -> None:
    raw = '\ufeffid,text\n1,plain row\n2,"multi\nline, with comma"\n\n3,\n4,"quoted ""x"""\n'.encode()
    path = write(tmp_path / "rows.csv", raw, compression)
    docs, stats = read(path)
    assert [(d.text, d.offset) for d in docs] == [("plain row", 0), ("multi\nline, with comma", 1), ('quoted "x"', 3)]
    assert {d.source_sha256 for d in docs} == {hashlib.sha256(path.read_bytes()).hexdigest()}
    assert (stats.files, stats.documents) == (1, 3)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_parquet_row_groups_nulls_and_provenance(tmp_path: Path, compression: str) -> None:
    rows = ["zero", None, "two", " ", "four", "five", "six"]
    raw = parquet_bytes(rows, row_group_size=2)
    assert pq.ParquetFile(io.BytesIO(raw)).num_row_groups == 4
    path = write(tmp_path / "table.parquet", raw, compression)
    docs, stats = read(path, opts=SourceOptions())
    assert [(d.text, d.offset) for d in docs] == [("zero", 0), ("two", 2), ("four", 4), ("five", 5), ("six", 6)]
    assert {d.source_sha256 for d in docs} == {hashlib.sha256(path.read_bytes()).hexdigest()}
    assert (stats.files, stats.bytes, stats.documents) == (1, path.stat().st_size, 5)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_text_file_is_one_document_at_offset_zero(tmp_path: Path, compression: str) -> None:
    raw = "def f():\n    return '\u00e9'\n".encode()
    path = write(tmp_path / "mod.py", raw, compression)
    docs, _ = read(path)
    assert docs == [Document(raw.decode(), str(path), 0, hashlib.sha256(path.read_bytes()).hexdigest())]


def test_concatenated_gzip_members_and_zstd_frames_read_as_one_stream(tmp_path: Path) -> None:
    a, b = b'{"text": "a"}\n', b'{"text": "b"}\n'
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(gzip.compress(a) + gzip.compress(b))
    zst = tmp_path / "y.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(a) + zstandard.ZstdCompressor().compress(b))
    docs, _ = read(gz, zst)
    assert [(d.text, d.offset) for d in docs] == [("a", 0), ("b", len(a))] * 2


def test_glob_over_mixed_compressed_files_in_order(tmp_path: Path) -> None:
    for i, compression in enumerate(COMPRESSIONS):
        write(tmp_path / f"part{i}.jsonl", f'{{"text": "doc {i}"}}\n'.encode(), compression)
    write(tmp_path / "notes.txt", b"some notes", ".zst")
    files = list_files([str(tmp_path / "part*.jsonl*")], [".jsonl"])
    assert [f.name for f in files] == ["part0.jsonl", "part1.jsonl.gz", "part2.jsonl.zst"]
    docs, stats = read(*files)
    assert [d.text for d in docs] == ["doc 0", "doc 1", "doc 2"] and stats.files == 3
    assert read(*files)[0] == docs  # deterministic


def test_reads_corpus_with_configured_fields(corpus: Path) -> None:
    opts = SourceOptions.from_spec(DataSpec(jsonl_text_field="body", csv_column="c", parquet_column="p", skip_bad=True))
    assert opts == SourceOptions("body", "c", "p", True, 1 << 20)
    stats = ReadStats()
    docs = list(read_documents(list_files([str(corpus)], [".py", ".jsonl"]), SourceOptions(), stats=stats))
    jsonl = [d for d in docs if d.source.endswith("docs.jsonl")]
    assert [(d.text, d.offset) for d in jsonl] == [
        ("a json document about return values", 0),
        ("another json document", 48),
    ]
    assert stats.documents == len(docs) and stats.files == 13


# --- bad input -------------------------------------------------------------------------------------------------------


def test_each_bad_file_is_skipped_whole_and_counted_by_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = write(tmp_path / "good.txt", b"fine text")
    bad = [
        write(tmp_path / "bin.txt", b"text\x00more"),
        write(tmp_path / "bin.jsonl", b'{"text": "x"}\n\x00', ".zst"),
        write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1")),
        write(tmp_path / "latin1.csv", "text\ncaf\xe9\n".encode("latin-1"), ".gz"),
        write(tmp_path / "latin1.parquet", invalid_utf8_parquet(), ".zst"),
        write(tmp_path / "cut.jsonl", '{"text": "\u2603"}'.encode()[:-3]),  # ends inside a character
        write(tmp_path / "long.py", b"x = 1\n" + b"#" * 65 + b"\n"),
        write(tmp_path / "tail.md", b"ok\n" + b"t" * 65, ".gz"),  # the last line has no newline
        write(tmp_path / "long.jsonl", b'{"text": "ok"}\n' * 10 + b'{"text": "' + b"y" * 80 + b'"}\n', ".gz"),
        write(tmp_path / "zero.txt", b""),
        write(tmp_path / "blank.jsonl", b"\n  \n", ".zst"),
        write(tmp_path / "nbsp.md", "\u00a0\n".encode()),
        write(tmp_path / "zero.parquet", b""),
        write(tmp_path / "rows0.parquet", parquet_bytes([])),
        write(tmp_path / "broken.py.gz", b"not gzip at all"),
        write(tmp_path / "corrupt.parquet", b"PAR1 not really parquet"),
        write(tmp_path / "cut.parquet", parquet_bytes(["a", "b"])[:-9]),
        tmp_path / "dir.txt",
        write(tmp_path / "denied.txt", b"secret"),
    ]
    (tmp_path / "dir.txt").mkdir()
    trunc_gz, trunc_zst = tmp_path / "trunc.jsonl.gz", tmp_path / "trunc.csv.zst"
    trunc_gz.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:-12])
    trunc_zst.write_bytes(zstandard.ZstdCompressor().compress(b"text\n" + b"row\n" * 1000)[:-6])
    bad += [trunc_gz, trunc_zst]

    real_open = open

    def denying_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(file).name == "denied.txt":  # tests run as root, where chmod 000 would not stop a read
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(sources, "open", denying_open, raising=False)
    docs, stats = read(good, *bad, opts=SourceOptions(max_line_bytes=64))
    assert [d.text for d in docs] == ["fine text"]
    assert stats.skipped == {"binary": 2, "invalid_utf8": 4, "line_too_long": 3, "empty": 5, "unreadable": 7}
    assert (stats.skipped_files, stats.files, stats.bytes) == (len(bad), 1, 9)


def test_a_line_of_exactly_max_line_bytes_is_kept(tmp_path: Path) -> None:
    path = write(tmp_path / "edge.jsonl", b'{"text": "' + b"z" * 50 + b'"}\n' + b'{"text": "b"}', ".zst")
    docs, stats = read(path, opts=SourceOptions(max_line_bytes=62))
    assert len(docs) == 2 and stats.skipped == {}
    assert read(path, opts=SourceOptions(max_line_bytes=61))[1].skipped == {"line_too_long": 1}


@pytest.mark.parametrize("chunk", [3, 7, 64, 1 << 20])
def test_long_lines_are_found_across_read_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(sources, "CHUNK", chunk)  # streamed files are checked a chunk at a time
    bodies = [b"a" * 20 + b"\n", b"a" * 21, b"b\n" + b"a" * 21 + b"\nb\n", (b"a" * 15 + b"\n") * 9, b"a" * 20]
    for i, body in enumerate(bodies):
        path = write(tmp_path / f"{i}.csv", b"text\n" + body, ".zst")
        too_long = max(len(line) for line in body.split(b"\n")) > 20
        docs, stats = read(path, opts=SourceOptions(max_line_bytes=20))
        assert (stats.skipped == {"line_too_long": 1}) == too_long and bool(docs) != too_long, body


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, compression: str) -> None:
    bad = write(tmp_path / "bad.jsonl", b'{"text": "ok"}\n\n{"text": oops}\n', compression)
    with pytest.raises(DataError, match=rf"bad.jsonl{compression}:3: malformed JSON"):
        read(bad)


@pytest.mark.parametrize(("line", "problem"), [('{"body": "x"}', "no 'text' field"), ('{"text": 3}', "is int")])
def test_jsonl_missing_or_wrong_field(tmp_path: Path, line: str, problem: str) -> None:
    bad = write(tmp_path / "bad.jsonl", f'{{"text": "ok"}}\n{line}\n'.encode())
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{problem}"):
        read(bad)


def test_jsonl_lone_surrogate_escape_is_malformed(tmp_path: Path) -> None:
    # Valid JSON, but the text it decodes to cannot be written as UTF-8 by any later stage.
    bad = write(tmp_path / "s.jsonl", b'{"text": "fine \\u00e9"}\n{"text": "x \\ud800 y"}\n')
    with pytest.raises(DataError, match=r"s.jsonl:2: .*lone surrogate"):
        read(bad)
    docs, stats = read(bad, opts=SourceOptions(skip_bad=True))
    assert [d.text for d in docs] == ["fine \u00e9"] and stats.skipped == {"malformed": 1}


def test_missing_csv_column_names_file_and_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.csv", b"id,body\n1,hello\n", ".gz")
    with pytest.raises(DataError, match=r"bad.csv.gz:1: no column 'text'"):
        read(bad)


def test_missing_or_non_string_parquet_column_is_an_error(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.parquet", parquet_bytes(["a"], column="body"))
    with pytest.raises(DataError, match=r"bad.parquet:1: no column 'text'"):
        read(bad)
    with pytest.raises(DataError, match=r"column 'id' is int64"):
        read(bad, opts=SourceOptions(parquet_column="id"))


def test_skip_bad_counts_bad_records_and_files_instead(tmp_path: Path) -> None:
    jsonl = write(tmp_path / "a.jsonl", b'{"text": "one"}\n{oops\n{"body": 1}\n[1]\n{"text": null}\n{"text": "two"}\n')
    csv_short = write(tmp_path / "b.csv", b"id,text\n1,alpha\n2\n3,beta\n", ".zst")
    csv_nocol = write(tmp_path / "c.csv", b"id,body\n1,x\n")
    parquet = write(tmp_path / "d.parquet", parquet_bytes(["x"], column="body"), ".gz")
    docs, stats = read(jsonl, csv_short, csv_nocol, parquet, opts=SourceOptions(skip_bad=True))
    assert [(d.text, d.offset) for d in docs] == [("one", 0), ("two", 53), ("alpha", 0), ("beta", 2)]
    assert stats.skipped == {"malformed": 2, "missing_field": 5}
    assert (stats.skipped_files, stats.files, stats.documents) == (2, 2, 4)


def test_max_bytes_stops_reading(corpus: Path) -> None:
    files = list_files([str(corpus)], [".py"])
    stats = ReadStats()
    docs = list(read_documents(files, SourceOptions(), max_bytes=1, stats=stats))
    assert len(docs) == 1 and stats.files == 1


def test_read_file_counts_into_the_given_stats(tmp_path: Path) -> None:
    stats = ReadStats(files=5)
    assert [d.text for d in read_file(write(tmp_path / "a.md", b"# hi"), SourceOptions(), stats)] == ["# hi"]
    assert stats.files == 6


def test_default_source_is_the_stdlib() -> None:
    root = Path(stdlib_source())
    assert (root / "os.py").is_file() and (root / "json" / "__init__.py").is_file()
