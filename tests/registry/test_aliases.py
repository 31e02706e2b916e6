"""Every alias move has a history: register, set, promote, forced, rollback each append one event in the same
transaction as the move; rollback undoes moves like an undo stack and says clearly when there is nothing to
undo; a promotion is stored whether or not it moves the alias, and refuses to record against a stale holder."""

import pytest
from sqlalchemy import delete, select

from aifab.errors import AifabError, NotFound
from aifab.registry.aliases import (
    AliasConflict,
    alias_history,
    holder,
    promotion,
    promotions,
    record_promotion,
    rollback,
)
from aifab.registry.models import register, resolve, set_alias
from aifab.store import Store
from aifab.store.schema import AliasEvent, AliasReason, ModelAlias, ModelVersion, Promotion


def _register(store: Store, name: str = "m", aliases: tuple[str, ...] = ()) -> int:
    weights = store.artifacts.put_bytes(b"weights " + name.encode())
    tok = store.artifacts.put_bytes(b"tokenizer")
    mv = register(
        store, name, weights_digest=weights, tokenizer_digest=tok, config={}, params_count=1, metrics={},
        aliases=aliases,
    )  # fmt: skip
    return mv.id


def _moves(store: Store, name: str = "m", alias: str | None = "prod") -> list[tuple[int | None, int | None, str]]:
    return [(e.from_version_id, e.to_version_id, e.reason) for e in alias_history(store, name, alias)]


def test_register_and_set_record_each_move_with_from_and_to(store: Store) -> None:
    v1 = _register(store, aliases=("prod", "latest"))
    v2 = _register(store, aliases=("latest",))
    set_alias(store, "m:2", "prod")
    set_alias(store, "m:2", "prod")  # already there: not a move, nothing recorded
    assert _moves(store) == [(None, v1, "register"), (v1, v2, "set")]
    assert _moves(store, alias="latest") == [(None, v1, "register"), (v1, v2, "register")]
    assert [e.alias for e in alias_history(store, "m")] == ["prod", "latest", "latest", "prod"]
    assert alias_history(store, "other") == []


def test_set_alias_records_the_reason_and_promotion_it_is_given(store: Store) -> None:
    v1 = _register(store)
    set_alias(store, "m:1", "prod", reason=AliasReason.PROMOTE)
    [ev] = alias_history(store, "m", "prod")
    assert (ev.reason, ev.to_version_id, ev.promotion_id) == ("promote", v1, None)


def test_rollback_moves_back_and_stacks_like_undo(store: Store) -> None:
    v1, v2, v3 = _register(store, aliases=("prod",)), _register(store), _register(store)
    set_alias(store, "m:2", "prod")
    set_alias(store, "m:3", "prod")
    assert rollback(store, "m", "prod").id == v2
    assert resolve(store, "m@prod").id == v2
    assert rollback(store, "m", "prod").id == v1  # a second rollback goes further back, not forward to m:3
    assert _moves(store) == [
        (None, v1, "register"), (v1, v2, "set"), (v2, v3, "set"), (v3, v2, "rollback"), (v2, v1, "rollback"),
    ]  # fmt: skip
    with pytest.raises(AifabError, match=r"m@prod has no earlier holder to roll back to: it was created by that move"):
        rollback(store, "m", "prod")
    assert resolve(store, "m@prod").id == v1  # a refused rollback changes nothing
    set_alias(store, "m:3", "prod")  # a new move after rollbacks is undone first
    assert rollback(store, "m", "prod").id == v1


def test_rollback_of_an_unset_or_unrecorded_alias_says_so(store: Store) -> None:
    _register(store)
    with pytest.raises(NotFound, match=r"m@prod is not set: nothing to roll back"):
        rollback(store, "m", "prod")
    with store.db.session() as s:  # an alias set before aliases had a history (an older store)
        s.add(ModelAlias(name="m", alias="prod", model_version_id=resolve(store, "m:1").id))
    with pytest.raises(NotFound, match=r"m@prod has no recorded moves to undo"):
        rollback(store, "m", "prod")
    with pytest.raises(AifabError, match="invalid alias"):
        rollback(store, "m", "../prod")


def test_rollback_to_a_deleted_version_is_refused_and_names_why(store: Store) -> None:
    v1 = _register(store, aliases=("prod",))
    _register(store)
    set_alias(store, "m:2", "prod")
    with store.db.session() as s:
        s.execute(delete(ModelVersion).where(ModelVersion.id == v1))
    with pytest.raises(AifabError, match=r"no earlier holder to roll back to: that version was deleted"):
        rollback(store, "m", "prod")
    assert resolve(store, "m@prod").version == 2


def _promote(store: Store, cand: int, *, passed: bool, force: bool = False, expected: int | None) -> int:
    d = record_promotion(
        store, name="m", alias="prod", candidate_id=cand, champion_id=expected,
        verdicts=[{"gate": "t/acc", "passed": passed}], passed=passed, force=force, expected_holder_id=expected,
    )  # fmt: skip
    assert d.moved is (passed or force)
    return d.promotion_id


def test_promotions_are_stored_moved_or_not_and_linked_to_their_move(store: Store) -> None:
    v1, v2, v3 = _register(store, aliases=("prod",)), _register(store), _register(store)
    refused = _promote(store, v2, passed=False, expected=v1)
    assert holder(store, "m", "prod").id == v1  # type: ignore[union-attr]
    passed = _promote(store, v2, passed=True, expected=v1)
    forced = _promote(store, v3, passed=False, force=True, expected=v2)
    rows = {p.id: p for p in promotions(store, "m", "prod")}
    assert [(rows[i].passed, rows[i].forced, rows[i].moved) for i in (refused, passed, forced)] == [
        (False, False, False), (True, False, True), (False, True, True),
    ]  # fmt: skip
    assert promotion(store, refused).gates == [{"gate": "t/acc", "passed": False}]
    events = alias_history(store, "m", "prod")
    assert [(e.reason, e.promotion_id) for e in events] == [("register", None), ("promote", passed), ("forced", forced)]
    assert resolve(store, "m@prod").id == v3
    # a forced move is an ordinary move to roll back
    assert rollback(store, "m", "prod").id == v2


def test_force_on_a_passing_promotion_is_not_recorded_as_forced(store: Store) -> None:
    v1 = _register(store)
    pid = _promote(store, v1, passed=True, force=True, expected=None)
    assert promotion(store, pid).forced is False
    assert _moves(store) == [(None, v1, "promote")]


def test_a_promotion_against_a_stale_holder_writes_nothing(store: Store) -> None:
    v1, v2 = _register(store, aliases=("prod",)), _register(store)
    set_alias(store, "m:2", "prod")  # moved after the decision began with m:1 holding it
    with pytest.raises(AliasConflict, match=r"m@prod moved from version id \d+ to m:2 while deciding"):
        _promote(store, v2, passed=True, expected=v1)
    with store.db.session() as s:
        assert s.scalars(select(Promotion)).all() == []
        assert len(s.scalars(select(AliasEvent)).all()) == 2


def test_an_unknown_promotion_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="no promotion 7"):
        promotion(store, 7)
