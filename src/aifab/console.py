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


def progress(*extra: TextColumn, transient: bool = False) -> Progress:
    """A progress bar with rate-friendly columns; `extra` adds live fields such as loss or tokens/s."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
        disable=os.environ.get("AIFAB_NO_PROGRESS") == "1",
    )
