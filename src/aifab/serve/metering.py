"""Energy attribution inside the serving engine: every joule the device spends goes to a request or to idle.

The engine tells the meter when each step starts and ends, and which requests were in it with how many tokens
(a decode token counts one, a prompt chunk of n tokens counts n). The meter reads the sampler's cumulative
counter at the edges of a *window* and splits the window's energy:
- over its steps in proportion to their wall time, and the rest of the window (between steps: waiting for
  work, HTTP handling) to idle;
- within a step, over its requests by their tokens, so a request that shares steps with many others pays a
  small share of each.
So at any moment

    sum of request charges + idle = counter at the last read - counter at start   (up to float rounding)

How often the counter is read is the sampler's `min_read_interval_s`. With 0 (the CPU-time estimate, RAPL)
every step is its own window, read at its start and its end, so the gap before it is measured as idle on its
own. NVML's energy counter moves only every few milliseconds, while a decode step on a GPU takes a few: read
per step, most steps would see no energy and a few a burst, and two driver calls a step would cost time.
There a window spans steps until the interval has passed, and an idle gap longer than the interval is its own
window. A request's last window is closed (read) when it finishes, so its bill is complete when it is sent.

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


Credits = list[tuple[Any, float]]  # (owner, joules) to add to each owner's energy


class ServeMeter:
    def __init__(
        self,
        sampler: Sampler | None = None,
        prices: Prices | None = None,
        sink: Callable[[list[RequestCharge], float, float], None] | None = None,
        flush_every: int = 64,
        read_every_s: float | None = None,
    ) -> None:
        """`sink(charges, idle_j, idle_s)` receives finished requests, and the idle energy and time since the
        last call. `read_every_s`: the shortest window (default: the sampler's `min_read_interval_s`, else 0)."""
        self.sampler = sampler or auto_sampler()
        if prices is None:
            from aifab.spec import MeterSpec

            prices = Prices(**MeterSpec().model_dump())
        self.prices = prices
        self.sink, self.flush_every = sink, flush_every
        if read_every_s is None:
            read_every_s = float(getattr(self.sampler, "min_read_interval_s", 0.0))
        self.read_every_s = read_every_s
        self.start_j = self.last_j = self.sampler.energy_j()
        self.reads = 1
        self.request_j = 0.0  # charged to requests, finished or not
        self.idle_j = 0.0
        self.counter_resets = 0
        self.last_step_s = 0.0  # wall time of the last step, which the engine splits like its energy
        self._window_t0 = self._step_t0 = time.perf_counter()
        self._window: list[tuple[float, list[tuple[Any, int]]]] = []  # (step seconds, shares) not yet read
        self._new_idle_j = 0.0  # booked since take_idle_j()
        self._pending: list[RequestCharge] = []
        self._pending_idle_j = 0.0
        self._pending_idle_s = 0.0
        self._lock = threading.Lock()

    @property
    def estimated(self) -> bool:
        return bool(self.sampler.estimated)

    def _read(self) -> float:
        """Energy since the last read; 0 (and a counted reset) if the counter went backwards."""
        now = self.sampler.energy_j()
        self.reads += 1
        spent = now - self.last_j
        self.last_j = now
        if spent < 0:
            self.counter_resets += 1
            return 0.0
        return spent

    def step_started(self) -> Credits:
        """A step begins. Closes the window first when it is due (with per-step reads: always, so the gap
        before this step is measured as idle)."""
        now = time.perf_counter()
        credits = self.settle(now) if now - self._window_t0 >= self.read_every_s else []
        self._step_t0 = now  # with per-step reads the window is then exactly the step
        return credits

    def step_finished(self, shares: list[tuple[Any, int]]) -> Credits:
        """The step that began at `step_started` ended with `shares` (owner, tokens in the step). Returns the
        joules to credit to owners: this step's with per-step reads, else those of a window closed now."""
        now = time.perf_counter()
        self.last_step_s = now - self._step_t0
        self._window.append((self.last_step_s, shares))
        return self.settle(now) if now - self._window_t0 >= self.read_every_s else []

    def settle(self, now: float | None = None) -> Credits:
        """Read the counter and split the open window: over its steps by wall time (each step over its owners
        by tokens), the rest to idle. The engine calls it before billing a finished request."""
        now = time.perf_counter() if now is None else now
        window_s, steps = now - self._window_t0, self._window
        if not steps and window_s <= 0:
            return []
        spent = self._read()
        self._window_t0, self._window = now, []
        credits: Credits = []
        busy_s = sum(dur for dur, _ in steps)
        # time in the window outside its steps is idle; a window that is all steps has none
        scale = max(window_s, busy_s)
        for dur, shares in steps:
            total = sum(n for _, n in shares)
            step_j = spent * dur / scale if scale > 0 else spent / len(steps)
            if total == 0:  # nothing was computed for anyone: the energy was idle
                continue
            credits += [(owner, step_j * n / total) for owner, n in shares]
        booked = sum(j for _, j in credits)
        self.request_j += booked
        idle = max(spent - booked, 0.0)
        self.idle_j += idle
        self._new_idle_j += idle
        with self._lock:
            self._pending_idle_j += idle
            self._pending_idle_s += max(window_s - busy_s, 0.0)
        return credits

    @property
    def open_steps(self) -> int:
        """Steps whose energy is not read yet (a finished request's bill waits for them: see settle)."""
        return len(self._window)

    def take_idle_j(self) -> float:
        """Idle joules booked since the last call (the engine's idle-energy metric)."""
        idle, self._new_idle_j = self._new_idle_j, 0.0
        return idle

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
