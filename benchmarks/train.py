"""Training benchmark: the trainer against a bare PyTorch loop on the same model, batches and data, in one run.

Data: synthetic token shards (uniform random ids over the vocabulary) stored as a real dataset version, so
`train()` reads them through the same loader the bare loop uses. Throughput does not depend on token values.

`--quick` (CPU, under 2 minutes on 2 cores): the tiny preset (3 layers, 128 wide, context 256) over a 4096
vocabulary, batch 8, fp32, no compile. Each side runs warm-up steps and then the same timed steps on the same
batches (`batch_at(k)` of one loader), alternating trainer and bare loop for `--rounds` rounds. On 2 cores one
round of either side varies by about 10%, so the ratio is the median of the rounds' paired ratios (each trainer
round against the bare round run right after it), not best against best, where one lucky round decides.
Last line JSON:
- cpu_tokens_per_s: `train()` in steady state: the timed steps' tokens over the wall time between the run's
  metric rows for the first and last timed step (so logging, DB flushes and the progress bar count; setup,
  the first and last evaluation and the final checkpoint do not, and the bare loop does none of them).
- bare_tokens_per_s: model, AdamW, forward / backward / clip / step on the same batches.
- cpu_ratio_vs_bare: the median paired ratio. Target >= 0.97. (cpu_ratio_best_vs_best is shown beside it.)

`--gpu` (one CUDA device): the GPT-2 124M shape (12 layers, 768 wide, 12 heads, vocab 50304, context 1024,
batch 32, bf16) in the trainer's (Llama) layout, on both sides. The reference is a nanoGPT-style loop: bf16
autocast, SDPA attention, fused AdamW and torch.compile of the whole model. Last line JSON: device,
ref_tokens_per_s, tokens_per_s, ratio_vs_ref (target >= 1.15), mfu (of the card's dense bf16 peak from
aifab.meter.catalog), joules_per_token (NVML's total energy counter over the trainer's steady-state steps;
null with a note when nvidia-ml-py is not installed).
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

QUICK = {"vocab": 4096, "batch": 8, "warmup": 8, "steps": 100, "rounds": 5}
GPU = {"vocab": 50304, "batch": 32, "warmup": 15, "steps": 60, "rounds": 1}


def synthetic_dataset(store: Any, vocab: int, train_tokens: int, val_tokens: int, seed: int = 0) -> int:
    """Store random token shards as a dataset version; return its id."""
    import numpy as np

    from aifab.store.schema import DatasetVersion
    from aifab.store.shards import Manifest, dtype_for

    rng = np.random.default_rng(seed)
    dtype = dtype_for(vocab)
    splits = {}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        digest = store.artifacts.put_bytes(rng.integers(0, vocab, size=n).astype(dtype).tobytes())
        splits[split] = [{"digest": digest, "tokens": n}]
    tok_digest = store.artifacts.put_bytes(b'{"synthetic": true}')
    manifest = Manifest(tokenizer_digest=tok_digest, vocab_size=vocab, eot_id=0, dtype=dtype, splits=splits)
    with store.db.session() as s:
        row = DatasetVersion(
            name="synthetic",
            version=1,
            manifest_digest=store.artifacts.put_bytes(manifest.to_json()),
            tokenizer_digest=tok_digest,
            files=0,
            bytes=0,
            documents=0,
            tokens=train_tokens + val_tokens,
            train_tokens=train_tokens,
            val_tokens=val_tokens,
        )
        s.add(row)
        s.flush()
        return int(row.id)


def bare_loop(store: Any, dataset_id: int, config: Any, cfg: Any, steps: int, warmup: int, gpu: bool) -> float:
    """Tokens/s of a plain loop over the trainer's batches: the same model init, AdamW, clipping and data.
    With `gpu`, the nanoGPT recipe: bf16 autocast, fused AdamW, torch.compile of the whole model."""
    import contextlib

    import torch

    from aifab.nn.transformer import Transformer
    from aifab.store.schema import DatasetVersion
    from aifab.store.shards import TokenShards

    with store.db.session() as s:
        row = s.get(DatasetVersion, dataset_id)
        assert row is not None
        digest = row.manifest_digest
    loader = TokenShards(store.artifacts, digest).loader("train", cfg.batch_size, config.context_len, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    dev = torch.device("cuda" if gpu else "cpu")
    model = Transformer(config).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), **({"fused": True} if gpu else {}))
    fwd = torch.compile(model) if gpu else model
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else contextlib.nullcontext

    def step(k: int) -> None:
        x, y = loader.batch_at(k)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        if gpu:
            xt, yt = xt.pin_memory().to(dev, non_blocking=True), yt.pin_memory().to(dev, non_blocking=True)
        with ctx():
            _, loss = fwd(xt, yt)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        loss.item()  # the trainer reads the loss every step too

    for k in range(warmup):
        step(k)
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(steps):
        step(k)
    if gpu:
        torch.cuda.synchronize()
    return float(steps * cfg.batch_size * config.context_len / (time.perf_counter() - t0))


def free_memory(gpu: bool) -> None:
    """Drop the last run's model and compiled graphs so the next side starts with the whole card."""
    import gc

    if gpu:
        import torch

        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()


def energy_marks(meter: "Energy | None", at: tuple[int, ...], marks: dict[int, float | None]) -> Any:
    """A stop_check that never stops, and reads the energy counter into marks[k] on its k-th call for k in `at`."""
    calls = [0]

    def check() -> None:
        k = calls[0]
        calls[0] += 1
        if meter is not None and k in at:
            marks[k] = meter.joules()

    return check


