"""Token shards: the on-disk format the data line writes and the trainer and evaluator read.

A dataset version is one manifest artifact (JSON) that lists its shard artifacts per split. Each shard is
raw little-endian token ids (`dtype`, uint16 while the vocabulary fits) with documents separated by the
tokenizer's end-of-text id. It lives in store/ because data/ writes it and train/ reads it, and those two
never import each other.
"""

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from aifab.errors import ArtifactError
from aifab.store.artifacts import ArtifactStore

FORMAT = "aifab.shards/1"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Manifest:
    tokenizer_digest: str
    vocab_size: int
    eot_id: int
    dtype: str
    splits: dict[str, list[dict[str, Any]]]  # split -> [{"digest": str, "tokens": int}]

    def tokens(self, split: str) -> int:
        return sum(int(s["tokens"]) for s in self.splits.get(split, []))

    def to_json(self) -> bytes:
        body = {"format": FORMAT, **self.__dict__}
        return json.dumps(body, sort_keys=True, indent=1).encode()

    @classmethod
    def load(cls, store: ArtifactStore, digest: str) -> "Manifest":
        raw = store.get_bytes(digest)
        try:
            body = json.loads(raw)
            if body.pop("format") != FORMAT:
                raise ValueError("unknown format")
            return cls(**body)
        except (ValueError, TypeError, KeyError) as e:
            raise ArtifactError(f"artifact {digest} is not a token-shard manifest: {e}") from None


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class TokenShards:
    """Memory-mapped shards of one dataset version, verified once on open."""

    def __init__(self, store: ArtifactStore, manifest_digest: str) -> None:
        self.manifest = Manifest.load(store, manifest_digest)
        dtype = np.dtype(self.manifest.dtype)
        self.arrays: dict[str, list[npt.NDArray[Any]]] = {
            split: [np.memmap(store.verified_path(s["digest"]), dtype=dtype, mode="r") for s in shards]
            for split, shards in self.manifest.splits.items()
        }

    def check_fits(self, context_len: int) -> None:
        for split in SPLITS:
            longest = max((len(a) for a in self.arrays.get(split, [])), default=0)
            if longest < context_len + 1:
                raise ArtifactError(
                    f"the {split} split has {longest} tokens in its largest shard; "
                    f"it needs at least {context_len + 1} for context length {context_len}"
                )

    def batch(
        self, split: str, batch_size: int, context_len: int, rng: np.random.Generator
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """`batch_size` random windows: inputs x and next-token targets y, each (B, T) int64."""
        arrays = [a for a in self.arrays[split] if len(a) > context_len]
        sizes = np.array([len(a) - context_len for a in arrays], dtype=np.float64)
        which = rng.choice(len(arrays), size=batch_size, p=sizes / sizes.sum())
        x = np.empty((batch_size, context_len), dtype=np.int64)
        y = np.empty((batch_size, context_len), dtype=np.int64)
        for row, shard in enumerate(which):
            arr = arrays[shard]
            start = int(rng.integers(0, len(arr) - context_len))
            window = arr[start : start + context_len + 1].astype(np.int64)
            x[row], y[row] = window[:-1], window[1:]
        return x, y
