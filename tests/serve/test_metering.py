"""Serving energy attribution: each step's energy goes to its requests by their tokens, the rest is idle, and
the books balance against the counter; charges reach the API's usage, /metrics and the ledger."""

import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from aifab.meter.ledger import J_PER_KWH, Prices
from aifab.nn.sampling import SamplingParams
from aifab.serve.api import create_app
from aifab.serve.engine import Done, Engine, Event, Request
from aifab.serve.loaded import LoadedModel
from aifab.serve.metering import RequestCharge, ServeMeter, ledger_sink, new_deployment_id
from aifab.store import Store
from aifab.store.schema import LedgerEntry
from aifab.web import BackgroundServer
from serving import WAIT_S, body

PRICES = Prices(electricity_usd_per_kwh=0.2, grid_co2_g_per_kwh=400.0, pue=1.5)


class Trace:
    """A sampler whose counter follows a known power trace: `watts` while the clock runs (a real clock, so the
    engine's steps and idle gaps get real shares), read exactly as a hardware counter is."""

    name, device, estimated = "trace", "fake device", False

    def __init__(self, watts: float) -> None:
        self.watts, self.t0 = watts, time.perf_counter()

    def energy_j(self) -> float:
        return (time.perf_counter() - self.t0) * self.watts

    def busy_s(self) -> float:
        return time.perf_counter() - self.t0


class Script:
    """A sampler that returns the listed counter readings, one per read (then stays on the last)."""

    name, device, estimated = "script", "fake device", False

    def __init__(self, *readings: float) -> None:
        self.readings = list(readings)

    def energy_j(self) -> float:
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]

    def busy_s(self) -> float:
        return 0.0


def test_a_step_is_split_by_tokens_and_the_gap_is_idle() -> None:
    m = ServeMeter(Script(10.0, 13.0, 77.0), PRICES)  # start 10; idle to 13; a 64 J step to 77
    assert m.step_started() == [] and m.take_idle_j() == 3.0
    a, b, c = object(), object(), object()
    credits = m.step_finished([(a, 1), (b, 1), (c, 30)])  # two decodes and a 30-token chunk
    assert credits == [(a, 2.0), (b, 2.0), (c, 60.0)]
    assert (m.request_j, m.idle_j, m.balance_error_j()) == (64.0, 3.0, 0.0)
    bill = m.charge(62.0, 30, 1, 0.5)
    assert bill.cost_usd == pytest.approx(62.0 * 1.5 / J_PER_KWH * 0.2)  # PUE applies to the bill
    assert bill.co2_g == pytest.approx(62.0 * 1.5 / J_PER_KWH * 400.0)


def test_the_bill_includes_the_hardwares_capex_for_the_device_time() -> None:
    prices = Prices(electricity_usd_per_kwh=0.2, grid_co2_g_per_kwh=400.0, pue=1.5, capex_usd_per_device_hour=3.6)
    m = ServeMeter(Script(0.0), prices)
    bill = m.charge(3.6e6, 5, 5, 2.0, device_s=1000.0)  # 1 kWh at PUE 1.5, and 1000 device-seconds
    assert bill.cost_usd == pytest.approx(1.5 * 0.2 + 1000 / 3600 * 3.6)
    assert bill.device_s == 1000.0


class Counting(Trace):
    """A `Trace` that counts its reads."""

    def __init__(self, watts: float) -> None:
        super().__init__(watts)
        self.reads = 0

    def energy_j(self) -> float:
        self.reads += 1
        return super().energy_j()


def test_a_window_spans_steps_and_splits_by_step_time_then_tokens() -> None:
    """With a 50 ms read interval, 40 steps of 2 ms are read a handful of times, not 80; under a constant power
    each step still gets its own time's energy, split by tokens, and the books balance."""
    sampler = Counting(watts=100.0)
    m = ServeMeter(sampler, PRICES, read_every_s=0.05)
    assert m.read_every_s == 0.05 and ServeMeter(Counting(1.0), PRICES).read_every_s == 0.0  # per step by default
    a, b = object(), object()
    got: dict[int, float] = {id(a): 0.0, id(b): 0.0}
    steps_s = 0.0
    for _ in range(40):
        credits = m.step_started()
        time.sleep(0.002)
        credits += m.step_finished([(a, 1), (b, 3)])
        steps_s += m.last_step_s
        for owner, joules in credits:
            got[id(owner)] += joules
    for owner, joules in m.settle():
        got[id(owner)] += joules
    assert sampler.reads <= 1 + 40 * 2 * 0.002 / 0.05 + 3  # the start, then about one read per 50 ms
    assert got[id(b)] == pytest.approx(3 * got[id(a)], rel=1e-9)  # tokens split each step's share
    assert got[id(a)] + got[id(b)] == pytest.approx(100.0 * steps_s, rel=0.05)  # each step: its own time
    assert m.request_j + m.idle_j == pytest.approx(m.last_j - m.start_j, rel=1e-12)


def test_a_counter_that_goes_backwards_books_nothing_and_is_counted() -> None:
    m = ServeMeter(Script(100.0, 120.0, 50.0, 70.0), PRICES)
    m.step_started()  # 20 J idle
    assert [j for _, j in m.step_finished([(object(), 1)])] == [0.0]  # 120 -> 50: a reset, not -70 J
    assert m.counter_resets == 1
    m.take_idle_j()
    m.step_started()
    assert m.take_idle_j() == 20.0  # 50 -> 70 counts again
    assert m.request_j == 0.0 and m.idle_j == 40.0


