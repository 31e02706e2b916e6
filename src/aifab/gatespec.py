"""The `gates:` section of factory.yaml: what a candidate model must show before an alias moves to it.

A gate compares a candidate with the model that holds an alias (the champion) or with absolute values. Each
item of `checks` names one measured quantity and one or more bounds:

- `metric: TASK/METRIC`: an evaluation result (aifab.evaluate), better up or down as the metric says
  (`aifab.evaluate.metrics.higher_is_better`: acc up, bits_per_byte down).
- `efficiency: j_per_token | usd_per_mtok`, `latency: ttft_p95_s | tpot_p95_s`: from a short load test of the
  candidate on this machine (`load_test:`); lower is better.

Bounds: `min` and `max` are absolute; `max_regression` (same unit as the value) and `max_regression_pct` (percent
of the champion's value) allow the candidate to be that much worse than the champion, and a negative value
demands an improvement of at least that much. spec.py imports these classes into FactorySpec; the decision
itself is aifab.evaluate.gates, the promotion aifab.pipeline.promote.
"""

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from aifab.store.names import NAME_RE

EFFICIENCY = ("j_per_token", "usd_per_mtok")
LATENCY = ("ttft_p95_s", "tpot_p95_s")
BOUNDS = ("min", "max", "max_regression", "max_regression_pct")


class _Gates(BaseModel):
    """Like every factory.yaml section: unknown keys are errors, not silently ignored settings."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class EvaluationsGate(_Gates):
    """The evaluations run for a model that lacks a current result of a checked metric (candidate or champion)."""

    suites: list[str] = Field(
        default_factory=list, description="Built-in suites to run; empty: the suites that hold the checked tasks."
    )
    tasks: list[str] = Field(default_factory=list, description="Task files (YAML) to run; relative to factory.yaml.")
    limit: int | None = Field(default=None, ge=1, description="Examples per task; null: all of them.")

    @field_validator("suites")
    @classmethod
    def _suite_names(cls, suites: list[str]) -> list[str]:
        for name in suites:
            if not NAME_RE.fullmatch(name):
                raise ValueError(f"invalid suite name {name!r}")
        return suites

    @field_validator("tasks")
    @classmethod
    def _task_files(cls, tasks: list[str], info: ValidationInfo) -> list[str]:
        base = Path((info.context or {}).get("base", "."))
        out = []
        for task in tasks:
            path = Path(task).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise ValueError(f"task file {task!r} does not exist")
            out.append(str(path.resolve()))
        return out


class LoadTestGate(_Gates):
    """The short load test efficiency and latency gates read: requests through the real engine and meter."""

    requests: int = Field(default=32, ge=1, le=10_000)
    concurrency: int = Field(default=8, ge=1, le=1024)
    prompt_tokens: int = Field(default=64, ge=1, le=131_072)
    max_tokens: int = Field(default=32, ge=2, le=4096, description="At least 2: a time per output token needs two.")
    seed: int = 0


class GateCheck(_Gates):
    """One checked quantity (exactly one of metric, efficiency, latency) and its bounds (at least one)."""

    metric: str | None = Field(default=None, description="TASK/METRIC, e.g. heldout-bpb/bits_per_byte.")
    efficiency: Literal["j_per_token", "usd_per_mtok"] | None = None
    latency: Literal["ttft_p95_s", "tpot_p95_s"] | None = None
    min: float | None = Field(default=None, allow_inf_nan=False)
    max: float | None = Field(default=None, allow_inf_nan=False)
    max_regression: float | None = Field(default=None, allow_inf_nan=False)
    max_regression_pct: float | None = Field(default=None, ge=-100, allow_inf_nan=False)

    @field_validator("metric")
    @classmethod
    def _task_metric(cls, metric: str | None) -> str | None:
        if metric is None:
            return None
        task, _, name = metric.rpartition("/")
        if not task or not name:
            raise ValueError(f"metric {metric!r} must be TASK/METRIC, e.g. heldout-bpb/bits_per_byte")
        from aifab.evaluate.metrics import higher_is_better  # the metric's vocabulary is evaluate's

        higher_is_better(name)  # a ValueError names an unknown metric and the known ones
        return metric

    @model_validator(mode="after")
    def _one_kind_some_bounds(self) -> "GateCheck":
        kinds = [k for k in ("metric", "efficiency", "latency") if getattr(self, k) is not None]
        if len(kinds) != 1:
            got = " and ".join(kinds) if kinds else "none"
            raise ValueError(f"a check names exactly one of metric, efficiency or latency (got {got})")
        if all(getattr(self, b) is None for b in BOUNDS):
            raise ValueError(f"check {self.gate!r} has no bound: give min, max, max_regression or max_regression_pct")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"check {self.gate!r}: min {self.min} is above max {self.max}")
        return self

    @property
    def kind(self) -> Literal["metric", "efficiency", "latency"]:
        return "metric" if self.metric is not None else "efficiency" if self.efficiency is not None else "latency"

    @property
    def gate(self) -> str:
        """The checked quantity as verdicts name it: TASK/METRIC, or the load-test metric."""
        name = self.metric or self.efficiency or self.latency
        assert name is not None
        return name

    def bounds(self) -> list[tuple[str, float]]:
        """(bound, value) for each bound set, in BOUNDS order."""
        out = []
        for b in BOUNDS:
            value = getattr(self, b)
            if value is not None:
                assert math.isfinite(value)
                out.append((b, float(value)))
        return out


class GatesSpec(_Gates):
    """What `aifab promote` and the pipeline's gate stage check before moving an alias."""

    champion: str | None = Field(
        default=None,
        pattern=NAME_RE.pattern,
        description="The alias whose holder the candidate is compared with; null: the alias being promoted.",
    )
    evaluations: EvaluationsGate = Field(default_factory=EvaluationsGate)
    load_test: LoadTestGate = Field(default_factory=LoadTestGate)
    checks: list[GateCheck] = Field(default_factory=list)
