"""Metering benchmark: what per-step energy attribution costs the serving engine, and whether its books balance.

The serving engine's meter reads the energy counter at the edges of each step (or, for counters that update
only every few ms such as NVML's, of windows of steps) and splits the joules over its requests
(`aifab.serve.metering`). This runs the same workload through the same engine twice per round, once with the
real meter (the sampler `auto_sampler()` picks on this machine) and once with a null meter that does no work,
alternating for `--rounds` rounds; the best round of each side counts. The engine runs on this process's main
thread (as `aifab serve` runs it), fed by a client thread: `--requests` requests of `--max-tokens` greedy
tokens each (ignore_eos, so every run does the same steps), at most `--max-batch` at a time.

Training attributes energy per stage (two counter reads per run) plus the budget check, which reads the
counter once per step; `--train` adds the same comparison for a short CPU training run with and without that
per-step read.

`--quick` is the CPU figure (a few minutes on 2 cores): the serving comparison at the default sizes plus the
`--train` one, on the 8.6M-parameter shape `benchmarks/serve.py --quick` serves.

`--gpu`: the same comparison on a CUDA device, with the TinyLlama 1.1B shape in bf16 (decode steps replayed
from CUDA graphs, energy from NVML); it also reports `sampler_read_us`, the median time of one counter read.
A step of a few ms that reads the counter twice is where a slow read would show.

Last line JSON:
- overhead_ratio: serving wall time with the real meter / without (1.0 = free; the target is under 1.01).
- balance_error: |requests + idle - counter difference| / counter difference over the metered runs (0 up to
  float rounding; the CPU-time estimate balances exactly too).
- sampler, estimated: which counter was read, and whether it is an estimate.
- train_overhead_ratio (with `--train`): the same ratio for training.
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any

SHAPE = {"vocab_size": 4096, "n_layer": 4, "n_head": 6, "d_model": 384, "context_len": 512}
GPU_SHAPE = {
    "vocab_size": 32000, "n_layer": 22, "n_head": 32, "n_kv_heads": 4, "d_model": 2048, "ffn_hidden": 5632,
    "context_len": 2048, "tie_embeddings": False,
}  # fmt: skip


class NullMeter:
    """The engine's meter interface doing nothing: the baseline."""

    estimated = True
    last_step_s = 0.0

    def __init__(self) -> None:
        from aifab.serve.metering import RequestCharge

        self.zero = RequestCharge(0.0, 0.0, 0.0, 0, 0, 0.0)

    open_steps = 0

    def step_started(self) -> list[tuple[Any, float]]:
        return []

    def step_finished(self, shares: list[tuple[Any, int]]) -> list[tuple[Any, float]]:
        return []

    def settle(self) -> list[tuple[Any, float]]:
        return []

    def take_idle_j(self) -> float:
        return 0.0

    def charge(self, *args: Any) -> Any:
        return self.zero

    def flush(self) -> None:
        pass


def serve_once(lm: Any, meter: Any, requests: int, max_tokens: int, max_batch: int) -> float:
    """Wall seconds for the workload through a fresh engine run on this thread."""
    from aifab.nn.sampling import SamplingParams
    from aifab.serve.engine import Done, Engine, Request

    engine = Engine(lm, max_queue=requests, max_batch=max_batch, start=False, meter=meter)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    left = threading.Semaphore(0)
    times: dict[str, float] = {}

    def client() -> None:
        times["t0"] = time.perf_counter()
        for i in range(requests):
            prompt = [(7 * i + j) % 4000 + 1 for j in range(32)]
            engine.submit(Request(prompt, params, lambda e: isinstance(e, Done) and left.release()))
        for _ in range(requests):
            left.acquire()
        times["t1"] = time.perf_counter()
        engine.close()

    threading.Thread(target=client, daemon=True).start()
    engine.run()
    return times["t1"] - times["t0"]


