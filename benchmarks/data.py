"""Data-line benchmark: ingest throughput against raw Hugging Face tokenization, in one run, on one machine.

Corpus: the Python standard library's source (about 32 MB), optionally copied N times (`--copies`).
Figures (the last line is JSON with these keys):
- raw_tokenize_mb_s: `Tokenizer.encode_batch` alone on the curated texts, in memory, same batch size.
- tokenize_ratio_vs_raw: our tokenize-and-write stage (read curated Parquet, encode, write shards) on the
  same texts with the same tokenizer and threads, as a ratio of the raw throughput. Target >= 0.9.
- ingest_mb_s: end-to-end `ingest()` (read, curate, dedup, train tokenizer, tokenize, write) over input MB.
- ingest_ratio_vs_raw: ingest_mb_s / raw_tokenize_mb_s. Target >= 0.5.
- near_dedup_mb_s: MinHash LSH near-duplicate detection alone.
- peak_rss_mb: peak memory of the ingest's whole process tree (it runs in a child process, with its curation
  workers): the largest sum of proportional set sizes (PSS, so pages shared by forked workers count once),
  sampled every 50 ms from /proc. Where /proc has no PSS, the child's own peak RSS.
- tokenize_ratio_vs_fast: the same stage against `encode_batch_fast`, which the stage itself uses (it needs
  no character offsets): the fairest baseline, reported beside the one the issue names.
- threads: the threads the tokenizer used.

`--quick` ingests the corpus once (under 2 minutes on 2 cores); `--copies 10` is the 300 MB memory check.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def corpus(root: Path, copies: int) -> tuple[list[str], int]:
    """Link `copies` copies of the stdlib's .py files under root; return the sources and their total bytes."""
    from aifab.data.sources import list_files, stdlib_source

    files = list_files([stdlib_source()], [".py"])
    base = Path(stdlib_source())
    total = 0
    for c in range(copies):
        for f in files:
            dest = root / f"copy{c}" / f.relative_to(base)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
            total += dest.stat().st_size
    return [str(root)], total


