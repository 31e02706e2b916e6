"""`aifab eval MODEL`: score a model on suites and task files; `aifab models show MODEL` and `aifab models compare
A B`: what is known about a version's quality and serving cost, alone and side by side."""

import json
from pathlib import Path

import typer

from aifab.cli.common import app, open_store, out
from aifab.cli.store_views import models_app
from aifab.cli.tables import Column, Kind, Listing, count, dash, duration, energy, money, when
from aifab.console import err
from aifab.evaluate.cards import Comparison, Efficiency, ModelCard
from aifab.evaluate.results import MetricResult


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="name, name:VERSION or name@ALIAS"),
    suite: list[str] | None = typer.Option(None, "--suite", help="A built-in suite (heldout, python-code); repeat."),
    task: list[Path] | None = typer.Option(None, "--task", help="A task file (YAML); repeat."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most N examples per task."),
    dataset: str | None = typer.Option(
        None, "--dataset", help="NAME[:VERSION] for the heldout suite (default: the model's training dataset)."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on the last line."),
) -> None:
    """Evaluate a registered model (default: the standard suites) and record the results with the version."""
    from aifab.evaluate.harness import evaluate_model

    report = evaluate_model(
        open_store(), model, suites=suite or (), task_files=task or (), limit=limit, dataset=dataset,
        progress=not as_json,
    )  # fmt: skip
    if as_json:
        print(json.dumps(report.to_json()))
        return
    out.print(_results(report.results))
    for note in report.notes:
        err.print(f"note: {note}", highlight=False)
    out.print(
        f"{report.model}: run {report.run_id}, {duration(report.elapsed_s)}, {energy(report.energy_j)}; "
        f"see `aifab models show {report.model}`",
        highlight=False,
    )


def _value(v: float) -> str:
    return f"{v:.4g}"


def _results(results: list[MetricResult]) -> Listing:
    table = Listing(
        Column("task", Kind.ID), Column("metric", Kind.ID), Column("value", Kind.NUMBER),
        Column("± stderr", Kind.NUMBER), Column("examples", Kind.NUMBER), Column("energy", Kind.NUMBER),
        Column("suite", Kind.ID),
    )  # fmt: skip
    for r in results:
        table.add_row(
            r.task, r.metric, _value(r.value), dash(r.stderr, ".2g"), count(r.examples), energy(r.energy_j),
            r.suite or "-",
        )  # fmt: skip
    return table


def _efficiency(e: Efficiency) -> str:
    if e.j_per_token is None and e.usd_per_mtok is None:
        return "not served yet (no serve rows in the ledger)"
    j = "-" if e.j_per_token is None else f"{e.j_per_token:.3g} J/token"
    usd = "-" if e.usd_per_mtok is None else f"{money(e.usd_per_mtok)}/Mtok"
    return f"{j}, {usd} over {count(e.tokens_out)} tokens{' (estimated)' if e.estimated else ''}"


@models_app.command("show")
def show(
    model: str = typer.Argument(..., help="name, name:VERSION or name@ALIAS"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on the last line."),
) -> None:
    """One model version: its settings, aliases, lineage, evaluation results and serving cost."""
    from aifab.evaluate.cards import model_card

    card = model_card(open_store(), model)
    if as_json:
        print(json.dumps(card.to_json()))
        return
    _print_card(card)


def _print_card(card: ModelCard) -> None:
    c = card.config
    shape = f"{c.get('n_layer')} layers, d_model {c.get('d_model')}, context {c.get('context_len')}"
    numbers = ", ".join(f"{k} {_value(v)}" for k, v in card.metrics.items() if isinstance(v, float | int))
    lines = [
        f"model     {card.model} (id {card.model_version_id}), created {when(card.created_at)}",
        f"shape     {count(card.params_count)} parameters, {shape}",
        f"aliases   {', '.join(card.aliases) or '-'}",
        f"metrics   {numbers or '-'}",
        f"lineage   {', '.join(f'{rel} {kind} {id_}' for kind, id_, rel in card.lineage) or '-'}",
        f"serving   {_efficiency(card.efficiency)}",
    ]
    for line in lines:
        out.print(line, highlight=False)
    if card.results:
        out.print(_results(card.results))
    else:
        out.print(f"no evaluation results: run `aifab eval {card.model}`", highlight=False)


@models_app.command("compare")
def compare(
    a: str = typer.Argument(..., help="name, name:VERSION or name@ALIAS"),
    b: str = typer.Argument(..., help="name, name:VERSION or name@ALIAS"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on the last line."),
) -> None:
    """Two model versions side by side: every metric both were evaluated on (b - a), and J/token and $/Mtok."""
    from aifab.evaluate.cards import compare_models

    comparison = compare_models(open_store(), a, b)
    if as_json:
        print(json.dumps(comparison.to_json()))
        return
    _print_comparison(comparison)


def _print_comparison(cmp: Comparison) -> None:
    table = Listing(
        Column("task", Kind.ID), Column("metric", Kind.ID), Column(cmp.a, Kind.NUMBER), Column(cmp.b, Kind.NUMBER),
        Column("b - a", Kind.NUMBER), Column("better", Kind.ID),
    )  # fmt: skip
    for row in cmp.rows:
        better = {"a": cmp.a, "b": cmp.b, None: "="}[row.better]
        same = "" if row.a.task_digest == row.b.task_digest else " (task differs)"
        table.add_row(row.task, row.metric, _value(row.a.value), _value(row.b.value), f"{row.diff:+.4g}", better + same)
    ea, eb = cmp.efficiency_a, cmp.efficiency_b
    for label, fa, fb in (
        ("J/token", ea.j_per_token, eb.j_per_token),
        ("$/Mtok", ea.usd_per_mtok, eb.usd_per_mtok),
    ):
        if fa is None and fb is None:
            continue
        diff = "-" if fa is None or fb is None else f"{fb - fa:+.3g}"
        better = "-" if fa is None or fb is None or fa == fb else cmp.a if fa < fb else cmp.b
        table.add_row("serving", label, dash(fa, ".3g"), dash(fb, ".3g"), diff, better)
    if table.rows:
        out.print(table)
    else:
        out.print(f"{cmp.a} and {cmp.b} share no evaluated metric: run `aifab eval` on both", highlight=False)
    for side, only in ((cmp.a, cmp.only_a), (cmp.b, cmp.only_b)):
        if only:
            out.print(f"only {side}: {', '.join(f'{t} {m}' for t, m in only)}", highlight=False)
    if ea.j_per_token is None and eb.j_per_token is None:
        out.print("serving: neither has serve rows in the ledger (serve them to compare J/token and $/Mtok)")
