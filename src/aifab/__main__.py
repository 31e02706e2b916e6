"""`python -m aifab` is the `aifab` command."""

from aifab.cli import main

main()
