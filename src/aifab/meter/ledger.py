"""The ledger: every stage charges its energy, cost and carbon to a subject, with units in the names.

`Meter.measure(stage, subject_kind)` is a context manager around a piece of work. On exit it writes one
`LedgerEntry` row. The subject id is often known only at the end (a run id, a dataset version), so
the caller sets it on the yielded `Charge` before the block ends.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, func, select

from aifab.errors import AifabError
from aifab.meter.samplers import Sampler, auto_sampler, monotonic_s
from aifab.store.db import Database
from aifab.store.schema import DatasetVersion, LedgerEntry, LineageEdge, ModelVersion, Run

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


# --- reading the ledger back: `aifab ledger --by ...` and the footprint of a model version ---------------------

GROUPINGS = ("stage", "dataset", "run", "model", "deployment")
# the stages that are the work of serving a model version (request rows and the idle energy between steps)
SERVING_STAGES = ("serve", "serve-idle")
# lineage relations followed upstream from a model to what it took to make it: its run (produced), the run's
# dataset (input, trained_on), a dataset's parent version (an increment builds on it) and a fine-tuned model's
# base (fine_tuned). Not "tokenizer": a dataset tokenized with a model's tokenizer did not cost that model's making.
MAKING_RELATIONS = frozenset({"produced", "trained_on", "input", "fine_tuned", "parent"})
SUMMED = ("energy_j", "cost_usd", "co2_g", "tokens_in", "tokens_out", "device_s")
MONEY = ("energy_j", "cost_usd", "co2_g")

Node = tuple[str, str]  # (kind, id) as lineage and the ledger name subjects


@dataclass(frozen=True)
class _Bucket:
    """Ledger rows of one (subject, stage, deployment), summed in the database."""

    subject_kind: str
    subject_id: str
    stage: str
    deployment: str | None
    sums: dict[str, float]
    estimated: bool
    entries: int


def _buckets(db: Database) -> list[_Bucket]:
    columns = [getattr(LedgerEntry, name) for name in SUMMED]
    keys = (LedgerEntry.subject_kind, LedgerEntry.subject_id, LedgerEntry.stage, LedgerEntry.deployment)
    query = select(
        *keys,
        *(func.sum(c) for c in columns),
        func.max(case((LedgerEntry.estimated, 1), else_=0)),  # portable "any": PostgreSQL has no max(boolean)
        func.count(LedgerEntry.id),
    ).group_by(*keys)
    with db.session() as s:
        rows = s.execute(query).all()
    n = len(SUMMED)
    return [
        _Bucket(
            r[0],
            r[1],
            r[2],
            r[3],
            {k: float(v or 0) for k, v in zip(SUMMED, r[4 : 4 + n], strict=True)},
            bool(r[4 + n]),
            int(r[5 + n]),
        )
        for r in rows
    ]


def _sum(buckets: list[_Bucket]) -> dict[str, Any]:
    out: dict[str, Any] = {k: 0.0 for k in SUMMED}
    for b in buckets:
        for k in SUMMED:
            out[k] += b.sums[k]
    out["tokens_in"], out["tokens_out"] = int(out["tokens_in"]), int(out["tokens_out"])
    out["estimated"] = any(b.estimated for b in buckets)
    out["entries"] = sum(b.entries for b in buckets)
    return out


def _money(buckets: list[_Bucket]) -> dict[str, float]:
    return {k: sum((b.sums[k] for b in buckets), 0.0) for k in MONEY}


class _Lineage:
    """The lineage edges (plus a model's run and a run's dataset from their own columns, should an edge be
    missing), the labels of datasets and models, and the ledger buckets by subject: read once per report."""

    def __init__(self, db: Database) -> None:
        self.upstream: dict[Node, set[Node]] = {}
        self.dataset_labels: dict[str, str] = {}
        self.model_labels: dict[str, str] = {}
        with db.session() as s:
            for e in s.scalars(select(LineageEdge).where(LineageEdge.relation.in_(MAKING_RELATIONS))):
                self._add((e.src_kind, e.src_id), (e.dst_kind, e.dst_id))
            for mid, name, version, run_id in s.execute(
                select(ModelVersion.id, ModelVersion.name, ModelVersion.version, ModelVersion.run_id)
            ):
                self.model_labels[str(mid)] = f"{name}:{version}"
                if run_id is not None:
                    self._add(("run", run_id), ("model", str(mid)))
            for run_id, ds_id in s.execute(select(Run.id, Run.dataset_version_id)):
                if ds_id is not None:
                    self._add(("dataset", str(ds_id)), ("run", run_id))
            for did, name, version in s.execute(select(DatasetVersion.id, DatasetVersion.name, DatasetVersion.version)):
                self.dataset_labels[str(did)] = f"{name}:{version}"
        self.buckets = _buckets(db)
        self.by_subject: dict[Node, list[_Bucket]] = {}
        for b in self.buckets:
            self.by_subject.setdefault((b.subject_kind, b.subject_id), []).append(b)

    def _add(self, src: Node, dst: Node) -> None:
        self.upstream.setdefault((dst[0], str(dst[1])), set()).add((src[0], str(src[1])))

    def ancestors(self, node: Node) -> set[Node]:
        seen: set[Node] = set()
        frontier = [node]
        while frontier:
            for parent in self.upstream.get(frontier.pop(), ()):
                if parent not in seen and parent != node:
                    seen.add(parent)
                    frontier.append(parent)
        return seen

    def split(self, model_id: str) -> tuple[list[_Bucket], list[_Bucket]]:
        """(making, serving) buckets of one model version. Making: every row charged to an ancestor dataset or
        run, and the non-serving rows of the model and of its ancestor models (a base's making, not its
        serving). Serving: the serving rows charged to the model itself."""
        me: Node = ("model", model_id)
        making: list[_Bucket] = []
        serving: list[_Bucket] = []
        for node in sorted(self.ancestors(me) | {me}):
            for b in self.by_subject.get(node, []):
                if node[0] == "model" and b.stage in SERVING_STAGES:
                    if node == me:
                        serving.append(b)
                else:
                    making.append(b)
        return making, serving


def _footprint(lin: _Lineage, model_id: str) -> dict[str, Any]:
    making, serving = lin.split(model_id)
    return {
        "model_version_id": int(model_id) if model_id.isdigit() else model_id,
        "making": _money(making),
        "serving": _money(serving),
        "total": _money(making + serving),
        "estimated": any(b.estimated for b in making + serving),
        "entries": sum(b.entries for b in making + serving),
    }


def model_footprints(db: Database, model_version_ids: list[int]) -> dict[int, dict[str, Any]]:
    """`model_footprint` of several model versions, reading the store once."""
    lin = _Lineage(db)
    return {i: _footprint(lin, str(i)) for i in model_version_ids}


def model_footprint(db: Database, model_version_id: int) -> dict[str, Any]:
    """What one model version cost, in energy_j, cost_usd and co2_g: `making` (the data, train and evaluate rows
    of its lineage, a fine-tuned model's base's making included), `serving` (its serve and serve-idle rows) and
    `total`, plus `estimated` (any of those rows an estimate) and `entries` (how many rows)."""
    return model_footprints(db, [model_version_id])[model_version_id]


def ledger_report(db: Database, by: str = "stage") -> dict[str, Any]:
    """The ledger summed by `by` (one of GROUPINGS): {"by", "rows", "total"}.

    Each row has `key`, the SUMMED columns, `estimated` (any row in the group an estimate) and `entries`.
    - stage: every row, by stage.
    - dataset, run: the rows charged directly to each dataset version (key name:version) or run (key run id).
    - model: each model version (key name:version) with the rows charged to it and, through lineage, those of
      its making (see `model_footprint`); such rows also carry `making`, `serving` and `model_version_id`.
      A base model's making is in its own row and in its fine-tuned model's row.
    - deployment: the serving rows by the `aifab serve` deployment that wrote them ("-" when none was recorded).
    `total` sums every ledger row that is in at least one group, each once (so under `model` it is not the sum
    of the rows when models share their making)."""
    if by not in GROUPINGS:
        raise AifabError(f"unknown --by {by!r}: choose one of {', '.join(GROUPINGS)}")
    lin = _Lineage(db)
    groups: dict[str, tuple[dict[str, Any], list[_Bucket]]] = {}

    def put(key: str, bucket: _Bucket, **extra: Any) -> None:
        groups.setdefault(key, ({"key": key, **extra}, []))[1].append(bucket)

    if by == "model":
        ids = set(lin.model_labels) | {b.subject_id for b in lin.buckets if b.subject_kind == "model"}
        for mid in sorted(ids, key=lambda i: (not i.isdigit(), int(i) if i.isdigit() else 0, i)):
            making, serving = lin.split(mid)
            if not making and not serving:
                continue
            fp = _footprint(lin, mid)
            key = lin.model_labels.get(mid, f"model {mid}")
            extra = {"model_version_id": fp["model_version_id"], "making": fp["making"], "serving": fp["serving"]}
            groups[key] = ({"key": key, **extra}, making + serving)
    else:
        for b in lin.buckets:
            if by == "stage":
                put(b.stage, b)
            elif by == "deployment" and b.stage in SERVING_STAGES:
                put(b.deployment or "-", b)
            elif by == "dataset" and b.subject_kind == "dataset":
                put(lin.dataset_labels.get(b.subject_id, b.subject_id), b, id=b.subject_id)
            elif by == "run" and b.subject_kind == "run":
                put(b.subject_id, b, id=b.subject_id)
    rows = []
    for head, buckets in groups.values():
        rows.append({**head, **_sum(buckets)})
    rows.sort(key=lambda r: (-r["energy_j"], r["key"]))
    seen = {id(b): b for _, buckets in groups.values() for b in buckets}
    return {"by": by, "rows": rows, "total": _sum(list(seen.values()))}
