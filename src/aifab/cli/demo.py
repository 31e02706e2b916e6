"""`aifab init`, `aifab validate` and `aifab demo`: write a spec, check a spec, run the whole line."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from aifab.cli.common import app, data_sources, open_store, out
from aifab.cli.tables import Column, Kind, Listing
from aifab.console import err
from aifab.errors import AifabError
from aifab.spec import FactorySpec, example_yaml, load_spec

if TYPE_CHECKING:
    from aifab.pipeline.line import LineReport


@app.command()
def init(
    path: Path = typer.Argument(Path("factory.yaml"), help="Where to write the example spec."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented example factory.yaml with every default spelled out."""
    if path.exists() and not force:
        raise AifabError(f"{path} already exists; pass --force to overwrite it")
    path.write_text(example_yaml(), encoding="utf-8")
    out.print(f"wrote {path}; edit it, check it with `aifab validate {path}`, run it with `aifab demo --config {path}`")


@app.command()
def validate(path: Path = typer.Argument(Path("factory.yaml"))) -> None:
    """Check a factory.yaml without running anything: its settings, and its stages as a DAG."""
    from aifab.pipeline.dag import build_pipeline, check_fits, pool_nodes

    spec = load_spec(path)
    pipeline = build_pipeline(spec, path.parent)  # cycles, missing needs, unknown uses
    check_fits(pipeline, pool_nodes(spec))  # requests larger than the configured pool, if one is configured
    stages = " -> ".join(pipeline.stages) if spec.stages is None else f"{len(pipeline.stages)} stages"
    out.print(
        f"{path}: ok (model {spec.name!r}, {len(spec.data.sources) or 'default'} data source(s), pipeline {stages})"
    )


@app.command()
def demo(
    config: Path | None = typer.Option(None, "--config", "-c", help="A factory.yaml (default: built-in defaults)."),
    data: list[str] | None = typer.Option(None, "--data", help="Data path or glob; repeat for more."),
    train_seconds: float | None = typer.Option(None, "--train-seconds", min=1, help="Training time budget."),
    no_serve: bool = typer.Option(False, "--no-serve", help="Skip starting the server and its test requests."),
    as_json: bool = typer.Option(False, "--json", help="Also print the report as JSON on the last line."),
) -> None:
    """Run the whole line on this machine: ingest, tokenize, train, evaluate, register, serve, report."""
    from aifab.pipeline.line import run_line

    spec = load_spec(config) if config is not None else FactorySpec()
    if data:
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"sources": data_sources(data)})})
    if train_seconds is not None:
        training = spec.training.model_copy(update={"seconds": train_seconds})
        spec = spec.model_copy(update={"training": training})
    store = open_store()
    err.print(f"[bold]aifab demo[/bold]: store at {store.home}")
    report = run_line(store, spec, serve_check=not no_serve, base=config.parent if config else None)
    print_report(report)
    if as_json:
        print(json.dumps(report.to_json(), default=str))


def print_report(r: "LineReport") -> None:
    d, t, e, cfg = r.data, r.train, r.evaluate, r.train.model_config
    table = Listing(Column("stage", Kind.ID), Column("result"), title="aifab demo report")
    table.add_row(
        "data",
        f"{d.files:,} files, {d.bytes / 1e6:,.1f} MB, {d.tokens:,} tokens "
        f"(train {d.train_tokens:,} / val {d.val_tokens:,}), vocab {d.vocab_size:,}, {d.elapsed_s:.1f} s",
    )
    table.add_row(
        "model",
        f"{r.model.model}: {t.params / 1e6:.2f}M parameters, {cfg['n_layer']} layers, "
        f"d_model {cfg['d_model']}, context {cfg['context_len']}",
    )
    table.add_row(
        "training",
        f"{t.steps} steps, {t.tokens:,} tokens in {t.elapsed_s:.1f} s, "
        f"{t.tokens_per_s:,.0f} tokens/s (stopped by {t.stopped_by})",
    )
    reduction = 1.0 - t.val_loss_final / t.val_loss_initial
    table.add_row("val loss", f"{t.val_loss_initial:.3f} -> {t.val_loss_final:.3f} ({100 * reduction:.0f}% lower)")
    table.add_row("evaluate", f"val loss {e.val_loss:.3f}, perplexity {e.perplexity:.1f} on {e.val_tokens:,} tokens")
    for sample in e.samples:
        table.add_row("sample", f"{sample['prompt']!r} -> {sample['completion'][:80]!r}")
    for req in r.requests or []:
        same = "stream matches" if req.stream_matches else "STREAM DIFFERS"
        table.add_row(
            "serving",
            f"{req.prompt!r}: {req.completion_tokens} tokens in {req.latency_s * 1000:.0f} ms, "
            f"{req.tokens_per_s:.0f} tokens/s, {same}",
        )
    label = "estimated" if r.energy_estimated else "measured"
    table.add_row(
        "energy",
        f"{r.energy_j / 1000:,.2f} kJ ({label}, {r.energy_sampler}), ${r.cost_usd:.6f}, {r.co2_g:.2f} g CO2",
    )
    table.add_row("total", f"{r.elapsed_s:.1f} s; files under {r.home}")
    out.print(table)
    out.print(f"serve it: [bold]{r.serve_command}[/bold]")
