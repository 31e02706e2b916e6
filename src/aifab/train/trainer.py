"""The training loop: one run over one dataset version, ending in a safetensors checkpoint in the store.

Contract of `train()`: it creates a `runs` row (status running), logs the per-step metrics history
(train_loss, lr, and val_loss every `eval_every` steps), saves checkpoints every `checkpoint_every` steps
and at the end (resumable ones under the run's work dir, see checkpoint.py, plus the weights in the
artifact store), and marks the run completed; on any error the run is marked failed with the message and
the error propagates. The budget ends the run: `steps`, `seconds`, or `stop_check()` returning a reason
(the caller's energy or cost budget), whichever comes first. A run stopped for the reason `PREEMPTED` (the
control plane wants its devices back) is marked `preempted` instead: checkpointed, and resumable later.
"""

import json
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import delete

from aifab.console import progress
from aifab.errors import ArtifactError, NotFound, TrainError
from aifab.nn.config import PRESETS, LoraConfig, ModelConfig
from aifab.spec import ModelSpec, TrainingSpec
from aifab.store import Store
from aifab.store.lineage import link
from aifab.store.schema import DatasetVersion, Run, RunMetric, utcnow
from aifab.store.shards import TokenShards
from aifab.train.checkpoint import KEEP_LAST, Checkpoint, latest_complete, rng_state, set_rng_state
from aifab.train.checkpoint import save as save_checkpoint
from aifab.train.device import Device, available_bytes, estimate_train_bytes, flops_per_token, resolve_device
from aifab.train.schedule import lr_at

if TYPE_CHECKING:
    from aifab.train.parallel import Group, Strategy

METRIC_FLUSH_STEPS = 10  # rows are batched so the DB sees one commit per 10 steps, not one per step
PREEMPTED = "preempted"  # the stop_check reason, and the status, of a run stopped to give its devices back


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    checkpoint_digest: str
    tokenizer_digest: str
    model_config: dict[str, Any]
    params: int
    steps: int
    tokens: int
    elapsed_s: float
    tokens_per_s: float
    val_loss_initial: float
    val_loss_final: float
    stopped_by: str
    mfu: float | None = None  # model FLOPs utilisation over the training time; None for an uncatalogued GPU
    lora_digest: str | None = None  # a LoRA run's adapters alone (safetensors); its checkpoint holds merged weights


@dataclass(frozen=True)
class FineTune:
    """Start from a registered model's weights instead of a fresh init: in full, or with LoRA adapters on a
    frozen base when `lora` is set. The dataset must be tokenized with the model's own tokenizer."""

    model: str  # "name:version", for the record and the messages
    weights_digest: str
    tokenizer_digest: str
    lora: LoraConfig | None = None

    def to_params(self) -> dict[str, Any]:
        lora = None if self.lora is None else {**asdict(self.lora), "targets": list(self.lora.targets)}
        return {"model": self.model, "weights_digest": self.weights_digest, "lora": lora}


def model_config_for(spec: ModelSpec, vocab_size: int) -> ModelConfig:
    """The preset for this vocabulary with the spec's overrides applied; raises TrainError on a bad shape."""
    preset = PRESETS[spec.preset](vocab_size).to_dict()
    overrides = {k: v for k, v in spec.model_dump(exclude={"preset"}).items() if v is not None}
    try:
        return ModelConfig.from_dict({**preset, **overrides})
    except ValueError as e:
        raise TrainError(str(e)) from None


