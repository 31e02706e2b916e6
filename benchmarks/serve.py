"""Serving benchmark: `aifab serve` against a naive transformers server, over HTTP, on the same weights, in one run.

Both servers run as subprocesses and are driven by the same closed-loop load generator (httpx, asyncio): at
concurrency c, c workers each send `--rounds` requests back to back (more rounds where needed for at least 16
requests per level), after one unmeasured round at that level as warm-up. Every request has its own prompt
from the Python standard library's source, and every request asks for exactly `max_tokens` output tokens at
temperature 0 (`ignore_eos`, a vLLM-style extension; when the server refuses the field the benchmark says so
and goes on without it: the model's end-of-text logit row is zeroed, so greedy decoding never picks it anyway).

- aifab: `python -m aifab serve bench --port 0 --max-batch 64 --max-queue 256` on a random-weight model in the
  Llama layout, registered in a temporary AIFAB_HOME with a byte-level BPE trained on a slice of the stdlib.
  Requests stream (SSE). TTFT is the time to the first chunk with text; TPOT is (time of the last chunk -
  time of the first) / (completion tokens - 1). Output tokens are `usage.completion_tokens` of the last chunk.
- hf (the baseline): `aifab export-hf` of the very same model, loaded by `AutoModelForCausalLM.from_pretrained`
  behind a FastAPI `/v1/completions` defined here (run on uvicorn in a subprocess): a plain `def` endpoint, so
  FastAPI runs each request in its thread pool, and one `generate(max_new_tokens=N, min_new_tokens=N,
  do_sample=False)` per request on the same token ids the engine sees (end-of-text, then the prompt). It does
  not stream: its TTFT is the whole latency and it has no TPOT.

Per level: requests/s and output tokens/s (completed requests and their tokens over the level's wall time),
TTFT p50/p99 and TPOT p50/p99 in ms. The last line is JSON: concurrency (16), tokens_per_s, hf_tokens_per_s,
ratio_vs_hf (target >= 5), c1_ratio_vs_hf (the same ratio at concurrency 1; target >= 1.5), ttft_p50_ms,
tpot_p50_ms (aifab at concurrency 16), ignore_eos (whether the server took it), same_greedy_text (one prompt's
whole greedy completion from each server, compared: the check that both serve the same weights), device.
Each level runs `--repeats` times (2 on CPU), alternating between the servers, and each side's best repeat
counts; on CPU both servers are up at once, so a burst of background load hits both sides alike.

`--quick` (CPU, under a minute on 2 cores): 4 layers, d_model 384, 6 heads, context 512, vocabulary 4096 (8.6M
parameters, 34 MB in fp32); prompts of about 48 tokens, 32 output tokens. A decode step of this model at batch
1 is a few ms of Python and kernel-launch overhead plus a read of 34 MB of weights (more than the caches hold),
while its FLOPs are few, so one step over 16 sequences costs far less than 16 steps over one: the regime a real
model is in on a GPU, where serving one sequence at a time wastes the hardware. The aifab sweep is 1, 4, 16 and
64; the baseline runs at 1 and 16 (`--hf-levels` to change) to keep the run short.

`--gpu` (one CUDA device): the TinyLlama 1.1B shape (22 layers, 2048 wide, 32 heads, 4 KV heads, MLP 5632, vocab
32000, context 2048, untied) with random weights in bf16; prompts of about 128 tokens, 128 output tokens.
Besides the sweep it reports, through the aifab server, the decode tokens/s at batch 1 and batch 32 (b
concurrent streams of 256 tokens: b / median TPOT), the same for transformers `generate` in this process
(b * (N - 1) tokens over the time of N new tokens minus the time of 1), and the batch-1 fraction of the
memory-bandwidth roofline: bandwidth measured here (a 2 GiB device-to-device copy, bytes read + written per
second) over the bytes of weights one decode step reads (every parameter but the input embedding table, in
bf16). The aifab server gets `--device cuda` and `--dtype bf16` when `aifab serve --help` lists them; add
others with `--serve-arg`.
"""

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUICK = {
    "model": {"vocab_size": 4096, "n_layer": 4, "n_head": 6, "d_model": 384, "context_len": 512},
    "corpus_bytes": 3_000_000, "prompt_tokens": 48, "max_tokens": 32, "rounds": 2, "repeats": 2,
    "levels": (1, 4, 16, 64), "hf_levels": (1, 16), "start_timeout_s": 120,
}  # fmt: skip
GPU = {
    "model": {
        "vocab_size": 32000, "n_layer": 22, "n_head": 32, "n_kv_heads": 4, "d_model": 2048, "ffn_hidden": 5632,
        "context_len": 2048, "tie_embeddings": False,
    },
    "corpus_bytes": 12_000_000, "prompt_tokens": 128, "max_tokens": 128, "rounds": 2, "repeats": 1,
    "levels": (1, 4, 16, 64), "hf_levels": (1, 16), "start_timeout_s": 600, "decode_tokens": 256,
    "decode_batches": (1, 32),
}  # fmt: skip
REPORT_AT = 16
MIN_REQUESTS = 16  # per level: at low concurrency, more rounds


