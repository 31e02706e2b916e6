"""FactorySpec: the schema of factory.yaml, validated before any compute is spent.

`load_spec(path)` returns a validated `FactorySpec` or raises `SpecError` with one line of the form
`factory.yaml:12: training.batch_size: Input should be a valid integer (got 'ten')`, so a user can go
straight to the offending key. Relative paths in the file are resolved against the file's directory.
"""

import glob as globlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from aifab.errors import SpecError
from aifab.gatespec import EvaluationsGate as EvaluationsGate
from aifab.gatespec import GateCheck as GateCheck
from aifab.gatespec import GatesSpec as GatesSpec
from aifab.gatespec import LoadTestGate as LoadTestGate
from aifab.store.names import NAME_RE
from aifab.yamlfile import YamlDoc, describe, parse_yaml, read_yaml

GLOB_CHARS = frozenset("*?[")


class _Section(BaseModel):
    """Every section rejects unknown keys, so a typo is an error instead of a silently ignored setting."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def _source_exists(source: str, info: ValidationInfo) -> str:
    return resolve_source(source, Path((info.context or {}).get("base", ".")))


class DataSpec(_Section):
    # Each item is checked on its own, so an error names its index (data.sources.1) and its line.
    sources: list[Annotated[str, AfterValidator(_source_exists)]] = Field(
        default_factory=list,
        description="Directories, files or globs to ingest. Empty means the Python standard library's source.",
    )
    # Suffixes to read; each also matches its .gz and .zst compressed variants (e.g. data.jsonl.zst).
    extensions: list[str] = Field(default_factory=lambda: [".py", ".md", ".txt", ".jsonl", ".csv", ".parquet"])
    jsonl_text_field: str = Field(default="text", min_length=1)
    csv_column: str = Field(default="text", min_length=1)
    parquet_column: str = Field(default="text", min_length=1)
    skip_bad: bool = Field(default=False, description="Skip and count malformed records instead of failing.")
    max_line_bytes: int = Field(default=1 << 20, gt=0, description="Files with a longer line are skipped.")
    val_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)
    max_bytes: int | None = Field(default=None, gt=0, description="Stop reading after this many bytes.")
    curation: "CurationSpec" = Field(default_factory=lambda: CurationSpec())

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, exts: list[str]) -> list[str]:
        for ext in exts:
            if not ext.startswith(".") or len(ext) < 2:
                raise ValueError(f"extension {ext!r} must look like '.py'")
        return exts


class CurationSpec(_Section):
    """Curation stages, in the order they run. Each can be switched off; each reports its own counts."""

    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    min_chars: int = Field(default=16, ge=0, description="Shorter documents are dropped.")
    max_chars: int = Field(default=2_000_000, gt=0, description="Longer documents are dropped.")
    max_symbol_ratio: float = Field(
        default=0.6, gt=0, le=1.0, description="Share of chars that are not letters, digits or whitespace."
    )
    max_repeated_line_ratio: float = Field(
        default=0.6,
        gt=0,
        le=1.0,
        description="Share of non-blank lines that repeat an earlier line of the same document.",
    )
    exact_dedup: bool = True
    near_dedup: bool = True
    near_dedup_threshold: float = Field(default=0.8, gt=0, lt=1.0, description="Estimated Jaccard similarity.")
    minhash_perms: int = Field(default=128, ge=16, le=1024)
    shingle_words: int = Field(default=5, ge=1, le=32)
    pii: bool = True


def resolve_source(source: str, base: Path) -> str:
    """Resolve a data source against `base`; raise ValueError if it names nothing on disk."""
    expanded = os.path.expanduser(source)
    path = Path(expanded) if os.path.isabs(expanded) else base / expanded
    if GLOB_CHARS & set(source):
        if not globlib.glob(str(path), recursive=True):
            raise ValueError(f"glob {source!r} matches no files")
        return str(path)
    if not path.exists():
        raise ValueError(f"data path {source!r} does not exist")
    return str(path.resolve())


class TokenizerSpec(_Section):
    vocab_size: int = Field(default=4096, ge=260, le=65535, description="uint16 shards cap it at 65535.")
    min_frequency: int = Field(default=2, ge=1)


class ModelSpec(_Section):
    preset: Literal["tiny", "small", "base"] = "tiny"
    n_layer: int | None = Field(default=None, ge=1, le=96)
    n_head: int | None = Field(default=None, ge=1, le=128)
    d_model: int | None = Field(default=None, ge=8, le=16384)
    context_len: int | None = Field(default=None, ge=8, le=131072)


class TrainingSpec(_Section):
    steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    seconds: float | None = Field(default=120.0, gt=0, description="Stop after this much wall time.")
    batch_size: int = Field(default=8, ge=1, le=4096)
    lr: float = Field(default=3e-3, gt=0, le=1.0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1.0)
    warmup_steps: int = Field(default=20, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, ge=0)
    eval_every: int = Field(default=50, ge=1)
    eval_batches: int = Field(default=8, ge=1)
    checkpoint_every: int = Field(default=200, ge=1)
    seed: int = 0
    grad_accum_steps: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches per optimizer step (tokens/step = batch*context*this)."
    )
    compile: bool | Literal["auto"] = Field(
        default="auto", description="torch.compile the model: auto = on CUDA only (compile time dominates CPU runs)."
    )
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto = bf16 autocast on CUDA, fp32 on CPU; weights stay fp32."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto = cuda when available.")
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        default="auto",
        description="Across processes (torchrun, Ray): auto = DDP, or FSDP2 when the training state cannot fit one "
        "device.",
    )


class EvaluationSpec(_Section):
    batches: int = Field(default=16, ge=1)
    prompts: list[str] = Field(default_factory=lambda: ["def ", "import os\n", "class "])
    max_new_tokens: int = Field(default=48, ge=1, le=4096)


class ServingSpec(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    requests: int = Field(default=3, ge=0, le=100, description="Test requests the demo sends.")
    max_tokens: int = Field(default=32, ge=1, le=4096, description="max_tokens of each test request.")


class BudgetsSpec(_Section):
    energy_j: float | None = Field(default=None, gt=0, description="Stop training once this is spent.")
    cost_usd: float | None = Field(default=None, gt=0, description="Stop training once this is spent.")


class MeterSpec(_Section):
    # US average retail price of electricity to commercial customers, 2023: 12.7 cents/kWh
    # (U.S. EIA, Electric Power Monthly, Table 5.6.B).
    electricity_usd_per_kwh: float = Field(default=0.127, ge=0)
    # US average grid intensity, 2022: 823 lb CO2/MWh = 373 g/kWh (U.S. EPA eGRID2022 summary tables).
    grid_co2_g_per_kwh: float = Field(default=373.0, ge=0)
    # A laptop or a server in an ordinary room: no facility overhead.
    pue: float = Field(default=1.0, ge=1.0, le=3.0)
    # The hardware's price spread over its life, charged per device-hour held. 0 by default (a machine that is
    # already paid for). For a cluster, e.g. the catalog's H100 all-in $50,000 per GPU over 5 years of
    # 8,760 h: 50000 / 43800 = $1.14 per GPU-hour (aifab.meter.catalog, an industry estimate).
    capex_usd_per_device_hour: float = Field(default=0.0, ge=0)


# ---- orchestration: the pipeline's stages and the pool they share -------------------------------------------

STAGE_USES = ("data", "train", "evaluate", "register", "gate", "command")
# what `with:` may set for each built-in stage: the spec sections it overrides (a key of the section, or the
# section itself as a nested mapping), plus the stage's own keys
_WITH_SECTIONS: dict[str, dict[str, type[BaseModel]]] = {}  # filled below, once the section classes exist
_WITH_OWN: dict[str, dict[str, Any]] = {
    "data": {"dataset": str},
    "train": {},
    "evaluate": {},
    "register": {"name": str, "aliases": list},
    "gate": {"alias": str},  # the alias the stage promotes the registered model to
    "command": {},
}


class ResourcesSpec(_Section):
    """What one attempt of a stage holds while it runs. A GPU stage gets whole GPUs, pinned by index."""

    gpus: int = Field(default=0, ge=0, le=1024)
    cpus: float = Field(default=1.0, gt=0, le=4096)
    memory_gb: float = Field(default=1.0, gt=0, le=65536)


class StageSpec(_Section):
    """One node of the pipeline DAG. `uses` says what it runs; `with` overrides that stage's spec sections."""

    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)

    uses: str = Field(description="data | train | evaluate | register | gate | command")
    needs: list[str] = Field(default_factory=list, description="Stages that must finish first.")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="Parameter overrides.")
    run: list[str] | None = Field(default=None, description="argv of a `uses: command` stage.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the stage's process.")
    deps: list[str] = Field(
        default_factory=list, description="Files or directories whose fingerprint is part of the stage's key."
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    retries: int | None = Field(default=None, ge=0, le=100, description="Default: orchestration.retries.")
    backoff_s: float | None = Field(default=None, ge=0, le=86400, description="Default: orchestration.backoff_s.")
    priority: int = Field(default=0, ge=-1000, le=1000)
    project: str | None = Field(default=None, pattern=NAME_RE.pattern, description="Default: orchestration.project.")
    cache: bool = Field(default=True, description="false: run every time, never skipped.")

    # `with`, validated against the sections it overrides and normalised (data paths resolved), by section
    _overrides: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("uses")
    @classmethod
    def _known_uses(cls, uses: str) -> str:
        if uses not in STAGE_USES:
            raise ValueError(f"unknown uses {uses!r}: choose one of {', '.join(STAGE_USES)}")
        return uses

    @field_validator("deps")
    @classmethod
    def _deps_exist(cls, deps: list[str], info: ValidationInfo) -> list[str]:
        return [resolve_source(d, Path((info.context or {}).get("base", "."))) for d in deps]

    @model_validator(mode="after")
    def _check_with(self, info: ValidationInfo) -> "StageSpec":
        if self.uses == "command":
            if not self.run:
                raise ValueError("a `uses: command` stage needs `run:`, the command's argv as a list")
            self._overrides = dict(self.with_)
            return self
        if self.run is not None:
            raise ValueError(f"`run:` belongs to `uses: command` stages, not `uses: {self.uses}`")
        sections, own = _WITH_SECTIONS[self.uses], _WITH_OWN[self.uses]
        # the first section's keys are given flat (`with: {steps: 200}`), the others nested (`model: {...}`)
        main = next(iter(sections), None)
        flat: dict[str, Any] = {}
        nested: dict[str, Any] = {}
        for key, value in self.with_.items():
            if key in own:
                if not isinstance(value, own[key]) or (own[key] is list and not all(isinstance(v, str) for v in value)):
                    raise ValueError(f"with.{key}: expected a {own[key].__name__} of names (got {value!r})")
                for name in value if isinstance(value, list) else [value]:
                    if not NAME_RE.fullmatch(name):
                        raise ValueError(f"with.{key}: invalid name {name!r}")
                nested[key] = value
            elif key in sections and key != main:
                nested[key] = _validate_part(sections[key], value, f"with.{key}", info)
            elif main is not None and key in sections[main].model_fields:
                flat[key] = value
            else:
                known = [*(sections[main].model_fields if main else ()), *own, *(k for k in sections if k != main)]
                raise ValueError(f"with.{key}: unknown key for `uses: {self.uses}` (known: {', '.join(known)})")
        if main is not None and flat:
            nested[main] = _validate_part(sections[main], flat, "with", info)
        self._overrides = nested
        return self

    @property
    def overrides(self) -> dict[str, Any]:
        """`with`, validated and normalised: {section: {key: value}} for built-in stages (only the keys set)."""
        return self._overrides


def _validate_part(section: type[BaseModel], value: Any, where: str, info: ValidationInfo) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping (got {value!r})")
    try:
        part = section.model_validate(value, context=info.context)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in (where, *first["loc"]))
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        shown = first.get("input")
        plain = shown is not None and not isinstance(shown, dict | list) and repr(shown) not in msg
        got = f" (got {shown!r})" if plain else ""
        raise ValueError(f"{key}: {msg}{got}") from None
    dumped: dict[str, Any] = part.model_dump(exclude_unset=True)
    return dumped


