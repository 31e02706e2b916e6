"""Prometheus metrics of one serving engine, in a registry of its own (so tests and several engines in one
process do not collide). `GET /metrics` renders `registry`. Names follow Prometheus conventions: base units
(seconds), `_total` on counters."""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# latency buckets from 5 ms to 60 s: TTFT spans prefill of long prompts under load, TPOT a decode step
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServeMetrics:
    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, {"model": model}
        self.queue_depth = Gauge("aifab_queue_depth", "Requests waiting for a batch slot.", ["model"], registry=r)
        self.running = Gauge("aifab_running_requests", "Requests holding a batch slot.", ["model"], registry=r)
        self.ttft = Histogram(
            "aifab_time_to_first_token_seconds",
            "From arrival to the first generated token.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.tpot = Histogram(
            "aifab_time_per_output_token_seconds",
            "Mean time between a request's output tokens after the first.",
            ["model"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.prompt_tokens = Counter("aifab_prompt_tokens", "Prompt tokens prefilled.", ["model"], registry=r).labels(
            **labels
        )
        self.generated_tokens = Counter(
            "aifab_generation_tokens", "Tokens generated; rate() of it is the output tokens/s.", ["model"], registry=r
        ).labels(**labels)
        self.requests = Counter(
            "aifab_requests", "Finished requests by finish reason.", ["model", "finish_reason"], registry=r
        )
        self.rejected = Counter(
            "aifab_rejected_requests", "Requests refused with 429 because the queue was full.", ["model"], registry=r
        ).labels(**labels)
        self.steps = Counter("aifab_engine_steps", "Engine steps executed.", ["model"], registry=r).labels(**labels)
        energy = Counter(
            "aifab_energy_joules",
            "Device energy, charged to requests (by their tokens in each step) or idle between steps.",
            ["model", "kind"],
            registry=r,
        )
        self.request_energy = energy.labels(kind="requests", **labels)
        self.idle_energy = energy.labels(kind="idle", **labels)
        self._labels = labels

    def watch(self, queue_depth: Callable[[], float], running: Callable[[], float]) -> None:
        """Read the gauges from the engine when scraped, so they are never stale."""
        self.queue_depth.labels(**self._labels).set_function(queue_depth)
        self.running.labels(**self._labels).set_function(running)

    def finished(self, reason: str) -> None:
        self.requests.labels(finish_reason=reason, **self._labels).inc()
