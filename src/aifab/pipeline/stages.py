"""The body of each built-in pipeline stage, run inside its job's process by `aifab stage run --task JSON`.

A task (built by pipeline.job_spec) is `{pipeline, stage, uses, params, inputs, meter, base}`: `params` are the
stage's resolved parameters (what its key covers) and `inputs` the outputs of every stage upstream of it,
`{stage: {"uses": ..., "outputs": {...}}}`. `execute(store, task)` runs the stage, metered into the ledger, and
returns its outputs: ids and digests of what it made, read back from the store, which the job reports with
`attempt.write_result`. A `command` stage replaces this process with the user's command (see `exec_command`).

A train stage survives its own retries: it remembers its run id in the job's state, and a later attempt resumes
that run from its newest checkpoint. On SIGTERM (preemption) it checkpoints, leaves the run resumable and exits
with EXIT_PREEMPTED, so the control plane requeues it.
"""

import json
import os
import sys
import time
from functools import partial
from typing import Any

from aifab.errors import AifabError
from aifab.jobs import attempt
from aifab.store import Store
from aifab.store.schema import DatasetVersion, Run


class Preempted(Exception):
    """The stage stopped for preemption after checkpointing; the job exits with EXIT_PREEMPTED."""


def upstream(task: dict[str, Any], uses: str) -> dict[str, Any]:
    """The outputs of the one stage of kind `uses` upstream of this one (the pipeline checked there is one)."""
    found = [v["outputs"] for v in task["inputs"].values() if v["uses"] == uses]
    if len(found) != 1:
        raise AifabError(f"stage {task['stage']!r} needs one `uses: {uses}` stage upstream, got {len(found)}")
    out: dict[str, Any] = found[0]
    return out


def execute(store: Store, task: dict[str, Any]) -> dict[str, Any]:
    from aifab.meter.ledger import Meter, Prices

    meter = Meter(store.db, Prices(**task["meter"]))
    body = {"data": _data, "train": _train, "evaluate": _evaluate, "register": _register}.get(task["uses"])
    if body is None:
        raise AifabError(f"stage {task['stage']!r}: `uses: {task['uses']}` has no built-in body")
    return body(store, task, meter)


def _data(store: Store, task: dict[str, Any], meter: Any) -> dict[str, Any]:
    from aifab.data.ingest import ingest
    from aifab.spec import DataSpec, TokenizerSpec

    p = task["params"]
    with meter.measure("data", "dataset") as charge:
        ds = ingest(
            store, p["dataset"], DataSpec.model_validate(p["data"]), TokenizerSpec.model_validate(p["tokenizer"])
        )
        charge.subject_id, charge.tokens_out = str(ds.dataset_version_id), ds.tokens
    with store.db.session() as s:
        row = s.get(DatasetVersion, ds.dataset_version_id)
        assert row is not None
        manifest_digest, tokenizer_digest = row.manifest_digest, row.tokenizer_digest
    return {
        "dataset_version_id": ds.dataset_version_id,
        "dataset": f"{ds.name}:{ds.version}",
        "manifest_digest": manifest_digest,
        "tokenizer_digest": tokenizer_digest,
        "documents": ds.documents,
        "tokens": ds.tokens,
    }


def _train(store: Store, task: dict[str, Any], meter: Any) -> dict[str, Any]:
    from aifab.pipeline.line import budget_check
    from aifab.spec import BudgetsSpec, ModelSpec, TrainingSpec
    from aifab.train.trainer import PREEMPTED, resume, train

    p, data = task["params"], upstream(task, "data")
    training, budgets = TrainingSpec.model_validate(p["training"]), BudgetsSpec.model_validate(p["budgets"])
    in_job = attempt.current() is not None
    preempted = attempt.preemption_check() if in_job else (lambda: None)
    run_id: str | None = attempt.recall("run_id") if in_job else None
    on_run = partial(attempt.remember, "run_id") if in_job else None  # a retry resumes this run
    over_budget = budget_check(meter, budgets)

    def stop_check() -> str | None:
        return preempted() or over_budget()

    resumed_from_step = 0
    with meter.measure("train", "run") as charge:
        if run_id is not None and (resumed_from_step := _resumable(store, run_id)):
            print(f"stage {task['stage']!r}: resuming run {run_id} from step {resumed_from_step}", file=sys.stderr)
            tr = resume(store, run_id, stop_check, on_run=on_run)
        else:
            model = ModelSpec.model_validate(p["model"])
            tr = train(store, data["dataset_version_id"], model, training, stop_check, on_run=on_run)
        charge.subject_id, charge.tokens_in = tr.run_id, tr.tokens
    if tr.stopped_by == PREEMPTED:  # the trainer checkpointed and left the run resumable
        raise Preempted(tr.run_id)
    return {
        "run_id": tr.run_id,
        "checkpoint_digest": tr.checkpoint_digest,
        "tokenizer_digest": tr.tokenizer_digest,
        "manifest_digest": data["manifest_digest"],
        "dataset_version_id": data["dataset_version_id"],
        "model_config": tr.model_config,
        "params": tr.params,
        "steps": tr.steps,
        "tokens": tr.tokens,
        "stopped_by": tr.stopped_by,
        "resumed_from_step": resumed_from_step,  # 0: this attempt started the run
        "val_loss_initial": tr.val_loss_initial,
        "val_loss_final": tr.val_loss_final,
    }


