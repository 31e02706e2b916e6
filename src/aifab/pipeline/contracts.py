"""What goes into each built-in stage and what comes out of it: typed, and JSON on the wire.

A stage's job receives a `Task` (as JSON on its command line) and reports its outputs as JSON, which the
pipeline stores in `StageRun.outputs`, folds into the keys of the stages below it, and hands them as their
inputs. These dataclasses are the one definition of those shapes: a body parses its parameters and its
upstream outputs into them, and returns one of the `*Output` classes. Every `*Output` field is JSON-ready;
`to_json()` is what the job reports and `from_json()` refuses, with a StageError naming the field, outputs
that lack one (an older aifab's cached outputs, say), so the cache treats them as a miss.
"""

from dataclasses import asdict, dataclass, fields
from typing import Any, Self

from aifab.errors import AifabError
from aifab.spec import BudgetsSpec, DataSpec, EvaluationSpec, GatesSpec, ModelSpec, TokenizerSpec, TrainingSpec


class StageError(AifabError):
    """A task or an upstream output that does not have the shape its stage needs."""


class _Json:
    """JSON round trip for the output dataclasses below."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload,no-any-return]

    @classmethod
    def from_json(cls, value: object) -> Self:
        if not isinstance(value, dict):
            raise StageError(f"{cls.__name__} must be a JSON object, got {type(value).__name__}")
        missing = [f.name for f in fields(cls) if f.name not in value]  # type: ignore[arg-type]
        if missing:
            raise StageError(f"{cls.__name__} lacks {', '.join(missing)}")
        return cls(**{f.name: value[f.name] for f in fields(cls)})  # type: ignore[arg-type]


# ---- outputs -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataOutput(_Json):
    """A data stage made a dataset version; the train stage reads its id, the rest is for the report."""

    dataset_version_id: int
    dataset: str  # "name:version"
    manifest_digest: str
    tokenizer_digest: str
    files: int
    bytes: int
    documents: int
    skipped_files: int
    tokens: int
    train_tokens: int
    val_tokens: int
    vocab_size: int
    elapsed_s: float


@dataclass(frozen=True)
class TrainOutput(_Json):
    """A train stage finished a run: its checkpoint and what evaluate and register need to go on."""

    run_id: str
    checkpoint_digest: str
    tokenizer_digest: str
    manifest_digest: str
    dataset_version_id: int | None
    model_config: dict[str, Any]  # nn.config.ModelConfig.to_dict(): the JSON the weights file carries too
    params: int
    steps: int
    tokens: int
    elapsed_s: float
    tokens_per_s: float
    val_loss_initial: float
    val_loss_final: float
    stopped_by: str
    mfu: float | None
    lora_digest: str | None
    base_model: str | None  # "name:version" of the model a fine-tune started from: register inherits from it
    resumed_from_step: int  # 0: this attempt started the run


@dataclass(frozen=True)
class EvalOutput(_Json):
    run_id: str
    checkpoint_digest: str
    val_loss: float
    perplexity: float
    val_tokens: int
    samples: list[dict[str, str]]  # {"prompt", "completion"}, seeded so repeatable


@dataclass(frozen=True)
class RegisterOutput(_Json):
    model_version_id: int
    model: str  # "name:version"
    aliases: list[str]


@dataclass(frozen=True)
class GateOutput(_Json):
    """A gate stage promoted the registered model: the stored decision and every gate's verdict. (A refusal is
    a failed stage, GateRefused, so nothing downstream runs on a model that did not pass.)"""

    promotion_id: int | None  # None: the model already held the alias
    model: str  # "name:version", the candidate
    alias: str
    champion: str | None  # "name:version" it was compared with; None: no champion
    moved: bool
    verdicts: list[dict[str, Any]]  # aifab.evaluate.gates.GateVerdict.to_json() each


# ---- parameters (what a stage's key covers) ------------------------------------------------------------------


@dataclass(frozen=True)
class DataParams:
    dataset: str  # the dataset's name
    data: DataSpec
    tokenizer: TokenizerSpec

    @classmethod
    def from_json(cls, p: dict[str, Any]) -> Self:
        return cls(p["dataset"], DataSpec.model_validate(p["data"]), TokenizerSpec.model_validate(p["tokenizer"]))


@dataclass(frozen=True)
class TrainParams:
    model: ModelSpec
    training: TrainingSpec
    budgets: BudgetsSpec

    @classmethod
    def from_json(cls, p: dict[str, Any]) -> Self:
        return cls(
            ModelSpec.model_validate(p["model"]),
            TrainingSpec.model_validate(p["training"]),
            BudgetsSpec.model_validate(p["budgets"]),
        )


@dataclass(frozen=True)
class EvaluateParams:
    evaluation: EvaluationSpec
    batch_size: int  # the training's: the same windows per batch
    seed: int

    @classmethod
    def from_json(cls, p: dict[str, Any]) -> Self:
        return cls(EvaluationSpec.model_validate(p["evaluation"]), int(p["batch_size"]), int(p["seed"]))


@dataclass(frozen=True)
class RegisterParams:
    name: str
    aliases: tuple[str, ...]

    @classmethod
    def from_json(cls, p: dict[str, Any]) -> Self:
        return cls(str(p["name"]), tuple(p["aliases"]))


@dataclass(frozen=True)
class GateParams:
    alias: str  # the alias to promote the upstream register stage's model to
    gates: GatesSpec

    @classmethod
    def from_json(cls, p: dict[str, Any]) -> Self:
        return cls(str(p["alias"]), GatesSpec.model_validate(p["gates"]))


# ---- the task a stage's job runs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StageInput:
    """The outputs of one stage upstream, with the kind of stage that made them."""

    uses: str
    outputs: dict[str, Any]  # JSON: one of the *Output shapes above, or a command stage's own


@dataclass(frozen=True)
class Task:
    """Everything one stage's job runs with; built by the pipeline runner, read by `aifab stage run --task`."""

    pipeline: str
    stage: str
    uses: str
    params: dict[str, Any]  # the stage's resolved parameters: exactly what its key covers
    inputs: dict[str, StageInput]  # every stage upstream of this one, by name
    prices: dict[str, float]  # the ledger's prices (factory.yaml's `meter:`); not part of any key
    base: str  # the factory.yaml's directory: a command stage runs there

    def upstream(self, uses: str) -> dict[str, Any]:
        """The outputs of the one stage of kind `uses` upstream (the pipeline checked there is one)."""
        found = self.upstream_all(uses)
        if len(found) != 1:
            raise StageError(f"stage {self.stage!r} needs one `uses: {uses}` stage upstream, got {len(found)}")
        return found[0]

    def upstream_all(self, uses: str) -> list[dict[str, Any]]:
        return [i.outputs for i in self.inputs.values() if i.uses == uses]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: object) -> "Task":
        try:
            assert isinstance(value, dict)
            inputs = {k: StageInput(str(v["uses"]), dict(v["outputs"])) for k, v in value["inputs"].items()}
            return cls(
                pipeline=str(value["pipeline"]),
                stage=str(value["stage"]),
                uses=str(value["uses"]),
                params=dict(value["params"]),
                inputs=inputs,
                prices=dict(value["prices"]),
                base=str(value["base"]),
            )
        except (AssertionError, KeyError, TypeError, AttributeError) as e:
            raise StageError(f"--task is not a stage task: {type(e).__name__} {e}") from None
