"""Engines that run the per-file step of the data line (`curate_chunk`) over many files.

Every engine returns the same entries in the same (input) order, so the corpus-wide steps that follow, and
therefore the manifest, do not depend on the engine:
- "local": in this process for a few files, else in a pool of worker processes (one per core).
- "ray": as a Ray Data `map` over the file list, on the cluster `ray.init()` connects to. Workers write
  parts to the same artifact store, so on several nodes the store's home must be on a shared filesystem.
"""

import contextlib
import json
import os
from collections.abc import Callable
from multiprocessing import get_context
from typing import Any

from aifab.data.sources import SourceOptions
from aifab.errors import DataError
from aifab.spec import CurationSpec

ENGINES = ("local", "ray")
POOL_MIN_FILES = 64  # below this, starting worker processes costs more than it saves
CHUNK_BYTES = 4 << 20  # on-disk bytes of consecutive files per task and per Parquet part
CHUNK_FILES = 256


def curate_files(
    paths: list[str],
    opts: SourceOptions,
    curation: CurationSpec,
    artifacts_root: str,
    engine: str = "local",
    on_done: Callable[[int], None] = lambda n: None,
) -> list[dict[str, Any]]:
    """One index entry per path, in the order of `paths`, from `curate_chunk` over consecutive chunks."""
    if engine == "local":
        return _local(paths, opts, curation, artifacts_root, on_done)
    if engine == "ray":
        return _ray(paths, opts, curation, artifacts_root, on_done)
    raise DataError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")


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


def _one(args: tuple[list[str], SourceOptions, CurationSpec, str]) -> list[dict[str, Any]]:
    from aifab.data.line import curate_chunk
    from aifab.store.artifacts import ArtifactStore

    paths, opts, curation, root = args
    return curate_chunk(paths, opts, curation, ArtifactStore(root))


def _local(
    paths: list[str], opts: SourceOptions, curation: CurationSpec, root: str, on_done: Callable[[int], None]
) -> list[dict[str, Any]]:
    jobs = [(c, opts, curation, root) for c in chunks(paths)]
    workers = min(os.cpu_count() or 1, len(jobs))
    out: list[dict[str, Any]] = []
    if workers < 2 or len(paths) < POOL_MIN_FILES:
        for job in jobs:
            out.extend(_one(job))
            on_done(len(job[0]))
        return out
    # fork, so library callers need no `if __name__ == "__main__"` guard; the pool is made before the caller's
    # progress bar starts its refresh thread (see ingest), and the workers use no inherited threads or sockets
    with get_context("fork").Pool(workers) as pool:
        for job, entries in zip(jobs, pool.imap(_one, jobs), strict=True):
            out.extend(entries)
            on_done(len(job[0]))
    return out


def _ray(
    paths: list[str], opts: SourceOptions, curation: CurationSpec, root: str, on_done: Callable[[int], None]
) -> list[dict[str, Any]]:
    from aifab.cluster import connect

    connect(DataError)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # entries must come back in input order
    ctx.enable_progress_bars = False

    def map_row(row: dict[str, Any]) -> dict[str, Any]:
        entries = _one((json.loads(row["paths"]), opts, curation, root))
        return {"i": row["i"], "entries": json.dumps(entries)}

    items = [{"i": i, "paths": json.dumps(c)} for i, c in enumerate(chunks(paths))]
    rows = ray.data.from_items(items).map(map_row).take_all()
    rows.sort(key=lambda r: int(r["i"]))
    on_done(len(paths))
    return [entry for r in rows for entry in json.loads(r["entries"])]