def collect() -> tuple[list[Done], Any]:
    done: list[Done] = []
    finished = threading.Event()

    def emit(e: Event) -> None:
        if isinstance(e, Done):
            done.append(e)
            finished.set()

    return done, emit


@pytest.mark.parametrize("read_every_s", [0.0, 0.05], ids=["read per step", "read per window"])
def test_under_batching_requests_and_idle_add_up_to_the_counter(loaded: LoadedModel, read_every_s: float) -> None:
    flushed: list[tuple[list[Any], float]] = []
    sink = lambda c, idle_j, idle_s: flushed.append((c, idle_j))  # noqa: E731
    meter = ServeMeter(Trace(watts=250.0), PRICES, sink=sink, read_every_s=read_every_s)
    engine = Engine(loaded, max_batch=4, chunk_tokens=8, meter=meter)
    sinks = []
    try:
        for i in range(10):  # more requests than slots, prompts chunked: every step mixes requests
            done, emit = collect()
            sinks.append(done)
            params = SamplingParams(max_tokens=6 + i % 3, temperature=0, ignore_eos=True)
            engine.submit(Request(loaded.encode("def function_" + " x" * i), params, emit))
        deadline = time.monotonic() + WAIT_S
        while not all(sinks) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.close()  # the loop ends, and flushes the meter
    dones = [d[0] for d in sinks]
    assert all(d.finish_reason == "length" and d.energy_j > 0 for d in dones)
    charged = sum(d.energy_j for d in dones)
    assert charged == pytest.approx(meter.request_j, rel=1e-12)
    total = meter.last_j - meter.start_j
    assert charged + meter.idle_j == pytest.approx(total, rel=1e-12)  # the books balance
    assert meter.idle_j > 0  # the engine waited for work at the start, and between requests
    assert sum(len(c) for c, _ in flushed) == 10
    assert sum(idle for _, idle in flushed) == pytest.approx(meter.idle_j, rel=1e-12)
    for d in dones:
        assert d.cost_usd == pytest.approx(PRICES.cost_usd(d.energy_j))


def test_usage_and_metrics_carry_the_energy(loaded: LoadedModel) -> None:
    meter = ServeMeter(Trace(watts=100.0), PRICES)
    engine = Engine(loaded, meter=meter)
    try:
        with BackgroundServer(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=WAIT_S) as c:
            usage = c.post("/v1/completions", json=body(max_tokens=4, ignore_eos=True)).json()["usage"]
            assert usage["energy_j"] > 0 and usage["energy_estimated"] is False
            assert usage["cost_usd"] == pytest.approx(PRICES.cost_usd(usage["energy_j"]))
            text = c.get("/metrics").text
    finally:
        engine.close()
    samples = {
        kind: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        for kind in ("requests", "idle")
        if line.startswith("aifab_energy_joules_total{") and f'kind="{kind}"' in line
    }
    assert samples["requests"] == pytest.approx(usage["energy_j"], rel=1e-9)  # the only request so far
    assert samples["idle"] > 0


def test_the_ledger_gets_one_serve_row_per_request_and_the_idle(trained: tuple[Store, str], tmp_path: Path) -> None:
    store = Store(tmp_path / "home")  # a ledger of its own: the charges of this test alone
    try:
        sampler = Script(0.0, 5.0, 25.0)
        sink = ledger_sink(store.db, 7, sampler, PRICES)  # type: ignore[arg-type]
        meter = ServeMeter(sampler, PRICES, sink=sink)  # type: ignore[arg-type]
        meter.step_started()
        owner = object()
        ((_, joules),) = meter.step_finished([(owner, 12)])
        meter.charge(joules, 10, 2, 0.25)
        meter.flush()
        with store.db.session() as s:
            rows = s.scalars(select(LedgerEntry).order_by(LedgerEntry.id)).all()
            got = [(r.stage, r.subject_kind, r.subject_id, r.energy_j, r.tokens_in, r.tokens_out) for r in rows]
            assert got == [("serve", "model", "7", 20.0, 10, 2), ("serve-idle", "model", "7", 5.0, 0, 0)]
            assert rows[1].cost_usd == pytest.approx(PRICES.cost_usd(5.0))
            assert all(r.sampler == "script" and r.estimated is False for r in rows)
            assert all(r.deployment is None for r in rows)  # no deployment named
    finally:
        store.close()


def test_the_ledger_rows_carry_the_deployment(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    try:
        dep = new_deployment_id()
        assert re.fullmatch(r"dep-[0-9a-f]{8}", dep) and new_deployment_id() != dep
        sampler = Script(0.0, 5.0, 25.0)
        sink = ledger_sink(store.db, 7, sampler, PRICES, deployment=dep)  # type: ignore[arg-type]
        sink([RequestCharge(20.0, 0.1, 2.0, 10, 2, 0.25, 0.2)], 5.0, 1.5)
        with store.db.session() as s:
            rows = s.scalars(select(LedgerEntry).order_by(LedgerEntry.id)).all()
            assert [(r.stage, r.deployment) for r in rows] == [("serve", dep), ("serve-idle", dep)]
            assert [r.device_s for r in rows] == [0.2, 1.5]  # the request's share of steps; the idle time
    finally:
        store.close()
