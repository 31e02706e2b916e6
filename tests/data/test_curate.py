import itertools
import json
import random
import unicodedata
from dataclasses import asdict

import pytest

from aifab.data.curate import (
    Curator,
    Deduplicator,
    StageCount,
    merge_counts,
    repeated_line_ratio,
    symbol_count,
)
from aifab.data.sources import Document
from aifab.spec import CurationSpec

SHA = "0" * 64


def doc(text: str, i: int = 0) -> Document:
    return Document(text=text, source=f"src/{i}.txt", offset=i, source_sha256=SHA)


def prose(n_words: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [f"w{rnd.randrange(50_000)}" for _ in range(n_words)]


def curate(spec: CurationSpec, texts: list[str]) -> tuple[Curator, list[Document]]:
    curator = Curator(spec)
    out = [d for i, t in enumerate(texts) if (d := curator.process(doc(t, i))) is not None]
    return curator, out


def test_nfc_composes_accents_but_keeps_compatibility_ligatures() -> None:
    text = "cafe\u0301 \ufb01le plus padding text"  # e + combining acute (3 bytes); the "fi" ligature (3 bytes)
    curator, [out] = curate(CurationSpec(normalize="NFC"), [text])
    assert out.text == "caf\u00e9 \ufb01le plus padding text"
    assert asdict(curator.counts["normalize"]) == {
        "stage": "normalize",
        "docs_in": 1,
        "docs_out": 1,
        "bytes_removed": 1,
        "reasons": {"changed": 1},
    }
    assert (out.source, out.offset, out.source_sha256) == ("src/0.txt", 0, SHA)  # provenance is kept


def test_nfkc_also_folds_compatibility_characters() -> None:
    curator, [out] = curate(CurationSpec(normalize="NFKC"), ["cafe\u0301 \ufb01le plus padding text"])
    assert out.text == "caf\u00e9 file plus padding text"
    assert curator.counts["normalize"].bytes_removed == 2


def test_normalize_none_is_absent_and_leaves_text_alone() -> None:
    text = "cafe\u0301 \ufb01le plus padding text"
    curator, [out] = curate(CurationSpec(normalize="none"), [text])
    assert out.text == text and "normalize" not in curator.counts


def test_ascii_documents_pass_through_unchanged() -> None:
    d = doc("plain ascii text that is long enough")
    out = Curator(CurationSpec(pii=False)).process(d)
    assert out is d


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("x" * 15, "too_short"),
        ("x" * 101, "too_long"),
        ("a = {}; b = [()]; c = <>!!", "symbol_ratio"),
        ("same line\nsame line\nsame line\nother\n", "repeated_lines"),
    ],
)
def test_each_filter_drops_with_its_reason(text: str, reason: str) -> None:
    spec = CurationSpec(min_chars=16, max_chars=100, max_symbol_ratio=0.4, max_repeated_line_ratio=0.4)
    curator = Curator(spec)
    assert curator.process(doc(text)) is None
    assert asdict(curator.counts["filter"]) == {
        "stage": "filter",
        "docs_in": 1,
        "docs_out": 0,
        "bytes_removed": len(text),
        "reasons": {reason: 1},
    }


def test_filter_limits_are_inclusive() -> None:
    spec = CurationSpec(min_chars=16, max_chars=16, max_symbol_ratio=0.5, max_repeated_line_ratio=0.5)
    curator = Curator(spec)
    assert curator.reject_reason("abcdefgh!!!!!!!!") is None  # 16 chars, ratio exactly 0.5
    assert curator.reject_reason("x\nx\nx\nyyyyyyyyyy") is None  # 2 of 4 lines repeat: exactly 0.5
    assert curator.reject_reason("x\nx\nx\nx\nyyyyyyyy") == "repeated_lines"  # 3 of 5
    assert curator.reject_reason("abcdefg!!!!!!!!!") == "symbol_ratio"  # 9 of 16
    assert curator.reject_reason("x" * 15) == "too_short" and curator.reject_reason("x" * 17) == "too_long"
    assert Curator(CurationSpec(max_symbol_ratio=1.0)).reject_reason("!" * 40) is None


