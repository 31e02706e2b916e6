"""Register model versions, move aliases, and resolve `name`, `name:VERSION` or `name@ALIAS`."""

from typing import Any

from sqlalchemy import func, select

from aifab.errors import NotFound
from aifab.registry.aliases import move_alias
from aifab.store import Store
from aifab.store.lineage import link
from aifab.store.names import ModelRef, check_name
from aifab.store.schema import AliasReason, ModelAlias, ModelVersion


def register(
    store: Store,
    name: str,
    *,
    weights_digest: str,
    tokenizer_digest: str,
    config: dict[str, Any],
    params_count: int,
    metrics: dict[str, Any],
    run_id: str | None = None,
    dataset_version_id: int | None = None,
    aliases: tuple[str, ...] = (),
    base_model_id: int | None = None,
    generation: dict[str, Any] | None = None,
) -> ModelVersion:
    """Add the next version of `name`, link it to its run, dataset and (when fine-tuned) base model, and point
    `aliases` at it (each move recorded with reason register). `generation` is how to generate with it (the dict
    `aifab.nn.hf.read_generation` returns; `{}` when unknown), stored as `ModelVersion.generation`."""
    check_name(name, "model name")
    for alias in aliases:
        check_name(alias, "alias")
    for digest in (weights_digest, tokenizer_digest):
        store.artifacts.verified_path(digest)  # refuse to register weights that are not in the store
    with store.db.session() as s:
        version = (s.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name)) or 0) + 1
        mv = ModelVersion(
            name=name,
            version=version,
            run_id=run_id,
            weights_digest=weights_digest,
            tokenizer_digest=tokenizer_digest,
            config=config,
            params_count=params_count,
            metrics=metrics,
            generation=dict(generation or {}),
        )
        s.add(mv)
        s.flush()
        if run_id is not None:
            link(s, ("run", run_id), ("model", mv.id), "produced")
        if dataset_version_id is not None:
            link(s, ("dataset", dataset_version_id), ("model", mv.id), "trained_on")
        if base_model_id is not None:
            link(s, ("model", base_model_id), ("model", mv.id), "fine_tuned")
        for alias in aliases:
            move_alias(s, name, alias, mv.id, AliasReason.REGISTER)
        return mv


def set_alias(
    store: Store, ref: str, alias: str, reason: AliasReason = AliasReason.SET, promotion_id: int | None = None
) -> ModelVersion:
    """Point `name@alias` at the version `ref` resolves to, and record the move (an AliasEvent with `reason`,
    linked to `promotion_id` when a promotion decided it) in the same transaction. Pointing an alias at the
    version it already holds is not a move: nothing is recorded."""
    check_name(alias, "alias")
    mv = resolve(store, ref)
    with store.db.session() as s:
        move_alias(s, mv.name, alias, mv.id, reason, promotion_id)
    return mv


def resolve(store: Store, ref: str | ModelRef) -> ModelVersion:
    """The model version a reference names; NotFound says what exists instead."""
    r = ref if isinstance(ref, ModelRef) else ModelRef.parse(ref)
    with store.db.session() as s:
        q = select(ModelVersion).where(ModelVersion.name == r.name)
        if r.alias is not None:
            q = q.join(ModelAlias, ModelAlias.model_version_id == ModelVersion.id).where(ModelAlias.alias == r.alias)
        elif r.version is not None:
            q = q.where(ModelVersion.version == r.version)
        mv = s.scalar(q.order_by(ModelVersion.version.desc()).limit(1))
        if mv is not None:
            return mv
        names = sorted(set(s.scalars(select(ModelVersion.name))))
    known = f"registered models: {', '.join(names)}" if names else "no models are registered yet"
    raise NotFound(f"unknown model {str(r)!r} ({known})")


def aliases_of(store: Store, model_version_id: int) -> list[str]:
    with store.db.session() as s:
        rows = s.scalars(select(ModelAlias.alias).where(ModelAlias.model_version_id == model_version_id))
        return sorted(rows)


def list_versions(store: Store, name: str | None = None) -> list[ModelVersion]:
    with store.db.session() as s:
        q = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)
        if name is not None:
            q = q.where(ModelVersion.name == name)
        return list(s.scalars(q))