# ---------------------------------------------------------------------------------------------------- setup


def corpus(max_bytes: int) -> list[str]:
    """The stdlib's .py files in path order (as the data line lists them) until `max_bytes` are read."""
    from aifab.data.sources import list_files, stdlib_source

    texts, total = [], 0
    for path in list_files([stdlib_source()], [".py"]):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def build_model(home: str, p: dict[str, Any], texts: list[str], bf16: bool) -> tuple[Any, Any]:
    """Train a tokenizer, build a random-weight model and register it as `bench` in the store at `home`.
    Returns (tokenizer, ModelConfig)."""
    import torch

    from aifab.data.tokenize import train_tokenizer
    from aifab.nn.config import ModelConfig
    from aifab.nn.transformer import Transformer, num_params
    from aifab.nn.weights import to_bytes
    from aifab.registry.models import register
    from aifab.store import Store
    from aifab.tokens import end_of_text_id

    config = ModelConfig(**p["model"])
    tok = train_tokenizer(texts, config.vocab_size, 2)
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        # logit 0 for end-of-text while the others are spread around 0: greedy decoding never ends a request
        # early, even on a server that does not know `ignore_eos`
        model.lm_head.weight[end_of_text_id(tok)] = 0.0
    if bf16:
        model = model.to(torch.bfloat16)  # half the bytes to store; bf16 -> fp32 -> bf16 is exact
    store = Store(home)
    try:
        register(
            store,
            "bench",
            weights_digest=store.artifacts.put_bytes(to_bytes(model)),
            tokenizer_digest=store.artifacts.put_bytes(tok.to_str().encode()),
            config=config.to_dict(),
            params_count=num_params(model),
            metrics={},
            aliases=("latest",),
        )
    finally:
        store.close()
    return tok, config


