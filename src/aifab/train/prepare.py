"""Everything a training run decides before it starts, as one `TrainSetup`.

`prepare()` reads the store and the device and writes nothing: it chooses how the run starts (fresh, a
fine-tune of a registered model, or a resume of an earlier run), the model config and training window, the
device, and DDP or FSDP2 from a memory floor. Every refusal happens here, before the run's row exists and
before any compute is spent, as one TrainError (NotFound for an unknown run) naming what to change.
"""

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from aifab.errors import ArtifactError, NotFound, TrainError
from aifab.nn.config import PRESETS, LoraConfig, ModelConfig
from aifab.spec import ModelSpec, TrainingSpec
from aifab.store import Store
from aifab.store.schema import DatasetVersion, Run, RunStatus
from aifab.store.shards import TokenShards
from aifab.train.checkpoint import Checkpoint, TrainState, latest_complete
from aifab.train.device import Device, available_bytes, estimate_train_bytes, resolve_device

if TYPE_CHECKING:
    from aifab.train.parallel import Strategy

Start = Literal["fresh", "fine-tune", "resume"]


@dataclass(frozen=True)
class FineTune:
    """Start from a registered model's weights instead of a fresh init: in full, or with LoRA adapters on a
    frozen base when `lora` is set. The dataset must be tokenized with the model's own tokenizer."""

    model: str  # "name:version", for the record and the messages
    weights_digest: str
    tokenizer_digest: str
    lora: LoraConfig | None = None

    def to_params(self) -> dict[str, Any]:
        """The run's `params["init"]`: what the run started from (read back by `lora_from_init`)."""
        lora = None if self.lora is None else {**asdict(self.lora), "targets": list(self.lora.targets)}
        return {"model": self.model, "weights_digest": self.weights_digest, "lora": lora}


def lora_from_init(init: dict[str, Any] | None) -> LoraConfig | None:
    """The LoRA config a run's `params["init"]` names, if any."""
    if not init or not init.get("lora"):
        return None
    return LoraConfig(**{**init["lora"], "targets": tuple(init["lora"]["targets"])})


@dataclass(frozen=True)
class RunParams:
    """A training run's `Run.params`: what it trains on, and how. A resume reads them back."""

    model: ModelConfig
    training: TrainingSpec  # a resume replaces it with its own (its budget may differ)
    dataset_version_id: int
    window: int  # tokens per training sequence (a fine-tune may train on less than the model's context)
    init: dict[str, Any] | None  # FineTune.to_params(), or None for a fresh init

    @property
    def lora(self) -> LoraConfig | None:
        return lora_from_init(self.init)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "training": self.training.model_dump(),
            "dataset_version_id": self.dataset_version_id,
            "window": self.window,
            "init": self.init,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RunParams":
        """Raises KeyError, TypeError or ValueError (pydantic's ValidationError is one) on params that are not
        a training run's. Runs older than the `window` key trained on the whole context."""
        model = ModelConfig.from_dict(d["model"])
        return cls(
            model=model,
            training=TrainingSpec.model_validate(d["training"]),
            dataset_version_id=int(d["dataset_version_id"]),
            window=int(d.get("window") or model.context_len),
            init=d.get("init"),
        )


@dataclass(frozen=True)
class TrainSetup:
    """A run decided and checked: how it starts, what it trains, where, and how it is split over processes."""

    start: Start
    dataset_version_id: int
    dataset: str  # "name:version", for messages
    tokenizer_digest: str
    shards: TokenShards
    training: TrainingSpec
    config: ModelConfig
    window: int  # training sequence length, at most config.context_len
    lora: LoraConfig | None
    base: FineTune | None  # a fine-tune's base model
    base_weights: bytes | None  # its weights, read once here (the config came from them)
    run_id: str | None  # the run a resume continues; a fresh run gets its id when its row is created
    resume_from: Checkpoint | None  # a resume's newest complete checkpoint
    resume_state: TrainState | None  # and its state.json
    device: Device
    n_params: int
    trainable_params: int  # all of them, or a LoRA run's adapters
    need_bytes: int  # the memory floor of one process under `strategy`
    have_bytes: int  # what the device has
    strategy: "Strategy"

    @property
    def params(self) -> RunParams:
        """The run's params as a fresh run records them."""
        init = self.base.to_params() if self.base is not None else None
        return RunParams(self.config, self.training, self.dataset_version_id, self.window, init)


