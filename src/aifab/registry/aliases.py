"""Alias moves with their history: every move of `name@alias` appends an `AliasEvent` in the same transaction
as the move itself, so the history is complete and `rollback` can read it.

`move_alias(session, ...)` is the one place an alias row changes; `record_promotion` stores a promotion decision
and, when it moves the alias, the move and its event, all in one transaction. `rollback` undoes the alias's
last move that is not itself undone; `alias_history` lists the moves oldest first.
"""

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from aifab.errors import AifabError, NotFound
from aifab.store import Store
from aifab.store.names import check_name
from aifab.store.schema import AliasEvent, AliasReason, ModelAlias, ModelVersion, Promotion


class AliasConflict(AifabError):
    """The alias moved while a promotion was being decided: the decision compared against a stale holder."""


def move_alias(
    s: Session,
    name: str,
    alias: str,
    model_version_id: int,
    reason: AliasReason,
    promotion_id: int | None = None,
) -> AliasEvent | None:
    """Point `name@alias` at `model_version_id` inside session `s` and append its AliasEvent; None (and nothing
    written) when the alias already points there, since that is not a move."""
    row = s.get(ModelAlias, (name, alias))
    from_id = row.model_version_id if row is not None else None
    if from_id == model_version_id:
        return None
    if row is None:
        s.add(ModelAlias(name=name, alias=alias, model_version_id=model_version_id))
    else:
        row.model_version_id = model_version_id
    event = AliasEvent(
        name=name,
        alias=alias,
        from_version_id=from_id,
        to_version_id=model_version_id,
        reason=str(reason),
        promotion_id=promotion_id,
    )
    s.add(event)
    s.flush()
    return event


def holder(store: Store, name: str, alias: str) -> ModelVersion | None:
    """The version `name@alias` points at, or None when the alias is not set."""
    with store.db.session() as s:
        return _holder(s, name, alias)


def _holder(s: Session, name: str, alias: str) -> ModelVersion | None:
    q = select(ModelVersion).join(ModelAlias, ModelAlias.model_version_id == ModelVersion.id)
    return s.scalar(q.where(ModelAlias.name == name, ModelAlias.alias == alias))


def alias_history(store: Store, name: str, alias: str | None = None) -> list[AliasEvent]:
    """Every recorded move of `name`'s aliases (or of `name@alias` only), oldest first. A version deleted since
    shows as None in from_version_id / to_version_id."""
    check_name(name, "model name")
    q = select(AliasEvent).where(AliasEvent.name == name)
    if alias is not None:
        q = q.where(AliasEvent.alias == check_name(alias, "alias"))
    with store.db.session() as s:
        return list(s.scalars(q.order_by(AliasEvent.id)))


def rollback(store: Store, name: str, alias: str) -> ModelVersion:
    """Move `name@alias` back to the version it held before its last move, recorded with reason rollback.

    Rollbacks stack like undo: a rollback undoes the newest move not already undone, so a second rollback goes
    one move further back (never forward again onto the version just rolled back from). Raises NotFound when the
    alias is not set or has no recorded history, and AifabError when there is no earlier holder (the move to undo
    created the alias) or that holder was deleted."""
    check_name(name, "model name")
    check_name(alias, "alias")
    with store.db.session() as s:
        current = _holder(s, name, alias)
        if current is None:
            raise NotFound(f"{name}@{alias} is not set: nothing to roll back")
        events = list(s.scalars(_events(name, alias).order_by(AliasEvent.id.desc())))
        target = _undo_target(events)
        if target is None:
            raise NotFound(f"{name}@{alias} has no recorded moves to undo (it was set before aliases had a history)")
        if target.from_version_id is None:
            created = target is events[-1]
            why = "it was created by that move" if created else "that version was deleted"
            raise AifabError(f"{name}@{alias} has no earlier holder to roll back to: {why} ({_when(target)})")
        back = s.get(ModelVersion, target.from_version_id)
        assert back is not None  # the foreign key nulls from_version_id when a version is deleted
        move_alias(s, name, alias, back.id, AliasReason.ROLLBACK)
        return back


def _events(name: str, alias: str) -> Any:
    return select(AliasEvent).where(AliasEvent.name == name, AliasEvent.alias == alias)


def _undo_target(newest_first: list[AliasEvent]) -> AliasEvent | None:
    """The newest move that no later rollback has undone: each rollback cancels the newest move before it that is
    not cancelled yet, as an undo stack does."""
    pending = 0
    for ev in newest_first:
        if ev.reason == AliasReason.ROLLBACK:
            pending += 1
        elif pending:
            pending -= 1
        else:
            return ev
    return None


def _when(ev: AliasEvent) -> str:
    return f"{ev.reason} at {ev.at:%Y-%m-%d %H:%M:%S} UTC"


@dataclass(frozen=True)
class Decision:
    """What `record_promotion` stored: the Promotion row's id and whether the alias moved."""

    promotion_id: int
    moved: bool


def record_promotion(
    store: Store,
    *,
    name: str,
    alias: str,
    candidate_id: int,
    champion_id: int | None,
    verdicts: list[dict[str, Any]],
    passed: bool,
    force: bool,
    expected_holder_id: int | None,
) -> Decision:
    """Store a promotion decision and, when every gate passed or `force` is set, move `name@alias` to the
    candidate, all in one transaction. The move's event is linked to the decision, with reason promote, or forced
    when it went past a failure (then the row says forced too). `expected_holder_id` is who held the alias when
    the decision began: if the alias moved since, nothing is written and AliasConflict says so."""
    move = passed or force
    with store.db.session() as s:
        now = _holder(s, name, alias)
        if (now.id if now is not None else None) != expected_holder_id:
            was = "unset" if expected_holder_id is None else f"version id {expected_holder_id}"
            got = "unset" if now is None else f"{now.name}:{now.version}"
            raise AliasConflict(f"{name}@{alias} moved from {was} to {got} while deciding; promote again")
        row = Promotion(
            name=name,
            alias=alias,
            candidate_id=candidate_id,
            champion_id=champion_id,
            passed=passed,
            forced=move and not passed,
            moved=move,
            gates=verdicts,
        )
        s.add(row)
        s.flush()
        if move:
            reason = AliasReason.PROMOTE if passed else AliasReason.FORCED
            move_alias(s, name, alias, candidate_id, reason, promotion_id=row.id)
        return Decision(row.id, move)


def promotions(store: Store, name: str, alias: str | None = None) -> list[Promotion]:
    """Stored promotion decisions of `name` (or of `name@alias`), oldest first."""
    q = select(Promotion).where(Promotion.name == check_name(name, "model name"))
    if alias is not None:
        q = q.where(Promotion.alias == check_name(alias, "alias"))
    with store.db.session() as s:
        return list(s.scalars(q.order_by(Promotion.id)))


def promotion(store: Store, promotion_id: int) -> Promotion:
    """One stored decision; NotFound names the id."""
    with store.db.session() as s:
        row = s.get(Promotion, promotion_id)
    if row is None:
        raise NotFound(f"no promotion {promotion_id} (see `aifab models history NAME`)")
    return row