class PoolNodeSpec(_Section):
    """One machine of the pool, instead of the one the control plane finds itself on."""

    name: str = Field(pattern=NAME_RE.pattern)
    gpus: int = Field(default=0, ge=0, le=1024)
    cpus: float = Field(gt=0)
    memory_gb: float = Field(gt=0)


class QuotaSpec(_Section):
    """The most a project may hold at once; null means no limit on that resource."""

    gpus: int | None = Field(default=None, ge=0)
    cpus: float | None = Field(default=None, ge=0)
    memory_gb: float | None = Field(default=None, ge=0)


class OrchestrationSpec(_Section):
    policy: Literal["fifo", "priority-fair", "default"] = "default"
    retries: int = Field(default=2, ge=0, le=100, description="Retries of a failed stage, unless it sets its own.")
    backoff_s: float = Field(default=5.0, ge=0, le=86400, description="Wait before a retry, unless a stage says.")
    project: str = Field(default="default", pattern=NAME_RE.pattern, description="Project of stages that name none.")
    quotas: dict[str, QuotaSpec] | None = Field(default=None, description="Per project; null: no quotas.")
    weights: dict[str, Annotated[float, Field(gt=0)]] | None = Field(
        default=None, description="Fair-share weight per project (default 1); null: all equal."
    )
    pool: list[PoolNodeSpec] | None = Field(default=None, description="null: this machine.")

    @field_validator("quotas", "weights")
    @classmethod
    def _project_names(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for name in value or {}:
            if not NAME_RE.fullmatch(name):
                raise ValueError(f"invalid project name {name!r}")
        return value

    @field_validator("pool")
    @classmethod
    def _unique_nodes(cls, pool: list[PoolNodeSpec] | None) -> list[PoolNodeSpec] | None:
        names = [n.name for n in pool or []]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"node {dupes[0]!r} is listed twice")
        if pool is not None and not pool:
            raise ValueError("an empty pool can run nothing: list at least one node, or drop `pool:`")
        return pool


