"""`aifab train`: train a model on a dataset version (or resume a run) and register it, through the same train
and register stage bodies as a pipeline (aifab.pipeline.stages)."""

import dataclasses
import json
from pathlib import Path

import typer
from pydantic import ValidationError

from aifab.cli.common import app, open_store, out
from aifab.cli.data import resolve_dataset
from aifab.errors import AifabError
from aifab.spec import FactorySpec, ModelSpec, load_spec
from aifab.store.names import check_name


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
    executor: str = typer.Option(
        "local",
        "--executor",
        "--engine",
        help="local (this process, or torchrun's) or ray (Ray Train on RAY_ADDRESS, or a local Ray); --engine is "
        "its old name.",
    ),
    workers: int = typer.Option(2, "--workers", min=1, help="With --executor ray: Ray Train workers (one GPU each)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on the last line."),
) -> None:
    """Train MODEL on DATASET within a budget (or resume RUN, or fine-tune --from a registered model), then
    register the result as NAME (alias latest)."""
    from aifab.jobs.attempt import EXIT_PREEMPTED
    from aifab.meter.ledger import Meter, Prices
    from aifab.nn.config import LoraConfig
    from aifab.pipeline.contracts import RegisterParams
    from aifab.pipeline.stages import Preempted, Resume, TrainRequest, register_stage, train_stage
    from aifab.registry.models import resolve
    from aifab.train.trainer import FineTune

    check_name(name, "model name")
    if steps is not None and seconds is not None:
        raise AifabError("give one budget: --steps or --seconds, not both")
    if lora_rank is not None and base is None:
        raise AifabError("--lora-rank adapts an existing model: give --from MODEL")
    spec = load_spec(config) if config is not None else FactorySpec()
    store = open_store()
    if resume is not None:
        options = {"--dataset": dataset, "--model": model, "--config": config, "--from": base,
                   "--lora-rank": lora_rank, "--context-len": context_len, "--lr": lr}  # fmt: skip
        given = [o for o, v in options.items() if v]
        if given:
            raise AifabError(f"--resume continues the run's own dataset, model and settings; drop {', '.join(given)}")
        req = TrainRequest(None, spec.model, spec.training, resume=Resume(resume, steps, seconds))
    else:
        if dataset is None:
            raise AifabError("--dataset is required (or --resume RUN)")
        if base is not None and model is not None:
            raise AifabError("--from fine-tunes an existing model; drop --model")
        if model is None and config is None and base is None:
            raise AifabError("--model is required: a preset (tiny, small, base) or a factory.yaml (or --from MODEL)")
        # a factory.yaml's model shape does not apply to an existing model
        mspec = ModelSpec() if base is not None else model_spec(model) if model is not None else spec.model
        if context_len is not None:
            mspec = mspec.model_copy(update={"context_len": context_len})
        overrides = {"steps": steps, "seconds": seconds} if steps is not None or seconds is not None else {}
        training = spec.training.model_copy(update={**overrides, **({"lr": lr} if lr is not None else {})})
        fine_tune = None
        if base is not None:
            mv = resolve(store, base)
            try:
                lora = LoraConfig(rank=lora_rank, alpha=lora_alpha) if lora_rank is not None else None
            except ValueError as e:
                raise AifabError(str(e)) from None
            fine_tune = FineTune(f"{mv.name}:{mv.version}", mv.weights_digest, mv.tokenizer_digest, lora)
        ds_id = resolve_dataset(store, dataset).id
        req = TrainRequest(ds_id, mspec, training, spec.budgets, base=fine_tune)
    req = dataclasses.replace(req, executor=executor, workers=workers)
    if executor == "ray":
        out.print(f"training on Ray Train with {workers} workers")
    try:
        result = train_stage(store, Meter(store.db, Prices(**spec.meter.model_dump())), req)
    except Preempted as e:
        out.print(f"{e}; its checkpoint is kept and the next attempt resumes it")
        raise typer.Exit(EXIT_PREEMPTED) from None
    if result is None:  # a torchrun rank other than 0: rank 0 registers and reports
        return
    mv_out = register_stage(store, RegisterParams(name, ("latest",)), result)
    out.print(
        f"[bold]{mv_out.model}[/bold] (run {result.run_id}): {result.params:,} parameters, "
        f"{result.steps} steps, {result.tokens:,} tokens in {result.elapsed_s:.1f} s "
        f"({result.tokens_per_s:,.0f} tokens/s), val loss {result.val_loss_initial:.3f} -> "
        f"{result.val_loss_final:.3f}, stopped by {result.stopped_by}"
    )
    if as_json:
        print(json.dumps(result.to_json()))
