"""The ledger: every stage charges its energy, cost and carbon to a subject, with units in the names.

`Meter.measure(stage, subject_kind)` is a context manager around a piece of work. On exit it writes one
`LedgerEntry` row. The subject id is often known only at the end (a run id, a dataset version), so
the caller sets it on the yielded `Charge` before the block ends. Reading the ledger back (sums by stage, dataset,
run, model or deployment; a model's footprint) is `aifab.meter.report`.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import func, select

from aifab.meter.samplers import Sampler, auto_sampler, monotonic_s
from aifab.store.db import Database
from aifab.store.schema import LedgerEntry

J_PER_KWH = 3.6e6


@dataclass(frozen=True)
class Prices:
    electricity_usd_per_kwh: float
    grid_co2_g_per_kwh: float
    pue: float
    capex_usd_per_device_hour: float = 0.0  # the hardware's purchase price amortised over its hours of life

    def cost_usd(self, energy_j: float, device_s: float = 0.0) -> float:
        """Electricity (with the facility's PUE) plus the hardware's amortised capex for `device_s`."""
        electricity = energy_j * self.pue / J_PER_KWH * self.electricity_usd_per_kwh
        return electricity + device_s / 3600.0 * self.capex_usd_per_device_hour

    def co2_g(self, energy_j: float) -> float:
        return energy_j * self.pue / J_PER_KWH * self.grid_co2_g_per_kwh


@dataclass
class Charge:
    """What one measured block spent. Filled in on exit; `subject_id` and tokens are set by the caller."""

    stage: str
    subject_kind: str
    subject_id: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    elapsed_s: float = 0.0
    device_s: float = 0.0
    energy_j: float = 0.0
    cost_usd: float = 0.0
    co2_g: float = 0.0
    estimated: bool = True
    sampler: str = field(default="")


class Meter:
    def __init__(self, db: Database, prices: Prices, sampler: Sampler | None = None) -> None:
        self.db = db
        self.prices = prices
        self.sampler = sampler or auto_sampler()

    def spent_j(self, since_j: float) -> float:
        return self.sampler.energy_j() - since_j

    @contextmanager
    def measure(self, stage: str, subject_kind: str, subject_id: str = "") -> Iterator[Charge]:
        charge = Charge(stage=stage, subject_kind=subject_kind, subject_id=subject_id)
        e0, b0, t0 = self.sampler.energy_j(), self.sampler.busy_s(), monotonic_s()
        resets0 = getattr(self.sampler, "resets", 0)
        try:
            yield charge
        finally:
            charge.elapsed_s = monotonic_s() - t0
            charge.device_s = self.sampler.busy_s() - b0
            charge.energy_j = self.sampler.energy_j() - e0
            charge.cost_usd = self.prices.cost_usd(charge.energy_j, charge.device_s)
            charge.co2_g = self.prices.co2_g(charge.energy_j)
            charge.estimated = self.sampler.estimated
            charge.sampler = self.sampler.name
            if getattr(self.sampler, "resets", 0) > resets0:
                # the counter restarted inside the window: the energy is a lower bound, not a measurement
                charge.estimated = True
                charge.sampler = f"{self.sampler.name} (counter reset)"
            self.record(charge)

    def record(self, c: Charge) -> None:
        with self.db.session() as s:
            s.add(entry(c, self.sampler.device))


def entry(c: Charge, device: str, deployment: str | None = None) -> LedgerEntry:
    """The ledger row for a charge: the one place a `Charge` becomes a `LedgerEntry`."""
    return LedgerEntry(
        stage=c.stage,
        subject_kind=c.subject_kind,
        subject_id=c.subject_id or "-",
        device=device[:64],
        sampler=c.sampler,
        estimated=c.estimated,
        elapsed_s=c.elapsed_s,
        device_s=c.device_s,
        energy_j=c.energy_j,
        cost_usd=c.cost_usd,
        co2_g=c.co2_g,
        tokens_in=c.tokens_in,
        tokens_out=c.tokens_out,
        deployment=deployment,
    )


def totals_for(db: Database, subjects: list[tuple[str, str]]) -> dict[str, float]:
    """Summed energy_j, cost_usd and co2_g over the given (kind, id) subjects."""
    out = {"energy_j": 0.0, "cost_usd": 0.0, "co2_g": 0.0}
    with db.session() as s:
        for kind, id_ in subjects:
            row = s.execute(
                select(
                    func.sum(LedgerEntry.energy_j),
                    func.sum(LedgerEntry.cost_usd),
                    func.sum(LedgerEntry.co2_g),
                ).where(LedgerEntry.subject_kind == kind, LedgerEntry.subject_id == id_)
            ).one()
            out["energy_j"] += row[0] or 0.0
            out["cost_usd"] += row[1] or 0.0
            out["co2_g"] += row[2] or 0.0
    return out
