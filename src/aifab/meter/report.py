"""Reading the ledger back: its rows summed by stage, dataset, run, model or deployment (`ledger_report`), what
one model version cost to make and to serve (`model_footprint`), and what serving it spent per token
(`serving_energy`). Sums run in the database; lineage is read once per call. Nothing here writes.
"""

from dataclasses import dataclass, fields

from sqlalchemy import case, func, select

from aifab.errors import AifabError
from aifab.store.db import Database
from aifab.store.schema import DatasetVersion, LedgerEntry, LineageEdge, ModelVersion, Run

GROUPINGS = ("stage", "dataset", "run", "model", "deployment")
# the stages that are the work of serving a model version (request rows and the idle energy between steps)
SERVING_STAGES = ("serve", "serve-idle")
# the serving stage whose rows carry the requests' tokens: a J/token divides these rows' energy by their tokens
REQUEST_STAGES = ("serve",)
# lineage relations followed upstream from a model to what it took to make it: its run (produced), the run's
# dataset (input, trained_on), a dataset's parent version (an increment builds on it) and a fine-tuned model's
# base (fine_tuned). Not "tokenizer": a dataset tokenized with a model's tokenizer did not cost that model's making.
MAKING_RELATIONS = frozenset({"produced", "trained_on", "input", "fine_tuned", "parent"})
SUMMED = ("energy_j", "cost_usd", "co2_g", "tokens_in", "tokens_out", "device_s")

Node = tuple[str, str]  # (kind, id) as lineage and the ledger name subjects


@dataclass(frozen=True)
class Spend:
    """Energy, money and carbon of some ledger rows (the electricity with the facility's PUE, plus capex)."""

    energy_j: float = 0.0
    cost_usd: float = 0.0
    co2_g: float = 0.0

    def to_json(self) -> dict[str, float]:
        return {"energy_j": self.energy_j, "cost_usd": self.cost_usd, "co2_g": self.co2_g}


