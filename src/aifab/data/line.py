"""The data stage: sources -> documents -> BPE tokenizer -> train/val token shards -> DatasetVersion.

`ingest()` returns only the new DatasetVersion's id and counts; later stages read its manifest artifact.
"""

import time
from dataclasses import dataclass

from sqlalchemy import func, select

from aifab.console import progress
from aifab.data.sources import ReadStats, list_files, read_documents, stdlib_source
from aifab.data.tokenize import EOT, ShardWriter, assign_splits, encode_documents, train_tokenizer
from aifab.errors import DataError
from aifab.spec import DataSpec, TokenizerSpec
from aifab.store import Store
from aifab.store.names import check_name
from aifab.store.schema import DatasetVersion
from aifab.store.shards import Manifest, dtype_for


@dataclass(frozen=True)
class IngestResult:
    dataset_version_id: int
    name: str
    version: int
    files: int
    bytes: int
    documents: int
    skipped_files: int
    tokens: int
    train_tokens: int
    val_tokens: int
    vocab_size: int
    elapsed_s: float


def ingest(store: Store, name: str, data: DataSpec, tokenizer: TokenizerSpec) -> IngestResult:
    check_name(name, "dataset name")
    t0 = time.perf_counter()
    sources = data.sources or [stdlib_source()]
    files = list_files(sources, data.extensions)
    if not files:
        raise DataError(f"no files with suffix {', '.join(data.extensions)} under {', '.join(sources)}")

    stats = ReadStats()
    with progress() as bar:
        task = bar.add_task("read", total=len(files))
        docs: list[str] = []
        for doc in read_documents(files, data.jsonl_text_field, data.max_bytes, stats):
            docs.append(doc.text)
            bar.update(task, completed=stats.files + stats.skipped_files)
        bar.update(task, completed=len(files))
    if not docs:
        raise DataError(f"the corpus is empty: {len(files)} file(s) under {', '.join(sources)} hold no text")
    if len(docs) < 2:
        raise DataError("the corpus has a single document; a train/val split needs at least two")

    with progress(counts=False) as bar:
        bar.add_task("train tokenizer", total=None)
        tok = train_tokenizer(docs, tokenizer.vocab_size, tokenizer.min_frequency)
    tokenizer_digest = store.artifacts.put_bytes(tok.to_str().encode())
    vocab_size = tok.get_vocab_size()
    dtype = dtype_for(vocab_size)

    writers = {split: ShardWriter(store.artifacts, dtype) for split in ("train", "val")}
    with progress() as bar:
        task = bar.add_task("tokenize", total=len(docs))
        splits = assign_splits(docs, data.val_fraction)
        counts = encode_documents(tok, docs, splits, writers, lambda n: bar.advance(task, n))
    manifest = Manifest(
        tokenizer_digest=tokenizer_digest,
        vocab_size=vocab_size,
        eot_id=tok.token_to_id(EOT),
        dtype=dtype,
        splits={split: w.close() for split, w in writers.items()},
    )
    manifest_digest = store.artifacts.put_bytes(manifest.to_json())

    sizes = {
        "files": stats.files,
        "bytes": stats.bytes,
        "documents": len(docs),
        "tokens": counts["train"] + counts["val"],
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
    }
    params = {"sources": sources, **data.model_dump(exclude={"sources"}), "tokenizer": tokenizer.model_dump()}
    with store.db.session() as s:
        version = (s.scalar(select(func.max(DatasetVersion.version)).where(DatasetVersion.name == name)) or 0) + 1
        row = DatasetVersion(
            name=name,
            version=version,
            manifest_digest=manifest_digest,
            tokenizer_digest=tokenizer_digest,
            params=params,
            **sizes,
        )
        s.add(row)
        s.flush()
        row_id = row.id
    return IngestResult(
        dataset_version_id=row_id,
        name=name,
        version=version,
        skipped_files=stats.skipped_files,
        vocab_size=vocab_size,
        elapsed_s=time.perf_counter() - t0,
        **sizes,
    )
