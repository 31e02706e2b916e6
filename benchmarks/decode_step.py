"""One decode step of the TinyLlama 1.1B shape on a CUDA GPU, timed four ways, against the bandwidth roofline.

The serving engine's decode-only step, without HTTP, scheduling or sampling: where `benchmarks/serve.py --gpu`
measures the whole server, this isolates what CUDA graphs and torch.compile do to the step itself.
- eager: the engine's packed path (`StepLayout`, batch 1 through its plain-slice fast path);
- static: `serve.graphs.DecodeGraphs` without capture (the static-shape code, launched op by op);
- graphs: the same, replayed from captured CUDA graphs;
- compiled graphs: torch.compile of the model inside the captured graphs (`aifab serve --compile` on CUDA).
Each at batch 1 and 32, keys bucket 256, the median of `--iters` steps timed with CUDA events. The roofline is
the bytes of weights a step reads over the device-to-device copy bandwidth measured here. Last line JSON.
"""

import argparse
import json
import statistics

import torch

from aifab.nn.config import ModelConfig
from aifab.nn.transformer import Transformer
from aifab.serve.graphs import DecodeGraphs
from aifab.serve.kv import SlotCache, StepLayout

SHAPE = {
    "vocab_size": 32000, "n_layer": 22, "n_head": 32, "n_kv_heads": 4, "d_model": 2048, "ffn_hidden": 5632,
    "context_len": 2048, "tie_embeddings": False,
}  # fmt: skip
SLOTS, MAX_LEN, POSITION = 32, 512, 200


def median_ms(fn, iters: int) -> float:  # type: ignore[no-untyped-def]
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bandwidth_gb_s() -> float:
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * 2 / (ms / 1e3) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled variant (a minute of compiling)")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = ModelConfig.from_dict(SHAPE)
    model = Transformer(config).to(device="cuda", dtype=torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - model.tok_emb.weight.nbytes
    bw = bandwidth_gb_s()
    roofline_ms = weight_bytes / (bw * 1e9) * 1e3
    cache = SlotCache(config, SLOTS, MAX_LEN, torch.device("cuda"), torch.bfloat16)
    results: dict[str, dict[int, float]] = {}

    def eager(batch: int) -> None:
        decode = [(s, POSITION) for s in range(batch)]
        layout = StepLayout(decode, [], SLOTS, torch.device("cuda"))
        cache.layout = layout
        idx = torch.zeros(1, batch, dtype=torch.long, device="cuda")
        model(idx, cache=cache, positions=layout.positions, logits_at=torch.arange(batch, device="cuda"))
        cache.layout = None

    variants = [("eager", None), ("static", False), ("graphs", True)]
    if not args.no_compile:
        variants.append(("compiled graphs", True))
    with torch.inference_mode():
        for name, capture in variants:
            if capture is None:
                step = eager
            else:
                g = DecodeGraphs(model, cache, capture=capture, compile=name == "compiled graphs")

                def step(batch: int, g: DecodeGraphs = g) -> None:
                    g.step([(s, 1, POSITION) for s in range(batch)])

            results[name] = {b: median_ms(lambda b=b, f=step: f(b), args.iters) for b in (1, 32)}  # type: ignore[misc]
            print(f"{name:16s} batch 1 {results[name][1]:7.3f} ms   batch 32 {results[name][32]:7.3f} ms", flush=True)
    print(f"weights {weight_bytes / 1e9:.2f} GB a step, bandwidth {bw:,.0f} GB/s: roofline {roofline_ms:.3f} ms")
    best = min(results, key=lambda k: results[k][1])
    print(
        json.dumps({
            "device": torch.cuda.get_device_name(),
            "step_ms": {k: {str(b): round(v, 3) for b, v in r.items()} for k, r in results.items()},
            "roofline_ms": round(roofline_ms, 3),
            "best": best,
            "batch1_roofline_fraction": round(roofline_ms / results[best][1], 3),
            "graph_speedup_vs_eager_batch1": round(results["eager"][1] / results["graphs"][1], 2),
        })
    )  # fmt: skip


if __name__ == "__main__":
    main()