def model_config_for(spec: ModelSpec, vocab_size: int) -> ModelConfig:
    """The preset for this vocabulary with the spec's overrides applied; raises TrainError on a bad shape."""
    preset = PRESETS[spec.preset](vocab_size).to_dict()
    overrides = {k: v for k, v in spec.model_dump(exclude={"preset"}).items() if v is not None}
    try:
        return ModelConfig.from_dict({**preset, **overrides})
    except ValueError as e:
        raise TrainError(str(e)) from None


def prepare(
    store: Store,
    dataset_version_id: int,
    model_spec: ModelSpec,
    cfg: TrainingSpec,
    world: int = 1,
    resume_run_id: str | None = None,
    base: FineTune | None = None,
) -> TrainSetup:
    """Decide and check a run of `world` processes. With `resume_run_id`: that run's own model, window and
    LoRA from its newest complete checkpoint (`model_spec` is ignored). With `base`: the base's weights and
    config, `model_spec.context_len` (if set) as the window. Otherwise `model_spec` over the dataset's
    vocabulary. Raises TrainError (NotFound for an unknown run) for anything that cannot run."""
    if cfg.steps is None and cfg.seconds is None:
        raise TrainError("training needs a budget: set training.steps or training.seconds")
    if cfg.batch_size % world:
        raise TrainError(f"training.batch_size {cfg.batch_size} does not split over {world} processes")
    with store.db.session() as s:
        ds = s.get(DatasetVersion, dataset_version_id)
        if ds is None:
            raise TrainError(f"dataset version id {dataset_version_id} does not exist")
        manifest_digest, tokenizer_digest = ds.manifest_digest, ds.tokenizer_digest
        dataset = f"{ds.name}:{ds.version}"
    shards = TokenShards(store.artifacts, manifest_digest)
    start: Start = "fresh"
    ckpt: Checkpoint | None = None
    state: TrainState | None = None
    base_weights: bytes | None = None
    lora: LoraConfig | None = None
    if resume_run_id is not None:
        start = "resume"
        config, window, lora, ckpt, state = _reopen(store, resume_run_id, dataset_version_id)
    elif base is not None:
        start = "fine-tune"
        base_weights = store.artifacts.get_bytes(base.weights_digest)
        config = _base_config(base, base_weights, tokenizer_digest, dataset)
        window, lora = model_spec.context_len or config.context_len, base.lora
    else:
        config = model_config_for(model_spec, shards.manifest.vocab_size)
        window = config.context_len
    if window > config.context_len:
        raise TrainError(f"training window {window} is longer than the model's context of {config.context_len}")
    if shards.manifest.vocab_size > config.vocab_size:
        raise TrainError(
            f"dataset {dataset} has a vocabulary of {shards.manifest.vocab_size:,} tokens but the model "
            f"has {config.vocab_size:,}: its ids would not fit the embedding"
        )
    device = resolve_device(cfg)
    try:
        shards.check_fits(window)
    except ArtifactError as e:
        raise TrainError(
            f"dataset too small for this model: {e}; add data, raise data.val_fraction or lower model.context_len"
        ) from None
    n_params, trainable = _count_params(config, lora)
    per_rank = cfg.batch_size // world

    def need_bytes(shards: int) -> int:
        return estimate_train_bytes(config, n_params, trainable, per_rank, window, device.dtype, shards)

    have = available_bytes(device)
    strategy = choose_strategy(cfg, world, fits_one_device=need_bytes(1) <= have)
    need = need_bytes(world if strategy == "fsdp" else 1)
    if need > have:
        raise TrainError(
            f"this run cannot fit in memory: {n_params:,} parameters at batch {cfg.batch_size} x {window} tokens "
            f"need at least {need / 1e9:.1f} GB (weights, gradients, AdamW state, activations), and the "
            f"{device.type} has {have / 1e9:.1f} GB; lower training.batch_size, the context or the model size"
        )
    return TrainSetup(
        start=start,
        dataset_version_id=dataset_version_id,
        dataset=dataset,
        tokenizer_digest=tokenizer_digest,
        shards=shards,
        training=cfg,
        config=config,
        window=window,
        lora=lora,
        base=base if start == "fine-tune" else None,
        base_weights=base_weights,
        run_id=resume_run_id,
        resume_from=ckpt,
        resume_state=state,
        device=device,
        n_params=n_params,
        trainable_params=trainable,
        need_bytes=need,
        have_bytes=have,
        strategy=strategy,
    )