def _resumable(store: Store, run_id: str) -> int:
    """The step of run `run_id`'s newest complete checkpoint when the run can be resumed, else 0."""
    from aifab.train.checkpoint import latest_complete

    with store.db.session() as s:
        run = s.get(Run, run_id)
        if run is None or run.status == "completed":
            return 0
    ckpt = latest_complete(store.work_dir("runs", run_id, "checkpoints"))
    return ckpt.step if ckpt is not None else 0


def _evaluate(store: Store, task: dict[str, Any], meter: Any) -> dict[str, Any]:
    from aifab.evaluate import evaluate

    p, tr = task["params"], upstream(task, "train")
    ev_spec = p["evaluation"]
    with meter.measure("evaluate", "run", tr["run_id"]):
        ev = evaluate(
            store,
            tr["checkpoint_digest"],
            tr["tokenizer_digest"],
            tr["manifest_digest"],
            batches=ev_spec["batches"],
            batch_size=p["batch_size"],
            prompts=ev_spec["prompts"],
            max_new_tokens=ev_spec["max_new_tokens"],
            seed=p["seed"],
        )
    return {
        "run_id": tr["run_id"],
        "checkpoint_digest": tr["checkpoint_digest"],
        "val_loss": ev.val_loss,
        "perplexity": ev.perplexity,
        "val_tokens": ev.val_tokens,
        "samples": [{"prompt": pr, "completion": c} for pr, c in ev.samples],
    }


def _register(store: Store, task: dict[str, Any], meter: Any) -> dict[str, Any]:
    from aifab.registry.models import register

    p, tr = task["params"], upstream(task, "train")
    evals = [v["outputs"] for v in task["inputs"].values() if v["uses"] == "evaluate"]
    metrics: dict[str, Any] = {"val_loss_initial": tr["val_loss_initial"], "val_loss": tr["val_loss_final"]}
    if evals:
        metrics.update(val_loss=evals[0]["val_loss"], perplexity=evals[0]["perplexity"])
    mv = register(
        store,
        p["name"],
        weights_digest=tr["checkpoint_digest"],
        tokenizer_digest=tr["tokenizer_digest"],
        config=tr["model_config"],
        params_count=tr["params"],
        metrics=metrics,
        run_id=tr["run_id"],
        dataset_version_id=tr["dataset_version_id"],
        aliases=tuple(p["aliases"]),
    )
    return {"model_version_id": mv.id, "model": f"{mv.name}:{mv.version}", "aliases": list(p["aliases"])}


def exec_command(task: dict[str, Any]) -> None:
    """Replace this process with a `uses: command` stage's argv, run in the factory.yaml's directory, with
    `AIFAB_STAGE_INPUTS` (upstream outputs) and `AIFAB_STAGE_PARAMS` (its `with:`) as JSON in its environment.
    The job's own environment (AIFAB_JOB_DIR...) passes through, so a Python command may call
    `aifab.jobs.attempt.write_result` to hand outputs downstream."""
    argv = task["params"]["run"]
    env = {
        **os.environ,
        **task["params"]["env"],
        "AIFAB_STAGE": task["stage"],
        "AIFAB_STAGE_INPUTS": json.dumps({k: v["outputs"] for k, v in task["inputs"].items()}),
        "AIFAB_STAGE_PARAMS": json.dumps(task["params"]["with"]),
    }
    os.chdir(task["base"])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        raise AifabError(f"stage {task['stage']!r}: cannot run {argv[0]!r}: {e.strerror or e}") from None


def run_task(store: Store, task: dict[str, Any]) -> dict[str, Any]:
    """What `aifab stage run` does: execute, then report the outputs to the job (or print them outside one)."""
    if task["uses"] == "command":
        exec_command(task)  # does not return
    t0 = time.perf_counter()
    outputs = execute(store, task)
    if attempt.current() is not None:
        attempt.write_result(outputs)
    print(f"stage {task['stage']!r} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return outputs
