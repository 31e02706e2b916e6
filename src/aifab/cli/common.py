"""The Typer app, its global options, and helpers the verb modules share."""

from pathlib import Path

import typer
from rich.console import Console

from aifab.errors import DataError
from aifab.spec import resolve_source
from aifab.store import Store

app = typer.Typer(
    name="aifab",
    help="aifab: an AI factory. Raw data in, a served model out; every joule and dollar metered.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console()
_state: dict[str, object] = {"home": None}


@app.callback()
def _global(
    home: Path | None = typer.Option(None, "--home", help="Store directory (default: $AIFAB_HOME or ./.aifab)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    _state["home"] = home


def open_store() -> Store:
    home = _state["home"]
    return Store(home if isinstance(home, Path) else None)


def data_sources(paths: list[str]) -> list[str]:
    """Data paths or globs from the command line, resolved against the current directory; a missing path or a
    glob that matches nothing is a DataError naming it."""
    sources = []
    for path in paths:
        try:
            sources.append(resolve_source(path, Path.cwd()))
        except ValueError as e:
            raise DataError(str(e)) from None
    return sources
