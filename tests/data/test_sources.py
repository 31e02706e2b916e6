from pathlib import Path

import pytest

from aifab.data.sources import ReadStats, list_files, read_documents, stdlib_source
from aifab.errors import DataError


def test_lists_supported_files_in_directories_sorted(corpus: Path) -> None:
    (corpus / "image.png").write_bytes(b"\x89PNG")
    (corpus / "__pycache__").mkdir()
    (corpus / "__pycache__" / "cached.py").write_text("x = 1\n")
    files = list_files([str(corpus)], [".py", ".md", ".txt", ".jsonl"])
    names = [f.name for f in files]
    assert "image.png" not in names and "cached.py" not in names
    assert {"README.md", "notes.txt", "docs.jsonl", "module_0.py"} <= set(names)
    assert files == sorted(files)


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


def test_reads_documents_with_jsonl_field(corpus: Path) -> None:
    stats = ReadStats()
    docs = list(read_documents(list_files([str(corpus)], [".py", ".jsonl"]), "text", stats=stats))
    jsonl = [d for d in docs if ".jsonl:" in d.source]
    assert [d.text for d in jsonl] == ["a json document about return values", "another json document"]
    assert jsonl[0].source.endswith("docs.jsonl:1")
    assert stats.documents == len(docs) and stats.files == 13


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        list(read_documents([bad]))


@pytest.mark.parametrize(("line", "problem"), [('{"body": "x"}', "no 'text' field"), ('{"text": 3}', "is int")])
def test_jsonl_missing_or_wrong_field(tmp_path: Path, line: str, problem: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line + "\n")
    with pytest.raises(DataError, match=problem):
        list(read_documents([bad]))


def test_undecodable_files_are_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("fine")
    stats = ReadStats()
    docs = list(read_documents(sorted(tmp_path.iterdir()), stats=stats))
    assert [Path(d.source).name for d in docs] == ["ok.txt"]
    assert stats.skipped_files == 1


def test_max_bytes_stops_reading(corpus: Path) -> None:
    files = list_files([str(corpus)], [".py"])
    stats = ReadStats()
    docs = list(read_documents(files, max_bytes=1, stats=stats))
    assert len(docs) == 1 and stats.files == 1


def test_default_source_is_the_stdlib() -> None:
    root = Path(stdlib_source())
    assert (root / "os.py").is_file() and (root / "json" / "__init__.py").is_file()