def ingest_child(home: str, sources: list[str]) -> None:
    """Run in a child process so its peak RSS is the ingest's alone; prints one JSON line."""
    from aifab.data.ingest import ingest
    from aifab.spec import DataSpec, TokenizerSpec
    from aifab.store import Store

    t0 = time.perf_counter()
    r = ingest(Store(home), "bench", DataSpec(sources=sources, extensions=[".py"]), TokenizerSpec())
    elapsed = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "elapsed_s": elapsed,
                "peak_rss_mb": rss_mb,
                "timings_s": r.timings_s,
                "documents": r.documents,
                "tokens": r.tokens,
                "stages": r.stages,
                "dataset_version_id": r.dataset_version_id,
            }
        )
    )


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def _tree(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        return [pid]
    return [pid, *(p for k in kids for p in _tree(k))]


def run_sampled(cmd: list[str]) -> tuple[str, float]:
    """Run `cmd`, returning its stdout and the peak PSS (MB) of its process tree."""
    peak_kb = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(proc.stdout.read() if proc.stdout else ""))
        reader.start()
        while proc.poll() is None:
            peak_kb = max(peak_kb, sum(_pss_kb(p) for p in _tree(proc.pid)))
            time.sleep(0.05)
        reader.join()
    if proc.returncode:
        raise SystemExit(f"the ingest child failed with exit code {proc.returncode}")
    return out[0], peak_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one copy of the corpus (the CPU figure)")
    ap.add_argument("--copies", type=int, default=None, help="copies of the stdlib corpus (default 1, or 10)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        ingest_child(args.child[0], json.loads(args.child[1]))
        return
    copies = args.copies or (1 if args.quick else 10)
    os.environ.setdefault("AIFAB_NO_PROGRESS", "1")
    threads = int(os.environ.get("RAYON_NUM_THREADS") or os.cpu_count() or 1)

    from aifab.data.dedup import LSHIndex, MinHasher
    from aifab.data.ingest import TOKENIZE_BATCH_ROWS
    from aifab.data.parts import iter_batches
    from aifab.data.tokenize import ShardWriter, encode_to_shards, split_of
    from aifab.store import Store
    from aifab.store.schema import DatasetVersion

    with tempfile.TemporaryDirectory(prefix="aifab-bench-") as tmp:
        sources, input_bytes = corpus(Path(tmp) / "corpus", copies)
        home = str(Path(tmp) / "home")
        stdout, tree_mb = run_sampled([sys.executable, __file__, "--child", home, json.dumps(sources)])
        ing = json.loads(stdout.strip().splitlines()[-1])
        if tree_mb > 0:
            ing["peak_rss_mb"] = tree_mb

        store = Store(home)
        with store.db.session() as s:
            row = s.get(DatasetVersion, ing["dataset_version_id"])
            assert row is not None and row.curated_digest is not None
            curated, tok_digest = row.curated_digest, row.tokenizer_digest
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(store.artifacts.get_bytes(tok_digest).decode())
        batches = [b[0] for b in iter_batches(store.artifacts, curated, TOKENIZE_BATCH_ROWS)]
        text_mb = sum(len(t.encode()) for b in batches for t in b) / 1e6

        # the baseline: encode_batch alone, same batches, same threads
        t0 = time.perf_counter()
        for b in batches:
            tok.encode_batch(b)
        raw_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        for b in batches:
            tok.encode_batch_fast(b)
        fast_s = time.perf_counter() - t0

        # our stage: read the curated Parquet, encode, write shards into the store
        t0 = time.perf_counter()
        writers = {split: ShardWriter(store.artifacts, "uint16") for split in ("train", "val")}
        texts = (b[0] for b in iter_batches(store.artifacts, curated, TOKENIZE_BATCH_ROWS))
        encode_to_shards(tok, texts, lambda i, t: split_of(t, 0.05), writers)
        for w in writers.values():
            w.close()
        stage_s = time.perf_counter() - t0

        hasher, index = MinHasher(128, 5), LSHIndex(0.8, 128)
        t0 = time.perf_counter()
        for b in batches:
            for text in b:
                index.add_if_new(hasher.signature(text))
        dedup_s = time.perf_counter() - t0
        store.close()

    raw_mb_s = text_mb / raw_s
    ingest_mb_s = input_bytes / 1e6 / ing["elapsed_s"]
    result = {
        "tokenize_ratio_vs_raw": round(raw_s / stage_s, 3),
        "ingest_mb_s": round(ingest_mb_s, 2),
        "raw_tokenize_mb_s": round(raw_mb_s, 2),
        "near_dedup_mb_s": round(text_mb / dedup_s, 2),
        "peak_rss_mb": round(ing["peak_rss_mb"], 1),
        "threads": threads,
        "ingest_ratio_vs_raw": round(ingest_mb_s / raw_mb_s, 3),
        "tokenize_ratio_vs_fast": round(fast_s / stage_s, 3),
        "fast_tokenize_mb_s": round(text_mb / fast_s, 2),
        "input_mb": round(input_bytes / 1e6, 1),
        "curated_mb": round(text_mb, 1),
        "copies": copies,
    }
    print(
        f"corpus: {copies} x stdlib = {input_bytes / 1e6:.1f} MB in, {text_mb:.1f} MB curated, "
        f"{ing['documents']:,} documents, {ing['tokens']:,} tokens"
    )
    for stage, c in ing["stages"].items():
        if stage != "read":
            print(
                f"  {stage:12s} {c['docs_in']:>8,} -> {c['docs_out']:>8,} docs  {c['bytes_removed']:>12,} bytes removed"
            )
    print("ingest steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in ing["timings_s"].items()))
    print(f"raw encode_batch     {raw_mb_s:8.2f} MB/s ({threads} threads)")
    print(f"encode_batch_fast    {text_mb / fast_s:8.2f} MB/s")
    ratios = f"ratio {raw_s / stage_s:.3f} (target >= 0.9), {fast_s / stage_s:.3f} vs encode_batch_fast"
    print(f"tokenize + write     {text_mb / stage_s:8.2f} MB/s  {ratios}")
    print(f"ingest end to end    {ingest_mb_s:8.2f} MB/s  ratio {ingest_mb_s / raw_mb_s:.3f} (target >= 0.5)")
    print(f"near dedup           {text_mb / dedup_s:8.2f} MB/s")
    print(f"peak RSS             {ing['peak_rss_mb']:8.1f} MB (target < 1024 for 10 copies)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
