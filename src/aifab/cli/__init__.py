"""The `aifab` command. Each verb is a thin call into a package; nothing imports cli/.

Expected failures (AifabError) print one line and exit 2; `--debug` shows the traceback instead.
"""

import sys

import click
import typer

from aifab.cli import demo, serve, store_views
from aifab.cli.common import app
from aifab.errors import AifabError

__all__ = ["app", "demo", "main", "serve", "store_views"]


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    command = typer.main.get_command(app)
    try:
        command.main(args=sys.argv[1:], prog_name="aifab", standalone_mode=False)
    except AifabError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        print(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
