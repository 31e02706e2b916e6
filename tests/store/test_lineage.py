"""Lineage edges: idempotent links, transitive upstream walks, edges in both directions."""

from sqlalchemy import func, select

from aifab.store import Store
from aifab.store.lineage import edges_of, link, upstream
from aifab.store.schema import LineageEdge


def _count(store: Store) -> int:
    with store.db.session() as s:
        return s.scalar(select(func.count()).select_from(LineageEdge)) or 0


def test_link_is_idempotent_within_and_across_sessions(store: Store) -> None:
    with store.db.session() as s:
        link(s, ("dataset", 1), ("run", "r1"), "input")
        link(s, ("dataset", 1), ("run", "r1"), "input")  # same session, before commit
    with store.db.session() as s:
        link(s, ("dataset", "1"), ("run", "r1"), "input")  # ids are compared as strings
    assert _count(store) == 1


def test_link_distinguishes_relation_and_direction(store: Store) -> None:
    with store.db.session() as s:
        link(s, ("dataset", 1), ("model", 1), "trained_on")
        link(s, ("dataset", 1), ("model", 1), "evaluated_on")
        link(s, ("model", 1), ("dataset", 1), "generated")
        link(s, ("run", 1), ("model", 1), "produced")  # same ids, other kind
    assert _count(store) == 4


def test_upstream_walks_dataset_run_model_nearest_first(store: Store) -> None:
    with store.db.session() as s:
        link(s, ("dataset", 7), ("run", "r1"), "input")
        link(s, ("run", "r1"), ("model", 3), "produced")
    with store.db.session() as s:
        assert upstream(s, "model", 3) == [("run", "r1", "produced"), ("dataset", "7", "input")]
        assert upstream(s, "run", "r1") == [("dataset", "7", "input")]
        assert upstream(s, "dataset", 7) == []


def test_upstream_lists_each_ancestor_once(store: Store) -> None:
    # the registry links the dataset to the model directly as well as through the run
    with store.db.session() as s:
        link(s, ("dataset", 1), ("run", "r1"), "input")
        link(s, ("run", "r1"), ("model", 1), "produced")
        link(s, ("dataset", 1), ("model", 1), "trained_on")
    with store.db.session() as s:
        ups = upstream(s, "model", 1)
    assert sorted(ups) == [("dataset", "1", "trained_on"), ("run", "r1", "produced")]


def test_upstream_goes_deeper_than_two_hops(store: Store) -> None:
    with store.db.session() as s:
        link(s, ("dataset", 1), ("run", "train"), "input")
        link(s, ("run", "train"), ("model", 1), "produced")
        link(s, ("model", 1), ("run", "finetune"), "base")
        link(s, ("dataset", 2), ("run", "finetune"), "input")
        link(s, ("run", "finetune"), ("model", 2), "produced")
    with store.db.session() as s:
        ups = upstream(s, "model", 2)
    nodes = [(k, i) for k, i, _ in ups]
    assert nodes[0] == ("run", "finetune")
    assert set(nodes) == {("run", "finetune"), ("model", "1"), ("dataset", "2"), ("run", "train"), ("dataset", "1")}
    assert len(nodes) == len(set(nodes))
    assert nodes.index(("model", "1")) < nodes.index(("run", "train")) < nodes.index(("dataset", "1"))


def test_upstream_is_breadth_first(store: Store) -> None:
    """Nearest first: no ancestor is listed before one that is fewer hops away."""
    depth = {("run", "a"): 1, ("run", "b"): 1, ("run", "c"): 2, ("run", "d"): 2, ("run", "e"): 3}
    with store.db.session() as s:
        link(s, ("run", "a"), ("model", 1), "x")
        link(s, ("run", "b"), ("model", 1), "x")
        link(s, ("run", "d"), ("run", "a"), "x")
        link(s, ("run", "c"), ("run", "b"), "x")
        link(s, ("run", "e"), ("run", "c"), "x")
    with store.db.session() as s:
        ups = upstream(s, "model", 1)
    depths = [depth[(k, i)] for k, i, _ in ups]
    assert sorted(depths) == [1, 1, 2, 2, 3]
    assert depths == sorted(depths)


def test_upstream_ignores_unrelated_nodes(store: Store) -> None:
    with store.db.session() as s:
        link(s, ("dataset", 1), ("run", "a"), "input")
        link(s, ("dataset", 2), ("run", "b"), "input")
        link(s, ("run", "b"), ("model", 9), "produced")
    with store.db.session() as s:
        assert upstream(s, "run", "a") == [("dataset", "1", "input")]
        assert ("dataset", "1", "input") not in upstream(s, "model", 9)


def test_upstream_terminates_on_a_cycle(store: Store) -> None:
    with store.db.session() as s:
        link(s, ("run", "a"), ("run", "b"), "x")
        link(s, ("run", "b"), ("run", "a"), "x")
    with store.db.session() as s:
        ups = upstream(s, "run", "a")
    assert ("run", "b", "x") in ups
    assert len(ups) <= 2


def test_edges_of_returns_both_directions(store: Store) -> None:
    with store.db.session() as s:
        link(s, ("dataset", 1), ("run", "r1"), "input")
        link(s, ("run", "r1"), ("model", 1), "produced")
        link(s, ("dataset", 2), ("run", "r2"), "input")
    with store.db.session() as s:
        edges = [(e.src_kind, e.src_id, e.dst_kind, e.dst_id, e.relation) for e in edges_of(s, "run", "r1")]
        assert edges == [("dataset", "1", "run", "r1", "input"), ("run", "r1", "model", "1", "produced")]
        only_out = [(e.dst_kind, e.dst_id) for e in edges_of(s, "dataset", 1)]
        assert only_out == [("run", "r1")]
        only_in = [(e.src_kind, e.src_id) for e in edges_of(s, "model", "1")]
        assert only_in == [("run", "r1")]
        assert edges_of(s, "model", 99) == []


def test_edges_of_matches_kind_as_well_as_id(store: Store) -> None:
    with store.db.session() as s:
        link(s, ("dataset", 5), ("run", "r"), "input")
    with store.db.session() as s:
        assert edges_of(s, "model", 5) == []
        assert len(edges_of(s, "dataset", 5)) == 1
