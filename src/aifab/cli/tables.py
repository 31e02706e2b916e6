"""Tables for the terminal that never cut a number or an id, and the short forms of quantities they show.

A `Listing` holds rows of strings under typed columns and renders (it is a Rich renderable) as a table when the
table fits the console: id and number columns never wrap and are never narrowed; text columns wrap at spaces and
may narrow down to their longest word (or TEXT_MIN_WIDTH, should that word be longer; such a word folds onto
the next line). When even that is too wide, each row renders as a block instead (the narrow layout): its first
cell on a line, then `header: value` pairs packed into lines of the console's width. No cell is ever cut to an
ellipsis, and cells are plain text, never Rich markup.

The formatters give quantities three significant figures and a unit, so a number stays short at any size:
`energy(5306.1)` is "5.31 kJ", `count(123_456_789)` is "123 M", `money(5.3e-05)` is "$5.30e-5".
"""

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

TEXT_MIN_WIDTH = 20  # a text column narrows to its longest word, or to this when that word is longer
GAP = 2  # cells between two columns: the right padding of one and the (blank) divider
# no edges and blank dividers; a rule under the header and above a new section (a total)
LISTING_BOX = box.Box("    \n    \n ── \n    \n ── \n    \n    \n    \n")


class Kind(StrEnum):
    """How a column may give way on a narrow console."""

    ID = "id"  # names, references, ids, times: never wrapped, never narrowed
    NUMBER = "number"  # right-aligned; never wrapped, never narrowed
    TEXT = "text"  # free text: wraps at spaces, folds a word too long for the column


@dataclass(frozen=True)
class Column:
    header: str  # a "\n" in it makes a two-line header, which keeps a column of short numbers narrow
    kind: Kind = Kind.TEXT


class Listing:
    """Rows under `columns`, rendered as a table or, when the console is too narrow for it, as blocks."""

    def __init__(self, *columns: Column, title: str | None = None, caption: str | None = None) -> None:
        self.columns = columns
        self.title, self.caption = title, caption
        self.rows: list[tuple[str, ...]] = []
        self.sections: set[int] = set()  # indices of rows that start a new section (a rule above them)

    def add_row(self, *cells: str) -> None:
        """One row, a string per column; a ValueError when the count is wrong."""
        if len(cells) != len(self.columns):
            raise ValueError(f"a row of {len(cells)} cells in a listing of {len(self.columns)} columns")
        self.rows.append(cells)

    def add_section(self) -> None:
        """Set the next row apart from those above it (a total, say)."""
        self.sections.add(len(self.rows))

    def widths(self, width: int) -> list[int] | None:
        """The column widths (content only) of a table `width` cells wide, or None when none fits."""
        natural, least = [], []
        for i, col in enumerate(self.columns):
            lines = [line for cell in (col.header, *(r[i] for r in self.rows)) for line in cell.split("\n")]
            natural.append(max(cell_len(line) for line in lines))
            if col.kind is Kind.TEXT:
                longest_word = max((cell_len(w) for line in lines for w in line.split()), default=1)
                least.append(min(natural[-1], longest_word, TEXT_MIN_WIDTH))
            else:
                least.append(natural[-1])
        room = width - GAP * (len(self.columns) - 1)
        if sum(least) > room:
            return None
        widths = list(natural)
        while sum(widths) > room:  # narrow the widest text column that can still give, one cell at a time
            i = max((j for j in range(len(widths)) if widths[j] > least[j]), key=lambda j: widths[j])
            widths[i] -= 1
        return widths

    def table(self, widths: list[int]) -> Table:
        """The Rich table with these column widths."""
        t = Table(title=self.title, caption=self.caption, box=LISTING_BOX, show_edge=False, pad_edge=False,
                  padding=(0, 1, 0, 0))  # fmt: skip
        for col, w in zip(self.columns, widths, strict=True):
            text = col.kind is Kind.TEXT
            t.add_column(col.header, justify="right" if col.kind is Kind.NUMBER else "left", no_wrap=not text,
                         overflow="fold", width=w if text else None)  # fmt: skip
        for i, row in enumerate(self.rows):
            if i in self.sections:
                t.add_section()
            t.add_row(*(Text(cell) for cell in row))
        return t

    def blocks(self, width: int) -> Iterator[Text]:
        """The narrow layout: per row, its first cell, then its other cells as `header: value` pairs."""
        if self.title:
            yield Text(self.title, style="bold", overflow="fold")
        for row in self.rows:
            yield Text(row[0], style="bold", overflow="fold")
            named = zip((c.header.replace("\n", " ") for c in self.columns[1:]), row[1:], strict=True)
            pairs = [f"{header}: {cell}" for header, cell in named if cell]
            for line in pack(pairs, width - 2):
                yield Text("  " + line, overflow="fold")
        if self.caption:
            yield Text(self.caption, style="dim", overflow="fold")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        widths = self.widths(options.max_width)
        if widths is not None:
            yield self.table(widths)
        else:
            yield from self.blocks(options.max_width)


