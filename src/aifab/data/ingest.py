"""The data stage: sources -> curated documents -> BPE tokenizer -> train/val token shards -> DatasetVersion.

`ingest()` runs it for one named dataset and returns the new version's id and counts; later stages read
its manifest artifact. Steps, each reported in the version's `stages`:

1. read + curate, per source file (`curate_chunk`): normalise, filter, redact PII, fingerprint. Files are
   written in chunks to Parquet *parts*; each file's rows are cached by its sha256, so re-ingesting a grown
   corpus reads only new and changed files.
2. deduplicate across the corpus in file order (exact, then MinHash LSH) into one curated Parquet file.
3. tokenizer: trained on the curated text, or the parent version's when its settings are unchanged, so
   token ids stay comparable across versions; or, with `tokenizer_from`, a registered model's own tokenizer,
   so that model can be fine-tuned on the result.
4. tokenize in streamed batches (encode_batch on every core) into uint16 shards (uint32 for vocabularies
   over 65,536) and a manifest.
5. one transaction inserts the version row. A run that dies earlier leaves only unreferenced artifacts
   and temp files (removed by the next run): never a half-written version.
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from aifab.console import progress
from aifab.data.chunks import curation_key
from aifab.data.curate import Deduplicator, StageCount
from aifab.data.executors import curate_files
from aifab.data.parts import DocWriter, PartCache, iter_batches
from aifab.data.sources import SourceOptions, file_sha256, list_files, stdlib_source
from aifab.data.tokenize import ShardWriter, encode_to_shards, train_tokenizer
from aifab.errors import DataError
from aifab.spec import DataSpec, TokenizerSpec
from aifab.store import Store
from aifab.store.lineage import link
from aifab.store.names import check_name
from aifab.store.schema import DatasetVersion
from aifab.store.shards import Manifest, dtype_for
from aifab.store.splits import flipped_index, split_of
from aifab.tokens import end_of_text_id

# documents per encode call: enough to keep every core busy, few enough that the Encoding objects of one batch
# stay small (512 stdlib files peak near 0.9 GB; 128 near 0.35 GB)
TOKENIZE_BATCH_ROWS = 128


@dataclass(frozen=True)
class IngestResult:
    dataset_version_id: int
    name: str
    version: int
    parent_version: int | None
    files: int
    bytes: int
    documents: int
    skipped_files: int
    tokens: int
    train_tokens: int
    val_tokens: int
    vocab_size: int
    processed_files: int
    reused_files: int
    stages: dict[str, Any]
    elapsed_s: float
    timings_s: dict[str, float]  # wall seconds per step: curate, dedup, tokenizer, tokenize


def ingest(
    store: Store,
    name: str,
    data: DataSpec,
    tokenizer: TokenizerSpec,
    *,
    executor: str = "local",
    tokenizer_from: str | None = None,
) -> IngestResult:
    """Add the next version of dataset `name`. With `tokenizer_from` (a model reference), the documents are
    tokenized with that registered model's tokenizer instead of a trained one, so the model can be fine-tuned
    on the result; `tokenizer` is then unused."""
    check_name(name, "dataset name")
    t0 = time.perf_counter()
    base = _base_tokenizer(store, tokenizer_from) if tokenizer_from is not None else None
    store.artifacts.clean_stale_tmp()
    sources = data.sources or [stdlib_source()]
    files = list_files(sources, data.extensions)
    if not files:
        raise DataError(f"no files with suffix {', '.join(data.extensions)} under {', '.join(sources)}")
    opts = SourceOptions.from_spec(data)
    key = curation_key(opts, data.curation)
    parent = _latest_version(store, name)
    previous: dict[str, Any] = {}
    if parent is not None and parent.index_digest is not None:
        index = json.loads(store.artifacts.get_bytes(parent.index_digest))
        if index.get("key") == key:
            previous = index["files"]

    timings: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[step] = now - mark
        mark = now

    # 1. read + curate each file, or reuse its part from the parent version
    selected = _within(files, data.max_bytes)
    shas = {str(p): _sha_or_none(p) for p in selected}
    todo = [p for p, sha in shas.items() if sha is None or previous.get(p, {}).get("sha256") != sha]
    with progress() as bar:
        task = bar.add_task("read + curate", total=len(todo))
        done = curate_files(
            todo, opts, data.curation, str(store.artifacts.root), executor, lambda n: bar.advance(task, n)
        )
    fresh = dict(zip(todo, done, strict=True))
    entries = {p: {"sha256": shas[p], **fresh[p]} if p in fresh else previous[p] for p in shas}
    processed, reused = len(todo), len(shas) - len(todo)

    lap("curate")

    # 2. corpus-wide deduplication, in file order, into the curated Parquet file
    dedup = Deduplicator(data.curation)
    writer = DocWriter(store.artifacts, "curated")
    val_docs = 0
    try:
        with progress() as bar:
            task = bar.add_task("deduplicate", total=len(entries))
            part_rows = PartCache(store.artifacts)
            for entry in entries.values():
                if entry["part"] is not None:
                    for doc, fp in part_rows.rows(entry["part"], *entry["rows"]):
                        if dedup.keep_fingerprint(fp):
                            writer.write(doc)
                            val_docs += split_of(doc.text, data.val_fraction) == "val"
                bar.advance(task)
    except BaseException:
        writer.abort()
        raise
    documents = writer.documents
    curated_digest = writer.close()
    stages = _report(entries, dedup.counts)
    if curated_digest is None:
        skipped = ", ".join(f"{n} {r}" for r, n in stages["read"]["skipped"].items()) or "none skipped"
        raise DataError(
            f"the corpus is empty: {len(files)} file(s) under {', '.join(sources)} hold no text "
            f"that survives curation ({skipped})"
        )
    if documents < 2:
        raise DataError("the corpus has a single document; a train/val split needs at least two")
    flip = flipped_index(documents, val_docs)  # both splits must exist

    def splits(i: int, text: str) -> str:
        split = split_of(text, data.val_fraction)
        return split if i != flip else ("train" if split == "val" else "val")

    lap("dedup")

    # 3. tokenizer
    if base is not None:
        tok, tokenizer_digest, tokenizer_params = base
    else:
        tok, tokenizer_digest = _tokenizer(store, parent, tokenizer, curated_digest)
        tokenizer_params = tokenizer.model_dump()
    vocab_size = tok.get_vocab_size()
    dtype = dtype_for(vocab_size)

    lap("tokenizer")

    # 4. tokenize, streamed
    shard_writers = {split: ShardWriter(store.artifacts, dtype) for split in ("train", "val")}
    with progress() as bar:
        task = bar.add_task("tokenize", total=documents)
        texts = (batch[0] for batch in iter_batches(store.artifacts, curated_digest, TOKENIZE_BATCH_ROWS))
        counts = encode_to_shards(tok, texts, splits, shard_writers, lambda n: bar.advance(task, n))
    manifest = Manifest(
        tokenizer_digest=tokenizer_digest,
        vocab_size=vocab_size,
        eot_id=end_of_text_id(tok),
        dtype=dtype,
        splits={split: w.close() for split, w in shard_writers.items()},
    )
    manifest_digest = store.artifacts.put_bytes(manifest.to_json())
    index_digest = store.artifacts.put_bytes(json.dumps({"key": key, "files": entries}, sort_keys=True).encode())

    lap("tokenize")

    # 5. the version becomes visible in one transaction
    read = stages["read"]
    sizes = {
        "files": read["files"],
        "bytes": read["bytes"],
        "documents": documents,
        "tokens": counts["train"] + counts["val"],
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
    }
    params = {"sources": sources, **data.model_dump(exclude={"sources"}), "tokenizer": tokenizer_params}
    with store.db.session() as s:
        version = (parent.version if parent is not None else 0) + 1
        row = DatasetVersion(
            name=name,
            version=version,
            manifest_digest=manifest_digest,
            tokenizer_digest=tokenizer_digest,
            params=params,
            parent_id=parent.id if parent else None,
            executor=executor,
            curated_digest=curated_digest,
            index_digest=index_digest,
            stages=stages,
            **sizes,
        )
        s.add(row)
        s.flush()
        if parent is not None:
            link(s, ("dataset", parent.id), ("dataset", row.id), "parent")
        if base is not None:
            link(s, ("model", tokenizer_params["model_version_id"]), ("dataset", row.id), "tokenizer")
        row_id = row.id
    return IngestResult(
        dataset_version_id=row_id,
        name=name,
        version=version,
        parent_version=parent.version if parent else None,
        skipped_files=read["skipped_files"],
        vocab_size=vocab_size,
        processed_files=processed,
        reused_files=reused,
        stages=stages,
        elapsed_s=time.perf_counter() - t0,
        timings_s=timings,
        **sizes,
    )


def _within(files: list[Path], max_bytes: int | None) -> list[Path]:
    """The files to read: all of them, or those before the running total of on-disk bytes reaches max_bytes."""
    if max_bytes is None:
        return files
    chosen, total = [], 0
    for path in files:
        if total >= max_bytes:
            break
        chosen.append(path)
        total += path.stat().st_size
    return chosen


def _sha_or_none(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None  # read_file will count it as unreadable


def _latest_version(store: Store, name: str) -> DatasetVersion | None:
    with store.db.session() as s:
        q = select(DatasetVersion).where(DatasetVersion.name == name).order_by(DatasetVersion.version.desc())
        return s.scalars(q.limit(1)).first()


def _tokenizer(store: Store, parent: DatasetVersion | None, spec: TokenizerSpec, curated: str) -> tuple[Any, str]:
    """The parent's tokenizer when it was trained with the same settings, else a new one on the curated text."""
    from tokenizers import Tokenizer

    if parent is not None and parent.params.get("tokenizer") == spec.model_dump():
        digest = parent.tokenizer_digest
        return Tokenizer.from_str(store.artifacts.get_bytes(digest).decode()), digest
    with progress(counts=False) as bar:
        bar.add_task("train tokenizer", total=None)
        texts = (text for batch in iter_batches(store.artifacts, curated) for text in batch[0])
        tok = train_tokenizer(texts, spec.vocab_size, spec.min_frequency)
    return tok, store.artifacts.put_bytes(tok.to_str().encode())


