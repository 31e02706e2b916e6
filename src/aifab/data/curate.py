"""Curation stages of the data line, with per-stage counts.

`Curator` runs the per-document stages (normalize -> filter -> pii); it depends on nothing but the document,
so any worker may run it on any slice of the corpus and the counts are summed afterwards (`merge_counts`).
`Deduplicator` runs the corpus-wide stages (exact_dedup -> near_dedup); it is stateful and order-dependent
(the first occurrence wins), so it must see every document once, in corpus order, in one place. Its
expensive part, `fingerprint`, is pure and may run in parallel; only `keep_fingerprint` must be sequential.
"""

import dataclasses
import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Literal

from aifab.data.dedup import LSHIndex, MinHasher, Signature
from aifab.data.pii import redact
from aifab.data.sources import Document
from aifab.spec import CurationSpec

# ASCII characters that are letters, digits or whitespace by str.isalnum / str.isspace (not "_")
_ASCII_NON_SYMBOLS = bytes(c for c in range(128) if chr(c).isalnum() or chr(c).isspace())
# runs of characters that are not symbols: re's \w is isalnum() plus "_", and \s is isspace()
_NON_SYMBOL_RUNS = re.compile(r"[^\W_]+|\s+")


@dataclass
class StageCount:
    """One row of the per-stage report (JSON-serialisable via `dataclasses.asdict`)."""

    stage: str  # "normalize" | "filter" | "pii" | "exact_dedup" | "near_dedup"
    docs_in: int = 0
    docs_out: int = 0
    bytes_removed: int = 0  # UTF-8 bytes of dropped documents, or the net shrink of a rewrite (never negative)
    reasons: dict[str, int] = field(default_factory=dict)  # reason -> documents affected

    def add(self, reason: str, n: int = 1) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + n

    def merge(self, other: "StageCount") -> None:
        """Add `other`'s counts (the same stage, counted by another worker) into this row."""
        if other.stage != self.stage:
            raise ValueError(f"cannot merge stage {other.stage!r} into {self.stage!r}")
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.bytes_removed += other.bytes_removed
        for reason, n in other.reasons.items():
            self.add(reason, n)


def merge_counts(parts: list[dict[str, StageCount]]) -> dict[str, StageCount]:
    """Sum per-stage counts from several workers, keeping the stage order of first appearance."""
    total: dict[str, StageCount] = {}
    for part in parts:
        for name, count in part.items():
            total.setdefault(name, StageCount(name)).merge(count)
    return total


def utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def symbol_count(text: str) -> int:
    """Characters that are neither alphanumeric (str.isalnum) nor whitespace (str.isspace)."""
    if text.isascii():
        return len(text.encode("ascii").translate(None, _ASCII_NON_SYMBOLS))
    # drop ASCII letters/digits/space as bytes (fast), then classify the few characters left with a regex
    rest = text.encode("utf-8").translate(None, _ASCII_NON_SYMBOLS).decode("utf-8")
    return len(_NON_SYMBOL_RUNS.sub("", rest))


def repeated_line_ratio(text: str) -> float:
    """Share of non-blank lines that exactly repeat an earlier line of `text`; 0.0 when there are none."""
    lines = [line for line in text.splitlines() if line and not line.isspace()]
    if not lines:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


