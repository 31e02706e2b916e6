"""A short standard load test of a registered model on this machine, which promotion gates read for efficiency
(J/token, $/Mtok) and latency (p95 time to first token and per output token).

It runs in process, through the real `Engine` and its `ServeMeter`, as `aifab serve` would serve the model
(the same engine defaults: CUDA graphs where there is CUDA; the engine on the thread that loaded the model),
without HTTP: it measures the engine and the device, not a network stack. One warm-up request runs alone
first (the first steps pay one-time costs) and is not measured. Then the load is closed-loop: `concurrency`
requests are in flight, each replaced by the next as it finishes, until `requests` have run. Prompts are
seeded random tokens from the model's own vocabulary (its stop and prefix tokens left out), sampled at
temperature 1 with a seed per request, and every request generates exactly `max_tokens` (EOS is ignored),
so two models of the same shape get the same work.
"""

import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aifab.errors import AifabError
from aifab.meter.ledger import Charge, Prices, entry
from aifab.serve.loaded import LoadedModel
from aifab.serve.metering import RequestCharge, ServeMeter
from aifab.store import Store

if TYPE_CHECKING:
    from aifab.serve.engine import Done, Event

WARM_UP_TOKENS = 2  # the warm-up request's max_tokens: a prefill and a decode step


@dataclass(frozen=True)
class RequestMeasure:
    """One measured request, as its `Done` says."""

    ttft_s: float  # submission to first token: queueing and prefill
    tpot_s: float  # mean time per output token after the first
    energy_j: float  # its share of the steps it was in (serve.metering)
    cost_usd: float  # electricity and the device's capex for its share of the steps' time
    tokens_in: int
    tokens_out: int


@dataclass(frozen=True)
class LoadTestResult:
    """What the load test measured, over the measured requests only (not the warm-up, not the idle energy
    between engine steps), as the ledger's serving J/token is (`meter.report`):

    - energy_j: the sum of the requests' energy, each step's energy split over its requests by the meter;
    - cost_usd: the sum of their costs (electricity with the facility's PUE, plus capex for device time);
    - j_per_token = energy_j / tokens_out and usd_per_mtok = cost_usd per million tokens_out: output
      (generated) tokens count, prompt tokens do not, as in `aifab plan`;
    - ttft_*_s, tpot_*_s: percentiles over the requests (linear interpolation, numpy's default);
    - elapsed_s: from the first measured request's submission to the last one's end;
    - estimated: the sampler estimates energy (no hardware counter), `sampler` is its name;
    - idle_j: energy between steps during the whole test (the ledger has it; the figures above do not).
    """

    model: str  # name:version
    requests: int
    concurrency: int
    tokens_in: int
    tokens_out: int
    elapsed_s: float
    energy_j: float
    cost_usd: float
    j_per_token: float
    usd_per_mtok: float
    ttft_p95_s: float
    tpot_p95_s: float
    estimated: bool
    sampler: str
    ttft_p50_s: float = 0.0
    tpot_p50_s: float = 0.0
    idle_j: float = 0.0
    per_request: tuple[RequestMeasure, ...] = ()


