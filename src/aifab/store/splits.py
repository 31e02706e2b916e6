"""Which split, train or val, a document of a dataset version belongs to: decided by its text alone.

The data line writes each curated document's tokens to the shards of its split; evaluation reads the curated
documents back and must draw held-out items from the val documents only. Both call these functions, so the two
can never disagree. store/ holds them because evaluate/ may not import data/.
"""

import hashlib
from collections.abc import Sequence


def is_val(text: str, val_fraction: float) -> bool:
    """Deterministic split by document content: the same text lands in the same split wherever it lives,
    and exact duplicates never straddle train and val."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


def split_of(text: str, val_fraction: float) -> str:
    return "val" if is_val(text, val_fraction) else "train"


def flipped_index(documents: int, val_docs: int) -> int:
    """The index of the one document that changes split, or -1. Both splits must exist: when every document of
    a corpus hashes to one side, its last document goes to the other."""
    return documents - 1 if val_docs in (0, documents) else -1


def document_splits(texts: Sequence[str], val_fraction: float) -> list[str]:
    """The split of each document of a curated file, in order, exactly as the data line assigned it."""
    splits = [split_of(t, val_fraction) for t in texts]
    flip = flipped_index(len(splits), splits.count("val"))
    if flip >= 0:
        splits[flip] = "train" if splits[flip] == "val" else "val"
    return splits
