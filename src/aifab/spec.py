"""FactorySpec: the schema of factory.yaml, validated before any compute is spent.

`load_spec(path)` returns a validated `FactorySpec` or raises `SpecError` with one line of the form
`factory.yaml:12: training.batch_size: Input should be a valid integer (got 'ten')`, so a user can go
straight to the offending key. Relative paths in the file are resolved against the file's directory.
"""

import glob as globlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from aifab.errors import SpecError
from aifab.store.names import NAME_RE

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


def load_spec(path: str | Path) -> FactorySpec:
    """Read and validate a factory.yaml. Raises SpecError with `file:line: key: problem`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read: {e}") from None
    return parse_spec(text, path)


def parse_spec(text: str, path: Path) -> FactorySpec:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}:{line}: malformed YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}:1: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return FactorySpec.model_validate(data, context={"base": path.parent})
    except ValidationError as e:
        raise SpecError(_describe(e, root, path)) from None


def _describe(exc: ValidationError, root: yaml.Node | None, path: Path) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif (
        first["type"] != "missing"
        and "input" in first
        and not isinstance(first["input"], dict | list)
        and repr(first["input"]) not in msg  # our own validators already quote the value
    ):
        msg = f"{msg} (got {first['input']!r})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{path}:{_line_of(root, loc)}: {key}: {msg}{more}"


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    """1-based line of the deepest YAML node along `loc` (the parent, when the key itself is missing)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    line = key_node.start_mark.line + 1
                    child = value_node
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


EXAMPLE_YAML = """\
# factory.yaml: one AI factory, from raw data to a served model. Every key is optional;
# the values below are the defaults. Unknown keys are rejected, so a typo is caught early.

# Name the trained model is registered under (letters, digits, '.', '_', '-').
name: demo

data:
  # Directories, files or globs ('**' recurses). Relative paths are relative to this file.
  # Empty means the Python standard library's own source on this machine.
  sources: []
  # Files with these suffixes are read, and their .gz and .zst compressed variants. A .jsonl line,
  # a .csv row or a .parquet row is one document, taken from the field or column named below.
  extensions: [.py, .md, .txt, .jsonl, .csv, .parquet]
  jsonl_text_field: text
  csv_column: text
  parquet_column: text
  # A malformed record or a missing field is an error naming file and line, unless skip_bad is true
  # (then it is skipped and counted). Files with a line longer than max_line_bytes are skipped.
  skip_bad: false
  max_line_bytes: 1048576
  # Share of documents held out for validation.
  val_fraction: 0.05
  # Stop reading after this many bytes (null: read everything).
  max_bytes: null
  curation:
    # Unicode normalisation: NFC, NFKC or none.
    normalize: NFC
    # Filters: document length in characters, share of symbol characters, share of repeated lines.
    min_chars: 16
    max_chars: 2000000
    max_symbol_ratio: 0.6
    max_repeated_line_ratio: 0.6
    # Exact duplicates by content hash; near duplicates by MinHash LSH over word shingles.
    exact_dedup: true
    near_dedup: true
    near_dedup_threshold: 0.8
    minhash_perms: 128
    shingle_words: 5
    # Redact emails, IP addresses, API keys and private-key blocks.
    pii: true

tokenizer:
  # Byte-level BPE trained on the corpus with Hugging Face tokenizers.
  vocab_size: 4096
  min_frequency: 2

model:
  # tiny (~1.2M parameters, trains on a laptop CPU), small, or base; any field overrides the preset.
  preset: tiny
  n_layer: null
  n_head: null
  d_model: null
  context_len: null

training:
  # Whichever budget is reached first ends training; null disables that budget.
  steps: null
  seconds: 120
  batch_size: 8
  lr: 0.003
  min_lr_ratio: 0.1
  warmup_steps: 20
  weight_decay: 0.1
  grad_clip: 1.0
  eval_every: 50
  eval_batches: 8
  checkpoint_every: 200
  seed: 0
  # Micro-batches per optimizer step: tokens per step = batch_size * context_len * grad_accum_steps.
  grad_accum_steps: 1
  # torch.compile the model: true, false, or auto (on for CUDA; off for CPU, where compile time
  # dominates short runs).
  compile: auto
  # auto: bf16 autocast on CUDA, fp32 on CPU. Or fp32, bf16 (weights and optimizer stay fp32).
  dtype: auto
  # auto: cuda when a CUDA device is available, else cpu. Or cpu, cuda.
  device: auto
  # Only when several processes train together (torchrun, or aifab train --engine ray): each takes
  # batch_size / processes rows of every batch. auto: DDP, or FSDP2 (sharded parameters, gradients and
  # optimizer state) when the training state cannot fit one device. Or ddp, fsdp.
  parallel: auto

evaluation:
  # Validation batches for loss and perplexity, and prompts for sampled completions.
  batches: 16
  prompts: ["def ", "import os\\n", "class "]
  max_new_tokens: 48

serving:
  # Servers bind loopback unless told otherwise.
  host: 127.0.0.1
  port: 8000
  # Test requests the demo sends to its server, and the tokens each asks for.
  requests: 3
  max_tokens: 32

budgets:
  # Training stops once it has spent this much (null: no limit).
  energy_j: null
  cost_usd: null

meter:
  # US commercial electricity price 2023 (EIA) and US grid intensity 2022 (EPA eGRID).
  electricity_usd_per_kwh: 0.127
  grid_co2_g_per_kwh: 373.0
  pue: 1.0
  capex_usd_per_device_hour: 0.0  # hardware price over its life; e.g. an H100 at $50k over 5 years is 1.14
"""