def test_symbol_count_matches_its_definition() -> None:
    assert symbol_count("a_b c-d\t") == 2  # "_" is a symbol: not alphanumeric
    assert symbol_count("né \u2192 ½ 中文\uff01 \u00a0x") == 2  # the arrow and the full-width "!"; "½" is numeric
    rnd = random.Random(0)
    pool = "aZ9_ \t\n-+*/\u00e9\u0301\u00bd\u2192\u4e2d\uff01\u00a0\U0001f600\u0663\u2028"
    for _ in range(200):
        s = "".join(rnd.choices(pool, k=rnd.randint(0, 40)))
        assert symbol_count(s) == sum(not (c.isalnum() or c.isspace()) for c in s), s


def test_repeated_line_ratio() -> None:
    assert repeated_line_ratio("a\na\nb\n\n   \na\n") == 0.5  # non-blank lines a, a, b, a: two repeats of four
    assert repeated_line_ratio("a\n a\n") == 0.0  # exact repeats only
    assert repeated_line_ratio("\n\n") == 0.0


def test_pii_stage_counts_documents_per_kind() -> None:
    texts = [
        "write to someone@example.com or else@example.com, from 10.0.0.1",
        "key AKIA" + "IOSFODNN7EXAMPLE in the config file",
        "nothing to see here, move along please",
        "a@b.co is shorter than its placeholder",
    ]
    curator, out = curate(CurationSpec(), texts)
    assert [d.text for d in out] == [
        "write to <EMAIL> or <EMAIL>, from <IPV4>",
        "key <SECRET> in the config file",
        "nothing to see here, move along please",
        "<EMAIL> is shorter than its placeholder",
    ]
    pii = curator.counts["pii"]
    assert pii.reasons == {"email": 2, "ipv4": 1, "secret": 1}  # documents, not occurrences
    assert (pii.docs_in, pii.docs_out) == (4, 4)
    removed = sum(len(t) - len(d.text) for t, d in zip(texts, out, strict=True) if len(t) > len(d.text))
    assert pii.bytes_removed == removed  # the last document grew: it counts 0, never negative


def test_pii_off_is_absent_and_keeps_text() -> None:
    curator, [out] = curate(CurationSpec(pii=False), ["mail someone@example.com today"])
    assert out.text == "mail someone@example.com today"
    assert list(curator.counts) == ["normalize", "filter"]


def planted_corpus() -> tuple[list[str], dict[str, int]]:
    """Unique docs, exact copies, near copies and look-alikes that must stay, with the expected removals."""
    base = [" ".join(prose(300, seed)) for seed in range(5)]
    near = prose(300, 0)
    near[50], near[200] = "changed", "words"  # two edits in 300 words: Jaccard about 0.94
    half = prose(300, 1)[:200] + prose(100, 99)  # shares 2/3 of its shingles: Jaccard about 0.5
    docs = [base[0], base[1], base[0], base[2], base[3], base[1], " ".join(near), base[4], " ".join(half)]
    docs.append(" ".join(prose(300, 42)))  # unrelated
    return docs, {"exact_dedup": 2, "near_dedup": 1}


def test_planted_duplicates_are_removed_exactly() -> None:
    texts, removed = planted_corpus()
    dedup = Deduplicator(CurationSpec())
    kept = [i for i, t in enumerate(texts) if dedup.keep(doc(t, i))]
    assert kept == [0, 1, 3, 4, 7, 8, 9]  # first occurrences win; 2, 5 exact and 6 near copies go
    exact, near = dedup.counts["exact_dedup"], dedup.counts["near_dedup"]
    assert exact.reasons == {"duplicate": removed["exact_dedup"]}
    assert near.reasons == {"near_duplicate": removed["near_dedup"]}
    assert (exact.docs_in, exact.docs_out, near.docs_in, near.docs_out) == (10, 8, 8, 7)
    assert exact.bytes_removed == len(texts[2]) + len(texts[5])
    assert near.bytes_removed == len(texts[6])


def test_near_dedup_threshold_is_honoured() -> None:
    texts, _ = planted_corpus()
    dedup = Deduplicator(CurationSpec(near_dedup_threshold=0.4))
    assert [i for i, t in enumerate(texts) if dedup.keep(doc(t, i))] == [0, 1, 3, 4, 7, 9]  # the 0.5 one goes too