def pack(items: Iterable[str], width: int, sep: str = "   ") -> list[str]:
    """Items joined by `sep` into lines of at most `width` cells; an item wider than that gets a line of its own."""
    lines: list[str] = []
    for item in items:
        if lines and cell_len(lines[-1]) + len(sep) + cell_len(item) <= width:
            lines[-1] += sep + item
        else:
            lines.append(item)
    return lines


# ---- quantities as short strings ------------------------------------------------------------------------------

SI_UP = ("", "k", "M", "G", "T", "P", "E")
SI_DOWN = ("", "m", "µ", "n", "p")
COUNT_UP = ("", "k", "M", "B", "T")  # thousand, million, billion, trillion: how tokens and parameters are counted


def sig3(x: float) -> str:
    """`x` to three significant figures in fixed notation, trailing zeros kept: 5.31, 53.1, 531, 0.0531."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    r = float(f"{x:.3g}")
    return f"{r:.{max(0, 2 - math.floor(math.log10(abs(r))))}f}"


def si(value: float, unit: str, up: tuple[str, ...] = SI_UP) -> str:
    """`value` with a prefix that leaves 1 to 999 in front of it: si(5306.1, "J") is "5.31 kJ", si(0.0042, "g")
    "4.20 mg". The prefixes are `up` (from "") above 1 and SI_DOWN below it; past the last, the number grows."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g} {unit}".rstrip()
    step = math.floor(math.log10(abs(value)) / 3)
    if float(f"{abs(value) / 1000.0**step:.3g}") >= 1000:
        step += 1  # 999.6 rounds to 1000: one prefix up
    if step < -(len(SI_DOWN) - 1):
        return f"{value:.2e} {unit}".rstrip()  # below the smallest prefix
    step = min(step, len(up) - 1)
    prefix = up[step] if step >= 0 else SI_DOWN[-step]
    return f"{sig3(value / 1000.0**step)} {prefix}{unit}".rstrip()


def energy(joules: float) -> str:
    return si(joules, "J")


def mass(grams: float) -> str:
    """Grams up to 999 kg, then tonnes (t, kt, Mt)."""
    return si(grams, "g") if abs(grams) < 1e6 else si(grams / 1e6, "t")


def size(n_bytes: float) -> str:
    return si(n_bytes, "B")  # decimal: 1 MB = 1e6 bytes


def count(n: float) -> str:
    """A count exact below 10,000 (with a thousands comma), then 12.3 k, 123 M, 1.23 B, 1.23 T."""
    if abs(n) < 10_000:
        return f"{round(n):,}"
    return si(n, "", COUNT_UP)


def money(usd: float) -> str:
    """Dollars: $0.0531, $5.31, $531, then $1.23 k, M, B, T; below a tenth of a cent in scientific form, $5.30e-5
    (not "m" or "µ", which money readers take for million)."""
    if usd == 0 or not math.isfinite(usd):
        return f"${usd:g}"
    if abs(usd) >= 1000:
        return "$" + si(usd, "", COUNT_UP)
    if abs(usd) >= 0.001:
        return "$" + sig3(usd)
    mantissa, exponent = f"{usd:.2e}".split("e")
    return f"${mantissa}e{int(exponent)}"


def duration(seconds: float) -> str:
    """Seconds (or ms, µs) below a minute, then minutes, hours below two days, then days."""
    s = abs(seconds)
    if s < 60:
        return si(seconds, "s")
    if s < 3600:
        return f"{sig3(seconds / 60)} min"
    if s < 172_800:
        return f"{sig3(seconds / 3600)} h"
    return f"{sig3(seconds / 86_400)} d"


def when(t: datetime) -> str:
    """A time to the minute, as the store records it (UTC)."""
    return f"{t:%Y-%m-%d %H:%M}"


def dash(value: float | None, fmt: str = ".3f") -> str:
    """`value` formatted by `fmt`, or "-" when there is none."""
    return "-" if value is None else format(value, fmt)
