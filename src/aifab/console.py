"""Shared Rich console and progress bars. Progress goes to stderr so stdout stays for reports and JSON."""

import os

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

err = Console(stderr=True)


def progress(*extra: TextColumn, counts: bool = True, transient: bool = False, disable: bool = False) -> Progress:
    """A progress bar with percentage, elapsed time and ETA. `extra` adds live fields such as loss or
    tokens/s; `counts=False` hides the done/total column when the total is not a count of things."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        *([MofNCompleteColumn()] if counts else []),
        *extra,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
        disable=disable or os.environ.get("AIFAB_NO_PROGRESS") == "1",
    )
