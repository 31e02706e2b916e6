"""Resolving a dataset reference, `NAME` (its newest version) or `NAME:VERSION`, to its row."""

from sqlalchemy import select

from aifab.errors import AifabError, NotFound
from aifab.store.db import Database
from aifab.store.names import check_name
from aifab.store.schema import DatasetVersion


def resolve_dataset(db: Database, ref: str) -> DatasetVersion:
    """The dataset version `ref` names; an AifabError for a malformed reference, NotFound when none matches."""
    name, _, version = ref.partition(":")
    check_name(name, "dataset name")
    if version and not (version.isascii() and version.isdigit()):
        raise AifabError(f"invalid dataset version in {ref!r}: expected a positive integer after ':'")
    with db.session() as s:
        q = select(DatasetVersion).where(DatasetVersion.name == name)
        q = q.where(DatasetVersion.version == int(version)) if version else q
        row = s.scalars(q.order_by(DatasetVersion.version.desc()).limit(1)).first()
    if row is None:
        raise NotFound(f"unknown dataset {ref!r} (see `aifab datasets`)")
    return row
