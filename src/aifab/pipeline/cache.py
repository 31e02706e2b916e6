"""Stage keys and the cache: a stage whose key matches a done StageRun whose outputs are still in the store
is skipped, and those outputs are reused.

A stage's key is the sha256 of its `uses`, its resolved parameters, a fingerprint of the files it reads and
the outputs of every stage upstream of it (canonical JSON).
"""

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from aifab.errors import AifabError
from aifab.pipeline.contracts import DataOutput, EvalOutput, RegisterOutput, StageError, TrainOutput
from aifab.store import Store
from aifab.store.schema import DatasetVersion, ModelVersion, Run, RunStatus, StageRun, StageRunStatus

if TYPE_CHECKING:
    from aifab.pipeline.dag import Pipeline, Stage

OUTPUTS: dict[str, type[DataOutput | TrainOutput | EvalOutput | RegisterOutput]] = {
    "data": DataOutput,
    "train": TrainOutput,
    "evaluate": EvalOutput,
    "register": RegisterOutput,
}


def canonical(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text, so equal keys."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)


def fingerprint(paths: Iterable[str], extensions: Iterable[str] | None = None) -> list[list[Any]]:
    """(path, size, mtime_ns) of every file under `paths`, sorted: a stat per file, no reads. Cheap on a large
    corpus; a touched file makes the stage rerun (and the data stage itself then reuses unchanged files by
    content), while an edit that keeps both size and mtime_ns is missed."""
    from aifab.data.sources import list_files

    files: list[Path] = []
    for p in paths:
        if extensions is not None or not os.path.isdir(p):
            files.extend(list_files([p], list(extensions or [])) if extensions is not None else [Path(p)])
        else:
            files.extend(Path(root) / f for root, _, names in os.walk(p) for f in names)
    out = []
    for f in sorted(set(files)):
        try:
            st = f.stat()
        except OSError as e:
            raise AifabError(f"cannot read {f}: {e.strerror}") from None
        out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def stage_key(pipeline: "Pipeline", stage: "Stage", outputs: dict[str, dict[str, Any]]) -> str:
    """sha256 of what the stage runs with: uses, params, its files' fingerprint and the outputs upstream."""
    upstream = {u: outputs[u] for u in pipeline.upstream(stage.name)}
    body = {
        "uses": stage.uses,
        "params": stage.params,
        "files": fingerprint(stage.deps, stage.extensions) if stage.deps else [],
        "upstream": upstream,
    }
    return hashlib.sha256(canonical(body).encode()).hexdigest()


def cached(store: Store, pipeline: str, stage: "Stage", key: str) -> StageRun | None:
    """The newest `done` StageRun of this stage with this key whose outputs are still in the store."""
    if not stage.cache:
        return None
    with store.db.session() as s:
        rows = list(
            s.scalars(
                select(StageRun)
                .where(StageRun.pipeline == pipeline, StageRun.stage == stage.name, StageRun.input_hash == key)
                .where(StageRun.status == StageRunStatus.DONE)
                .order_by(StageRun.id.desc())
            )
        )
        for row in rows:
            if outputs_exist(store, stage.uses, row.outputs or {}):
                s.expunge(row)
                return row
    return None


def outputs_exist(store: Store, uses: str, outputs: dict[str, Any]) -> bool:
    """Whether what a done stage made is still there: its rows, and the artifacts the next stage reads."""
    shape = OUTPUTS.get(uses)
    if shape is not None:
        try:
            shape.from_json(outputs)
        except StageError:  # made by an older aifab, or damaged: not something the next stage can read
            return False
    with store.db.session() as s:
        if uses == "data":
            ds = s.get(DatasetVersion, outputs.get("dataset_version_id"))
            return ds is not None and store.artifacts.exists(ds.manifest_digest)
        if uses == "train":
            run = s.get(Run, outputs.get("run_id"))
            digest = str(outputs.get("checkpoint_digest") or "")
            return (
                run is not None
                and run.status == RunStatus.COMPLETED
                and bool(digest)
                and store.artifacts.exists(digest)
            )
        if uses == "register":
            return s.get(ModelVersion, outputs.get("model_version_id")) is not None
    return True  # evaluate and command stages leave nothing in the store but their outputs themselves
