"""The line's ledger rows add up to the energy counter's difference over the whole line: what no stage measured
(registration, hand-offs) is booked as `line-idle`, charged to the model it made."""

from pathlib import Path

import pytest
from sqlalchemy import func, select

from aifab.pipeline.line import run_line
from aifab.spec import DataSpec, EvaluationSpec, FactorySpec, TrainingSpec
from aifab.store import Store
from aifab.store.schema import LedgerEntry
from helpers import TINY_MODEL, TINY_TOKENIZER, write_corpus


class Ticker:
    """A counter that rises 1.5 J on every read, so every read between stages leaves a gap to book."""

    name, device, estimated = "ticker", "fake device", False

    def __init__(self) -> None:
        self.reads = 0

    def energy_j(self) -> float:
        self.reads += 1
        return 1.5 * self.reads

    def busy_s(self) -> float:
        return 0.0


def test_the_lines_rows_add_up_to_the_counter(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ticker = Ticker()
    monkeypatch.setattr("aifab.meter.ledger.auto_sampler", lambda: ticker)
    spec = FactorySpec(
        name="line",
        data=DataSpec(sources=[str(write_corpus(tmp_path / "corpus"))], val_fraction=0.2),
        tokenizer=TINY_TOKENIZER,
        model=TINY_MODEL,
        training=TrainingSpec(steps=3, seconds=None, batch_size=4, eval_every=10, eval_batches=1),
        evaluation=EvaluationSpec(batches=1, prompts=["def "], max_new_tokens=4),
    )
    report = run_line(store, spec, serve_check=False)
    first, last = 1.5, 1.5 * ticker.reads  # the line's first read, and the read that booked the gap
    with store.db.session() as s:
        total = s.scalar(select(func.sum(LedgerEntry.energy_j)))
        stages = set(s.scalars(select(LedgerEntry.stage)))
        idle = s.scalars(select(LedgerEntry).where(LedgerEntry.stage == "line-idle")).one()
    assert stages == {"data", "train", "evaluate", "line-idle"}
    assert total == pytest.approx(last - first)
    assert idle.energy_j > 0 and idle.subject_kind == "model"
    assert report.energy_j == pytest.approx(last - first)
