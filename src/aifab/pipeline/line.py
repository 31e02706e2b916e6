"""The demo: the whole line once, in this process, then a serving check and a report.

`run_line` runs the default pipeline (data -> train -> evaluate -> register; a `stages:` section is ignored)
through the same runner and stage bodies as `aifab run`, in this process instead of as jobs, and with every
stage forced: the demo always makes a new dataset, run and model version. Stages still record StageRuns, so a
later `aifab run` of the same factory.yaml reuses what the demo made. Every stage is metered, and what no stage
measured (registration, the hand-offs) is booked as `line-idle`, so the line's ledger rows add up to the energy
counter's difference over the whole line. Returns the report `aifab demo` prints.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aifab.errors import AifabError
from aifab.meter.ledger import Charge, Meter, Prices, totals_for
from aifab.pipeline.contracts import DataOutput, EvalOutput, RegisterOutput, TrainOutput
from aifab.pipeline.dag import build_pipeline
from aifab.pipeline.runner import InProcess, run_pipeline
from aifab.spec import FactorySpec
from aifab.store import Store


@dataclass(frozen=True)
class ServedRequest:
    """One test request of the serving check: sent whole, then streamed; greedy, so the texts must match."""

    prompt: str
    text: str
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    tokens_per_s: float
    stream_matches: bool


@dataclass(frozen=True)
class LineReport:
    """What the demo made and what it cost; `to_json()` is the object `aifab demo --json` prints."""

    data: DataOutput
    train: TrainOutput
    evaluate: EvalOutput
    model: RegisterOutput
    serve_command: str  # how to serve the model from a shell
    requests: list[ServedRequest] | None  # None: the serving check was skipped
    energy_j: float
    cost_usd: float
    co2_g: float
    energy_estimated: bool
    energy_sampler: str
    device: str
    elapsed_s: float
    home: str

    def to_json(self) -> dict[str, Any]:
        d, t, m = self.data, self.train, self.model
        name, _, version = m.model.partition(":")
        serving: dict[str, Any] = {"command": self.serve_command}
        if self.requests is not None:
            serving["requests"] = [asdict(r) for r in self.requests]
        return {
            "data": {k: getattr(d, k) for k in DATA_KEYS},
            "model": {
                "name": name,
                "version": int(version),
                "ref": m.model,
                "params": t.params,
                "config": t.model_config,
            },
            "train": {
                **{k: getattr(t, k) for k in TRAIN_KEYS},
                "val_loss_reduction": 1.0 - t.val_loss_final / t.val_loss_initial,
            },
            "evaluate": {k: getattr(self.evaluate, k) for k in ("val_loss", "perplexity", "val_tokens", "samples")},
            "serving": serving,
            **{k: getattr(self, k) for k in SUMMARY_KEYS},
        }


# the report's fields that come straight from the stages' outputs
DATA_KEYS = [
    "dataset",
    "files",
    "bytes",
    "documents",
    "skipped_files",
    "tokens",
    "train_tokens",
    "val_tokens",
    "vocab_size",
    "elapsed_s",
]
TRAIN_KEYS = [
    "run_id",
    "steps",
    "tokens",
    "tokens_per_s",
    "elapsed_s",
    "stopped_by",
    "val_loss_initial",
    "val_loss_final",
]
SUMMARY_KEYS = ("energy_j", "cost_usd", "co2_g", "energy_estimated", "energy_sampler", "device", "elapsed_s", "home")


def run_line(store: Store, spec: FactorySpec, *, serve_check: bool = True, base: Path | None = None) -> LineReport:
    """Run the line on `spec` (relative data paths against `base`, default the working directory)."""
    meter = Meter(store.db, Prices(**spec.meter.model_dump()))
    t0 = time.perf_counter()
    line_start_j = meter.sampler.energy_j()

    pipeline = build_pipeline(spec.model_copy(update={"stages": None}), base or Path.cwd())
    report = run_pipeline(store, pipeline, InProcess(meter), force=list(pipeline.stages))
    ds = DataOutput.from_json(report.outputs("data"))
    tr = TrainOutput.from_json(report.outputs("train"))
    mv = RegisterOutput.from_json(report.outputs("register"))

    requests = None
    if serve_check and spec.serving.requests > 0:
        with meter.measure("serve", "model", str(mv.model_version_id)) as charge:
            requests = check_serving(store, mv.model, spec)
            charge.tokens_in = sum(r.prompt_tokens for r in requests)
            charge.tokens_out = sum(r.completion_tokens for r in requests)

    subjects = [("dataset", str(ds.dataset_version_id)), ("run", tr.run_id), ("model", str(mv.model_version_id))]
    # what no stage measured (registration, the hand-offs between stages) is booked too, so the line's rows
    # add up to the counter's difference over the whole line
    idle_j = meter.sampler.energy_j() - line_start_j - totals_for(store.db, subjects)["energy_j"]
    if idle_j > 0:
        meter.record(
            Charge(
                stage="line-idle",
                subject_kind="model",
                subject_id=str(mv.model_version_id),
                energy_j=idle_j,
                cost_usd=meter.prices.cost_usd(idle_j),
                co2_g=meter.prices.co2_g(idle_j),
                estimated=meter.sampler.estimated,
                sampler=meter.sampler.name,
            )
        )
    spent = totals_for(store.db, subjects)
    return LineReport(
        data=ds,
        train=tr,
        evaluate=EvalOutput.from_json(report.outputs("evaluate")),
        model=mv,
        serve_command=f"aifab --home {store.home} serve {mv.model}",
        requests=requests,
        energy_j=spent["energy_j"],
        cost_usd=spent["cost_usd"],
        co2_g=spent["co2_g"],
        energy_estimated=meter.sampler.estimated,
        energy_sampler=meter.sampler.name,
        device=meter.sampler.device,
        elapsed_s=time.perf_counter() - t0,
        home=str(store.home),
    )


def check_serving(store: Store, model_ref: str, spec: FactorySpec) -> list[ServedRequest]:
    """Serve the model on a free loopback port and send real HTTP requests: each prompt once whole and once
    streamed, greedy, so the two texts must match."""
    import httpx

    from aifab.serve.api import create_app
    from aifab.serve.engine import Engine
    from aifab.serve.loaded import LoadedModel
    from aifab.web import BackgroundServer

    engine = Engine(LoadedModel.load(store, model_ref))
    prompts = (spec.evaluation.prompts or ["def "]) * spec.serving.requests
    results = []
    try:
        with BackgroundServer(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
            for prompt in prompts[: spec.serving.requests]:
                body = {"model": model_ref, "prompt": prompt, "max_tokens": spec.serving.max_tokens, "temperature": 0}
                t = time.perf_counter()
                resp = http.post("/v1/completions", json=body)
                latency_s = time.perf_counter() - t
                if resp.status_code != 200:
                    raise AifabError(f"the test request to {srv.url} failed: {resp.status_code} {resp.text[:200]}")
                out = resp.json()
                text, n = out["choices"][0]["text"], out["usage"]["completion_tokens"]
                streamed = stream_text(http, {**body, "stream": True})
                results.append(
                    ServedRequest(
                        prompt, text, latency_s, out["usage"]["prompt_tokens"], n, n / latency_s, streamed == text
                    )
                )
    finally:
        engine.close()
    return results


def stream_text(http: Any, body: dict[str, Any]) -> str:
    """POST a streaming completion and join the text of its SSE chunks."""
    import json

    parts: list[str] = []
    with http.stream("POST", "/v1/completions", json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                parts.extend(c["text"] for c in chunk.get("choices", []))
    return "".join(parts)