def train(
    store: Store,
    dataset_version_id: int,
    model_spec: ModelSpec,
    cfg: TrainingSpec,
    stop_check: Callable[[], str | None] = lambda: None,
    resume_run_id: str | None = None,
    keep_last: int = KEEP_LAST,
    base: FineTune | None = None,
    on_run: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a new run, or with `resume_run_id` continue that run from its newest complete checkpoint.
    `on_run(run_id)` is called once the run's row exists, before the first step (a job remembers its run so
    that a later attempt can resume it).

    From scratch, the model is `model_spec` over the dataset's vocabulary. With `base`, it is that registered
    model's weights (LoRA adapters on top when `base.lora` is set) and `model_spec.context_len`, if set, is the
    training window (at most the model's context). A LoRA run registers merged weights and keeps the adapters.

    A resumed run keeps its id, goes back to status running, restores the model, optimizer, RNG states, loader
    position and budget accounting, drops any metrics logged after the checkpoint, and continues; the run's
    own model config is used (`model_spec` is ignored) and `dataset_version_id` must be the run's. Resuming a
    completed or unknown run, or one with no complete checkpoint, raises before any compute is spent.
    """
    import torch

    from aifab.nn.lora import apply_lora, count_trainable
    from aifab.nn.transformer import Transformer, num_params
    from aifab.nn.weights import from_bytes
    from aifab.train import parallel

    if cfg.steps is None and cfg.seconds is None:
        raise TrainError("training needs a budget: set training.steps or training.seconds")
    group = parallel.init(use_cuda=cfg.device != "cpu" and torch.cuda.is_available())
    if cfg.batch_size % group.world:
        raise TrainError(f"training.batch_size {cfg.batch_size} does not split over {group.world} processes")
    with store.db.session() as s:
        ds = s.get(DatasetVersion, dataset_version_id)
        if ds is None:
            raise TrainError(f"dataset version id {dataset_version_id} does not exist")
        manifest_digest, tokenizer_digest = ds.manifest_digest, ds.tokenizer_digest
        dataset_label = f"{ds.name}:{ds.version}"
    shards = TokenShards(store.artifacts, manifest_digest)
    resumed: Checkpoint | None = None
    init: dict[str, Any] | None = None
    base_weights: bytes | None = None  # a fine-tune's starting weights, read once: config first, tensors later
    if resume_run_id is not None:
        run_id = resume_run_id
        config, resumed, window, init = _reopen(store, run_id, dataset_version_id, cfg, mutate=group.main)
    elif base is not None:
        base_weights = store.artifacts.get_bytes(base.weights_digest)
        config = _base_config(base, base_weights, tokenizer_digest, dataset_label)
        window = model_spec.context_len or config.context_len
        init = base.to_params()
    else:
        config = model_config_for(model_spec, shards.manifest.vocab_size)
        window = config.context_len
    lora = LoraConfig(**{**init["lora"], "targets": tuple(init["lora"]["targets"])}) if init and init["lora"] else None
    if window > config.context_len:
        raise TrainError(f"training window {window} is longer than the model's context of {config.context_len}")
    if shards.manifest.vocab_size > config.vocab_size:
        raise TrainError(
            f"dataset {dataset_label} has a vocabulary of {shards.manifest.vocab_size:,} tokens but the model "
            f"has {config.vocab_size:,}: its ids would not fit the embedding"
        )
    device = resolve_device(cfg)  # a bad device fails here, before the run row exists
    try:
        shards.check_fits(window)
    except ArtifactError as e:
        raise TrainError(
            f"dataset too small for this model: {e}; add data, raise data.val_fraction or lower model.context_len"
        ) from None
    with torch.device("meta"):  # shapes only: parameter counts without allocating
        probe = Transformer(config)
        n_params = num_params(probe)
        trainable = count_trainable(apply_lora(probe, lora)) if lora else n_params
    per_rank = cfg.batch_size // group.world

    def need_bytes(shards: int) -> int:
        return estimate_train_bytes(config, n_params, trainable, per_rank, window, device.dtype, shards)

    have = available_bytes(device)
    strategy: parallel.Strategy = "single"
    if group.world > 1:
        auto = "ddp" if need_bytes(1) <= have else "fsdp"
        strategy = "ddp" if (auto if cfg.parallel == "auto" else cfg.parallel) == "ddp" else "fsdp"
    need = need_bytes(group.world if strategy == "fsdp" else 1)
    if need > have:
        raise TrainError(
            f"this run cannot fit in memory: {n_params:,} parameters at batch {cfg.batch_size} x {window} tokens "
            f"need at least {need / 1e9:.1f} GB (weights, gradients, AdamW state, activations), and the "
            f"{device.type} has {have / 1e9:.1f} GB; lower training.batch_size, the context or the model size"
        )

    if resumed is None and group.main:
        run_id = uuid.uuid4().hex[:12]
        params = {
            "model": config.to_dict(),
            "training": cfg.model_dump(),
            "dataset_version_id": dataset_version_id,
            "window": window,
            "init": init,
        }
        with store.db.session() as s:
            s.add(
                Run(
                    id=run_id,
                    kind="train",
                    status="running",
                    params=params,
                    summary={},
                    dataset_version_id=dataset_version_id,
                    started_at=utcnow(),
                )
            )
            s.flush()
            link(s, ("dataset", dataset_version_id), ("run", run_id), "input")
    run_id = parallel.from_main(group, run_id if group.main or resumed is not None else None)
    if on_run is not None and group.main:
        on_run(run_id)
    try:
        torch.manual_seed(cfg.seed)
        # the processes on one node share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // group.local_world))
        # a resumed run loads its checkpoint over the fresh init
        model = from_bytes(base_weights, config) if base_weights is not None else Transformer(config)
        if lora is not None:
            apply_lora(model, lora)
        ckpt_dir = store.work_dir("runs", run_id, "checkpoints")
        result = _loop(
            store,
            run_id,
            model,
            shards,
            cfg,
            stop_check,
            ckpt_dir,
            keep_last,
            resumed,
            device,
            window,
            n_params,
            group,
            strategy,
        )
    except BaseException as e:
        if not group.main:
            raise
        with store.db.session() as s:
            run = s.get(Run, run_id)
            assert run is not None
            run.status, run.ended_at = "failed", utcnow()
            run.error = f"{type(e).__name__}: {e}"[:2000]
        raise
    summary, digest, elapsed_s = parallel.from_main(group, result)  # the other ranks return rank 0's result
    if group.main:
        with store.db.session() as s:
            run = s.get(Run, run_id)
            assert run is not None
            run.status = PREEMPTED if summary["stopped_by"] == PREEMPTED else "completed"
            run.ended_at, run.elapsed_s = utcnow(), elapsed_s
            run.checkpoint_digest, run.summary = digest, summary
    parallel.barrier(group)
    return TrainResult(
        run_id=run_id,
        checkpoint_digest=digest,
        tokenizer_digest=tokenizer_digest,
        model_config=config.to_dict(),
        params=n_params,
        steps=summary["steps"],
        tokens=summary["tokens"],
        elapsed_s=elapsed_s,
        tokens_per_s=summary["tokens_per_s"],
        val_loss_initial=summary["val_loss_initial"],
        val_loss_final=summary["val_loss_final"],
        stopped_by=summary["stopped_by"],
        mfu=summary["mfu"],
        lora_digest=summary["lora_digest"],
    )


def _base_config(base: FineTune, weights: bytes, tokenizer_digest: str, dataset_label: str) -> ModelConfig:
    """The base model's config from its weights file; refuses a dataset tokenized with another tokenizer."""
    from aifab.nn.weights import config_from_bytes

    if tokenizer_digest != base.tokenizer_digest:
        raise TrainError(
            f"dataset {dataset_label} was not tokenized with the tokenizer of {base.model}, so its token ids mean "
            f"nothing to that model; ingest it with `aifab ingest ... --tokenizer-from {base.model}`"
        )
    try:
        return config_from_bytes(weights)
    except ValueError as e:
        raise TrainError(f"the weights of {base.model} cannot be used: {e}") from None


def resume(
    store: Store,
    run_id: str,
    stop_check: Callable[[], str | None] = lambda: None,
    *,
    steps: int | None = None,
    seconds: float | None = None,
    keep_last: int = KEEP_LAST,
    on_run: Callable[[str], None] | None = None,
) -> TrainResult:
    """Continue run `run_id` with its own dataset, model and training spec; `steps`/`seconds` replace its
    budget (the lr schedule follows the new budget, so only an unchanged budget resumes bit-exactly)."""
    with store.db.session() as s:
        run = s.get(Run, run_id)
        if run is None or run.kind != "train":
            raise NotFound(f"unknown training run {run_id!r} (see `aifab runs`)")
        params = dict(run.params)
    cfg = TrainingSpec.model_validate(params["training"])
    if steps is not None or seconds is not None:
        cfg = cfg.model_copy(update={"steps": steps, "seconds": seconds})
    return train(
        store, int(params["dataset_version_id"]), ModelSpec(), cfg, stop_check, run_id, keep_last, on_run=on_run
    )


def _reopen(
    store: Store, run_id: str, dataset_version_id: int, cfg: TrainingSpec, mutate: bool = True
) -> tuple[ModelConfig, Checkpoint, int, dict[str, Any] | None]:
    """Check run `run_id` can resume, load its newest complete checkpoint, drop the metrics logged after it,
    and mark it running again. Returns the run's model config, the checkpoint, training window and init."""
    with store.db.session() as s:
        run = s.get(Run, run_id)
        if run is None or run.kind != "train":
            raise NotFound(f"unknown training run {run_id!r} (see `aifab runs`)")
        if run.status == "completed":
            raise TrainError(f"run {run_id} already completed; nothing to resume")
        if run.dataset_version_id != dataset_version_id:
            raise TrainError(
                f"run {run_id} trained on dataset version id {run.dataset_version_id}, not {dataset_version_id}"
            )
        try:
            config = ModelConfig.from_dict(run.params["model"])
            window = int(run.params.get("window") or config.context_len)
            init = run.params.get("init")
        except (KeyError, TypeError, ValueError) as e:
            raise TrainError(f"run {run_id} has no usable model config: {e}") from None
    ckpt_dir = store.work_dir("runs", run_id, "checkpoints")
    ckpt = latest_complete(ckpt_dir)
    if ckpt is None:
        raise TrainError(f"run {run_id} has no complete checkpoint to resume from (in {ckpt_dir})")
    if not mutate:  # a rank other than 0 of a parallel run: rank 0 updates the run
        return config, ckpt, window, init
    with store.db.session() as s:
        s.execute(delete(RunMetric).where(RunMetric.run_id == run_id, RunMetric.step > ckpt.step))
        run = s.get(Run, run_id)
        assert run is not None
        run.status, run.error, run.ended_at = "running", None, None
        run.params = {**run.params, "training": cfg.model_dump()}
    return config, ckpt, window, init


def _loop(
    store: Store,
    run_id: str,
    model: Any,
    shards: TokenShards,
    cfg: TrainingSpec,
    stop_check: Callable[[], str | None],
    ckpt_dir: Path,
    keep_last: int,
    resumed: Checkpoint | None,
    device: Device,
    window: int,
    n_params: int,
    group: "Group",
    strategy: "Strategy",
) -> tuple[dict[str, Any], str, float]:
    import contextlib

    import torch
    from rich.progress import TextColumn
    from safetensors.torch import save as st_save

    from aifab.nn.lora import LoraLinear, lora_state_dict, merged_state_dict
    from aifab.nn.weights import CONFIG_KEY, state_for_save
    from aifab.train import parallel

    T, B, accum = window, cfg.batch_size, cfg.grad_accum_steps
    mine = parallel.rows(group, B)  # this process's rows of every batch
    lora = any(isinstance(m, LoraLinear) for m in model.modules())
    dev = torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else torch.device("cpu")
    model.to(dev)
    wrapped = parallel.wrap(model, strategy, dev)
    # the compiled module shares the parameters; `model` (uncompiled) keeps its state_dict keys for checkpoints
    fwd = torch.compile(wrapped) if device.compile else wrapped
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if device.dtype == "bf16"
        else contextlib.nullcontext
    )
    flops_token = flops_per_token(n_params, model.config.n_layer, model.config.d_model, T)
    peak = device.peak_flops * group.world if device.peak_flops else None  # tokens/s are the whole group's

    def mfu_of(tokens_per_s: float) -> float | None:
        return flops_token * tokens_per_s / peak if peak else None

    def to_dev(a: np.ndarray) -> Any:
        t = torch.from_numpy(a)
        return t if device.type == "cpu" else t.pin_memory().to(dev, non_blocking=True)

    # batch k of the run is a pure function of (seed, k): the data order is reproducible and resumable
    batches = shards.loader("train", B, T, seed=cfg.seed)
    # fixed validation batches, so every evaluation measures the same tokens
    val_loader = shards.loader("val", B, T, seed=cfg.seed + 1)
    val_batches = [val_loader.batch_at(i) for i in range(cfg.eval_batches)]
    # the fused CUDA kernel updates every parameter in a few launches; on CPU the plain (for-each) one
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), **fused)

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        losses = []
        for x, y in val_batches:
            with autocast():
                loss = fwd(to_dev(x[mine]), to_dev(y[mine]))[1]
            losses.append(parallel.mean(group, loss).item())
        model.train()
        return float(np.mean(losses))

    pending: list[RunMetric] = []
    t0 = time.perf_counter()  # reset below: the budget counts training, not the first evaluation

    def log(step: int, **values: float) -> None:
        if not group.main:
            return
        elapsed = time.perf_counter() - t0
        pending.extend(
            RunMetric(run_id=run_id, step=step, key=k, value=float(v), elapsed_s=elapsed) for k, v in values.items()
        )

    def flush() -> None:
        if pending and group.main:
            with store.db.session() as s:
                s.add_all(pending)
            pending.clear()

    def checkpoint() -> str:
        """Write a resumable checkpoint, store the weights and point the run at them, so a failed run still
        names its last checkpoint. Metrics are flushed first: the history never lags its checkpoint.
        Under FSDP every rank takes part in gathering the full state; rank 0 writes it."""
        flush()
        full = parallel.model_state(model, strategy)
        optimizer_sd = parallel.optimizer_state(model, optimizer, strategy)
        if not group.main:
            return ""
        weights = state_for_save(model, full)  # with LoRA: the frozen base and the adapters, under their own names
        meta = {CONFIG_KEY: json.dumps(model.config.to_dict())}  # the same bytes as nn.weights.to_bytes
        plain = state_for_save(model, merged_state_dict(model, full)) if lora else weights
        digest = store.artifacts.put_bytes(st_save(plain, metadata=meta))
        state = {
            "run_id": run_id,
            "tokens": tokens,
            "train_s": train_s,
            "elapsed_s": time.perf_counter() - t0,
            "train_loss": loss_value,
            "val_loss_initial": val_initial,
            "last_val": list(last_val),
            "schedule": {
                "peak_lr": cfg.lr,
                "warmup_steps": cfg.warmup_steps,
                "min_lr_ratio": cfg.min_lr_ratio,
                "steps": cfg.steps,
                "seconds": cfg.seconds,
            },
            "loader": {"split": "train", "seed": cfg.seed, "order": batches.order, "position": step * accum},
            "rng": rng_state(),
            "training": cfg.model_dump(),
            "model_config": model.config.to_dict(),
            "weights_digest": digest,
        }
        save_checkpoint(ckpt_dir, step, weights, optimizer_sd, state, model_metadata=meta, keep_last=keep_last)
        with store.db.session() as s:
            run = s.get(Run, run_id)
            assert run is not None
            run.checkpoint_digest = digest
        return digest

    step, tokens, train_s, loss_value, stopped_by = 0, 0, 0.0, float("nan"), ""
    last_ckpt = resumed.step if resumed is not None else 0
    if resumed is None:
        val_initial = val_loss()
        last_val = (0, val_initial)
        log(0, val_loss=val_initial)
        t0 = time.perf_counter()
    else:
        st = resumed.state
        missing, unexpected = parallel.load(model, optimizer, resumed.model, resumed.optimizer, strategy)
        if unexpected or [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]:
            raise TrainError(f"checkpoint {resumed.path} does not match the model: missing {missing[:3]}")
        set_rng_state(st["rng"])
        step, tokens, train_s, loss_value = resumed.step, int(st["tokens"]), float(st["train_s"]), st["train_loss"]
        val_initial = float(st["val_loss_initial"])
        last_val = (int(st["last_val"][0]), float(st["last_val"][1]))
        t0 = time.perf_counter() - float(st["elapsed_s"])  # the time budget counts the earlier sessions too
    total = cfg.steps if cfg.seconds is None else 1000
    columns = (
        TextColumn("step {task.fields[step]}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TextColumn("mfu {task.fields[mfu]:.1%}"),
    )
    with progress(*columns, counts=False, disable=not group.main) as bar:
        task = bar.add_task("train", total=total, step=step, loss=float("nan"), tps=0.0, mfu=0.0)
        while True:
            elapsed = time.perf_counter() - t0
            frac = max(step / cfg.steps if cfg.steps else 0.0, elapsed / cfg.seconds if cfg.seconds else 0.0)
            if cfg.steps is not None and step >= cfg.steps:
                stopped_by = "steps"
            elif cfg.seconds is not None and elapsed >= cfg.seconds:
                stopped_by = "seconds"
            else:
                stopped_by = stop_check() or ""
            stopped_by = parallel.from_main(group, stopped_by)  # clocks differ: rank 0 decides for all
            if stopped_by and step > 0:  # every run takes at least one step, so it has a checkpoint
                break
            lr = lr_at(step, frac, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
            for pg in optimizer.param_groups:
                pg["lr"] = lr
            ts = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_sum = None
            for micro in range(accum):
                # micro-batch `micro` of step `step` is loader batch step*accum+micro: with accum=1, batch `step`
                x, y = batches.batch_at(step * accum + micro)
                # DDP averages gradients across ranks on the last micro-batch only
                last = strategy != "ddp" or micro == accum - 1
                sync = contextlib.nullcontext() if last else wrapped.no_sync()  # type: ignore[operator]
                with sync:
                    with autocast():
                        _, loss = fwd(to_dev(x[mine]), to_dev(y[mine]))
                    # gradients add up over micro-batches; 1/accum makes them the mean over the step's tokens
                    (loss / accum if accum > 1 else loss).backward()
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            assert loss_sum is not None
            loss_value = (
                parallel.mean(group, loss_sum).item() / accum
            )  # a device sync point on GPU; once per step is fine
            if not math.isfinite(loss_value):
                kept = f"step {last_ckpt}" if last_ckpt else "none yet"
                raise TrainError(
                    f"the training loss became {loss_value} at step {step + 1}; the run stops here and its last "
                    f"good checkpoint ({kept}) is kept. Lower training.lr, set training.grad_clip, or check the data"
                )
            step_s = time.perf_counter() - ts
            train_s += step_s
            step += 1
            tokens += B * T * accum
            step_tps = B * T * accum / max(step_s, 1e-9)  # this step's own rate: the history shows stalls
            log(step, train_loss=loss_value, lr=lr, tokens_per_s=step_tps, **_some(mfu=mfu_of(step_tps)))
            if step % cfg.eval_every == 0:
                last_val = (step, val_loss())
                log(step, val_loss=last_val[1])
            if step % cfg.checkpoint_every == 0:
                checkpoint()
                last_ckpt = step
            if step % METRIC_FLUSH_STEPS == 0:
                flush()
            done = step if cfg.seconds is None else 1000 * frac
            tps = tokens / max(train_s, 1e-9)
            bar.update(task, completed=done, step=step, loss=loss_value, tps=tps, mfu=mfu_of(tps) or 0.0)
        bar.update(task, completed=total)
    if last_val[0] == step:
        val_final = last_val[1]
    else:
        val_final = val_loss()
        last_val = (step, val_final)
        log(step, val_loss=val_final)
    digest = checkpoint()
    lora_digest = None
    if lora:
        adapted = [m for m in model.modules() if isinstance(m, LoraLinear)]
        meta = {"aifab.lora": json.dumps({"rank": adapted[0].lora_a.shape[0], "scaling": adapted[0].scaling})}
        lora_digest = store.artifacts.put_bytes(st_save(lora_state_dict(model), metadata=meta))
    elapsed_s = time.perf_counter() - t0
    summary = {
        "steps": step,
        "tokens": tokens,
        "train_loss_final": loss_value,
        "val_loss_initial": val_initial,
        "val_loss_final": val_final,
        "tokens_per_s": tokens / max(train_s, 1e-9),
        "train_s": train_s,
        "stopped_by": stopped_by,
        # model FLOPs utilisation: flops_per_token * tokens/s over the device's catalogued dense peak
        "mfu": mfu_of(tokens / max(train_s, 1e-9)),
        "flops_per_token": flops_token,
        "peak_flops": peak,
        "device": device.name,
        "dtype": device.dtype,
        "compiled": device.compile,
        "window": T,
        "lora_digest": lora_digest,
    }
    return summary, digest, elapsed_s


def _some(**values: float | None) -> dict[str, float]:
    """The values that exist (MFU is None for a device without a catalogued peak)."""
    return {k: v for k, v in values.items() if v is not None}


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (embeddings, linear weights) but not norm gains."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
