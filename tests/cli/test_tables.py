"""The short forms of quantities, and a Listing's choice between a table and blocks."""

import io

import pytest
from rich.console import Console

from aifab.cli.tables import Column, Kind, Listing, count, duration, energy, mass, money, pack, si, sig3, size


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0 J"), (5306.1, "5.31 kJ"), (100, "100 J"), (10, "10.0 J"), (999.6, "1.00 kJ"), (0.9996, "1.00 J"),
     (0.0042, "4.20 mJ"), (5_306_123.4, "5.31 MJ"), (-1234, "-1.23 kJ"), (2.5e-15, "2.50e-15 J")],
)  # fmt: skip
def test_energy(value: float, text: str) -> None:
    assert energy(value) == text


def test_other_quantities() -> None:
    assert [count(n) for n in (0, 12, 9_999, 10_000, 123_456_789, 1.4e12)] == [
        "0", "12", "9,999", "10.0 k", "123 M", "1.40 T"
    ]  # fmt: skip
    assert [money(x) for x in (0, 5.306e-5, 0.0531, 5.31, 531, 47.5e9, 0.00123)] == [
        "$0", "$5.31e-5", "$0.0531", "$5.31", "$531", "$47.5 B", "$0.00123"
    ]  # fmt: skip
    assert [duration(s) for s in (0, 0.5, 12.34, 61, 1234.5, 53_061.8, 200_000)] == [
        "0 s", "500 ms", "12.3 s", "1.02 min", "20.6 min", "14.7 h", "2.31 d"
    ]  # fmt: skip
    assert [mass(g) for g in (0.0053, 530.7, 1234, 5.3e6)] == ["5.30 mg", "531 g", "1.23 kg", "5.30 t"]
    assert size(1_234_567_890) == "1.23 GB" and si(0.0, "") == "0" and sig3(0.0531) == "0.0531"


def render(listing: Listing, width: int) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(listing)
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def listing() -> Listing:
    table = Listing(Column("run", Kind.ID), Column("energy", Kind.NUMBER), Column("note"), title="runs")
    table.add_row("3f9a1c2b7d4e", "5.31 MJ", "a note that is long enough to wrap over several lines of a column")
    table.add_section()
    table.add_row("total", "5.31 MJ", "")
    return table


def test_a_table_when_it_fits_with_the_text_column_wrapped() -> None:
    out = render(listing(), 50)
    lines = out.splitlines()
    assert lines[0].strip() == "runs" and lines[1].split() == ["run", "energy", "note"]
    assert "3f9a1c2b7d4e  5.31 MJ  a note that" in out  # ids and numbers whole, on the row's first line
    assert len([line for line in lines if set(line.strip()) == {"─"}]) == 2  # under the header, above the total
    assert all(len(line) <= 50 for line in lines) and "…" not in out


def test_blocks_when_ids_and_numbers_alone_overflow() -> None:
    out = render(listing(), 24)
    assert out.splitlines()[:3] == ["runs", "3f9a1c2b7d4e", "  energy: 5.31 MJ"]
    assert "total" in out and "note:" in out and "…" not in out
    assert "  energy: 5.31 MJ" in out.split("total")[1]  # the empty note of the total row is left out


def test_a_word_longer_than_a_text_column_folds() -> None:
    table = Listing(Column("stage", Kind.ID), Column("result"))
    path = "/a/very/long/path/" + "x" * 60
    table.add_row("total", f"files under {path}")
    out = render(table, 40)
    assert "…" not in out and path in out.replace("\n", "").replace(" ", "")


def test_rows_must_match_the_columns() -> None:
    with pytest.raises(ValueError, match="a row of 1 cells in a listing of 3 columns"):
        listing().add_row("one")


def test_pack() -> None:
    assert pack(["aa", "bb", "cc"], 8, sep=" ") == ["aa bb cc"]
    assert pack(["aa", "bb", "cc"], 7, sep=" ") == ["aa bb", "cc"]
    assert pack(["a" * 10, "b"], 5, sep=" ") == ["a" * 10, "b"]
