"""Held-out documents of a registered dataset version, and the check that an item never appeared in training.

A dataset version's curated Parquet file holds every document; each one's split is decided by its text
(`aifab.store.splits`), exactly as the data line decided it. `held_out` reads the file once, keeps the val
documents, and drops any val document whose text occurs inside a train document (a near-duplicate that survived
deduplication would let a model score a memorised text). `TrainText.contains(passage)` is the same check for an
item cut from a val document: a passage that occurs in a train document is not held out, and is never used.
"""

from dataclasses import dataclass, field

from aifab.errors import AifabError
from aifab.store import Store
from aifab.store.schema import DatasetVersion
from aifab.store.splits import document_splits

SEPARATOR = "\x00"  # between train documents in the joined text: no document holds it, so no match spans two


@dataclass
class TrainText:
    """Every train document of a version, to test whether a passage occurs in any of them.

    A passage that spans a line break can occur in a train document only if each of its complete lines (those
    after its first line break and before its last) is a whole line there, so a set of line hashes answers
    most questions without scanning the text; the rest scan the joined text."""

    joined: str
    lines: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, texts: list[str]) -> "TrainText":
        lines: set[int] = set()
        for text in texts:
            lines.update(hash(line) for line in text.split("\n"))
        return cls(SEPARATOR.join(texts), lines)

    def contains(self, passage: str) -> bool:
        if SEPARATOR in passage:  # it could match across two documents of the joined text: look in each
            return any(passage in text for text in self.joined.split(SEPARATOR))
        parts = passage.split("\n")
        complete = parts[1:-1]
        if complete and any(hash(line) not in self.lines for line in complete):
            return False
        return passage in self.joined


@dataclass
class HeldOut:
    """The held-out documents of one dataset version, in file order, and the text of its train documents."""

    dataset: str  # name:version
    dataset_version_id: int
    curated_digest: str
    val_fraction: float
    documents: list[str]  # val documents whose text occurs in no train document
    leaked: int  # val documents dropped because a train document contains their text
    train: TrainText


def held_out(store: Store, ds: DatasetVersion) -> HeldOut:
    """Read a version's curated documents (digest verified) and split them; an AifabError when the version has
    no curated file (made before curation was recorded) or no val document survives."""
    import pyarrow.parquet as pq

    ref = f"{ds.name}:{ds.version}"
    if not ds.curated_digest:
        raise AifabError(f"dataset {ref} records no curated documents, so its held-out split cannot be read")
    val_fraction = float((ds.params or {}).get("val_fraction", 0.05))
    texts: list[str] = (
        pq.read_table(store.artifacts.verified_path(ds.curated_digest), columns=["text"]).column("text").to_pylist()
    )
    splits = document_splits(texts, val_fraction)
    train = TrainText.of([t for t, s in zip(texts, splits, strict=True) if s == "train"])
    val = [t for t, s in zip(texts, splits, strict=True) if s == "val"]
    kept = [t for t in val if not train.contains(t)]
    if not kept:
        raise AifabError(f"dataset {ref} has no held-out document that is not also in its training split")
    return HeldOut(ref, ds.id, ds.curated_digest, val_fraction, kept, len(val) - len(kept), train)