def train_once(store: Any, dataset_id: int, read_each_step: bool, steps: int) -> float:
    from aifab.meter.samplers import auto_sampler
    from aifab.spec import ModelSpec, TrainingSpec
    from aifab.train.trainer import train

    sampler = auto_sampler()

    def check() -> str | None:
        if read_each_step:
            sampler.energy_j()
        return None

    cfg = TrainingSpec(steps=steps, seconds=None, batch_size=8, eval_every=10**6, checkpoint_every=10**6)
    t0 = time.perf_counter()
    train(store, dataset_id, ModelSpec(preset="tiny"), cfg, stop_check=check)
    return time.perf_counter() - t0


def read_us(sampler: Any, n: int = 200) -> float:
    """Median microseconds of one `energy_j()` read."""
    import statistics

    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        sampler.energy_j()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train", action="store_true", help="also measure the per-step budget read in training")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU, minutes on 2 cores: serving and training (--train)")
    mode.add_argument("--gpu", action="store_true", help="CUDA: TinyLlama 1.1B shape in bf16, NVML")
    args = ap.parse_args()
    args.train = args.train or args.quick
    os.environ.setdefault("AIFAB_NO_PROGRESS", "1")

    import torch
    from tokenizers import Tokenizer, models

    from aifab.nn.config import ModelConfig
    from aifab.nn.transformer import Transformer
    from aifab.serve.loaded import LoadedModel
    from aifab.serve.metering import ServeMeter

    torch.manual_seed(0)
    shape = GPU_SHAPE if args.gpu else SHAPE
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit(f"--gpu needs a CUDA device; torch {torch.__version__} sees none")
    model = Transformer(ModelConfig.from_dict(shape)).eval()
    if args.gpu:
        model = model.to(device="cuda", dtype=torch.bfloat16)
    tok = Tokenizer(models.BPE())  # the engine decodes text; an empty vocabulary decodes to ""
    lm = LoadedModel("bench:1", frozenset({"bench:1"}), model, tok, 0, shape["context_len"], 0, prefix_ids=(0,))
    serve_once(lm, NullMeter(), 4, 4, args.max_batch)  # warm-up
    best = {"metered": float("inf"), "null": float("inf")}
    errors, meter = [], None
    for _ in range(args.rounds):
        for side in ("null", "metered"):
            meter = ServeMeter() if side == "metered" else NullMeter()
            dt = serve_once(lm, meter, args.requests, args.max_tokens, args.max_batch)
            best[side] = min(best[side], dt)
            if isinstance(meter, ServeMeter):
                total = meter.last_j - meter.start_j
                errors.append(abs(meter.balance_error_j()) / total if total > 0 else 0.0)
            print(f"  serve {side:8s} {dt:6.3f} s", file=sys.stderr)
    assert isinstance(meter, ServeMeter)
    out: dict[str, Any] = {
        "overhead_ratio": round(best["metered"] / best["null"], 4),
        "balance_error": max(errors),
        "sampler": meter.sampler.name,
        "estimated": meter.estimated,
        "serve_tokens_per_s": round(args.requests * args.max_tokens / best["metered"], 1),
        "sampler_read_us": round(read_us(meter.sampler), 1),
    }
    if args.train:
        from aifab.store import Store

        sys.path.insert(0, os.path.dirname(__file__))
        from train import synthetic_dataset  # the training benchmark's random-token dataset

        with tempfile.TemporaryDirectory() as home:
            store = Store(home)
            ds = synthetic_dataset(store, 4096, 200_000, 20_000)
            train_once(store, ds, False, 10)  # warm-up: first-call costs land on neither side
            tb = {True: float("inf"), False: float("inf")}
            for _ in range(args.rounds):
                for read in (False, True):
                    tb[read] = min(tb[read], train_once(store, ds, read, 100))
            store.close()
        out["train_overhead_ratio"] = round(tb[True] / tb[False], 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
