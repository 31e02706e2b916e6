"""Documents as Parquet: the curated text with its provenance columns.

A *part* holds the curated documents of one source file (cached across versions by the file's sha256)
and each document's dedup fingerprint (sha256 digest and MinHash signature), computed where the part was
made, so the corpus-wide dedup pass only compares. The *curated* file of a version holds every document
that survived deduplication, in order. Both have the columns text, source, offset, source_sha256; the
fingerprint columns are null in the curated file.
"""

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from aifab.data.curate import Fingerprint
from aifab.data.sources import Document
from aifab.store.artifacts import ArtifactStore

COLUMNS = ("text", "source", "offset", "source_sha256")
ALL_COLUMNS = (*COLUMNS, "digest", "signature")
ROW_GROUP_BYTES = 16 << 20  # flush a row group every ~16 MB of text: bounded memory, efficient reads


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("text", pa.string()),
            ("source", pa.string()),
            ("offset", pa.int64()),
            ("source_sha256", pa.string()),
            ("digest", pa.binary()),
            ("signature", pa.binary()),
        ]
    )


class DocWriter:
    """Streams documents into a Parquet temp file in the artifact store; `close()` stores it and returns
    its digest (None when no document was written)."""

    def __init__(self, artifacts: ArtifactStore, kind: str = "docs") -> None:
        import pyarrow.parquet as pq

        self.artifacts = artifacts
        fd, self.path = artifacts.temp_file(kind)
        os.close(fd)
        self._writer = pq.ParquetWriter(self.path, _schema(), compression="zstd")
        self._rows: dict[str, list[Any]] = {c: [] for c in ALL_COLUMNS}
        self._pending_bytes = 0
        self.documents = 0
        self.bytes = 0

    def write(self, doc: Document, fp: Fingerprint | None = None) -> None:
        self._rows["digest"].append(fp.digest if fp is not None else None)
        sig = fp.signature if fp is not None else None
        self._rows["signature"].append(sig.tobytes() if sig is not None else None)
        self._rows["text"].append(doc.text)
        self._rows["source"].append(doc.source)
        self._rows["offset"].append(doc.offset)
        self._rows["source_sha256"].append(doc.source_sha256)
        size = len(doc.text.encode())
        self._pending_bytes += size
        self.bytes += size
        self.documents += 1
        if self._pending_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def write_all(self, docs: Iterable[Document]) -> None:
        for doc in docs:
            self.write(doc)

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows["text"]:
            self._writer.write_table(pa.table(self._rows, schema=_schema()))
        self._rows = {c: [] for c in ALL_COLUMNS}
        self._pending_bytes = 0

    def close(self) -> str | None:
        try:
            self._flush()
            self._writer.close()
            return self.artifacts.put_file(self.path) if self.documents else None
        finally:
            Path(self.path).unlink(missing_ok=True)

    def abort(self) -> None:
        self._writer.close()
        Path(self.path).unlink(missing_ok=True)


def iter_docs(artifacts: ArtifactStore, digest: str, batch_rows: int = 1024) -> Iterator[Document]:
    """The documents of a part or curated file, in order, read a batch at a time (digest verified first)."""
    for batch in iter_batches(artifacts, digest, batch_rows):
        yield from (Document(t, s, o, h) for t, s, o, h in zip(*batch, strict=True))


class PartCache:
    """Rows of parts with their fingerprints, keeping the last part read: entries of consecutive files share
    a part, so the dedup pass opens each part once."""

    def __init__(self, artifacts: ArtifactStore) -> None:
        self.artifacts = artifacts
        self._digest = ""
        self._cols: list[list[Any]] = []

    def rows(self, digest: str, start: int, stop: int) -> Iterator[tuple[Document, Fingerprint]]:
        import pyarrow.parquet as pq

        if digest != self._digest:
            table = pq.read_table(self.artifacts.verified_path(digest), columns=list(ALL_COLUMNS))
            self._cols = [table.column(c).to_pylist() for c in ALL_COLUMNS]
            self._digest = digest
        for i in range(start, stop):
            text, source, offset, sha, dig, sig = (col[i] for col in self._cols)
            signature = np.frombuffer(sig, dtype=np.uint32) if sig is not None else None
            yield Document(text, source, offset, sha), Fingerprint(len(text.encode()), dig, signature)


def iter_batches(artifacts: ArtifactStore, digest: str, batch_rows: int = 1024) -> Iterator[tuple[list[Any], ...]]:
    """Column lists (text, source, offset, source_sha256) of up to `batch_rows` documents at a time."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(artifacts.verified_path(digest)) as f:
        for batch in f.iter_batches(batch_size=batch_rows, columns=list(COLUMNS)):
            yield tuple(batch.column(c).to_pylist() for c in COLUMNS)