def make_prompts(tok: Any, texts: list[str], n: int, prompt_tokens: int) -> tuple[list[str], list[list[int]]]:
    """n distinct prompts: windows of `prompt_tokens` ids over the corpus, as text and as ids."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts[-200:]):
        ids.extend(enc.ids)
    stride = max(prompt_tokens, (len(ids) - prompt_tokens) // max(n, 1))
    windows = [ids[i : i + prompt_tokens] for i in range(0, len(ids) - prompt_tokens, stride)][:n]
    while len(windows) < n:  # a short corpus: reuse windows shifted by one token
        windows.append(ids[len(windows) % 97 : len(windows) % 97 + prompt_tokens])
    return [tok.decode(w) for w in windows], windows


def env_for(home: str) -> dict[str, str]:
    return {
        **os.environ,
        "AIFAB_HOME": home,
        "AIFAB_NO_PROGRESS": "1",
        "COLUMNS": "250",  # rich must not wrap the line that names the URL
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }


def aifab_cli(home: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "aifab", *args], env=env_for(home), capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"aifab {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout + proc.stderr


class Server:
    """A server subprocess that prints `... http://HOST:PORT/v1 ...` on stderr once it listens.
    `with Server(name, cmd, env, timeout_s) as s:` gives s.url; the process is terminated (then killed) on exit."""

    URL = re.compile(r"(http://[\w.\-\[\]:]+)/v1")

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], timeout_s: float) -> None:
        self.name, self.cmd, self.env, self.timeout_s = name, cmd, env, timeout_s
        self.log: deque[str] = deque(maxlen=50)
        self.url = ""

    def __enter__(self) -> "Server":
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        found = threading.Event()

        def drain() -> None:  # keep reading so a chatty server never blocks on a full pipe
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line.rstrip())
                m = self.URL.search(line)
                if m and not found.is_set():
                    self.url = m.group(1)
                    found.set()

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + self.timeout_s
        while not found.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                why = f"exited with {self.proc.returncode}" if self.proc.returncode is not None else "timed out"
                raise SystemExit(f"{self.name} server {why} before listening:\n" + "\n".join(self.log))
        self._wait_healthy(deadline)
        return self

    def _wait_healthy(self, deadline: float) -> None:
        import httpx

        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"{self.name} server never answered /healthz:\n" + "\n".join(self.log))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------- the baseline


def hf_server_main(model_dir: str, device: str, dtype: str) -> None:
    """The naive baseline: one `generate` call per request, FastAPI's thread pool for concurrency."""
    import socket
    import uuid

    import torch
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel, ConfigDict
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from aifab.tokens import end_of_text_id

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    eot = end_of_text_id(tok)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()

    class Body(BaseModel):
        model_config = ConfigDict(extra="allow")  # temperature, stream, ignore_eos...: greedy, fixed length anyway
        model: str
        prompt: str
        max_tokens: int = 16

    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    def completions(body: Body) -> dict[str, Any]:  # plain def: FastAPI runs it in its thread pool
        ids = [eot, *tok.encode(body.prompt).ids]  # what the aifab engine feeds the model
        x = torch.tensor([ids], device=device)
        n = body.max_tokens
        with torch.inference_mode():
            out = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=eot,
            )  # fmt: skip
        new = out[0, len(ids) :].tolist()
        choice = {"text": tok.decode(new), "index": 0, "logprobs": None, "finish_reason": "length"}
        usage = {"prompt_tokens": len(ids) - 1, "completion_tokens": len(new), "total_tokens": len(ids) - 1 + len(new)}
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": body.model, "choices": [choice], "usage": usage,
        }  # fmt: skip

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    print(f"serving hf {model_dir} on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


# ------------------------------------------------------------------------------------------ the load generator


@dataclass
class Sample:
    ttft_s: float
    latency_s: float
    tokens: int
    tpot_s: float | None


@dataclass
class Level:
    server: str
    concurrency: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return len(self.samples) / self.wall_s

    def pct_ms(self, what: str, q: float) -> float | None:
        import numpy as np

        values = [getattr(s, what) for s in self.samples if getattr(s, what) is not None]
        return float(np.percentile(values, q)) * 1000 if values else None


async def request(client: Any, url: str, body: dict[str, Any], stream: bool) -> Sample:
    """One completion. Streaming: TTFT at the first chunk with text, TPOT over the chunks after it."""
    t0 = time.perf_counter()
    if not stream:
        r = await client.post(f"{url}/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.text[:500]}")
        latency = time.perf_counter() - t0
        return Sample(latency, latency, int(r.json()["usage"]["completion_tokens"]), None)
    first = last = None
    tokens = None
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread()).decode()[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"{url}: stream error: {chunk['error']}")
            now = time.perf_counter()
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = now
            if chunk.get("usage"):
                tokens, last = int(chunk["usage"]["completion_tokens"]), now
    if tokens is None or last is None:
        raise RuntimeError(f"{url}: the stream ended without usage")
    first = first if first is not None else last
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return Sample(first - t0, last - t0, tokens, tpot)