class Energy:
    """NVML's total energy counter (mJ since driver load) of device 0, or None without nvidia-ml-py."""

    def __init__(self) -> None:
        try:
            import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py
        except ImportError:
            self.nvml = None
            return
        pynvml.nvmlInit()
        self.nvml = pynvml
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        # NVML numbers every GPU on the machine, ignoring CUDA_VISIBLE_DEVICES; it may also name a UUID
        self.handle = (
            pynvml.nvmlDeviceGetHandleByIndex(int(visible))
            if visible.isdigit()
            else pynvml.nvmlDeviceGetHandleByUUID(visible)
        )

    def joules(self) -> float | None:
        if self.nvml is None:
            return None
        return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)) / 1000.0


def run(gpu: bool, rounds: int | None) -> dict[str, Any]:
    import torch
    from sqlalchemy import select

    from aifab.spec import ModelSpec, TrainingSpec
    from aifab.store import Store
    from aifab.store.schema import RunMetric
    from aifab.train.trainer import model_config_for, train

    p = dict(GPU if gpu else QUICK)
    if rounds:
        p["rounds"] = rounds
    # GPU: the GPT-2 124M shape. ModelSpec has no layout keys, so it is the Llama layout (RMSNorm, RoPE,
    # SwiGLU of the same FLOPs as a 4x GELU MLP); the reference loop trains the very same model.
    spec = ModelSpec(preset="small", n_layer=12, n_head=12, d_model=768, context_len=1024) if gpu else ModelSpec()
    config = model_config_for(spec, p["vocab"])
    T, B = config.context_len, p["batch"]
    # eval and checkpoint only at the start and end: the bare loop does neither, and train_s excludes them
    base = TrainingSpec(
        steps=p["warmup"] + p["steps"], seconds=None, batch_size=B, eval_every=10**6, eval_batches=1,
        checkpoint_every=10**6, warmup_steps=0, device="cuda" if gpu else "cpu",
        dtype="bf16" if gpu else "fp32", compile=gpu,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="aifab-bench-train-") as tmp:
        store = Store(os.path.join(tmp, "home"))
        need = (p["warmup"] + p["steps"] + 2) * B * (T + 1)
        ds = synthetic_dataset(store, p["vocab"], train_tokens=need, val_tokens=4 * (T + 1))
        train(store, ds, spec, base.model_copy(update={"steps": 2}))  # warm-up: process, allocator, compile caches
        ours, bare, energy_j, mfu = [], [], None, None
        meter = Energy() if gpu else None
        for _ in range(p["rounds"]):
            # stop_check runs before every step but the last: call k comes after k steps (a synced point, as the
            # loop reads each step's loss). Energy is read after the warm-up steps and before the last step.
            first, last = p["warmup"], p["warmup"] + p["steps"] - 1
            marks: dict[int, float | None] = {}
            r = train(store, ds, spec, base, stop_check=energy_marks(meter, (first, last), marks))
            # steady state from the run's own history: steps warmup+1 .. warmup+steps, wall time between their
            # metric rows, so the trainer's per-step overhead (logging, flushes, progress) counts too
            with store.db.session() as s:
                rows = s.scalars(
                    select(RunMetric).where(RunMetric.run_id == r.run_id, RunMetric.key == "train_loss")
                ).all()
                at = {m.step: m.elapsed_s for m in rows}
            ours.append(p["steps"] * B * T / (at[p["warmup"] + p["steps"]] - at[p["warmup"]]))
            mfu = r.mfu if mfu is None or r.mfu is None else max(mfu, r.mfu)
            e0, e1 = marks.get(first), marks.get(last)
            if e0 is not None and e1 is not None:  # steady-state steps only, like the throughput
                energy_j = (e1 - e0) / ((last - first) * B * T)
            free_memory(gpu)
            bare.append(bare_loop(store, ds, config, base, p["steps"], p["warmup"], gpu))
            free_memory(gpu)
        store.close()
    name = torch.cuda.get_device_name() if gpu else f"cpu ({os.cpu_count()} cores)"
    print(f"{name}: {config.n_layer} layers, d_model {config.d_model}, context {T}, batch {B}, {p['steps']} steps")
    for i, (a, b) in enumerate(zip(ours, bare, strict=True)):
        print(f"  round {i + 1}: trainer {a:12,.0f} tok/s   bare {b:12,.0f} tok/s   ratio {a / b:.3f}")
    best, best_bare = max(ours), max(bare)
    if gpu:
        note = None if energy_j is not None else "joules_per_token is null: install nvidia-ml-py for NVML energy"
        if note:
            print(note)
        return {
            "device": name,
            "ref_tokens_per_s": round(best_bare, 1),
            "tokens_per_s": round(best, 1),
            "ratio_vs_ref": round(best / best_bare, 3),
            "mfu": round(mfu, 4) if mfu is not None else None,
            "joules_per_token": energy_j,
        }
    median = statistics.median(a / b for a, b in zip(ours, bare, strict=True))
    return {
        "cpu_tokens_per_s": round(best, 1),
        "bare_tokens_per_s": round(best_bare, 1),
        "cpu_ratio_vs_bare": round(median, 3),
        "cpu_ratio_best_vs_best": round(best / best_bare, 3),
        "mfu": round(mfu, 5) if mfu is not None else None,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="CPU: tiny preset, trainer vs bare loop")
    mode.add_argument("--gpu", action="store_true", help="CUDA: GPT-2 124M shape, trainer vs nanoGPT-style loop")
    ap.add_argument("--rounds", type=int, default=None, help="alternating trainer/bare rounds")
    args = ap.parse_args()
    os.environ.setdefault("AIFAB_NO_PROGRESS", "1")
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--gpu needs a CUDA device; torch {torch.__version__} sees none (use --quick on CPU)")
    print(json.dumps(run(args.gpu, args.rounds)))


if __name__ == "__main__":
    main()
