"""Run the whole line once, in this process: ingest -> train -> evaluate -> register -> serve check.

Each stage hands the next only ids and digests read back from the store, so any stage could run in
another process. Every stage is metered into the ledger. Returns the report `aifab demo` prints.
"""

import time
from collections.abc import Callable
from typing import Any

from aifab.data.ingest import ingest
from aifab.errors import AifabError
from aifab.evaluate import evaluate
from aifab.meter.ledger import Charge, Meter, Prices, totals_for
from aifab.registry.models import register
from aifab.spec import BudgetsSpec, FactorySpec
from aifab.store import Store
from aifab.store.schema import DatasetVersion
from aifab.train.trainer import train


def run_line(store: Store, spec: FactorySpec, *, serve_check: bool = True) -> dict[str, Any]:
    meter = Meter(store.db, Prices(**spec.meter.model_dump()))
    t0 = time.perf_counter()
    line_start_j = meter.sampler.energy_j()

    with meter.measure("data", "dataset") as charge:
        ds = ingest(store, spec.name, spec.data, spec.tokenizer)
        charge.subject_id, charge.tokens_out = str(ds.dataset_version_id), ds.tokens

    with meter.measure("train", "run") as charge:
        tr = train(store, ds.dataset_version_id, spec.model, spec.training, budget_check(meter, spec.budgets))
        charge.subject_id, charge.tokens_in = tr.run_id, tr.tokens

    with store.db.session() as s:
        row = s.get(DatasetVersion, ds.dataset_version_id)
        assert row is not None
        manifest_digest = row.manifest_digest
    with meter.measure("evaluate", "run", tr.run_id):
        ev = evaluate(
            store,
            tr.checkpoint_digest,
            tr.tokenizer_digest,
            manifest_digest,
            batches=spec.evaluation.batches,
            batch_size=spec.training.batch_size,
            prompts=spec.evaluation.prompts,
            max_new_tokens=spec.evaluation.max_new_tokens,
            seed=spec.training.seed,
        )

    mv = register(
        store,
        spec.name,
        weights_digest=tr.checkpoint_digest,
        tokenizer_digest=tr.tokenizer_digest,
        config=tr.model_config,
        params_count=tr.params,
        run_id=tr.run_id,
        dataset_version_id=ds.dataset_version_id,
        aliases=("latest",),
        metrics={"val_loss": ev.val_loss, "perplexity": ev.perplexity, "val_loss_initial": tr.val_loss_initial},
    )
    model_ref = f"{mv.name}:{mv.version}"

    serving: dict[str, Any] = {"command": f"aifab --home {store.home} serve {model_ref}"}
    if serve_check and spec.serving.requests > 0:
        with meter.measure("serve", "model", str(mv.id)) as charge:
            serving.update(check_serving(store, model_ref, spec))
            charge.tokens_in = sum(r["prompt_tokens"] for r in serving["requests"])
            charge.tokens_out = sum(r["completion_tokens"] for r in serving["requests"])

    subjects = [("dataset", str(ds.dataset_version_id)), ("run", tr.run_id), ("model", str(mv.id))]
    # what no stage measured (registration, the hand-offs between stages) is booked too, so the line's rows
    # add up to the counter's difference over the whole line
    idle_j = meter.sampler.energy_j() - line_start_j - totals_for(store.db, subjects)["energy_j"]
    if idle_j > 0:
        meter.record(
            Charge(
                stage="line-idle",
                subject_kind="model",
                subject_id=str(mv.id),
                energy_j=idle_j,
                cost_usd=meter.prices.cost_usd(idle_j),
                co2_g=meter.prices.co2_g(idle_j),
                estimated=meter.sampler.estimated,
                sampler=meter.sampler.name,
            )
        )
    spent = totals_for(store.db, subjects)
    return {
        "data": {
            "dataset": f"{ds.name}:{ds.version}",
            "files": ds.files,
            "bytes": ds.bytes,
            "documents": ds.documents,
            "skipped_files": ds.skipped_files,
            "tokens": ds.tokens,
            "train_tokens": ds.train_tokens,
            "val_tokens": ds.val_tokens,
            "vocab_size": ds.vocab_size,
            "elapsed_s": ds.elapsed_s,
        },
        "model": {
            "name": mv.name,
            "version": mv.version,
            "ref": model_ref,
            "params": tr.params,
            "config": tr.model_config,
        },
        "train": {
            "run_id": tr.run_id,
            "steps": tr.steps,
            "tokens": tr.tokens,
            "tokens_per_s": tr.tokens_per_s,
            "elapsed_s": tr.elapsed_s,
            "stopped_by": tr.stopped_by,
            "val_loss_initial": tr.val_loss_initial,
            "val_loss_final": tr.val_loss_final,
            "val_loss_reduction": 1.0 - tr.val_loss_final / tr.val_loss_initial,
        },
        "evaluate": {
            "val_loss": ev.val_loss,
            "perplexity": ev.perplexity,
            "val_tokens": ev.val_tokens,
            "samples": [{"prompt": p, "completion": c} for p, c in ev.samples],
        },
        "serving": serving,
        "energy_j": spent["energy_j"],
        "cost_usd": spent["cost_usd"],
        "co2_g": spent["co2_g"],
        "energy_estimated": meter.sampler.estimated,
        "energy_sampler": meter.sampler.name,
        "device": meter.sampler.device,
        "elapsed_s": time.perf_counter() - t0,
        "home": str(store.home),
    }


def budget_check(meter: Meter, budgets: BudgetsSpec) -> Callable[[], str | None]:
    """A stop_check for the trainer: the energy or cost budget, measured from the start of training."""
    start_j = meter.sampler.energy_j()

    def check() -> str | None:
        spent_j = meter.spent_j(start_j)
        if budgets.energy_j is not None and spent_j >= budgets.energy_j:
            return "energy budget"
        if budgets.cost_usd is not None and meter.prices.cost_usd(spent_j) >= budgets.cost_usd:
            return "cost budget"
        return None

    return check


def check_serving(store: Store, model_ref: str, spec: FactorySpec) -> dict[str, Any]:
    """Serve the model on a free loopback port and send real HTTP requests: each prompt once whole and once
    streamed, greedy, so the two texts must match."""
    import httpx

    from aifab.serve.api import create_app
    from aifab.serve.engine import Engine
    from aifab.serve.loaded import LoadedModel
    from aifab.serve.server import BackgroundServer

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
                streamed = stream_text(http, {**body, "stream": True})
                n = out["usage"]["completion_tokens"]
                results.append(
                    {
                        "prompt": prompt,
                        "text": out["choices"][0]["text"],
                        "latency_s": latency_s,
                        "prompt_tokens": out["usage"]["prompt_tokens"],
                        "completion_tokens": n,
                        "tokens_per_s": n / latency_s,
                        "stream_matches": streamed == out["choices"][0]["text"],
                    }
                )
    finally:
        engine.close()
    return {"requests": results}


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
