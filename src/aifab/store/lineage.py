"""Lineage edges: `src` was an input to `dst`. Kinds are 'dataset', 'run', 'model'."""

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from aifab.store.schema import LineageEdge


def link(s: Session, src: tuple[str, object], dst: tuple[str, object], relation: str) -> None:
    """Record an edge once; recording it again is a no-op."""
    (src_kind, src_id), (dst_kind, dst_id) = src, dst
    exists = s.scalar(
        select(LineageEdge.id).where(
            LineageEdge.src_kind == src_kind,
            LineageEdge.src_id == str(src_id),
            LineageEdge.dst_kind == dst_kind,
            LineageEdge.dst_id == str(dst_id),
            LineageEdge.relation == relation,
        )
    )
    if exists is None:
        s.add(
            LineageEdge(
                src_kind=src_kind,
                src_id=str(src_id),
                dst_kind=dst_kind,
                dst_id=str(dst_id),
                relation=relation,
            )
        )


def edges_of(s: Session, kind: str, id_: object) -> list[LineageEdge]:
    """Every edge into or out of one node."""
    node = str(id_)
    return list(
        s.scalars(
            select(LineageEdge)
            .where(
                or_(
                    (LineageEdge.src_kind == kind) & (LineageEdge.src_id == node),
                    (LineageEdge.dst_kind == kind) & (LineageEdge.dst_id == node),
                )
            )
            .order_by(LineageEdge.id)
        )
    )


def upstream(s: Session, kind: str, id_: object) -> list[tuple[str, str, str]]:
    """All ancestors of a node as (kind, id, relation), nearest first."""
    seen: set[tuple[str, str]] = set()
    out: list[tuple[str, str, str]] = []
    frontier = [(kind, str(id_))]
    while frontier:
        k, i = frontier.pop(0)
        for e in s.scalars(select(LineageEdge).where(LineageEdge.dst_kind == k, LineageEdge.dst_id == i)):
            node = (e.src_kind, e.src_id)
            if node not in seen:
                seen.add(node)
                out.append((e.src_kind, e.src_id, e.relation))
                frontier.append(node)
    return out
