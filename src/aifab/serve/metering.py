"""Energy attribution inside the serving engine: every joule the device spends goes to a request or to idle.

The engine reads the sampler's cumulative counter at the start and the end of each step. A step's energy is
split among the requests in it by their tokens in that step (a decode token counts one, a prompt chunk of n
tokens counts n), so a request that shares steps with many others pays a small share of each. The energy
between steps (waiting for work, HTTP handling) is idle and booked apart, so at any moment

    sum of request charges + idle = counter now - counter at start      (exactly, up to float rounding)

A counter that goes backwards (a reset, or a wrap the sampler did not handle) books nothing for that window
and counts it in `counter_resets`, rather than booking a negative energy.

Finished requests' charges are handed to `sink` in batches (the serve command writes them to the ledger), so
the engine thread never waits on the database per request.
"""

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aifab.meter.ledger import Prices
from aifab.meter.samplers import Sampler, auto_sampler


@dataclass(frozen=True)
class RequestCharge:
    energy_j: float
    cost_usd: float
    co2_g: float
    tokens_in: int
    tokens_out: int
    elapsed_s: float
    device_s: float = 0.0  # its token-weighted share of the wall time of the steps it was in


class ServeMeter:
    def __init__(
        self,
        sampler: Sampler | None = None,
        prices: Prices | None = None,
        sink: Callable[[list[RequestCharge], float, float], None] | None = None,
        flush_every: int = 64,
    ) -> None:
        """`sink(charges, idle_j, idle_s)` receives finished requests, and the idle energy and time since the
        last call."""
        self.sampler = sampler or auto_sampler()
        if prices is None:
            from aifab.spec import MeterSpec

            prices = Prices(**MeterSpec().model_dump())
        self.prices = prices
        self.sink, self.flush_every = sink, flush_every
        self.start_j = self.last_j = self.sampler.energy_j()
        self.request_j = 0.0  # charged to requests, finished or not
        self.idle_j = 0.0
        self.counter_resets = 0
        self._step_t0 = time.perf_counter()
        self.last_step_s = 0.0  # wall time of the last step, which the engine splits like its energy
        self._pending: list[RequestCharge] = []
        self._pending_idle_j = 0.0
        self._pending_idle_s = 0.0
        self._step_end = time.perf_counter()
        self._lock = threading.Lock()

    @property
    def estimated(self) -> bool:
        return bool(self.sampler.estimated)

    def _read(self) -> float:
        """Energy since the last read; 0 (and a counted reset) if the counter went backwards."""
        now = self.sampler.energy_j()
        spent = now - self.last_j
        self.last_j = now
        if spent < 0:
            self.counter_resets += 1
            return 0.0
        return spent

    def step_started(self) -> float:
        """Book the energy since the last step as idle; returns it."""
        self._step_t0 = time.perf_counter()
        self._pending_idle_s += self._step_t0 - self._step_end
        idle = self._read()
        self.idle_j += idle
        self._pending_idle_j += idle
        return idle

    def step_finished(self, shares: list[tuple[Any, int]]) -> list[float]:
        """The step's energy split over `shares` (owner, tokens in the step): each owner's joules, in order."""
        spent = self._read()
        self._step_end = time.perf_counter()
        self.last_step_s = self._step_end - self._step_t0
        total = sum(n for _, n in shares)
        if total == 0:  # nothing was computed for anyone: the energy was idle
            self.idle_j += spent
            self._pending_idle_j += spent
            return [0.0] * len(shares)
        parts = [spent * n / total for _, n in shares]
        self.request_j += sum(parts)
        return parts

    def charge(
        self, energy_j: float, tokens_in: int, tokens_out: int, elapsed_s: float, device_s: float = 0.0
    ) -> RequestCharge:
        """A finished request's bill (electricity, plus the hardware's capex for its device time); queued for
        the sink."""
        c = RequestCharge(
            energy_j,
            self.prices.cost_usd(energy_j, device_s),
            self.prices.co2_g(energy_j),
            tokens_in,
            tokens_out,
            elapsed_s,
            device_s,
        )
        with self._lock:
            self._pending.append(c)
            full = len(self._pending) >= self.flush_every
        if full:
            self.flush()
        return c

    def flush(self) -> None:
        """Hand the queued charges and the idle energy so far to the sink."""
        with self._lock:
            pending, idle_j, idle_s = self._pending, self._pending_idle_j, self._pending_idle_s
            self._pending, self._pending_idle_j, self._pending_idle_s = [], 0.0, 0.0
        if self.sink is not None and (pending or idle_j or idle_s):
            self.sink(pending, idle_j, idle_s)

    def balance_error_j(self) -> float:
        """Counter difference since start minus everything booked (0 up to rounding; resets aside)."""
        return (self.last_j - self.start_j) - (self.request_j + self.idle_j)


def new_deployment_id() -> str:
    """A fresh id for one `aifab serve` process or Ray Serve app: `dep-` and 8 hex digits."""
    return f"dep-{secrets.token_hex(4)}"


def ledger_sink(
    db: Any, model_version_id: int, sampler: Sampler, prices: Prices, deployment: str | None = None
) -> Callable[[list[RequestCharge], float, float], None]:
    """A sink that writes each finished request as a `serve` ledger row and the idle energy as a `serve-idle`
    row, both charged to the served model version (so `aifab ledger --by model` and `aifab plan --from-model`
    see them) and stamped with `deployment` (so `aifab ledger --by deployment` sees them)."""
    from aifab.meter.ledger import Charge, entry

    def write(charges: list[RequestCharge], idle_j: float, idle_s: float) -> None:
        def charge(stage: str, **figures: Any) -> Charge:
            return Charge(
                stage,
                "model",
                str(model_version_id),
                estimated=sampler.estimated,
                sampler=sampler.name,
                **figures,
            )

        rows = [
            charge(
                "serve",
                elapsed_s=c.elapsed_s,
                device_s=c.device_s,
                energy_j=c.energy_j,
                cost_usd=c.cost_usd,
                co2_g=c.co2_g,
                tokens_in=c.tokens_in,
                tokens_out=c.tokens_out,
            )
            for c in charges
        ]
        if idle_j > 0 or idle_s > 0:  # the device is held while idle: its energy and capex are booked too
            cost, co2 = prices.cost_usd(idle_j, idle_s), prices.co2_g(idle_j)
            rows.append(
                charge("serve-idle", elapsed_s=idle_s, device_s=idle_s, energy_j=idle_j, cost_usd=cost, co2_g=co2)
            )
        with db.session() as s:
            s.add_all(entry(c, sampler.device, deployment) for c in rows)

    return write


def ledger_meter(
    db: Any, model_version_id: int | None, prices: Prices | None = None, deployment: str | None = None
) -> ServeMeter:
    """The meter `aifab serve` uses: the auto-chosen sampler, the meter prices (factory.yaml `meter:`
    defaults unless given), and the ledger as its sink (none for a model that is not in the registry), with
    every row stamped with `deployment`."""
    from aifab.spec import MeterSpec

    sampler = auto_sampler()
    prices = prices or Prices(**MeterSpec().model_dump())
    sink = None if model_version_id is None else ledger_sink(db, model_version_id, sampler, prices, deployment)
    return ServeMeter(sampler, prices, sink)
