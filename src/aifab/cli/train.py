"""`aifab train`: train a model on a dataset version (or resume a run) and register it."""

import contextlib
import json
import os
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError

from aifab.cli.common import app, open_store, out
from aifab.cli.data import resolve_dataset
from aifab.errors import AifabError, NotFound
from aifab.orchestrate import attempt
from aifab.spec import FactorySpec, ModelSpec, TrainingSpec, load_spec
from aifab.store import Store
from aifab.store.names import check_name
from aifab.store.schema import Run


def model_spec(value: str) -> ModelSpec:
    """A preset name (tiny, small, base), or a factory.yaml whose `model:` section is used."""
    if value.endswith((".yaml", ".yml")):
        return load_spec(value).model
    try:
        return ModelSpec.model_validate({"preset": value})
    except ValidationError:
        raise AifabError(f"unknown model {value!r}: expected tiny, small, base or a factory.yaml") from None


@app.command("train")
def train_command(
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="NAME or NAME:VERSION (default: newest)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Preset (tiny, small, base) or a factory.yaml."),
    name: str = typer.Option(..., "--name", "-n", help="Register the trained model under this name."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Step budget."),
    seconds: float | None = typer.Option(None, "--seconds", min=0.001, help="Time budget in seconds."),
    resume: str | None = typer.Option(None, "--resume", help="Continue this run from its newest checkpoint."),
    base: str | None = typer.Option(
        None, "--from", metavar="MODEL", help="Fine-tune this registered model (name, name:VERSION, name@ALIAS)."
    ),
    lora_rank: int | None = typer.Option(
        None, "--lora-rank", min=1, help="With --from: train rank-R LoRA adapters on a frozen base, merged at the end."
    ),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha", min=0.001, help="LoRA scale numerator (alpha / rank)."),
    context_len: int | None = typer.Option(
        None, "--context-len", min=8, help="Tokens per sequence (with --from: at most the model's context)."
    ),
    lr: float | None = typer.Option(None, "--lr", min=1e-9, help="Peak learning rate (default: training.lr)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="A factory.yaml for model/training settings."),
    engine: str = typer.Option(
        "local",
        "--engine",
        help="local (this process, or torchrun's) or ray (Ray Train on RAY_ADDRESS, or a local Ray).",
    ),
    workers: int = typer.Option(2, "--workers", min=1, help="With --engine ray: Ray Train workers (one GPU each)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on the last line."),
) -> None:
    """Train MODEL on DATASET within a budget (or resume RUN, or fine-tune --from a registered model), then
    register the result as NAME (alias latest)."""
    from aifab.nn.config import LoraConfig
    from aifab.registry.models import register, resolve
    from aifab.train.executors import EXECUTORS, run_on_ray
    from aifab.train.trainer import PREEMPTED, FineTune, train
    from aifab.train.trainer import resume as resume_run

    check_name(name, "model name")
    if engine not in EXECUTORS:
        raise AifabError(f"unknown engine {engine!r}: choose one of {', '.join(EXECUTORS)}")
    if steps is not None and seconds is not None:
        raise AifabError("give one budget: --steps or --seconds, not both")
    if lora_rank is not None and base is None:
        raise AifabError("--lora-rank adapts an existing model: give --from MODEL")
    store = open_store()
    # inside a job (aifab submit / a pipeline stage): SIGTERM stops at a checkpoint, and a later attempt of the
    # same job resumes the run an earlier attempt started
    in_job = engine == "local" and attempt.current() is not None and os.environ.get("RANK", "0") == "0"
    stop_check = attempt.preemption_check() if in_job else _never
    continued = _job_run(store) if in_job and resume is None else None
    on_run = partial(attempt.remember, "run_id") if in_job else None  # a later attempt resumes this run
    base_id = None
    generation: dict[str, Any] = {}  # a fine-tune generates like its base (BOS/EOS, chat template)
    if resume is not None:
        given = [
            o
            for o, v in (
                ("--dataset", dataset),
                ("--model", model),
                ("--config", config),
                ("--from", base),
                ("--lora-rank", lora_rank),
                ("--context-len", context_len),
                ("--lr", lr),
            )
            if v
        ]
        if given:
            raise AifabError(f"--resume continues the run's own dataset, model and settings; drop {', '.join(given)}")
        job = partial(resume_run, run_id=resume, steps=steps, seconds=seconds, stop_check=stop_check, on_run=on_run)
    elif continued is not None:  # the run's own dataset, model and budget; the command's options made it
        out.print(f"resuming run {continued} (started by an earlier attempt of this job) from its newest checkpoint")
        job = partial(resume_run, run_id=continued, stop_check=stop_check, on_run=on_run)
    else:
        if dataset is None:
            raise AifabError("--dataset is required (or --resume RUN)")
        if base is not None and model is not None:
            raise AifabError("--from fine-tunes an existing model; drop --model")
        spec = load_spec(config) if config is not None else FactorySpec()
        if model is None and config is None and base is None:
            raise AifabError("--model is required: a preset (tiny, small, base) or a factory.yaml (or --from MODEL)")
        mspec = model_spec(model) if model is not None else spec.model
        if base is not None:  # a factory.yaml's model shape does not apply to an existing model
            mspec = ModelSpec()
        if context_len is not None:
            mspec = mspec.model_copy(update={"context_len": context_len})
        training: TrainingSpec = spec.training
        if steps is not None or seconds is not None:
            training = training.model_copy(update={"steps": steps, "seconds": seconds})
        if lr is not None:
            training = training.model_copy(update={"lr": lr})
        ds = resolve_dataset(store, dataset)
        fine_tune = None
        if base is not None:
            mv = resolve(store, base)
            base_id = mv.id
            generation = dict(mv.generation or {})
            try:
                lora = LoraConfig(rank=lora_rank, alpha=lora_alpha) if lora_rank is not None else None
            except ValueError as e:
                raise AifabError(str(e)) from None
            fine_tune = FineTune(f"{mv.name}:{mv.version}", mv.weights_digest, mv.tokenizer_digest, lora)
        job = partial(
            train, dataset_version_id=ds.id, model_spec=mspec, cfg=training, base=fine_tune, stop_check=stop_check,
            on_run=on_run,
        )  # fmt: skip
    if engine == "ray":
        out.print(f"training on Ray Train with {workers} workers")
        result = run_on_ray(store, job, workers)
    else:
        result = job(store)
    if _finish_process_group():  # under torchrun, rank 0 alone registers and reports
        return
    if in_job and result.stopped_by == PREEMPTED:  # the trainer left the run checkpointed and resumable
        out.print(
            f"run {result.run_id} preempted at step {result.steps}; its checkpoint is kept and the next attempt "
            "resumes it"
        )
        raise typer.Exit(attempt.EXIT_PREEMPTED)
    with store.db.session() as s:
        run = s.get(Run, result.run_id)
        dataset_version_id = run.dataset_version_id if run is not None else None
        init = (run.params or {}).get("init") if run is not None else None
    # a resumed fine-tune (by --resume or by a later attempt of its job) generates like its base
    if (resume or continued) is not None and isinstance(init, dict) and init.get("model"):
        with contextlib.suppress(NotFound):  # unless the base version is gone: then nothing to inherit
            generation = dict(resolve(store, str(init["model"])).generation or {})
    mv = register(
        store,
        name,
        weights_digest=result.checkpoint_digest,
        tokenizer_digest=result.tokenizer_digest,
        config=result.model_config,
        params_count=result.params,
        metrics={"val_loss": result.val_loss_final, "val_loss_initial": result.val_loss_initial},
        run_id=result.run_id,
        dataset_version_id=dataset_version_id,
        aliases=("latest",),
        base_model_id=base_id,
        generation=generation,
    )
    out.print(
        f"[bold]{mv.name}:{mv.version}[/bold] (run {result.run_id}): {result.params:,} parameters, "
        f"{result.steps} steps, {result.tokens:,} tokens in {result.elapsed_s:.1f} s "
        f"({result.tokens_per_s:,.0f} tokens/s), val loss {result.val_loss_initial:.3f} -> "
        f"{result.val_loss_final:.3f}, stopped by {result.stopped_by}"
    )
    if as_json:
        print(json.dumps(asdict(result)))


def _never() -> str | None:
    return None


def _job_run(store: Store) -> str | None:
    """The run an earlier attempt of this job started and did not finish, if any."""
    run_id = attempt.recall("run_id")
    if not isinstance(run_id, str):
        return None
    with store.db.session() as s:
        run = s.get(Run, run_id)
        return run_id if run is not None and run.status != "completed" else None


def _finish_process_group() -> bool:
    """Leave the torchrun process group, if there is one; True on ranks other than 0."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return False
    rank = dist.get_rank()
    dist.barrier()  # no rank tears its gloo connections down while a peer still uses them (that aborts the peer)
    dist.destroy_process_group()
    return rank != 0
