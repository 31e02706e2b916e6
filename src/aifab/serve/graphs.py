"""Decode steps in static shapes, replayed from CUDA graphs.

A decode step of a small model on a GPU is hundreds of short kernels: launching them from Python takes longer
than running them. A CUDA graph records the launches once and replays them with one call. It needs every
shape and every address fixed, so `DecodeGraphs` keeps the step's inputs in static buffers and runs the
model over a `kv.RowsLayout`: R rows (slots 0..R-1, R a power of two up to the batch) reading L keys (a power
of two up to the context). At start it captures one graph per (R, L) bucket, largest first, all in one memory
pool; a step copies its tokens, positions and lengths into the buffers (one host-to-device copy) and replays
the smallest bucket that holds it. Steps with prompt chunks run eagerly (their shapes vary too much).

Without CUDA (or with `capture=False`) the same static-shape code runs eagerly: that is how its correctness
is tested on CPU. With `compile=True` the model runs through torch.compile inside the graphs: the fused
kernels of a compiled decode step, with the launch cost of a graph.
"""

from typing import Any

import torch
from torch import Tensor

from aifab.serve.kv import RowsLayout, SlotCache

MIN_KEYS = 64  # smallest key bucket: below it, reading a few more keys costs less than another graph


def buckets(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` up to `limit`, and `limit` itself."""
    out, b = [], min(smallest, limit)
    while b < limit:
        out.append(b)
        b *= 2
    return [*out, limit]


def bucket_for(n: int, sizes: list[int]) -> int:
    return next(b for b in sizes if b >= n)


class DecodeGraphs:
    """Decode-only steps of `model` over `cache` in static (rows, keys) buckets: captured as CUDA graphs when
    `capture` and the cache is on a GPU, else run eagerly with the same shapes; `compile` wraps the model in
    torch.compile first. `step()` runs one step."""

    def __init__(self, model: Any, cache: SlotCache, capture: bool, compile: bool = False) -> None:
        self.model, self.cache = model, cache
        self.fwd = torch.compile(model, dynamic=True) if compile else model
        self.row_sizes = buckets(cache.n_slots)
        self.key_sizes = buckets(cache.max_len, MIN_KEYS)
        dev = torch.device(cache.device)
        # rows: token, position, key length; one buffer so a step's inputs are one copy
        self.inputs = torch.zeros(3, cache.n_slots, dtype=torch.long, device=dev)
        self.row_ids = torch.arange(cache.n_slots, device=dev)
        self.graphs: dict[tuple[int, int], tuple[Any, Tensor]] = {}
        self.capture = capture and dev.type == "cuda"
        if self.capture:
            self._capture_all()

    def _forward(self, R: int, L: int) -> Tensor:
        """The model over rows 0..R-1 of the buffers: logits (R, V)."""
        tokens, positions, lengths = self.inputs[0, :R], self.inputs[1, :R], self.inputs[2, :R]
        self.cache.layout = RowsLayout(positions, lengths, self.row_ids[:R], L)
        try:
            logits, _ = self.fwd(tokens.view(1, R), cache=self.cache, positions=positions)
        finally:
            self.cache.layout = None
        out: Tensor = logits[0]
        return out

    def _capture_all(self) -> None:
        """One graph per bucket, largest first so the smaller ones reuse its memory. The dummy inputs write
        position 0 of each slot, before any request holds one."""
        self.inputs[2].fill_(1)
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for R in reversed(self.row_sizes):
                for L in reversed(self.key_sizes):
                    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):  # warm-up off the capture: cuBLAS handles, compilation
                        for _ in range(2):
                            self._forward(R, L)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    # thread-local: only this thread is barred from unsafe CUDA calls while it captures. In the
                    # default (global) mode another engine of the process (the version an alias switch replaces,
                    # still serving on its own thread) would fail its steps' syncs and allocations meanwhile
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                        out = self._forward(R, L)
                    self.graphs[(R, L)] = (graph, out)
        torch.cuda.synchronize()

    def step(self, rows: list[tuple[int, int, int]]) -> Tensor:
        """rows: (slot, token, position) of each decoding sequence -> logits (R, V), row s for slot s.

        On CUDA the result is the graph's output buffer, overwritten by the next step: read it first."""
        R = bucket_for(max(s for s, _, _ in rows) + 1, self.row_sizes)
        L = bucket_for(max(p for _, _, p in rows) + 1, self.key_sizes)
        tokens, positions, lengths = [0] * R, [0] * R, [1] * R  # dummy rows read key 0 only
        for s, tok, p in rows:
            tokens[s], positions[s], lengths[s] = tok, p, p + 1
        self.inputs[:, :R].copy_(torch.tensor([tokens, positions, lengths]), non_blocking=True)
        if self.capture:
            graph, out = self.graphs[(R, L)]
            graph.replay()
            return out
        return self._forward(R, L)
