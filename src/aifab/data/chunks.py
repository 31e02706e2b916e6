"""The per-file step of ingest: read and curate a chunk of consecutive source files into one Parquet part.

`curate_chunk` is pure in its inputs, so any worker (a local process, a Ray task; see executors.py) can run
it; `curation_key` says when a cached part may be reused.
"""

import contextlib
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aifab.data.curate import Curator, Deduplicator
from aifab.data.parts import DocWriter
from aifab.data.sources import ReadStats, SourceOptions, read_file
from aifab.spec import CurationSpec
from aifab.store.artifacts import ArtifactStore

CHUNK_BYTES = 4 << 20  # on-disk bytes of consecutive files per task and per Parquet part
CHUNK_FILES = 256


def chunks(paths: list[str]) -> list[list[str]]:
    """Consecutive runs of paths of about CHUNK_BYTES (or CHUNK_FILES files) each."""
    out: list[list[str]] = [[]]
    size = 0
    for path in paths:
        if out[-1] and (size >= CHUNK_BYTES or len(out[-1]) >= CHUNK_FILES):
            out.append([])
            size = 0
        out[-1].append(path)
        with contextlib.suppress(OSError):  # an unreadable file is counted by the reader
            size += os.path.getsize(path)
    return [c for c in out if c]


def curate_chunk(
    paths: list[str], opts: SourceOptions, curation: CurationSpec, artifacts: ArtifactStore
) -> list[dict[str, Any]]:
    """Read and curate consecutive source files into one Parquet part (one small part per file would cost a
    Parquet open per file later). Returns one index entry per file: the part digest and the file's row range
    in it ([start, stop), part None when nothing survived), its read statistics and per-stage counts. Pure in
    its inputs, so any worker can run it."""
    # fingerprints for both dedup stages, whatever the spec enables, so a cached part serves any later setting
    hasher = Deduplicator(curation.model_copy(update={"exact_dedup": True, "near_dedup": True}))
    writer = DocWriter(artifacts, "part")
    entries: list[dict[str, Any]] = []
    try:
        for path in paths:
            stats, curator, start = ReadStats(), Curator(curation), writer.documents
            for doc in read_file(Path(path), opts, stats):
                kept = curator.process(doc)
                if kept is not None:
                    writer.write(kept, hasher.fingerprint(kept.text))
            entries.append(
                {
                    "rows": [start, writer.documents],
                    "read": {
                        "files": stats.files,
                        "bytes": stats.bytes,
                        "documents": stats.documents,
                        "skipped_files": stats.skipped_files,
                        "skipped": dict(stats.skipped),
                    },
                    "stages": {name: asdict(count) for name, count in curator.counts.items()},
                }
            )
    except BaseException:
        writer.abort()
        raise
    part = writer.close()
    for entry in entries:
        entry["part"] = part if entry["rows"][1] > entry["rows"][0] else None
    return entries


def curation_key(opts: SourceOptions, curation: CurationSpec) -> str:
    """Hash of every setting that changes a file's part: a part is reused only under the same key."""
    per_file = curation.model_dump(exclude={"exact_dedup", "near_dedup", "near_dedup_threshold"})
    body = json.dumps({"source": asdict(opts), "curation": per_file}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()
