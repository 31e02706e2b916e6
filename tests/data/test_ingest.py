"""The data stage end to end: versions, increments, curation counts on planted corpora, export, crashes."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from aifab.data.ingest import ingest
from aifab.data.parts import iter_docs
from aifab.data.tokenize import EOT
from aifab.errors import DataError
from aifab.spec import DataSpec
from aifab.store import Store
from aifab.store.schema import DatasetVersion
from aifab.store.shards import Manifest, TokenShards
from aifab.store.splits import is_val
from helpers import TINY_TOKENIZER, aifab

WORDS = [f"w{i}" for i in range(3000)]

EMAILS = ["alice@example.com", "bob.smith+dev@mail.example.org"]
SECRETS = ["AKIAIOSFODNN7EXAMPLE", "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"]
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7Yq3\nabcDEF123\n-----END RSA PRIVATE KEY-----"


def prose(seed: int, n: int = 240) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n // 12)]
    return "\n".join(lines) + "\n"


def planted_corpus(root: Path) -> Path:
    """8 unique documents, 2 exact copies of doc 0, 1 near copy of doc 1 (2 words of 240 changed), and PII."""
    root.mkdir(parents=True, exist_ok=True)
    docs = [prose(i) for i in range(8)]
    for i, text in enumerate(docs):
        (root / f"doc{i}.txt").write_text(text)
    (root / "copy_a.txt").write_text(docs[0])
    (root / "copy_b.txt").write_text(docs[0])
    words = docs[1].split(" ")
    words[30], words[150] = "changed", "edited"
    (root / "near.txt").write_text(" ".join(words))
    (root / "pii.txt").write_text(
        prose(99) + f"contact {EMAILS[0]} or {EMAILS[1]}\naws = '{SECRETS[0]}'\ntoken = '{SECRETS[1]}'\n{PEM}\n"
    )
    return root


def spec(root: Path, **kw: object) -> DataSpec:
    return DataSpec(sources=[str(root)], val_fraction=0.2, **kw)  # type: ignore[arg-type]


def version_row(store: Store, id_: int) -> DatasetVersion:
    with store.db.session() as s:
        row = s.get(DatasetVersion, id_)
        assert row is not None
        return row


def test_planted_duplicates_and_pii_are_removed_with_exact_counts(store: Store, tmp_path: Path) -> None:
    r = ingest(store, "planted", spec(planted_corpus(tmp_path / "c")), TINY_TOKENIZER)
    st = r.stages
    assert st["read"]["files"] == 12 and st["read"]["documents"] == 12
    assert (st["exact_dedup"]["docs_in"], st["exact_dedup"]["docs_out"]) == (12, 10)
    assert (st["near_dedup"]["docs_in"], st["near_dedup"]["docs_out"]) == (10, 9)
    assert st["pii"]["reasons"] == {"email": 1, "secret": 1, "private_key": 1}  # documents affected, by kind
    assert st["exact_dedup"]["bytes_removed"] == 2 * len(prose(0).encode())
    assert r.documents == 9
    texts = [d.text for d in iter_docs(store.artifacts, version_row(store, r.dataset_version_id).curated_digest or "")]
    joined = "\n".join(texts)
    for planted in [*EMAILS, *SECRETS, "MIIEpAIBAAKCAQEA7Yq3"]:
        assert planted not in joined
    assert "<EMAIL>" in joined and "<PRIVATE_KEY>" in joined


def test_ingest_writes_tokenizer_shards_manifest_and_provenance(store: Store, corpus: Path) -> None:
    from tokenizers import Tokenizer

    r = ingest(store, "tiny", spec(corpus), TINY_TOKENIZER)
    assert (r.name, r.version, r.parent_version) == ("tiny", 1, None)
    assert r.train_tokens > 0 and r.val_tokens > 0 and r.tokens == r.train_tokens + r.val_tokens
    row = version_row(store, r.dataset_version_id)
    manifest = Manifest.load(store.artifacts, row.manifest_digest)
    assert manifest.tokenizer_digest == row.tokenizer_digest and manifest.dtype == "uint16"
    assert manifest.tokens("train") == r.train_tokens and manifest.tokens("val") == r.val_tokens
    tok = Tokenizer.from_str(store.artifacts.get_bytes(row.tokenizer_digest).decode())
    assert tok.token_to_id(EOT) == manifest.eot_id == 0
    shards = TokenShards(store.artifacts, row.manifest_digest)
    ids = np.concatenate([np.asarray(a) for a in shards.arrays["train"] + shards.arrays["val"]])
    assert int((ids == manifest.eot_id).sum()) == r.documents
    assert "def function_3_2(value, other=None):" in tok.decode(ids.tolist())
    docs = list(iter_docs(store.artifacts, row.curated_digest or ""))
    jsonl = [d for d in docs if d.source.endswith("docs.jsonl")]
    raw = (corpus / "docs.jsonl").read_bytes()
    assert [raw[d.offset :].startswith(b'{"text"') for d in jsonl] == [True, True]
    import hashlib

    assert {d.source_sha256 for d in jsonl} == {hashlib.sha256(raw).hexdigest()}


def test_reingesting_a_grown_corpus_processes_only_new_and_changed_files(store: Store, tmp_path: Path) -> None:
    root = planted_corpus(tmp_path / "c")
    first = ingest(store, "grow", spec(root), TINY_TOKENIZER)
    assert (first.processed_files, first.reused_files) == (12, 0)
    (root / "doc9.txt").write_text(prose(1234))
    (root / "doc2.txt").write_text(prose(4321))
    second = ingest(store, "grow", spec(root), TINY_TOKENIZER)
    assert (second.version, second.parent_version) == (2, 1)
    assert (second.processed_files, second.reused_files) == (2, 11)
    assert second.documents == first.documents + 1
    row2 = version_row(store, second.dataset_version_id)
    assert row2.parent_id == first.dataset_version_id
    assert row2.tokenizer_digest == version_row(store, first.dataset_version_id).tokenizer_digest  # ids stay stable
    # the increment's curated documents equal a fresh ingest of the same files
    fresh = ingest(store, "fresh", spec(root), TINY_TOKENIZER)
    assert version_row(store, fresh.dataset_version_id).curated_digest == row2.curated_digest
    assert fresh.stages == second.stages


def test_same_input_same_manifest(store: Store, corpus: Path) -> None:
    a = ingest(store, "a", spec(corpus), TINY_TOKENIZER)
    b = ingest(store, "b", spec(corpus), TINY_TOKENIZER)
    ra, rb = version_row(store, a.dataset_version_id), version_row(store, b.dataset_version_id)
    assert (ra.manifest_digest, ra.curated_digest) == (rb.manifest_digest, rb.curated_digest)


def test_split_is_by_document_content_and_deterministic() -> None:
    texts = [f"document number {i}" for i in range(2000)]
    in_val = [is_val(t, 0.1) for t in texts]
    assert in_val == [is_val(t, 0.1) for t in texts]
    assert 0.07 < sum(in_val) / len(in_val) < 0.13


def test_two_documents_always_land_in_both_splits(store: Store, tmp_path: Path) -> None:
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"document {name} " * 50)
    r = ingest(store, "two", DataSpec(sources=[str(tmp_path)], val_fraction=0.01), TINY_TOKENIZER)
    assert r.train_tokens > 0 and r.val_tokens > 0


def test_empty_corpus_is_an_error_and_stores_nothing(store: Store, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.py").write_text("   \n")
    (empty / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(DataError, match=r"corpus is empty.*(1 binary.*1 empty|1 empty.*1 binary)"):
        ingest(store, "tiny", DataSpec(sources=[str(empty)]), TINY_TOKENIZER)
    with pytest.raises(DataError, match="no files"):
        ingest(store, "tiny", DataSpec(sources=[str(empty)], extensions=[".md"]), TINY_TOKENIZER)
    with store.db.session() as s:
        assert s.scalars(select(DatasetVersion)).all() == []


def test_single_document_cannot_be_split(store: Store, tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("only one document here, long enough to pass the length filter")
    with pytest.raises(DataError, match="single document"):
        ingest(store, "tiny", DataSpec(sources=[str(tmp_path / "one.txt")]), TINY_TOKENIZER)


def test_bad_dataset_name_is_rejected(store: Store, corpus: Path) -> None:
    from aifab.errors import AifabError

    with pytest.raises(AifabError, match="invalid dataset name"):
        ingest(store, "../escape", spec(corpus), TINY_TOKENIZER)


def test_cli_ingest_lists_shows_and_exports(tmp_path: Path) -> None:
    root = planted_corpus(tmp_path / "c")
    home = tmp_path / "home"
    proc = aifab("ingest", str(root), "--name", "planted", "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["documents"] == 9
    listing = aifab("datasets", "planted", home=home)
    assert listing.returncode == 0 and "planted:1" in listing.stdout
    shown = aifab("datasets", "show", "planted:1", "--json", home=home)
    assert json.loads(shown.stdout)["stages"]["near_dedup"]["docs_out"] == 9
    out = tmp_path / "out.jsonl"
    assert aifab("datasets", "export", "planted", str(out), home=home).returncode == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 9 and {"text", "source", "offset", "source_sha256"} <= set(rows[0])
    assert not any(secret in out.read_text() for secret in [*EMAILS, *SECRETS])
    again = aifab("datasets", "export", "planted", str(out), home=home)
    assert again.returncode == 2 and "already exists" in again.stderr
    missing = aifab("datasets", "nosuch", home=home)
    assert missing.returncode == 2 and "unknown dataset 'nosuch'" in missing.stderr


def test_a_killed_ingest_leaves_no_version_and_the_next_run_starts_clean(tmp_path: Path) -> None:
    root = tmp_path / "big"
    root.mkdir()
    # ~8 MB in all: several seconds of work, in few enough files that this process (not a worker pool) writes them
    for i in range(60):
        (root / f"f{i}.txt").write_text(prose(10_000 + i, 16_000))
    home = tmp_path / "home"
    env = {**os.environ, "AIFAB_HOME": str(home), "AIFAB_NO_PROGRESS": "1"}
    tmp_dir = home / "artifacts" / "tmp"
    victim = subprocess.Popen(
        [sys.executable, "-m", "aifab", "ingest", str(root), "--name", "big"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (tmp_dir.is_dir() and any(tmp_dir.iterdir())):  # kill it while it is writing
        assert victim.poll() is None and time.monotonic() < deadline, "ingest ended before it could be killed"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    listing = aifab("datasets", home=home)
    assert listing.returncode == 0 and "big:" not in listing.stdout
    assert any(tmp_dir.iterdir())  # the dead run's temp files are still there ...
    done = aifab("ingest", str(root), "--name", "big", home=home)
    assert done.returncode == 0, done.stderr
    assert list(tmp_dir.iterdir()) == []  # ... and the next run removed them
    assert "big:1" in aifab("datasets", home=home).stdout


def test_bad_files_are_skipped_and_counted_by_reason_without_stopping_the_run(store: Store, tmp_path: Path) -> None:
    import gzip

    root = planted_corpus(tmp_path / "c")
    (root / "binary.txt").write_bytes(b"PK\x03\x04\x00\x00" + bytes(range(256)))
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 20)
    (root / "long.txt").write_text("x" * (2 << 20))
    (root / "empty.txt").write_text("")
    (root / "broken.txt.gz").write_bytes(gzip.compress(prose(7).encode())[:40])
    r = ingest(store, "bad", spec(root), TINY_TOKENIZER)
    skipped = r.stages["read"]["skipped"]
    assert skipped == {"binary": 1, "invalid_utf8": 1, "line_too_long": 1, "empty": 1, "unreadable": 1}
    assert r.skipped_files == 5 and r.documents == 9  # the good files went through untouched


def test_malformed_records_fail_with_file_and_line_unless_skip_bad(tmp_path: Path) -> None:
    root = planted_corpus(tmp_path / "c")
    (root / "dump.jsonl").write_text('{"text": "fine document number one"}\n{"text": broken\n{"body": "x"}\n')
    home = tmp_path / "home"
    failed = aifab("ingest", str(root), "--name", "dump", home=home)
    assert failed.returncode == 2 and "dump.jsonl:2" in failed.stderr and "Traceback" not in failed.stderr
    assert "dump:" not in aifab("datasets", home=home).stdout
    ok = aifab("ingest", str(root), "--name", "dump", "--skip-bad", "--json", home=home)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout.strip().splitlines()[-1])
    assert result["stages"]["read"]["skipped"] == {"malformed": 1, "missing_field": 1}
