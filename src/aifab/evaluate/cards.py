"""A model version with everything known about its quality and cost (`model_card`, `aifab models show`), and
two versions side by side (`compare_models`, `aifab models compare`): every (task, metric) both were evaluated
on, and what serving each cost per token according to the ledger."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aifab.evaluate.results import Difference, MetricResult, differences, latest_results
from aifab.store import Store


@dataclass(frozen=True)
class Efficiency:
    """What serving a version cost per output token, from its `serve` ledger rows; None where nothing was served."""

    j_per_token: float | None
    usd_per_mtok: float | None
    tokens_out: int
    estimated: bool  # some of the rows' energy is an estimate, not a measurement

    def to_json(self) -> dict[str, Any]:
        return {
            "j_per_token": self.j_per_token, "usd_per_mtok": self.usd_per_mtok, "tokens_out": self.tokens_out,
            "estimated": self.estimated,
        }  # fmt: skip


@dataclass(frozen=True)
class ModelCard:
    model: str  # name:version
    model_version_id: int
    created_at: datetime
    params_count: int
    config: dict[str, Any]
    metrics: dict[str, Any]  # recorded at registration (val_loss...)
    aliases: list[str]
    lineage: list[tuple[str, str, str]]  # (kind, id, relation) of its ancestors, nearest first
    results: list[MetricResult]  # the newest of each (task, metric)
    efficiency: Efficiency

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "model_version_id": self.model_version_id, "created_at": self.created_at.isoformat(),
            "params": self.params_count, "config": self.config, "metrics": self.metrics, "aliases": self.aliases,
            "lineage": [{"kind": k, "id": i, "relation": r} for k, i, r in self.lineage],
            "results": [r.to_json() for r in self.results], "efficiency": self.efficiency.to_json(),
        }  # fmt: skip


def efficiency(store: Store, model_version_id: int) -> Efficiency:
    from aifab.meter.report import serving_energy

    spent = serving_energy(store.db, model_version_id)
    return Efficiency(spent.j_per_token, spent.usd_per_mtok, spent.tokens_out, spent.estimated)


def model_card(store: Store, ref: str) -> ModelCard:
    """The version `ref` names (NotFound otherwise) with its aliases, lineage, latest results and serving cost."""
    from aifab.registry.models import aliases_of, resolve
    from aifab.store.lineage import upstream

    mv = resolve(store, ref)
    with store.db.session() as s:
        lineage = upstream(s, "model", mv.id)
    results = sorted(latest_results(store, mv.id).values(), key=lambda r: (r.suite or "~", r.task, r.metric))
    return ModelCard(
        f"{mv.name}:{mv.version}", mv.id, mv.created_at, mv.params_count, dict(mv.config), dict(mv.metrics),
        aliases_of(store, mv.id), lineage, results, efficiency(store, mv.id),
    )  # fmt: skip


@dataclass(frozen=True)
class Comparison:
    a: str  # name:version
    b: str
    rows: list[Difference]  # every (task, metric) both have
    only_a: list[tuple[str, str]]  # (task, metric) evaluated on one side only
    only_b: list[tuple[str, str]]
    efficiency_a: Efficiency
    efficiency_b: Efficiency

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "rows": [r.to_json() for r in self.rows],
            "only_a": [list(k) for k in self.only_a], "only_b": [list(k) for k in self.only_b],
            "efficiency": {"a": self.efficiency_a.to_json(), "b": self.efficiency_b.to_json()},
        }  # fmt: skip


def compare_models(store: Store, a: str, b: str) -> Comparison:
    """Versions `a` and `b` side by side (NotFound for either unknown)."""
    from aifab.registry.models import resolve

    ma, mb = resolve(store, a), resolve(store, b)
    ra, rb = latest_results(store, ma.id), latest_results(store, mb.id)
    only_a, only_b = sorted(ra.keys() - rb.keys()), sorted(rb.keys() - ra.keys())
    return Comparison(
        f"{ma.name}:{ma.version}", f"{mb.name}:{mb.version}", differences(ra, rb), only_a, only_b,
        efficiency(store, ma.id), efficiency(store, mb.id),
    )  # fmt: skip