def load_test(
    store: Store,
    ref: str,
    *,
    requests: int = 32,
    concurrency: int = 8,
    prompt_tokens: int = 64,
    max_tokens: int = 32,
    seed: int = 0,
    prices: Prices | None = None,
) -> LoadTestResult:
    """Load-test the model `ref` names (see the module doc) and charge what it spent to the ledger.

    The ledger gets one row, stage `evaluate`, charged to the model version: a load test is part of judging
    a model, not of serving it, so it counts in the model's making, not in its serving footprint or its
    measured serving J/token. The row holds all the energy the test spent (warm-up and idle between steps
    included, so at least `energy_j`), its cost and carbon at `prices` (default: factory.yaml's `meter:`
    defaults), the whole test's wall time and the measured requests' tokens.

    Raises NotFound for an unknown model; AifabError, one line and before any request runs, for a count
    below 1 (max_tokens below 2: a time per output token needs two tokens) or for a prompt and max_tokens
    that do not fit the model's context; AifabError too if the engine fails a request.
    """
    from aifab.nn.generate import ContextError, check_fits

    for name, value, least in (
        ("requests", requests, 1),
        ("concurrency", concurrency, 1),
        ("prompt_tokens", prompt_tokens, 1),
        ("max_tokens", max_tokens, 2),
    ):
        if value < least:
            raise AifabError(f"load test: {name} must be at least {least} (got {value})")
    started = time.perf_counter()
    lm = LoadedModel.load(store, ref)  # NotFound for an unknown model
    try:
        check_fits(prompt_tokens, max_tokens, lm.context_len, prefix_tokens=len(lm.prefix_ids))
    except ContextError as e:
        raise AifabError(f"load test of {lm.id}: {e} (lower prompt_tokens or max_tokens)") from None
    if prices is None:
        from aifab.spec import MeterSpec

        prices = Prices(**MeterSpec().model_dump())
    prompts = synthetic_prompts(lm, requests + 1, prompt_tokens, seed)  # [0]: the warm-up's
    spent = _Spent(prices)
    meter = ServeMeter(prices=prices, sink=spent.add)
    loop = _ClosedLoop(lm, meter, prompts, max_tokens, concurrency, seed)
    try:
        loop.run()
    finally:  # whatever happened, what the test spent is on the books
        _charge(store, lm, meter, spent, loop, time.perf_counter() - started)
    measured = [
        RequestMeasure(d.ttft_s or 0.0, d.tpot_s or 0.0, d.energy_j, d.cost_usd, d.prompt_tokens, d.completion_tokens)
        for d in loop.finished()[1:]
    ]
    return _result(lm.id, measured, concurrency, loop.elapsed_s, spent.idle_j, meter)


