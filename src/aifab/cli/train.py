"""`aifab train`: train a model on a dataset version (or resume a run) and register it."""

import json
from dataclasses import asdict
from pathlib import Path

import typer
from pydantic import ValidationError

from aifab.cli.common import app, open_store, out
from aifab.cli.data import resolve_dataset
from aifab.errors import AifabError
from aifab.spec import FactorySpec, ModelSpec, TrainingSpec, load_spec
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
    config: Path | None = typer.Option(None, "--config", "-c", help="A factory.yaml for model/training settings."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on the last line."),
) -> None:
    """Train MODEL on DATASET within a budget (or resume RUN), then register it as NAME (alias latest)."""
    from aifab.registry.models import register
    from aifab.train.trainer import resume as resume_run
    from aifab.train.trainer import train

    check_name(name, "model name")
    if steps is not None and seconds is not None:
        raise AifabError("give one budget: --steps or --seconds, not both")
    store = open_store()
    if resume is not None:
        if dataset is not None or model is not None or config is not None:
            raise AifabError(
                "--resume continues the run's own dataset, model and config; drop --dataset/--model/--config"
            )
        result = resume_run(store, resume, steps=steps, seconds=seconds)
    else:
        if dataset is None:
            raise AifabError("--dataset is required (or --resume RUN)")
        spec = load_spec(config) if config is not None else FactorySpec()
        if model is None and config is None:
            raise AifabError("--model is required: a preset (tiny, small, base) or a factory.yaml")
        mspec = model_spec(model) if model is not None else spec.model
        training: TrainingSpec = spec.training
        if steps is not None or seconds is not None:
            training = training.model_copy(update={"steps": steps, "seconds": seconds})
        ds = resolve_dataset(store, dataset)
        result = train(store, ds.id, mspec, training)
    with store.db.session() as s:
        run = s.get(Run, result.run_id)
        dataset_version_id = run.dataset_version_id if run is not None else None
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
    )
    out.print(
        f"[bold]{mv.name}:{mv.version}[/bold] (run {result.run_id}): {result.params:,} parameters, "
        f"{result.steps} steps, {result.tokens:,} tokens in {result.elapsed_s:.1f} s "
        f"({result.tokens_per_s:,.0f} tokens/s), val loss {result.val_loss_initial:.3f} -> "
        f"{result.val_loss_final:.3f}, stopped by {result.stopped_by}"
    )
    if as_json:
        print(json.dumps(asdict(result)))
