"""One decode step of the TinyLlama 1.1B shape on a CUDA GPU, timed four ways, against the bandwidth roofline.

The serving engine's decode-only step, without HTTP, scheduling or sampling: where `benchmarks/serve.py --gpu`
measures the whole server, this isolates what CUDA graphs and torch.compile do to the step itself.
- eager: the engine's packed path (`StepLayout`, batch 1 through its plain-slice fast path);
- static: `serve.graphs.DecodeGraphs` without capture (the static-shape code, launched op by op);
- graphs: the same, replayed from captured CUDA graphs;
- compiled graphs: torch.compile of the model inside the captured graphs (`aifab serve --compile` on CUDA).
Each at batch 1 and 32, keys bucket 256, the median of `--iters` steps timed with CUDA events. The roofline is
the bytes of weights a step reads over the device-to-device copy bandwidth measured here. Last line JSON:
`device`, `step_ms` (per variant and batch), `roofline_ms`, `best`, `batch1_roofline_fraction` and
`graph_speedup_vs_eager_batch1` (null under `--quick`).

`--quick` (CPU, a minute or two on 2 cores): the 8.6M-parameter shape of `benchmarks/serve.py --quick` in fp32,
eager and static only (CUDA graphs and torch.compile of the graphs need a GPU), timed with the wall clock
against the bandwidth of a copy in memory; it checks that the step code runs, not what a GPU does.
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from aifab.nn.config import ModelConfig
from aifab.nn.transformer import Transformer
from aifab.serve.graphs import DecodeGraphs
from aifab.serve.kv import SlotCache, StepLayout

SHAPE = {
    "vocab_size": 32000, "n_layer": 22, "n_head": 32, "n_kv_heads": 4, "d_model": 2048, "ffn_hidden": 5632,
    "context_len": 2048, "tie_embeddings": False,
}  # fmt: skip
QUICK_SHAPE = {"vocab_size": 4096, "n_layer": 4, "n_head": 6, "d_model": 384, "context_len": 512}
SLOTS, MAX_LEN, POSITION = 32, 512, 200


def median_ms(fn: Callable[[], object], iters: int, cuda: bool) -> float:
    """The median milliseconds of `fn()` after 5 warm-up calls: CUDA events for work on a GPU, else the wall clock."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bandwidth_gb_s(device: torch.device, numel: int) -> float:
    """Copy bandwidth of `device`'s memory, bytes read plus written, over `numel` bf16 elements."""
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 10, device.type == "cuda")
    return 2 * src.numel() * 2 / (ms / 1e3) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=None, help="timed steps per variant and batch (50; --quick 20)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled variant (a minute of compiling)")
    ap.add_argument("--quick", action="store_true", help="CPU: the 8.6M-parameter shape, eager and static only")
    args = ap.parse_args()
    if not args.quick and not torch.cuda.is_available():
        raise SystemExit(f"this benchmark needs a CUDA device; torch {torch.__version__} sees none (use --quick)")
    iters = args.iters or (20 if args.quick else 50)
    torch.manual_seed(0)
    device = torch.device("cpu" if args.quick else "cuda")
    dtype = torch.float32 if args.quick else torch.bfloat16
    config = ModelConfig.from_dict(QUICK_SHAPE if args.quick else SHAPE)
    model = Transformer(config).to(device=device, dtype=dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - model.tok_emb.weight.nbytes
    bw = bandwidth_gb_s(device, 1 << (26 if args.quick else 30))
    roofline_ms = weight_bytes / (bw * 1e9) * 1e3
    cache = SlotCache(config, SLOTS, MAX_LEN, device, dtype)
    results: dict[str, dict[int, float]] = {}

    def eager(batch: int) -> None:
        decode = [(s, POSITION) for s in range(batch)]
        layout = StepLayout(decode, [], SLOTS, device)
        cache.layout = layout
        idx = torch.zeros(1, batch, dtype=torch.long, device=device)
        model(idx, cache=cache, positions=layout.positions, logits_at=torch.arange(batch, device=device))
        cache.layout = None

    variants = [("eager", None), ("static", False)] + ([] if args.quick else [("graphs", True)])
    if not args.no_compile and not args.quick:
        variants.append(("compiled graphs", True))
    with torch.inference_mode():
        for name, capture in variants:
            if capture is None:
                step = eager
            else:
                g = DecodeGraphs(model, cache, capture=capture, compile=name == "compiled graphs")

                def step(batch: int, g: DecodeGraphs = g) -> None:
                    g.step([(s, 1, POSITION) for s in range(batch)])

            on_gpu = device.type == "cuda"
            results[name] = {b: median_ms(lambda b=b, f=step: f(b), iters, on_gpu) for b in (1, 32)}  # type: ignore[misc]
            print(f"{name:16s} batch 1 {results[name][1]:7.3f} ms   batch 32 {results[name][32]:7.3f} ms", flush=True)
    print(f"weights {weight_bytes / 1e9:.2f} GB a step, bandwidth {bw:,.0f} GB/s: roofline {roofline_ms:.3f} ms")
    best = min(results, key=lambda k: results[k][1])
    graphs = results.get("graphs")
    print(
        json.dumps({
            "device": "cpu" if args.quick else torch.cuda.get_device_name(),
            "step_ms": {k: {str(b): round(v, 3) for b, v in r.items()} for k, r in results.items()},
            "roofline_ms": round(roofline_ms, 3),
            "best": best,
            "batch1_roofline_fraction": round(roofline_ms / results[best][1], 3),
            "graph_speedup_vs_eager_batch1": None if graphs is None else round(results["eager"][1] / graphs[1], 2),
        })
    )  # fmt: skip


if __name__ == "__main__":
    main()