class Curator:
    """Per-document stages in order: normalize -> filter -> pii. Holds its own StageCounts.

    `counts` holds only the enabled stages: normalize unless spec.normalize is "none", pii if spec.pii;
    filter always (a limit of 0 chars or a ratio of 1.0 makes that check a no-op).
    """

    def __init__(self, spec: CurationSpec) -> None:
        self.spec = spec
        self.counts: dict[str, StageCount] = {}
        form = spec.normalize
        self._form: Literal["NFC", "NFKC"] | None = None if form == "none" else form
        if self._form is not None:
            self.counts["normalize"] = StageCount("normalize")
        self.counts["filter"] = StageCount("filter")
        if spec.pii:
            self.counts["pii"] = StageCount("pii")

    def process(self, doc: Document) -> Document | None:
        """The curated document, or None when a filter drops it (counted under its reason)."""
        text = doc.text
        norm = self.counts.get("normalize")
        if norm is not None and self._form is not None:
            norm.docs_in += 1
            # ASCII is invariant under every normal form, and most code is ASCII
            if not text.isascii():
                new = unicodedata.normalize(self._form, text)
                if new != text:
                    norm.add("changed")
                    norm.bytes_removed += max(0, utf8_len(text) - utf8_len(new))
                    text = new
            norm.docs_out += 1

        filt = self.counts["filter"]
        filt.docs_in += 1
        reason = self.reject_reason(text)
        if reason is not None:
            filt.add(reason)
            filt.bytes_removed += utf8_len(text)
            return None
        filt.docs_out += 1

        pii = self.counts.get("pii")
        if pii is not None:
            pii.docs_in += 1
            new, found = redact(text)
            if found:
                for kind in found:
                    pii.add(kind)
                pii.bytes_removed += max(0, utf8_len(text) - utf8_len(new))
                text = new
            pii.docs_out += 1
        return doc if text is doc.text else dataclasses.replace(doc, text=text)

    def reject_reason(self, text: str) -> str | None:
        """The first filter `text` fails, in order too_short, too_long, symbol_ratio, repeated_lines; or None.
        Ratios must exceed their limit to fail, so a limit of 1.0 never drops anything."""
        spec = self.spec
        n = len(text)
        if n < spec.min_chars:
            return "too_short"
        if n > spec.max_chars:
            return "too_long"
        if spec.max_symbol_ratio < 1.0 and n and symbol_count(text) / n > spec.max_symbol_ratio:
            return "symbol_ratio"
        if spec.max_repeated_line_ratio < 1.0 and repeated_line_ratio(text) > spec.max_repeated_line_ratio:
            return "repeated_lines"
        return None


@dataclass(frozen=True)
class Fingerprint:
    """What the corpus-wide stages need from one document; pure in the text, so it can be computed anywhere."""

    nbytes: int  # UTF-8 size, for bytes_removed
    digest: bytes | None  # sha256 of the UTF-8 text, when exact_dedup is on
    signature: Signature | None  # MinHash, when near_dedup is on and the text has at least one word


class Deduplicator:
    """Corpus-wide stages in order: exact_dedup -> near_dedup. First occurrence wins, so the result depends
    only on input order. `counts` holds only the enabled stages. Memory grows with the kept documents: 32
    bytes per digest, 4 * minhash_perms bytes per signature plus one bucket entry per LSH band."""

    def __init__(self, spec: CurationSpec) -> None:
        self.spec = spec
        self.counts: dict[str, StageCount] = {}
        self._seen: set[bytes] = set()
        self._hasher: MinHasher | None = None
        self._index: LSHIndex | None = None
        if spec.exact_dedup:
            self.counts["exact_dedup"] = StageCount("exact_dedup")
        if spec.near_dedup:
            self.counts["near_dedup"] = StageCount("near_dedup")
            self._hasher = MinHasher(spec.minhash_perms, spec.shingle_words)
            self._index = LSHIndex(spec.near_dedup_threshold, spec.minhash_perms)

    def fingerprint(self, text: str) -> Fingerprint:
        """Hash `text` for both stages. Pure: the same text gives the same fingerprint in any process."""
        raw = text.encode("utf-8")
        digest = hashlib.sha256(raw).digest() if self.spec.exact_dedup else None
        signature = None
        if self._hasher is not None:
            shingles = self._hasher.shingles(text)
            # a text with no words has no shingles: it is kept and not indexed, never a near duplicate
            signature = self._hasher.signature_of(shingles) if len(shingles) else None
        return Fingerprint(len(raw), digest, signature)

    def keep(self, doc: Document) -> bool:
        """Whether `doc` is the first of its exact and near duplicates seen so far (then it is remembered)."""
        return self.keep_fingerprint(self.fingerprint(doc.text))

    def keep_fingerprint(self, fp: Fingerprint) -> bool:
        """`keep` for a precomputed fingerprint: must be called once per document, in corpus order."""
        exact = self.counts.get("exact_dedup")
        if exact is not None and fp.digest is not None:
            exact.docs_in += 1
            if fp.digest in self._seen:
                exact.add("duplicate")
                exact.bytes_removed += fp.nbytes
                return False
            self._seen.add(fp.digest)
            exact.docs_out += 1
        near = self.counts.get("near_dedup")
        if near is not None and self._index is not None:
            near.docs_in += 1
            if fp.signature is not None and not self._index.add_if_new(fp.signature):
                near.add("near_duplicate")
                near.bytes_removed += fp.nbytes
                return False
            near.docs_out += 1
        return True
