"""The training loop: one run over one dataset version, ending in a safetensors checkpoint in the store.

Contract of `train()`: it creates a `runs` row (status running), logs the per-step metrics history
(train_loss, lr, and val_loss every `eval_every` steps), saves checkpoints every `checkpoint_every` steps
and at the end, and marks the run completed; on any error the run is marked failed with the message and
the error propagates. The budget ends the run: `steps`, `seconds`, or `stop_check()` returning a reason
(the caller's energy or cost budget), whichever comes first.
"""

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from aifab.console import progress
from aifab.errors import ArtifactError, TrainError
from aifab.nn.config import PRESETS, ModelConfig
from aifab.spec import ModelSpec, TrainingSpec
from aifab.store import Store
from aifab.store.lineage import link
from aifab.store.schema import DatasetVersion, Run, RunMetric, utcnow
from aifab.store.shards import TokenShards
from aifab.train.schedule import lr_at

METRIC_FLUSH_STEPS = 10  # rows are batched so the DB sees one commit per 10 steps, not one per step


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
) -> TrainResult:
    import torch

    from aifab.nn.transformer import Transformer, num_params
    from aifab.nn.weights import to_bytes

    if cfg.steps is None and cfg.seconds is None:
        raise TrainError("training needs a budget: set training.steps or training.seconds")
    with store.db.session() as s:
        ds = s.get(DatasetVersion, dataset_version_id)
        if ds is None:
            raise TrainError(f"dataset version id {dataset_version_id} does not exist")
        manifest_digest, tokenizer_digest = ds.manifest_digest, ds.tokenizer_digest
    shards = TokenShards(store.artifacts, manifest_digest)
    config = model_config_for(model_spec, shards.manifest.vocab_size)
    try:
        shards.check_fits(config.context_len)
    except ArtifactError as e:
        raise TrainError(
            f"dataset too small for this model: {e}; add data, raise data.val_fraction or lower model.context_len"
        ) from None

    run_id = uuid.uuid4().hex[:12]
    params = {
        "model": config.to_dict(),
        "training": cfg.model_dump(),
        "dataset_version_id": dataset_version_id,
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
    try:
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(os.cpu_count() or 1)
        model = Transformer(config)
        result = _loop(store, run_id, model, shards, cfg, stop_check, to_bytes)
    except BaseException as e:
        with store.db.session() as s:
            run = s.get(Run, run_id)
            assert run is not None
            run.status, run.ended_at = "failed", utcnow()
            run.error = f"{type(e).__name__}: {e}"[:2000]
        raise
    summary, digest, elapsed_s = result
    with store.db.session() as s:
        run = s.get(Run, run_id)
        assert run is not None
        run.status, run.ended_at, run.elapsed_s = "completed", utcnow(), elapsed_s
        run.checkpoint_digest, run.summary = digest, summary
    return TrainResult(
        run_id=run_id,
        checkpoint_digest=digest,
        tokenizer_digest=tokenizer_digest,
        model_config=config.to_dict(),
        params=num_params(model),
        steps=summary["steps"],
        tokens=summary["tokens"],
        elapsed_s=elapsed_s,
        tokens_per_s=summary["tokens_per_s"],
        val_loss_initial=summary["val_loss_initial"],
        val_loss_final=summary["val_loss_final"],
        stopped_by=summary["stopped_by"],
    )


def _loop(
    store: Store,
    run_id: str,
    model: Any,
    shards: TokenShards,
    cfg: TrainingSpec,
    stop_check: Callable[[], str | None],
    to_bytes: Callable[[Any], bytes],
) -> tuple[dict[str, Any], str, float]:
    import torch
    from rich.progress import TextColumn

    T, B = model.config.context_len, cfg.batch_size
    # batch k of the run is a pure function of (seed, k): the data order is reproducible and resumable
    batches = shards.loader("train", B, T, seed=cfg.seed)
    # fixed validation batches, so every evaluation measures the same tokens
    val_loader = shards.loader("val", B, T, seed=cfg.seed + 1)
    val_batches = [val_loader.batch_at(i) for i in range(cfg.eval_batches)]
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        losses = [model(torch.from_numpy(x), torch.from_numpy(y))[1].item() for x, y in val_batches]
        model.train()
        return float(np.mean(losses))

    pending: list[RunMetric] = []
    t0 = time.perf_counter()  # reset below: the budget counts training, not the first evaluation

    def log(step: int, **values: float) -> None:
        elapsed = time.perf_counter() - t0
        pending.extend(
            RunMetric(run_id=run_id, step=step, key=k, value=float(v), elapsed_s=elapsed) for k, v in values.items()
        )

    def flush() -> None:
        if pending:
            with store.db.session() as s:
                s.add_all(pending)
            pending.clear()

    def checkpoint() -> str:
        """Store the weights and point the run at them, so a failed run still names its last checkpoint."""
        digest = store.artifacts.put_bytes(to_bytes(model))
        with store.db.session() as s:
            run = s.get(Run, run_id)
            assert run is not None
            run.checkpoint_digest = digest
        return digest

    val_initial = val_loss()
    last_val = (0, val_initial)
    log(0, val_loss=val_initial)
    t0 = time.perf_counter()
    step, tokens, train_s, loss_value, stopped_by = 0, 0, 0.0, float("nan"), ""
    total = cfg.steps if cfg.seconds is None else 1000
    columns = (
        TextColumn("step {task.fields[step]}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
    )
    with progress(*columns, counts=False) as bar:
        task = bar.add_task("train", total=total, step=0, loss=float("nan"), tps=0.0)
        while True:
            elapsed = time.perf_counter() - t0
            frac = max(step / cfg.steps if cfg.steps else 0.0, elapsed / cfg.seconds if cfg.seconds else 0.0)
            if cfg.steps is not None and step >= cfg.steps:
                stopped_by = "steps"
            elif cfg.seconds is not None and elapsed >= cfg.seconds:
                stopped_by = "seconds"
            else:
                stopped_by = stop_check() or ""
            if stopped_by and step > 0:  # every run takes at least one step, so it has a checkpoint
                break
            lr = lr_at(step, frac, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ts = time.perf_counter()
            x, y = batches.batch_at(step)
            _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            loss_value = loss.item()  # a device sync point on GPU; once per step is fine
            train_s += time.perf_counter() - ts
            step += 1
            tokens += B * T
            log(step, train_loss=loss_value, lr=lr)
            if step % cfg.eval_every == 0:
                last_val = (step, val_loss())
                log(step, val_loss=last_val[1])
            if step % cfg.checkpoint_every == 0:
                checkpoint()
            if step % METRIC_FLUSH_STEPS == 0:
                flush()
            done = step if cfg.seconds is None else 1000 * frac
            bar.update(task, completed=done, step=step, loss=loss_value, tps=tokens / train_s)
        bar.update(task, completed=total)
    if last_val[0] == step:
        val_final = last_val[1]
    else:
        val_final = val_loss()
        log(step, val_loss=val_final)
    flush()
    digest = checkpoint()
    elapsed_s = time.perf_counter() - t0
    summary = {
        "steps": step,
        "tokens": tokens,
        "train_loss_final": loss_value,
        "val_loss_initial": val_initial,
        "val_loss_final": val_final,
        "tokens_per_s": tokens / train_s,
        "train_s": train_s,
        "stopped_by": stopped_by,
    }
    return summary, digest, elapsed_s


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (embeddings, linear weights) but not norm gains."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
