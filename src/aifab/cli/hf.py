"""`aifab import-hf DIR --name NAME` and `aifab export-hf MODEL OUT_DIR`: Hugging Face checkpoints, safetensors only."""

from pathlib import Path

import typer

from aifab.cli.common import app, open_store, out
from aifab.errors import DataError


@app.command("import-hf")
def import_hf(
    directory: Path = typer.Argument(
        ...,
        help="A local HF checkpoint: config.json, *.safetensors, tokenizer.json (and, if present, "
        "generation_config.json, tokenizer_config.json, chat_template.jinja).",
    ),
    name: str = typer.Option(..., "--name", "-n", help="Model name; each import adds a version."),
) -> None:
    """Register a Llama, Mistral, Qwen2 or GPT-2 checkpoint from a local directory as a model version, with its
    generation settings (BOS/EOS tokens, chat template)."""
    from aifab.store.names import check_name

    check_name(name, "model name")
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory")

    from aifab.nn.hf import load_hf, read_generation  # torch: only once the cheap checks pass
    from aifab.nn.transformer import Transformer, num_params
    from aifab.nn.weights import to_bytes
    from aifab.registry.models import register

    tokenizer = directory / "tokenizer.json"
    try:
        config, state = load_hf(directory)
    except ValueError as e:
        raise DataError(str(e)) from None
    if not tokenizer.is_file():
        raise DataError(f"{tokenizer} not found: an imported model needs its tokenizer.json")
    try:
        generation = read_generation(directory)  # before anything is stored: a malformed file registers nothing
    except ValueError as e:
        raise DataError(str(e)) from None
    model = Transformer(config)
    model.load_state_dict(state, strict=not config.tie_embeddings)  # tied: lm_head is tok_emb
    store = open_store()
    mv = register(
        store,
        name,
        weights_digest=store.artifacts.put_bytes(to_bytes(model)),
        tokenizer_digest=store.artifacts.put_bytes(tokenizer.read_bytes()),
        config=config.to_dict(),
        params_count=num_params(model),
        metrics={},
        generation=dict(generation),  # the registry keeps it as JSON
        run_id=None,
        aliases=("latest",),
    )
    out.print(f"imported {directory} as {mv.name}:{mv.version} ({mv.params_count:,} parameters)")


@app.command("export-hf")
def export_hf(
    model_ref: str = typer.Argument(..., metavar="MODEL", help="name, name:VERSION or name@ALIAS"),
    out_dir: Path = typer.Argument(..., help="A new or empty directory."),
) -> None:
    """Write a registered model as a Hugging Face checkpoint: config.json, model.safetensors, tokenizer.json, and
    generation_config.json / tokenizer_config.json when the model has generation settings."""
    from aifab.registry.models import resolve

    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} exists and is not an empty directory")
    store = open_store()
    mv = resolve(store, model_ref)

    from aifab.nn.hf import family_of, save_hf  # torch: only once the cheap checks pass
    from aifab.nn.weights import from_bytes

    model = from_bytes(store.artifacts.get_bytes(mv.weights_digest))
    try:
        family = family_of(model.config)
    except ValueError as e:
        raise DataError(f"{mv.name}:{mv.version}: {e}") from None
    save_hf(model, out_dir, store.artifacts.get_bytes(mv.tokenizer_digest), generation=mv.generation or {})
    out.print(f"exported {mv.name}:{mv.version} as {family} to {out_dir}")