def _base_tokenizer(store: Store, ref: str) -> tuple[Any, str, dict[str, Any]]:
    """The tokenizer of registered model `ref`, its digest, and the params that record where it came from.
    Checked before any file is read: it must load and have an end-of-text token."""
    from tokenizers import Tokenizer

    from aifab.registry.models import resolve

    mv = resolve(store, ref)
    label = f"{mv.name}:{mv.version}"
    try:
        tok = Tokenizer.from_str(store.artifacts.get_bytes(mv.tokenizer_digest).decode())
        end_of_text_id(tok)
    except Exception as e:  # tokenizers raises its own exception type for a malformed file
        raise DataError(f"the tokenizer of model {label} cannot be used: {e}") from None
    if tok.get_vocab_size() > mv.config.get("vocab_size", 0):
        raise DataError(
            f"the tokenizer of model {label} has {tok.get_vocab_size():,} tokens, more than the model's "
            f"vocabulary of {mv.config.get('vocab_size')}"
        )
    params = {"from_model": label, "model_version_id": mv.id, "digest": mv.tokenizer_digest}
    return tok, mv.tokenizer_digest, params


def _report(entries: dict[str, dict[str, Any]], dedup_counts: dict[str, StageCount]) -> dict[str, Any]:
    """Per-stage counts for the whole corpus: the read statistics and every curation stage, summed over files."""
    read: dict[str, Any] = {"files": 0, "bytes": 0, "documents": 0, "skipped_files": 0, "skipped": {}}
    stages: dict[str, dict[str, Any]] = {}
    for entry in entries.values():
        for k in ("files", "bytes", "documents", "skipped_files"):
            read[k] += entry["read"][k]
        _add_reasons(read["skipped"], entry["read"]["skipped"])
        for name, count in entry["stages"].items():
            total = stages.setdefault(
                name, {"stage": name, "docs_in": 0, "docs_out": 0, "bytes_removed": 0, "reasons": {}}
            )
            for k in ("docs_in", "docs_out", "bytes_removed"):
                total[k] += count[k]
            _add_reasons(total["reasons"], count["reasons"])
    stages.update({name: asdict(count) for name, count in dedup_counts.items()})
    return {"read": read, **stages}


def _add_reasons(into: dict[str, int], more: dict[str, int]) -> None:
    for reason, n in more.items():
        into[reason] = into.get(reason, 0) + n
