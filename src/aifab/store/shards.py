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

    def loader(self, split: str, batch_size: int, context_len: int, **kw: Any) -> "BatchLoader":
        return BatchLoader(self, split, batch_size, context_len, **kw)


class BatchLoader:
    """(x, y) batches of `batch_size` windows from one split: inputs and next-token targets, each (B, T) int64.

    Batch k is a pure function of (seed, k): `batch_at(k)` gives the same batch whether the loader iterated
    there from 0 or started at `position=k`, so a resumed trainer sees exactly the batches it would have seen.
    - order="random": windows at random offsets, shards weighted by size, drawn from a generator seeded by
      (seed, k).
    - order="sequential": consecutive non-overlapping windows through the shards in order, wrapping around
      (a full pass over the split when iterated from 0).
    """

    def __init__(
        self,
        shards: TokenShards,
        split: str,
        batch_size: int,
        context_len: int,
        *,
        seed: int = 0,
        order: str = "random",
        position: int = 0,
    ) -> None:
        if order not in ("random", "sequential"):
            raise ValueError(f"order must be 'random' or 'sequential', got {order!r}")
        self.arrays = [a for a in shards.arrays.get(split, []) if len(a) > context_len]
        if not self.arrays:
            raise ArtifactError(f"the {split} split has no shard longer than the context ({context_len} tokens)")
        self.split, self.B, self.T = split, batch_size, context_len
        self.seed, self.order, self.position = seed, order, position
        sizes = np.array([len(a) - context_len for a in self.arrays], dtype=np.float64)
        self._weights = sizes / sizes.sum()
        # sequential: window w of shard s starts at w*T; cumulative counts map a global window to its shard
        self._windows = np.array([(len(a) - 1) // context_len for a in self.arrays], dtype=np.int64)
        self._first = np.concatenate([[0], np.cumsum(self._windows)])

    @property
    def windows(self) -> int:
        """Non-overlapping windows in one sequential pass."""
        return int(self._first[-1])

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        batch = self.batch_at(self.position)
        self.position += 1
        return batch

    def batch_at(self, k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        B, T = self.B, self.T
        if self.order == "random":
            rng = np.random.default_rng((self.seed, k))
            which = rng.choice(len(self.arrays), size=B, p=self._weights)
            starts = [int(rng.integers(0, len(self.arrays[s]) - T)) for s in which]
        else:
            globals_ = (k * B + np.arange(B)) % self.windows
            which = np.searchsorted(self._first, globals_, side="right") - 1
            starts = [int(g - self._first[s]) * T for g, s in zip(globals_, which, strict=True)]
        x = np.empty((B, T), dtype=np.int64)
        y = np.empty((B, T), dtype=np.int64)
        for row, (shard, start) in enumerate(zip(which, starts, strict=True)):
            window = self.arrays[shard][start : start + T + 1].astype(np.int64)
            x[row], y[row] = window[:-1], window[1:]
        return x, y