@dataclass(frozen=True)
class Sums:
    """The SUMMED columns of a group of ledger rows, whether any of them is an estimate, and how many there are."""

    energy_j: float = 0.0
    cost_usd: float = 0.0
    co2_g: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    device_s: float = 0.0
    estimated: bool = False
    entries: int = 0

    def to_json(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class LedgerRow:
    """One group of `ledger_report`: its key and sums, plus what the grouping adds.

    `id`: the subject id under `dataset` and `run` (the key of a dataset is its name:version). `model_version_id`,
    `making` and `serving`: under `model`, the version's id and its spend split as in `model_footprint`."""

    key: str
    sums: Sums
    id: str | None = None
    model_version_id: int | str | None = None
    making: Spend | None = None
    serving: Spend | None = None

    def to_json(self) -> dict[str, object]:
        """The row as `aifab ledger --json` prints it: key, the grouping's own fields, then the sums."""
        head: dict[str, object] = {"key": self.key}
        if self.id is not None:
            head["id"] = self.id
        if self.making is not None and self.serving is not None:
            head |= {"model_version_id": self.model_version_id, "making": self.making.to_json()}
            head["serving"] = self.serving.to_json()
        return head | self.sums.to_json()


@dataclass(frozen=True)
class LedgerReport:
    """The ledger summed by `by`: `rows` most energy first, and `total`, every row in some group counted once."""

    by: str
    rows: list[LedgerRow]
    total: Sums

    def to_json(self) -> dict[str, object]:
        return {"by": self.by, "rows": [r.to_json() for r in self.rows], "total": self.total.to_json()}


@dataclass(frozen=True)
class Footprint:
    """What one model version cost: `making` (the data, train and evaluate rows of its lineage, a fine-tuned
    model's base's making included), `serving` (its serve and serve-idle rows) and `total`; `estimated` when
    any of those rows is an estimate; `entries`, how many rows (0: nothing metered)."""

    model_version_id: int | str
    making: Spend
    serving: Spend
    total: Spend
    estimated: bool
    entries: int


@dataclass(frozen=True)
class ServingEnergy:
    """A model version's request rows (stage `serve`; idle energy left out), summed."""

    energy_j: float
    tokens_out: int
    entries: int
    estimated: bool
    cost_usd: float = 0.0

    @property
    def j_per_token(self) -> float | None:
        """Joules per output token; None when no rows produced tokens or they recorded no energy."""
        if not self.entries or self.tokens_out <= 0 or self.energy_j <= 0:
            return None
        return self.energy_j / self.tokens_out

    @property
    def usd_per_mtok(self) -> float | None:
        """Dollars per million output tokens (electricity and capex, as the rows charged); None without tokens."""
        if not self.entries or self.tokens_out <= 0:
            return None
        return self.cost_usd / self.tokens_out * 1e6


def serving_energy(db: Database, model_version_id: int) -> ServingEnergy:
    """The summed `serve` rows charged to one model version (all zero when there are none)."""
    with db.session() as s:
        energy_j, tokens_out, entries, estimated, cost_usd = s.execute(
            select(
                func.sum(LedgerEntry.energy_j),
                func.sum(LedgerEntry.tokens_out),
                func.count(LedgerEntry.id),
                func.max(case((LedgerEntry.estimated, 1), else_=0)),  # portable "any": PostgreSQL has no max(bool)
                func.sum(LedgerEntry.cost_usd),
            ).where(
                LedgerEntry.stage.in_(REQUEST_STAGES),
                LedgerEntry.subject_kind == "model",
                LedgerEntry.subject_id == str(model_version_id),
            )
        ).one()
    return ServingEnergy(
        float(energy_j or 0), int(tokens_out or 0), int(entries), bool(estimated), float(cost_usd or 0)
    )


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


def _sum(buckets: list[_Bucket]) -> Sums:
    totals = {k: sum((b.sums[k] for b in buckets), 0.0) for k in SUMMED}
    return Sums(
        energy_j=totals["energy_j"],
        cost_usd=totals["cost_usd"],
        co2_g=totals["co2_g"],
        tokens_in=int(totals["tokens_in"]),
        tokens_out=int(totals["tokens_out"]),
        device_s=totals["device_s"],
        estimated=any(b.estimated for b in buckets),
        entries=sum(b.entries for b in buckets),
    )


def _spend(buckets: list[_Bucket]) -> Spend:
    return Spend(*(sum((b.sums[k] for b in buckets), 0.0) for k in ("energy_j", "cost_usd", "co2_g")))


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


def _footprint(lin: _Lineage, model_id: str) -> Footprint:
    making, serving = lin.split(model_id)
    return Footprint(
        model_version_id=int(model_id) if model_id.isdigit() else model_id,
        making=_spend(making),
        serving=_spend(serving),
        total=_spend(making + serving),
        estimated=any(b.estimated for b in making + serving),
        entries=sum(b.entries for b in making + serving),
    )


def model_footprints(db: Database, model_version_ids: list[int]) -> dict[int, Footprint]:
    """`model_footprint` of several model versions, reading the store once."""
    lin = _Lineage(db)
    return {i: _footprint(lin, str(i)) for i in model_version_ids}


def model_footprint(db: Database, model_version_id: int) -> Footprint:
    """What one model version cost (see `Footprint`); an unknown id has a footprint of no entries, not an error."""
    return model_footprints(db, [model_version_id])[model_version_id]


def ledger_report(db: Database, by: str = "stage") -> LedgerReport:
    """The ledger summed by `by`, one of GROUPINGS (else an AifabError listing them):

    - stage: every row, by stage.
    - dataset, run: the rows charged directly to each dataset version (key name:version) or run (key run id).
    - model: each model version (key name:version) with the rows charged to it and, through lineage, those of
      its making (see `Footprint`); a base model's making is in its own row and in its fine-tuned model's row.
    - deployment: the serving rows by the `aifab serve` deployment that wrote them ("-" when none was recorded).
    `total` sums every ledger row that is in at least one group, each once (so under `model` it is not the sum
    of the rows when models share their making)."""
    if by not in GROUPINGS:
        raise AifabError(f"unknown --by {by!r}: choose one of {', '.join(GROUPINGS)}")
    lin = _Lineage(db)
    heads: dict[str, LedgerRow] = {}  # the row's key and grouping fields; sums filled in below
    groups: dict[str, list[_Bucket]] = {}

    def put(key: str, bucket: _Bucket, subject_id: str | None = None) -> None:
        heads.setdefault(key, LedgerRow(key, Sums(), id=subject_id))
        groups.setdefault(key, []).append(bucket)

    if by == "model":
        ids = set(lin.model_labels) | {b.subject_id for b in lin.buckets if b.subject_kind == "model"}
        for mid in sorted(ids, key=lambda i: (not i.isdigit(), int(i) if i.isdigit() else 0, i)):
            making, serving = lin.split(mid)
            if not making and not serving:
                continue
            fp = _footprint(lin, mid)
            key = lin.model_labels.get(mid, f"model {mid}")
            heads[key] = LedgerRow(key, Sums(), model_version_id=fp.model_version_id, making=fp.making,
                                   serving=fp.serving)  # fmt: skip
            groups[key] = making + serving
    else:
        for b in lin.buckets:
            if by == "stage":
                put(b.stage, b)
            elif by == "deployment" and b.stage in SERVING_STAGES:
                put(b.deployment or "-", b)
            elif by == "dataset" and b.subject_kind == "dataset":
                put(lin.dataset_labels.get(b.subject_id, b.subject_id), b, b.subject_id)
            elif by == "run" and b.subject_kind == "run":
                put(b.subject_id, b, b.subject_id)
    rows = [
        LedgerRow(head.key, _sum(groups[key]), head.id, head.model_version_id, head.making, head.serving)
        for key, head in heads.items()
    ]
    rows.sort(key=lambda r: (-r.sums.energy_j, r.key))
    seen = {id(b): b for buckets in groups.values() for b in buckets}
    return LedgerReport(by, rows, _sum(list(seen.values())))
