"""Deduplication primitives: exact content hashes, MinHash signatures and a banded LSH index.

Everything here is deterministic across processes and machines: word hashes are CRC-32 (zlib), and every
random parameter comes from a SplitMix64 stream seeded by a constant, never from Python's `hash()` or an
unseeded generator. So two engines that feed the same documents in the same order make the same decisions.
"""

import functools
import hashlib
import math
import zlib

import numpy as np
import numpy.typing as npt

Signature = npt.NDArray[np.uint32]

DEFAULT_SEED = 0x5EED_DA7A
_MASK64 = (1 << 64) - 1
_SCRATCH_ELEMS = 1 << 20  # uint64s in one (num_perm, chunk) product matrix: 8 MiB whatever num_perm is


def content_hash(text: str) -> str:
    """sha256 hex digest of the UTF-8 text: the exact-dedup key."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def splitmix64(seed: int, n: int) -> list[int]:
    """`n` 64-bit values from SplitMix64: a fixed, documented stream (numpy's generators may change between
    versions, which would silently change every signature)."""
    out, state = [], seed & _MASK64
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        out.append(z ^ (z >> 31))
    return out


class MinHasher:
    """MinHash signatures over word shingles.

    Words are runs of non-whitespace in the UTF-8 bytes (ASCII whitespace separates). A shingle is
    `shingle_words` consecutive words; a document with fewer words is one shingle; one with no words has
    no shingles. Each word is hashed once (CRC-32), shingles combine word hashes with a multilinear hash,
    and permutation i is the multiply-add-shift hash ((a_i * x + b_i) mod 2^64) >> 32, a 2-independent
    family on 32-bit keys that needs no modulo by a prime, so it runs as two numpy passes and a min.
    Not thread-safe: one instance reuses one scratch matrix.
    """

    def __init__(self, num_perm: int = 128, shingle_words: int = 5, seed: int = DEFAULT_SEED) -> None:
        if num_perm < 1 or shingle_words < 1:
            raise ValueError("num_perm and shingle_words must be >= 1")
        self.num_perm = num_perm
        self.shingle_words = shingle_words
        params = splitmix64(seed, 2 * num_perm + shingle_words + 1)
        self._a = np.array([p | 1 for p in params[:num_perm]], dtype=np.uint64)[:, None]  # odd: a bijection
        self._b = np.array(params[num_perm : 2 * num_perm], dtype=np.uint64)[:, None]
        self._mix = np.array([p | 1 for p in params[2 * num_perm : -1]], dtype=np.uint64)
        self._mix_add = np.uint64(params[-1])
        self._chunk = max(1, _SCRATCH_ELEMS // num_perm)  # shingles per product matrix
        self._scratch = np.empty(num_perm * self._chunk, dtype=np.uint64)

    def shingles(self, text: str) -> npt.NDArray[np.uint64]:
        """32-bit shingle hashes (as uint64), in document order, duplicates kept."""
        words = text.encode("utf-8").split()
        n = len(words)
        if n == 0:
            return np.empty(0, dtype=np.uint64)
        h = np.fromiter(map(zlib.crc32, words), dtype=np.uint64, count=n)
        m = max(n - self.shingle_words + 1, 1)
        acc = np.full(m, self._mix_add, dtype=np.uint64)
        for i in range(min(self.shingle_words, n)):
            acc += h[i : i + m] * self._mix[i]  # wraps mod 2^64, which the hash relies on
        return acc >> np.uint64(32)

    def signature_of(self, shingles: npt.NDArray[np.uint64]) -> Signature:
        """The (num_perm,) uint32 signature of a shingle set; all 0xFFFFFFFF when it is empty."""
        best = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), self._chunk):
            x = shingles[start : start + self._chunk]
            # a contiguous (num_perm, len(x)) view: a strided slice of a wider matrix thrashes the cache
            prod = self._scratch[: self.num_perm * len(x)].reshape(self.num_perm, len(x))
            np.multiply(self._a, x[None, :], out=prod)
            prod += self._b
            # the shift is monotone, so it commutes with min and runs once per perm, not per shingle
            np.minimum(best, prod.min(axis=1), out=best)
        return (best >> np.uint64(32)).astype(np.uint32)

    def signature(self, text: str) -> Signature:
        """The (num_perm,) uint32 MinHash signature of `text`."""
        return self.signature_of(self.shingles(text))


def jaccard_estimate(a: Signature, b: Signature) -> float:
    """Share of equal signature positions: an unbiased estimate of the Jaccard similarity of the shingle sets."""
    return float(np.count_nonzero(a == b)) / len(a)


@functools.cache
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm that minimise the weighted area of false positives (pairs
    below `threshold` that share a band) plus false negatives (pairs above it that share none): datasketch's
    criterion. Plain Python floats on a fixed grid, not numpy, whose SIMD pow may differ in the last bit from
    machine to machine and so, in a near tie, pick other bands on another node."""
    grid = 200
    lo = [threshold * (i + 0.5) / grid for i in range(grid)]  # midpoint rule
    hi = [threshold + (1.0 - threshold) * (i + 0.5) / grid for i in range(grid)]
    best = (math.inf, 1, 1)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = sum(1.0 - (1.0 - s**rows) ** bands for s in lo) / grid * threshold
            fn = sum((1.0 - s**rows) ** bands for s in hi) / grid * (1.0 - threshold)
            err = fp_weight * fp + (1.0 - fp_weight) * fn
            if err < best[0]:
                best = (err, bands, rows)
    return best[1], best[2]


class LSHIndex:
    """Banded LSH over MinHash signatures, verified: a document is a near duplicate only when a candidate
    sharing a band also has estimated Jaccard >= threshold, so band collisions never drop anything."""

    def __init__(self, threshold: float, num_perm: int) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self.num_perm = num_perm
        self.bands, self.rows = optimal_bands(threshold, num_perm)
        # a band's r uint32 values fold into one 64-bit key (a multilinear hash); collisions only add candidates
        self._fold = np.array([p | 1 for p in splitmix64(DEFAULT_SEED ^ 0xBA4D, self.rows)], dtype=np.uint64)
        self._buckets: list[dict[int, list[int]]] = [{} for _ in range(self.bands)]
        self._sigs = np.empty((1024, num_perm), dtype=np.uint32)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _keys(self, sig: Signature) -> list[int]:
        used = sig[: self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)
        keys: list[int] = (used * self._fold).sum(axis=1, dtype=np.uint64).tolist()
        return keys

    def add_if_new(self, sig: Signature) -> bool:
        """False if an indexed signature has estimated Jaccard >= threshold with `sig`; otherwise index it and
        return True. Only kept documents are indexed, so the first of a group of near duplicates wins."""
        if sig.shape != (self.num_perm,):
            raise ValueError(f"signature shape {sig.shape}, expected ({self.num_perm},)")
        keys = self._keys(sig)
        candidates: set[int] = set()
        for bucket, key in zip(self._buckets, keys, strict=True):
            found = bucket.get(key)
            if found is not None:
                candidates.update(found)
        if candidates:
            ids = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
            matches = np.count_nonzero(self._sigs[ids] == sig, axis=1)
            if np.any(matches / self.num_perm >= self.threshold):
                return False
        if self._n == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])
        self._sigs[self._n] = sig
        for bucket, key in zip(self._buckets, keys, strict=True):
            bucket.setdefault(key, []).append(self._n)
        self._n += 1
        return True