class FactorySpec(_Section):
    name: str = Field(default="demo", pattern=NAME_RE.pattern, description="Name of the model to register.")
    data: DataSpec = Field(default_factory=DataSpec)
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    budgets: BudgetsSpec = Field(default_factory=BudgetsSpec)
    meter: MeterSpec = Field(default_factory=MeterSpec)
    orchestration: OrchestrationSpec = Field(default_factory=OrchestrationSpec)
    gates: GatesSpec | None = Field(
        default=None, description="Promotion gates; when set, the line ends with a gate stage (see gatespec.py)."
    )
    stages: dict[str, StageSpec] | None = Field(
        default=None, description="The pipeline's DAG; null runs the line: data -> train -> evaluate -> register."
    )

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, stages: dict[str, StageSpec] | None) -> dict[str, StageSpec] | None:
        if stages is not None and not stages:
            raise ValueError("`stages:` is empty: list at least one stage, or drop the section")
        for name in stages or {}:
            if not NAME_RE.fullmatch(name):
                raise ValueError(
                    f"invalid stage name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter"
                    " or digit"
                )
        return stages


_WITH_SECTIONS.update(
    {
        "data": {"data": DataSpec, "tokenizer": TokenizerSpec},
        "train": {"training": TrainingSpec, "model": ModelSpec},
        "evaluate": {"evaluation": EvaluationSpec},
        "register": {},
        "gate": {"gates": GatesSpec},
        "command": {},
    }
)


def load_spec(path: str | Path) -> FactorySpec:
    """Read and validate a factory.yaml. Raises SpecError with `file:line: key: problem`."""
    path = Path(path)
    doc = read_yaml(path, SpecError)
    return validate_spec(doc, path)


def parse_spec(text: str, path: Path) -> FactorySpec:
    """Validate factory.yaml text as if read from `path` (relative paths resolve against its directory)."""
    return validate_spec(parse_yaml(text, path, SpecError), path)


def validate_spec(doc: YamlDoc, path: Path) -> FactorySpec:
    data = {} if doc.data is None else doc.data
    if not isinstance(data, dict):
        raise SpecError(f"{path}:1: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return FactorySpec.model_validate(data, context={"base": path.parent})
    except ValidationError as e:
        raise SpecError(describe(e, doc.root, path)) from None


def example_yaml() -> str:
    """A commented factory.yaml that spells out every key with its default (`aifab init` writes it)."""
    return (Path(__file__).parent / "factory.example.yaml").read_text(encoding="utf-8")
