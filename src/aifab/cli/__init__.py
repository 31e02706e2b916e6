"""The `aifab` command. Each verb is a thin call into a package; nothing imports cli/.

Expected failures (AifabError) print one line and exit 2; `--debug` shows the traceback instead.
"""

import sys

import typer

from aifab.cli import data, demo, eval, hf, jobs, ledger, plan, promote, run, serve, store_views, train
from aifab.cli.common import app
from aifab.errors import AifabError

__all__ = [
    "app",
    "data",
    "demo",
    "eval",
    "hf",
    "jobs",
    "ledger",
    "main",
    "plan",
    "promote",
    "run",
    "serve",
    "store_views",
    "train",
]


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    command = typer.main.get_command(app)
    try:
        # standalone mode: usage errors print click's message and exit 2; Ctrl-C exits 1 with "Aborted!"
        command.main(args=sys.argv[1:], prog_name="aifab", standalone_mode=True)
    except AifabError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:
        if debug:
            raise
        print(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