def test_switched_off_dedup_stages_are_absent() -> None:
    texts, _ = planted_corpus()
    none = Deduplicator(CurationSpec(exact_dedup=False, near_dedup=False))
    assert all(none.keep(doc(t)) for t in texts) and none.counts == {}
    near_only = Deduplicator(CurationSpec(exact_dedup=False))
    assert [i for i, t in enumerate(texts) if near_only.keep(doc(t, i))] == [0, 1, 3, 4, 7, 8, 9]
    assert list(near_only.counts) == ["near_dedup"]
    assert near_only.counts["near_dedup"].reasons == {"near_duplicate": 3}  # exact copies are near ones too
    exact_only = Deduplicator(CurationSpec(near_dedup=False))
    assert [i for i, t in enumerate(texts) if exact_only.keep(doc(t, i))] == [0, 1, 3, 4, 6, 7, 8, 9]
    assert list(exact_only.counts) == ["exact_dedup"]


def test_wordless_documents_are_never_near_duplicates() -> None:
    dedup = Deduplicator(CurationSpec(exact_dedup=False))
    assert dedup.keep(doc("   ")) and dedup.keep(doc("\n\n"))
    assert dedup.counts["near_dedup"].docs_out == 2


def test_decisions_and_counts_are_deterministic() -> None:
    texts, _ = planted_corpus()
    texts = [*texts, "email me at a.b@example.com " + texts[3], "tiny"]
    runs = []
    for _ in range(2):
        curator, out = curate(CurationSpec(), texts)
        dedup = Deduplicator(CurationSpec())
        kept = [d.text for d in out if dedup.keep(d)]
        runs.append((kept, json.dumps({k: asdict(v) for k, v in {**curator.counts, **dedup.counts}.items()})))
    assert runs[0] == runs[1]


def test_fingerprints_can_be_computed_elsewhere() -> None:
    texts, _ = planted_corpus()
    spec = CurationSpec()
    worker = Deduplicator(spec)  # e.g. a parallel map task; only keep_fingerprint must see corpus order
    fps = [worker.fingerprint(t) for t in texts]
    central, reference = Deduplicator(spec), Deduplicator(spec)
    assert [central.keep_fingerprint(fp) for fp in fps] == [reference.keep(doc(t)) for t in texts]
    assert central.counts == reference.counts


def test_stage_counts_chain_and_add_up() -> None:
    texts, _ = planted_corpus()
    short = "e\u0301" * 5  # 15 bytes; 10 after NFC, which is what the filter then drops
    texts = ["cafe\u0301 " + texts[0], short, "#" * 40, *texts, "ip 192.168.1.1 here " + texts[4]]
    curator, out = curate(CurationSpec(), texts)
    dedup = Deduplicator(CurationSpec())
    kept = [d for d in out if dedup.keep(d)]
    rows = [*curator.counts.values(), *dedup.counts.values()]
    assert [r.stage for r in rows] == ["normalize", "filter", "pii", "exact_dedup", "near_dedup"]
    assert rows[0].docs_in == len(texts) and rows[-1].docs_out == len(kept)
    for before, after in itertools.pairwise(rows):
        assert before.docs_out == after.docs_in
    for row in rows:
        dropped = row.docs_in - row.docs_out
        assert dropped == (sum(row.reasons.values()) if row.stage in ("filter", "exact_dedup", "near_dedup") else 0)
        json.dumps(asdict(row))
    assert curator.counts["filter"].reasons == {"too_short": 1, "symbol_ratio": 1}
    assert curator.counts["filter"].bytes_removed == 10 + 40
    total_in = sum(len(t.encode()) for t in texts)
    total_out = sum(len(d.text.encode()) for d in kept)
    assert total_in - total_out == sum(r.bytes_removed for r in rows)  # every rewrite here shrinks


def test_merge_counts_sums_workers() -> None:
    a = {"filter": StageCount("filter", 3, 2, 10, {"too_short": 1})}
    b = {"filter": StageCount("filter", 2, 1, 5, {"too_short": 1}), "pii": StageCount("pii", 1, 1, 4, {"email": 1})}
    total = merge_counts([a, b])
    assert asdict(total["filter"]) == asdict(StageCount("filter", 5, 3, 15, {"too_short": 2}))
    assert total["pii"].reasons == {"email": 1} and list(total) == ["filter", "pii"]
    with pytest.raises(ValueError, match="cannot merge"):
        total["filter"].merge(total["pii"])


def test_normal_forms_agree_with_unicodedata() -> None:
    text = "Å ﬃ ① ｶ " + "x" * 20
    for form in ("NFC", "NFKC"):
        [out] = curate(CurationSpec(normalize=form, pii=False), [text])[1]
        assert out.text == unicodedata.normalize(form, text)