def synthetic_prompts(lm: LoadedModel, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` prompts of `length` token ids drawn uniformly, with `seed`, from the model's vocabulary less its stop
    tokens (which would end a request that does not ignore them) and the prefix the engine puts before every
    prompt."""
    vocab = sorted(set(range(lm.vocab_size)) - lm.stop_ids - set(lm.prefix_ids))
    rng = random.Random(seed)
    return [[rng.choice(vocab) for _ in range(length)] for _ in range(n)]


class _Spent:
    """Everything the meter handed its sink (the requests' charges and the idle energy), summed: the ledger
    row's figures. The idle time is billed like `aifab serve` bills it (serve.metering.ledger_sink)."""

    def __init__(self, prices: Prices) -> None:
        self.prices = prices
        self.energy_j = self.cost_usd = self.co2_g = self.device_s = self.idle_j = 0.0

    def add(self, charges: list[RequestCharge], idle_j: float, idle_s: float) -> None:
        self.energy_j += sum(c.energy_j for c in charges) + idle_j
        self.cost_usd += sum(c.cost_usd for c in charges) + self.prices.cost_usd(idle_j, idle_s)
        self.co2_g += sum(c.co2_g for c in charges) + self.prices.co2_g(idle_j)
        self.device_s += sum(c.device_s for c in charges) + idle_s
        self.idle_j += idle_j


class _ClosedLoop:
    """Runs an engine on this thread and feeds it from its own callbacks: request 0 (the warm-up) alone, then
    `concurrency` of the others at a time, each that finishes replaced by the next; the last closes the
    engine, which ends `run()`."""

    def __init__(
        self,
        lm: LoadedModel,
        meter: ServeMeter,
        prompts: list[list[int]],
        max_tokens: int,
        concurrency: int,
        seed: int,
    ) -> None:
        from aifab.serve.engine import Engine

        self.prompts, self.max_tokens, self.concurrency, self.seed = prompts, max_tokens, concurrency, seed
        slots = min(concurrency, len(prompts) - 1)  # more slots than requests would only hold memory
        self.engine: Engine = Engine(lm, max_queue=len(prompts), max_batch=slots, start=False, meter=meter)
        self.dones: list[Done | None] = [None] * len(prompts)
        self.next = 1
        self.started_at = self.ended_at = 0.0

    @property
    def elapsed_s(self) -> float:
        return self.ended_at - self.started_at

    def run(self) -> None:
        self._submit(0)
        try:
            self.engine.run()
        finally:
            self.engine.close()

    def finished(self) -> list["Done"]:
        """Every request's Done, in order; AifabError if one failed or did not generate max_tokens."""
        for i, d in enumerate(self.dones):
            if d is None or d.error is not None or d.finish_reason != "length":
                why = "it never finished" if d is None else d.error or f"it ended with {d.finish_reason!r}"
                raise AifabError(f"load test of {self.engine.loaded.id}: request {i} failed: {why}")
        return [d for d in self.dones if d is not None]

    def _submit(self, i: int) -> None:
        from aifab.nn.sampling import SamplingParams
        from aifab.serve.engine import Request

        tokens = self.max_tokens if i else WARM_UP_TOKENS
        params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=self.seed + i, ignore_eos=True)
        self.engine.submit(Request(self.prompts[i], params, lambda event: self._on(i, event)))

    def _on(self, i: int, event: "Event") -> None:  # on the engine's thread
        from aifab.serve.engine import Done

        if not isinstance(event, Done):
            return
        self.dones[i] = event
        if i == 0:  # warmed up: the measured requests start now
            self.started_at = time.perf_counter()
            for _ in range(self.concurrency):
                self._submit_next()
        elif self.next < len(self.prompts):
            self._submit_next()
        elif all(d is not None for d in self.dones):
            self.ended_at = time.perf_counter()
            self.engine.close()

    def _submit_next(self) -> None:
        if self.next < len(self.prompts):
            self._submit(self.next)
            self.next += 1


def _charge(
    store: Store, lm: LoadedModel, meter: ServeMeter, spent: "_Spent", loop: "_ClosedLoop", wall_s: float
) -> None:
    """The test's one ledger row: everything the meter saw (see `load_test`), the measured requests' tokens."""
    measured = [d for d in loop.dones[1:] if d is not None]
    charge = Charge(
        "evaluate",
        "model",
        str(lm.version_id),
        tokens_in=sum(d.prompt_tokens for d in measured),
        tokens_out=sum(d.completion_tokens for d in measured),
        elapsed_s=wall_s,
        device_s=spent.device_s,
        energy_j=spent.energy_j,
        cost_usd=spent.cost_usd,
        co2_g=spent.co2_g,
        estimated=meter.estimated,
        sampler=meter.sampler.name,
    )
    with store.db.session() as s:
        s.add(entry(charge, meter.sampler.device))


def _result(
    model: str, measured: list[RequestMeasure], concurrency: int, elapsed_s: float, idle_j: float, meter: ServeMeter
) -> LoadTestResult:
    energy_j, cost_usd = sum(m.energy_j for m in measured), sum(m.cost_usd for m in measured)
    tokens_out = sum(m.tokens_out for m in measured)
    ttft, tpot = [m.ttft_s for m in measured], [m.tpot_s for m in measured]
    return LoadTestResult(
        model=model,
        requests=len(measured),
        concurrency=concurrency,
        tokens_in=sum(m.tokens_in for m in measured),
        tokens_out=tokens_out,
        elapsed_s=elapsed_s,
        energy_j=energy_j,
        cost_usd=cost_usd,
        j_per_token=energy_j / tokens_out,
        usd_per_mtok=cost_usd / tokens_out * 1e6,
        ttft_p95_s=percentile(ttft, 95),
        tpot_p95_s=percentile(tpot, 95),
        estimated=meter.estimated,
        sampler=meter.sampler.name,
        ttft_p50_s=percentile(ttft, 50),
        tpot_p50_s=percentile(tpot, 50),
        idle_j=idle_j,
        per_request=tuple(measured),
    )


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, interpolating linearly between the two nearest ranks (numpy's
    default method); ValueError for no values."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
