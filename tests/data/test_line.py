import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from aifab.data.line import ingest
from aifab.data.tokenize import EOT, assign_splits, is_val
from aifab.errors import DataError
from aifab.spec import DataSpec
from aifab.store import Store
from aifab.store.schema import DatasetVersion
from aifab.store.shards import Manifest, TokenShards
from helpers import TINY_TOKENIZER


def test_ingest_writes_tokenizer_shards_and_a_version(store: Store, corpus: Path) -> None:
    from tokenizers import Tokenizer

    r = ingest(store, "tiny", DataSpec(sources=[str(corpus)], val_fraction=0.2), TINY_TOKENIZER)
    assert (r.name, r.version, r.files) == ("tiny", 1, 15)
    assert r.train_tokens > 0 and r.val_tokens > 0 and r.tokens == r.train_tokens + r.val_tokens
    with store.db.session() as s:
        row = s.get(DatasetVersion, r.dataset_version_id)
        assert row is not None
        manifest = Manifest.load(store.artifacts, row.manifest_digest)
    assert manifest.tokenizer_digest == row.tokenizer_digest
    assert manifest.tokens("train") == r.train_tokens and manifest.tokens("val") == r.val_tokens
    tok = Tokenizer.from_str(store.artifacts.get_bytes(row.tokenizer_digest).decode())
    assert tok.token_to_id(EOT) == manifest.eot_id == 0

    # the shards decode back to the corpus text, documents separated by EOT
    shards = TokenShards(store.artifacts, row.manifest_digest)
    ids = np.concatenate([np.asarray(a) for a in shards.arrays["train"] + shards.arrays["val"]])
    assert int((ids == manifest.eot_id).sum()) == r.documents
    text = tok.decode(ids.tolist())
    assert "def function_3_2(value, other=None):" in text
    assert "a json document about return values" in text


def test_reingest_makes_a_new_version(store: Store, corpus: Path) -> None:
    spec = DataSpec(sources=[str(corpus)], val_fraction=0.2)
    first = ingest(store, "tiny", spec, TINY_TOKENIZER)
    second = ingest(store, "tiny", spec, TINY_TOKENIZER)
    assert (first.version, second.version) == (1, 2)
    with store.db.session() as s:
        rows = s.scalars(select(DatasetVersion).order_by(DatasetVersion.version)).all()
        # same corpus, same settings: same content-addressed manifest
        assert rows[0].manifest_digest == rows[1].manifest_digest


def test_split_is_by_document_content_and_deterministic() -> None:
    texts = [f"document number {i}" for i in range(2000)]
    in_val = [is_val(t, 0.1) for t in texts]
    assert in_val == [is_val(t, 0.1) for t in texts]
    assert 0.07 < sum(in_val) / len(in_val) < 0.13
    splits = assign_splits(texts, 0.1)
    assert splits == ["val" if v else "train" for v in in_val]


def test_tiny_corpora_get_both_splits() -> None:
    assert sorted(assign_splits(["a", "b"], 1e-9)) == ["train", "val"]
    assert sorted(assign_splits(["a", "b"], 1 - 1e-9)) == ["train", "val"]


def test_batches_are_reproducible_and_shifted(store: Store, corpus: Path) -> None:
    r = ingest(store, "tiny", DataSpec(sources=[str(corpus)], val_fraction=0.2), TINY_TOKENIZER)
    with store.db.session() as s:
        row = s.get(DatasetVersion, r.dataset_version_id)
        assert row is not None
        digest = row.manifest_digest
    shards = TokenShards(store.artifacts, digest)
    x1, y1 = shards.batch("train", 4, 16, np.random.default_rng(7))
    x2, y2 = shards.batch("train", 4, 16, np.random.default_rng(7))
    assert x1.shape == (4, 16) and (x1 == x2).all() and (y1 == y2).all()
    assert (x1[:, 1:] == y1[:, :-1]).all()  # targets are the inputs shifted by one


def test_empty_corpus_is_an_error_and_stores_nothing(store: Store, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.py").write_text("   \n")
    with pytest.raises(DataError, match="corpus is empty"):
        ingest(store, "tiny", DataSpec(sources=[str(empty)]), TINY_TOKENIZER)
    with pytest.raises(DataError, match="no files"):
        ingest(store, "tiny", DataSpec(sources=[str(empty)], extensions=[".md"]), TINY_TOKENIZER)
    with store.db.session() as s:
        assert s.scalars(select(DatasetVersion)).all() == []


def test_single_document_cannot_be_split(store: Store, tmp_path: Path) -> None:
    one = tmp_path / "one.txt"
    one.write_text("only one document here")
    with pytest.raises(DataError, match="single document"):
        ingest(store, "tiny", DataSpec(sources=[str(one)]), TINY_TOKENIZER)


def test_two_documents_always_land_in_both_splits(store: Store, tmp_path: Path) -> None:
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"document {name} " * 50)
    r = ingest(store, "two", DataSpec(sources=[str(tmp_path)], val_fraction=0.01), TINY_TOKENIZER)
    assert r.train_tokens > 0 and r.val_tokens > 0


def test_bad_dataset_name_is_rejected(store: Store, corpus: Path) -> None:
    from aifab.errors import AifabError

    with pytest.raises(AifabError, match="invalid dataset name"):
        ingest(store, "../escape", DataSpec(sources=[str(corpus)], val_fraction=0.2), TINY_TOKENIZER)


def test_manifest_is_json_with_format_tag(store: Store, corpus: Path) -> None:
    r = ingest(store, "tiny", DataSpec(sources=[str(corpus)], val_fraction=0.2), TINY_TOKENIZER)
    with store.db.session() as s:
        row = s.get(DatasetVersion, r.dataset_version_id)
        assert row is not None
        body = json.loads(store.artifacts.get_bytes(row.manifest_digest))
    assert body["format"] == "aifab.shards/1" and body["dtype"] == "uint16"
    assert all(len(sh["digest"]) == 64 for split in body["splits"].values() for sh in split)


def test_shard_writer_cuts_shards_at_the_limit(store: Store) -> None:
    from aifab.data.tokenize import ShardWriter

    w = ShardWriter(store.artifacts, "uint16", shard_tokens=10)
    w.write(list(range(7)))
    w.write(list(range(7, 25)))
    shards = w.close()
    assert [s["tokens"] for s in shards] == [10, 10, 5]
    joined = b"".join(store.artifacts.get_bytes(s["digest"]) for s in shards)
    assert np.frombuffer(joined, dtype=np.uint16).tolist() == list(range(25))
    assert list(store.artifacts.tmp.iterdir()) == []  # temp files are cleaned up


def test_a_non_manifest_artifact_is_rejected(store: Store) -> None:
    from aifab.errors import ArtifactError

    digest = store.artifacts.put_bytes(b'{"hello": 1}')
    with pytest.raises(ArtifactError, match="not a token-shard manifest"):
        Manifest.load(store.artifacts, digest)
