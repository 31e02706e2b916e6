"""Evaluation benchmark: the batched scorer against a one-example-at-a-time loop, same model, same examples, one run.

Data: a slice of the Python standard library's source ingested as a real dataset version (`--mb`, default 3 MB,
its own BPE tokenizer of 4,096 tokens), from which the heldout suite builds its items exactly as `aifab eval`
does, with each task's default limit (48 documents, 200 next-line items, the 40 code problems). Model: the tiny
preset (3 layers, 128 wide, context 256) with random weights: throughput does not depend on the weights (a
random model never stops a generation early, so every completion runs to its 128 tokens).

Each round scores every task twice: batched (`run_task`: spans packed into padded batches, logits only where
scored; prompts generated together through one KV cache) and naive (one span per forward pass, one prompt per
generation). Rounds alternate the two; on 2 busy cores a round varies, so the ratio is the median of the
rounds' paired ratios. The scores of the two must agree (max_rel_diff). Last line JSON, with each task's own
times and ratio under `tasks`:
- examples_per_s: examples scored per second, batched (median round)
- naive_examples_per_s: the same, one at a time
- ratio_vs_naive: the median paired ratio. Target >= 5.
"""

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

QUICK = {"mb": 3.0, "rounds": 3}


def setup(home: str, mb: float) -> tuple[Any, list[tuple[Any, list[Any]]]]:
    """A random-weights tiny model on a real tokenizer, and the tasks with their rendered examples."""
    import torch
    from tokenizers import Tokenizer

    from aifab.data.ingest import ingest
    from aifab.evaluate.heldout import held_out
    from aifab.evaluate.lm import EvalModel
    from aifab.evaluate.suites import DEFAULT_LIMITS, PYTHON_CODE, heldout_tasks, python_code_task
    from aifab.evaluate.tasks import render_examples
    from aifab.nn.config import tiny
    from aifab.nn.transformer import Transformer
    from aifab.spec import DataSpec, TokenizerSpec
    from aifab.store import Store
    from aifab.store.datasets import resolve_dataset

    store = Store(home)
    ds = ingest(store, "stdlib", DataSpec(max_bytes=int(mb * 1e6), val_fraction=0.15), TokenizerSpec())
    row = resolve_dataset(store.db, f"{ds.name}:{ds.version}")
    tok = Tokenizer.from_str(store.artifacts.get_bytes(row.tokenizer_digest).decode())
    torch.manual_seed(0)
    lm = EvalModel.of(Transformer(tiny(tok.get_vocab_size())).eval(), tok)
    tasks = heldout_tasks(held_out(store, row))
    if PYTHON_CODE.exists():
        tasks.append(python_code_task())
    return lm, [(t, render_examples(t, DEFAULT_LIMITS.get(t.spec.name))) for t in tasks]


def timed(lm: Any, tasks: list[tuple[Any, list[Any]]], naive: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """Seconds per task and each task's metric values, scoring every task batched or naively."""
    from aifab.evaluate import runners

    seconds: dict[str, float] = {}
    values: dict[str, Any] = {}
    for task, examples in tasks:
        if task.spec.code is not None:  # time the model, not the sandbox: score completions only
            task.spec.metrics = ["exact_match"]
        t0 = time.perf_counter()
        scores = runners.run_task(lm, task, examples, naive=naive)
        seconds[task.spec.name] = time.perf_counter() - t0
        values[task.spec.name] = {m: v.value for m, v in scores.values.items()}
    return seconds, values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU: the tiny preset, a few minutes on 2 cores")
    ap.add_argument("--rounds", type=int, default=QUICK["rounds"])
    ap.add_argument("--mb", type=float, default=QUICK["mb"], help="MB of the standard library to ingest")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="aifab-bench-eval-") as home:
        t0 = time.perf_counter()
        lm, tasks = setup(home, args.mb)
        print(f"setup {time.perf_counter() - t0:.1f} s: " + ", ".join(f"{t.spec.name} {len(e)}" for t, e in tasks))
        examples = sum(len(e) for _, e in tasks)
        timed(lm, tasks[:1], naive=False)  # warm up the allocator and the thread pool
        rounds = []
        for r in range(args.rounds):
            batched_s, batched = timed(lm, tasks, naive=False)
            naive_s, naive = timed(lm, tasks, naive=True)
            diff = max(abs(v - naive[t][m]) / max(1.0, abs(v)) for t, ms in batched.items() for m, v in ms.items())
            rounds.append((batched_s, naive_s, diff))
            b, n = sum(batched_s.values()), sum(naive_s.values())
            print(f"round {r + 1}: batched {b:.2f} s, naive {n:.2f} s, ratio {n / b:.2f}")
    total_b = [sum(b.values()) for b, _, _ in rounds]
    total_n = [sum(n.values()) for _, n, _ in rounds]
    per_task = {
        name: {
            "examples": len(e),
            "batched_s": statistics.median(b[name] for b, _, _ in rounds),
            "naive_s": statistics.median(n[name] for _, n, _ in rounds),
            "ratio": statistics.median(n[name] / b[name] for b, n, _ in rounds),
        }
        for name, e in ((t.spec.name, e) for t, e in tasks)
    }
    result = {
        "device": "cpu",
        "model": "tiny preset (3 layers, 128 wide, context 256), random weights",
        "examples": examples,
        "tasks": per_task,
        "max_rel_diff": max(d for _, _, d in rounds),  # batched vs naive scores, relative to the value
        "examples_per_s": examples / statistics.median(total_b),
        "naive_examples_per_s": examples / statistics.median(total_n),
        "ratio_vs_naive": statistics.median(n / b for b, n in zip(total_b, total_n, strict=True)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