def choose_strategy(cfg: TrainingSpec, world: int, fits_one_device: bool) -> "Strategy":
    """One process: single. Several: what `training.parallel` asks for; `auto` is DDP when a whole replica
    fits one device, else FSDP2."""
    if world == 1:
        return "single"
    wanted = cfg.parallel if cfg.parallel != "auto" else ("ddp" if fits_one_device else "fsdp")
    return "ddp" if wanted == "ddp" else "fsdp"


def _count_params(config: ModelConfig, lora: LoraConfig | None) -> tuple[int, int]:
    """(all parameters, trainable ones) of the model, from shapes alone."""
    import torch

    from aifab.nn.lora import apply_lora, count_trainable
    from aifab.nn.transformer import Transformer, num_params

    with torch.device("meta"):  # shapes only: nothing is allocated
        probe = Transformer(config)
        n_params = num_params(probe)
        return n_params, count_trainable(apply_lora(probe, lora)) if lora else n_params


def _base_config(base: FineTune, weights: bytes, tokenizer_digest: str, dataset: str) -> ModelConfig:
    """The base model's config from its weights file; refuses a dataset tokenized with another tokenizer."""
    from aifab.nn.weights import config_from_bytes

    if tokenizer_digest != base.tokenizer_digest:
        raise TrainError(
            f"dataset {dataset} was not tokenized with the tokenizer of {base.model}, so its token ids mean "
            f"nothing to that model; ingest it with `aifab ingest ... --tokenizer-from {base.model}`"
        )
    try:
        return config_from_bytes(weights)
    except ValueError as e:
        raise TrainError(f"the weights of {base.model} cannot be used: {e}") from None


def resumable_params(store: Store, run_id: str) -> RunParams:
    """The params of training run `run_id` if it can be resumed: NotFound for no such run, TrainError for a
    completed one or unusable params."""
    with store.db.session() as s:
        run = s.get(Run, run_id)
        if run is None or run.kind != "train":
            raise NotFound(f"unknown training run {run_id!r} (see `aifab runs`)")
        status, raw = run.status, dict(run.params)
    if status == RunStatus.COMPLETED:
        raise TrainError(f"run {run_id} already completed; nothing to resume")
    try:
        params = RunParams.from_json(raw)
        lora_from_init(params.init)  # parsed now too, so that a bad LoRA config is refused with the rest
    except (KeyError, TypeError, ValueError) as e:
        raise TrainError(f"run {run_id} has no usable params: {e}") from None
    return params


def _reopen(
    store: Store, run_id: str, dataset_version_id: int
) -> tuple[ModelConfig, int, LoraConfig | None, Checkpoint, TrainState]:
    """Check run `run_id` can resume on this dataset and load its newest complete checkpoint. Returns the run's
    model config, training window, LoRA config, the checkpoint and its training state."""
    params = resumable_params(store, run_id)
    if params.dataset_version_id != dataset_version_id:
        raise TrainError(
            f"run {run_id} trained on dataset version id {params.dataset_version_id}, not {dataset_version_id}"
        )
    ckpt_dir = store.work_dir("runs", run_id, "checkpoints")
    ckpt = latest_complete(ckpt_dir)
    if ckpt is None:
        raise TrainError(f"run {run_id} has no complete checkpoint to resume from (in {ckpt_dir})")
    try:
        state = TrainState.from_json(ckpt.state)
    except (KeyError, TypeError, ValueError) as e:
        raise TrainError(f"checkpoint {ckpt.path} has no usable training state: {e!r}") from None
    return params.model, params.window, params.lora, ckpt, state