async def run_level(
    server: str, url: str, prompts: list[str], body: dict[str, Any], c: int, rounds: int, stream: bool
) -> Level:
    """c workers, each sending `rounds` requests back to back; prompts taken in order."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        samples: list[Sample] = []
        nxt = iter(range(c * rounds))

        async def worker() -> None:
            for i in nxt:
                samples.append(await request(client, url, {**body, "prompt": prompts[i % len(prompts)]}, stream))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        return Level(server, c, time.perf_counter() - t0, samples)


def measure(
    server: str,
    url: str,
    prompts: list[str],
    body: dict[str, Any],
    c: int,
    rounds: int,
    stream: bool,
    warm: bool = True,
    best: Level | None = None,
) -> Level:
    """One level: (with `warm`) an unmeasured round at concurrency c on other prompts, then the measured one.
    Returns whichever of it and `best` (an earlier repeat) had the higher tokens/s."""
    if warm:
        asyncio.run(run_level(server, url, prompts[::-1], body, c, 1, stream))
    lv = asyncio.run(run_level(server, url, prompts, body, c, max(rounds, -(-MIN_REQUESTS // c)), stream))
    print(f"  {server:5} c={c:<3} {len(lv.samples):4d} requests {lv.tokens_per_s:10.1f} tok/s", file=sys.stderr)
    return lv if best is None or lv.tokens_per_s > best.tokens_per_s else best


def completion_text(url: str, body: dict[str, Any], prompt: str) -> str:
    """The whole text of one non-streamed completion."""
    import httpx

    r = httpx.post(f"{url}/v1/completions", json={**body, "prompt": prompt}, timeout=300)
    if r.status_code != 200:
        raise SystemExit(f"{url}: HTTP {r.status_code}: {r.text[:500]}")
    return str(r.json()["choices"][0]["text"])


def probe_ignore_eos(url: str, body: dict[str, Any]) -> bool:
    """True when the server takes `ignore_eos`; False (with a note) when it refuses the field."""
    import httpx

    r = httpx.post(f"{url}/v1/completions", json={**body, "prompt": "def ", "max_tokens": 2}, timeout=300)
    if r.status_code == 200:
        return True
    if r.status_code == 400 and "ignore_eos" in r.text:
        print(
            "note: the server refuses ignore_eos; sending no ignore_eos (the zeroed end-of-text logit keeps "
            "outputs at max_tokens; usage.completion_tokens counts what was really sent)",
            file=sys.stderr,
        )
        return False
    raise SystemExit(f"probe request failed: HTTP {r.status_code}: {r.text[:500]}")


# ------------------------------------------------------------------------------------------------- GPU extras


def serve_flags() -> list[str]:
    """--device cuda / --dtype bf16 for `aifab serve`, where its --help lists them."""
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "aifab", "serve", "--help"], env=env, capture_output=True, text=True, check=False
    )
    text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
    flags = []
    if re.search(r"--device\b", text):
        flags += ["--device", "cuda"]
    if re.search(r"--dtype\b", text):
        flags += ["--dtype", "bf16"]
    if not flags:
        print("note: aifab serve has no --device/--dtype; the engine picks its own device and dtype", file=sys.stderr)
    return flags


def bandwidth_gb_s(gib: int = 2, iters: int = 20) -> float:
    """Device memory bandwidth: a `gib` GiB device-to-device copy, bytes read + written per second."""
    import torch

    n = (gib << 30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (gib << 30) * iters / seconds / 1e9


def hf_decode_tokens_per_s(
    model_dir: str, windows: list[list[int]], eot: int, batches: tuple[int, ...], n: int
) -> dict[int, float]:
    """transformers `generate` in this process: decode tokens/s at each batch size, prefill excluded."""
    import torch
    from transformers import AutoModelForCausalLM

    def timed(model: Any, x: Any, new: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                pad_token_id=eot,
            )  # fmt: skip
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda").eval()
    out = {}
    for b in batches:
        x = torch.tensor([[eot, *windows[i % len(windows)]] for i in range(b)], device="cuda")
        timed(model, x, 8)  # warm-up
        out[b] = b * (n - 1) / (timed(model, x, n) - timed(model, x, 1))
    return out


def decode_weight_bytes(config: Any) -> int:
    """Bytes of bf16 weights one decode step reads: every parameter but an untied input embedding table."""
    d, kv, L = config.d_model, config.kv_heads * config.head_dim, config.n_layer
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * config.hidden + 2 * d
    return 2 * (L * per_layer + d + config.vocab_size * d)


# ---------------------------------------------------------------------------------------------------- the run


def table(levels: list[Level]) -> None:
    from rich.console import Console
    from rich.table import Table

    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v:,.1f}"

    t = Table(title="closed-loop sweep (ms; hf does not stream: its TTFT is the whole latency)")
    for col in ("server", "conc.", "requests", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99"):
        t.add_column(col, justify="left" if col == "server" else "right")
    for lv in levels:
        t.add_row(
            lv.server, str(lv.concurrency), str(len(lv.samples)), f"{lv.requests_per_s:.2f}",
            f"{lv.tokens_per_s:,.1f}", ms(lv.pct_ms("ttft_s", 50)), ms(lv.pct_ms("ttft_s", 99)),
            ms(lv.pct_ms("tpot_s", 50)), ms(lv.pct_ms("tpot_s", 99)),
        )  # fmt: skip
    Console(width=140).print(t)


def run(gpu: bool, args: argparse.Namespace) -> dict[str, Any]:
    p = dict(GPU if gpu else QUICK)
    levels = tuple(args.levels or p["levels"])
    hf_levels = tuple(args.hf_levels or p["hf_levels"])
    rounds = args.rounds or p["rounds"]
    repeats = args.repeats or p["repeats"]
    max_tokens = args.max_tokens or p["max_tokens"]
    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="aifab-bench-serve-")
    try:
        home, hf_dir = os.path.join(tmp, "home"), os.path.join(tmp, "hf")
        texts = corpus(p["corpus_bytes"])
        tok, config = build_model(home, p, texts, bf16=gpu)
        n_prompts = max(rounds * max(levels), 64) * 2
        prompts, windows = make_prompts(tok, texts, n_prompts, p["prompt_tokens"])
        aifab_cli(home, "export-hf", "bench", hf_dir)
        env = env_for(home)
        body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        print(f"setup {time.perf_counter() - t_start:.1f} s; {config}", file=sys.stderr)

        extra = (serve_flags() if gpu else []) + list(args.serve_arg)
        max_batch = max(*levels, *(p.get("decode_batches", ()) if gpu else ()))
        cmd = [sys.executable, "-m", "aifab", "serve", "bench", "--port", "0", "--max-batch", str(max_batch)]
        cmd += ["--max-queue", str(max(256, 4 * max_batch)), *extra]
        hf_cmd = [sys.executable, os.path.abspath(__file__), "--hf-server", hf_dir]
        hf_cmd += ["--hf-device", "cuda" if gpu else "cpu", "--hf-dtype", "bf16" if gpu else "fp32"]
        ours: dict[int, Level] = {}
        hf: dict[int, Level] = {}
        decode: dict[int, Level] = {}
        with contextlib.ExitStack() as stack:
            srv = stack.enter_context(Server("aifab", cmd, env, p["start_timeout_s"]))
            ignore_eos = probe_ignore_eos(srv.url, body)
            if not ignore_eos:
                body.pop("ignore_eos")
            ours_text = completion_text(srv.url, body, prompts[0])
            # CPU: both servers up at once and the levels interleaved (aifab c, hf c, ...), so a change in the
            # machine's background load hits both sides alike. GPU: one server at a time, since the engine may
            # reserve most of the card's memory for its KV cache.
            hf_srv = None if gpu else stack.enter_context(Server("hf", hf_cmd, env, p["start_timeout_s"]))
            hf_text = None if hf_srv is None else completion_text(hf_srv.url, body, prompts[0])
            for c in sorted(set(levels) | set(hf_levels)):
                for r in range(repeats):  # alternating, the best repeat of each side counts
                    if c in levels:
                        ours[c] = measure("aifab", srv.url, prompts, body, c, rounds, True, r == 0, ours.get(c))
                    if hf_srv is not None and c in hf_levels:
                        hf[c] = measure("hf", hf_srv.url, prompts, body, c, rounds, False, r == 0, hf.get(c))
            if gpu:
                long = {**body, "max_tokens": p["decode_tokens"]}
                for b in p["decode_batches"]:  # every stream decodes at once: b / TPOT is the batch-b decode rate
                    decode[b] = measure(f"aifab decode b={b}", srv.url, prompts, long, b, 1, stream=True)
        if gpu:
            with Server("hf", hf_cmd, env, p["start_timeout_s"]) as hf_srv:
                hf_text = completion_text(hf_srv.url, body, prompts[0])
                for c in hf_levels:
                    for r in range(repeats):
                        hf[c] = measure("hf", hf_srv.url, prompts, body, c, rounds, False, r == 0, hf.get(c))

        table([*ours.values(), *hf.values(), *decode.values()])
        both = set(ours) & set(hf)
        if not both:
            raise SystemExit("--levels and --hf-levels share no concurrency level: nothing to compare")
        at = REPORT_AT if REPORT_AT in both else max(both)
        c1 = min(both)
        result: dict[str, Any] = {
            "concurrency": at,
            "tokens_per_s": round(ours[at].tokens_per_s, 1),
            "hf_tokens_per_s": round(hf[at].tokens_per_s, 1),
            "ratio_vs_hf": round(ours[at].tokens_per_s / hf[at].tokens_per_s, 3),
            "c1_ratio_vs_hf": round(ours[c1].tokens_per_s / hf[c1].tokens_per_s, 3),
            "ttft_p50_ms": round(ours[at].pct_ms("ttft_s", 50) or 0.0, 1),
            "tpot_p50_ms": round(ours[at].pct_ms("tpot_s", 50) or 0.0, 2),
            "ignore_eos": ignore_eos,
            "same_greedy_text": ours_text == hf_text,
        }
        if ours_text != hf_text:  # bf16 kernels at other batch shapes may round differently; fp32 on CPU should not
            print(f"note: greedy texts differ\n  aifab: {ours_text!r}\n  hf:    {hf_text!r}", file=sys.stderr)
        if gpu:
            import torch

            from aifab.tokens import end_of_text_id

            # the servers are gone: the card is this process's alone
            bw = bandwidth_gb_s()
            ref = hf_decode_tokens_per_s(hf_dir, windows, end_of_text_id(tok), p["decode_batches"], p["decode_tokens"])
            ours_decode = {b: b / (lv.pct_ms("tpot_s", 50) / 1000) for b, lv in decode.items()}
            weight_bytes = decode_weight_bytes(config)
            roofline = bw * 1e9 / weight_bytes
            for b in p["decode_batches"]:
                print(f"decode batch {b}: aifab {ours_decode[b]:,.1f} tok/s, transformers generate {ref[b]:,.1f}")
            gb = weight_bytes / 1e9
            print(f"bandwidth {bw:,.0f} GB/s over {gb:.2f} GB of weights a step: roofline {roofline:,.1f} tok/s")
            result = {
                "device": torch.cuda.get_device_name(),
                **result,
                "batch1_tokens_per_s": round(ours_decode[1], 1),
                "batch32_tokens_per_s": round(ours_decode[32], 1),
                "hf_batch1_tokens_per_s": round(ref[1], 1),
                "hf_batch32_tokens_per_s": round(ref[32], 1),
                "bandwidth_gb_s": round(bw, 1),
                "weight_gb": round(weight_bytes / 1e9, 3),
                "roofline_tokens_per_s": round(roofline, 1),
                "batch1_roofline_fraction": round(ours_decode[1] / roofline, 3),
            }
        else:
            result["device"] = f"cpu ({os.cpu_count()} cores)"
        print(f"total {time.perf_counter() - t_start:.1f} s", file=sys.stderr)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def levels_arg(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="CPU: 8.6M-parameter model, aifab vs transformers")
    mode.add_argument("--gpu", action="store_true", help="CUDA: TinyLlama 1.1B shape in bf16, plus the roofline")
    mode.add_argument("--hf-server", metavar="DIR", help=argparse.SUPPRESS)  # the baseline's own process
    ap.add_argument("--hf-device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--hf-dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--levels", type=levels_arg, help="aifab concurrency levels (default 1,4,16,64)")
    ap.add_argument("--hf-levels", type=levels_arg, help="baseline concurrency levels (default 1,16)")
    ap.add_argument("--rounds", type=int, help="requests each worker sends per level (default 2)")
    ap.add_argument("--repeats", type=int, help="measured repeats of each level, best counts (default 2; GPU 1)")
    ap.add_argument("--max-tokens", type=int, help="output tokens per request")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra argument for `aifab serve` (repeatable)")
    args = ap.parse_args()
    if args.hf_server:
        hf_server_main(args.hf_server, args.hf_device, args.hf_dtype)
        return
    os.environ.setdefault("AIFAB_NO_PROGRESS", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the servers
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--gpu needs a CUDA device; torch {torch.__version__} sees none (use --quick on CPU)")
    print(json.dumps(run(args.gpu, args)))


if __name__ == "__main__":
    main()
