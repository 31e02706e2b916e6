"""Executors that run the per-file step of ingest (`curate_chunk`) over many files.

Every executor returns the same entries in the same (input) order, so the corpus-wide steps that follow, and
therefore the manifest, do not depend on the executor:
- "local": in this process for a few files, else in a pool of worker processes (one per core).
- "ray": as a Ray Data `map` over the file list, on the cluster `ray.init()` connects to. Workers write
  parts to the same artifact store, so on several nodes the store's home must be on a shared filesystem.
"""

import json
import os
from collections.abc import Callable
from multiprocessing import get_context
from typing import Any

from aifab.data.chunks import chunks, curate_chunk
from aifab.data.sources import SourceOptions
from aifab.errors import DataError
from aifab.spec import CurationSpec

EXECUTORS = ("local", "ray")
POOL_MIN_FILES = 64  # below this, starting worker processes costs more than it saves


def curate_files(
    paths: list[str],
    opts: SourceOptions,
    curation: CurationSpec,
    artifacts_root: str,
    executor: str = "local",
    on_done: Callable[[int], None] = lambda n: None,
) -> list[dict[str, Any]]:
    """One index entry per path, in the order of `paths`, from `curate_chunk` over consecutive chunks."""
    if executor == "local":
        return _local(paths, opts, curation, artifacts_root, on_done)
    if executor == "ray":
        return _ray(paths, opts, curation, artifacts_root, on_done)
    raise DataError(f"unknown executor {executor!r}: choose one of {', '.join(EXECUTORS)}")


def _one(args: tuple[list[str], SourceOptions, CurationSpec, str]) -> list[dict[str, Any]]:
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
