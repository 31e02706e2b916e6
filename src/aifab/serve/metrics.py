"""Prometheus metrics of serving engines. `MetricFamilies` is one registry with the metric families; each engine
reports through its own `ServeMetrics`, the families' series labelled with its model version (`model="demo:3"`).
Engines that serve side by side (a canary, an alias switch: `serve.fleet`) share one `MetricFamilies`, so one
scrape compares their latency, errors and energy; an engine alone gets families of its own (so tests and
several apps in one process do not collide). `GET /metrics` renders `registry`. Names follow Prometheus
conventions: base units (seconds), `_total` on counters."""

import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# latency buckets from 5 ms to 60 s: TTFT spans prefill of long prompts under load, TPOT a decode step
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class MetricFamilies:
    """The metric families of one registry, every series labelled with `model` (the version that served)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("aifab_queue_depth", "Requests waiting for a batch slot.", ["model"], registry=r)
        self.running = Gauge("aifab_running_requests", "Requests holding a batch slot.", ["model"], registry=r)
        self.ttft = Histogram(
            "aifab_time_to_first_token_seconds",
            "From arrival to the first generated token.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "aifab_time_per_output_token_seconds",
            "Mean time between a request's output tokens after the first.",
            ["model"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("aifab_prompt_tokens", "Prompt tokens prefilled.", ["model"], registry=r)
        self.generated_tokens = Counter(
            "aifab_generation_tokens", "Tokens generated; rate() of it is the output tokens/s.", ["model"], registry=r
        )
        self.requests = Counter(
            "aifab_requests", "Finished requests by finish reason.", ["model", "finish_reason"], registry=r
        )
        self.rejected = Counter(
            "aifab_rejected_requests", "Requests refused with 429 because the queue was full.", ["model"], registry=r
        )
        self.steps = Counter("aifab_engine_steps", "Engine steps executed.", ["model"], registry=r)
        self.energy = Counter(
            "aifab_energy_joules",
            "Device energy, charged to requests (by their tokens in each step) or idle between steps.",
            ["model", "kind"],
            registry=r,
        )


class ServeMetrics:
    """One engine's series: the families' children labelled with its `model` version."""

    def __init__(self, model: str, families: MetricFamilies | None = None) -> None:
        self.families = f = families or MetricFamilies()
        self.registry = f.registry
        labels = {"model": model}
        self.ttft = f.ttft.labels(**labels)
        self.tpot = f.tpot.labels(**labels)
        self.prompt_tokens = f.prompt_tokens.labels(**labels)
        self.generated_tokens = f.generated_tokens.labels(**labels)
        self.requests = f.requests
        self.rejected = f.rejected.labels(**labels)
        self.steps = f.steps.labels(**labels)
        self.request_energy = f.energy.labels(kind="requests", **labels)
        self.idle_energy = f.energy.labels(kind="idle", **labels)
        self._labels = labels

    def watch(self, queue_depth: Callable[[], float], running: Callable[[], float]) -> None:
        """Read the gauges from the engine when scraped, so they are never stale."""
        self.families.queue_depth.labels(**self._labels).set_function(queue_depth)
        self.families.running.labels(**self._labels).set_function(running)

    def unwatch(self) -> None:
        """Drop the gauges of an engine that stopped (and the references they hold to it, so its model can be
        freed). Its counters and histograms stay, for comparing it with the versions that served after it."""
        for gauge in (self.families.queue_depth, self.families.running):
            with contextlib.suppress(KeyError):  # never watched
                gauge.remove(self._labels["model"])

    def finished(self, reason: str) -> None:
        self.requests.labels(finish_reason=reason, **self._labels).inc()
