"""The `heldout` suite's items, cut from a dataset version's held-out documents (aifab.evaluate.heldout).

- heldout-bpb: bits per byte (and token perplexity) on the start of each held-out document, up to
  DOC_CHARS characters cut at a line end, scored in rolling windows.
- heldout-next-line: which line comes next? The context is up to CONTEXT_CHARS of whole lines of a held-out
  document; the choices are the line that follows and three distractor lines of other held-out documents with
  the same indentation and the nearest lengths, in a seeded random order. Matching both matters: a model that
  only prefers few tokens (long runs of spaces are one token; a random-weights model does exactly this) then
  scores chance, not better or worse.

Every item's text (the document start; the context with the right line) is checked against the train
documents, and an item whose text occurs in one is dropped. Items come in a seeded order that mixes documents,
so a --limit takes a spread of them. Everything is a function of the curated file, the split and the constants
below (BUILDER), so the items are the same wherever they are built.
"""

import bisect
import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from typing import Any

from aifab.errors import ArtifactError
from aifab.evaluate.heldout import HeldOut, held_out
from aifab.store import Store
from aifab.store.schema import DatasetVersion

SEED = 14
DOC_CHARS = 3000
CONTEXT_CHARS = 400
MIN_LINE_CHARS = 12  # non-space characters of a line worth predicting (and of a distractor)
ITEMS_PER_DOC = 4
DISTRACTORS = 3
BUILDER = f"heldout-v2 seed={SEED} doc={DOC_CHARS} ctx={CONTEXT_CHARS} line={MIN_LINE_CHARS} per={ITEMS_PER_DOC}"


def _eligible(line: str) -> bool:
    return len(line.strip()) >= MIN_LINE_CHARS


def document_rows(held: HeldOut) -> tuple[list[dict[str, str]], int]:
    """Rows {"text"} for heldout-bpb, and how many document starts were dropped as occurring in training."""
    rows, dropped = [], 0
    for text in held.documents:
        start = text if len(text) <= DOC_CHARS else text[: text.rfind("\n", 0, DOC_CHARS) + 1 or DOC_CHARS]
        if not start.strip():
            continue
        if start != text and held.train.contains(start):
            dropped += 1
            continue
        rows.append({"text": start})
    random.Random(SEED).shuffle(rows)
    return rows, dropped


def next_line_rows(held: HeldOut) -> tuple[list[dict[str, object]], int]:
    """Rows {"context", "choices", "gold"} for heldout-next-line, and how many candidate items were dropped as
    occurring in training."""
    rng = random.Random(SEED)
    docs = [text.split("\n") for text in held.documents]
    # the distractor pools: every eligible line of every document, by indentation, then by length
    pools: dict[str, list[tuple[int, str, int]]] = {}
    for d, lines in enumerate(docs):
        for line in set(lines):
            if _eligible(line):
                pools.setdefault(_indent(line), []).append((len(line), line, d))
    for pool in pools.values():
        pool.sort()
    rows: list[dict[str, object]] = []
    dropped = 0
    for d, lines in enumerate(docs):
        candidates = [i for i in range(1, len(lines)) if _eligible(lines[i]) and lines[i - 1].strip()]
        for i in sorted(rng.sample(candidates, min(ITEMS_PER_DOC, len(candidates)))):
            context = _context(lines, i)
            gold = lines[i]
            if held.train.contains(context + "\n" + gold):
                dropped += 1
                continue
            distractors = _distractors(pools.get(_indent(gold), []), gold, d, rng)
            if len(distractors) < DISTRACTORS:
                continue
            choices = [gold, *distractors]
            rng.shuffle(choices)
            rows.append({"context": context, "choices": choices, "gold": choices.index(gold)})
    rng.shuffle(rows)
    return rows, dropped


def _context(lines: list[str], i: int) -> str:
    """Whole lines before line i, as many as fit CONTEXT_CHARS (at least one)."""
    start, size = i - 1, len(lines[i - 1])
    while start > 0 and size + len(lines[start - 1]) + 1 <= CONTEXT_CHARS:
        start -= 1
        size += len(lines[start]) + 1
    return "\n".join(lines[start:i])


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _distractors(pool: list[tuple[int, str, int]], gold: str, doc: int, rng: random.Random) -> list[str]:
    """Three lines of other documents with the gold line's indentation and the lengths nearest its length, none
    equal to it or each other (fewer when the pool has fewer)."""
    lengths = [n for n, _, _ in pool]
    at = bisect.bisect_left(lengths, len(gold))
    near: list[str] = []
    seen = {gold.strip()}
    lo, hi = at - 1, at
    while len(near) < 4 * DISTRACTORS and (lo >= 0 or hi < len(pool)):
        # widen the window on the side whose next line is closer in length
        take_hi = lo < 0 or (hi < len(pool) and lengths[hi] - len(gold) <= len(gold) - lengths[lo])
        _, line, d = pool[hi] if take_hi else pool[lo]
        hi, lo = (hi + 1, lo) if take_hi else (hi, lo - 1)
        if d != doc and line.strip() not in seen:
            seen.add(line.strip())
            near.append(line)
    return rng.sample(near, DISTRACTORS) if len(near) >= DISTRACTORS else near


@dataclass(frozen=True)
class Items:
    """Both tasks' rows for one dataset version, and how many candidates were left out as seen in training."""

    dataset: str  # name:version
    dataset_version_id: int
    curated_digest: str
    val_fraction: float
    docs: list[dict[str, str]]
    dropped_docs: int  # held-out documents (or their starts) found in a training document
    items: list[dict[str, Any]]
    dropped_items: int


def items_of(held: HeldOut) -> Items:
    docs, dropped_docs = document_rows(held)
    items, dropped_items = next_line_rows(held)
    return Items(
        held.dataset, held.dataset_version_id, held.curated_digest, held.val_fraction, docs,
        dropped_docs + held.leaked, items, dropped_items,
    )  # fmt: skip


def cached_items(store: Store, ds: DatasetVersion) -> Items:
    """The items of a dataset version, built once: reading the corpus and checking every item against the train
    documents takes seconds. The items are stored as an artifact (read back verified) under a key of the curated
    file, the split and BUILDER; a missing or unreadable entry is rebuilt."""
    val_fraction = float((ds.params or {}).get("val_fraction", 0.05))
    key = hashlib.sha256(f"{ds.curated_digest} {val_fraction} {BUILDER}".encode()).hexdigest()
    index = store.work_dir("evaluate") / f"heldout-{key}"
    try:
        body = json.loads(store.artifacts.get_bytes(index.read_text().strip()))
        body.update(dataset=f"{ds.name}:{ds.version}", dataset_version_id=ds.id)  # the same text may be renamed
        return Items(**body)
    except (OSError, ValueError, TypeError, ArtifactError):  # absent, corrupt or stale: build it again
        pass
    items = items_of(held_out(store, ds))
    digest = store.artifacts.put_bytes(json.dumps(asdict(items)).encode())
    tmp = index.with_suffix(".tmp")
    tmp.write_text(digest)
    os.replace(tmp, index)
    return items
