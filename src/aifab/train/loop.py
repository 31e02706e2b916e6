"""The training loop: optimizer steps until the budget or `stop_check` ends the run, with evaluations,
checkpoints and metrics along the way. Everything it decides was decided by `prepare`; everything it writes
to the run's row goes through `RunRecord`.

`run()` reads top to bottom. What changes from step to step is one `LoopState`, which `checkpoint()` saves
and a resume restores; what stays fixed for the session (model, optimizer, data) is one `Harness`.
"""

import contextlib
import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from rich.progress import TextColumn
from safetensors.torch import save as st_save

from aifab.console import progress
from aifab.errors import TrainError
from aifab.nn.lora import LoraLinear, lora_state_dict, merged_state_dict
from aifab.nn.transformer import Transformer
from aifab.nn.weights import CONFIG_KEY, state_for_save
from aifab.spec import TrainingSpec
from aifab.store.shards import BatchLoader
from aifab.train import parallel
from aifab.train.checkpoint import LoaderPosition, LrScheduleInputs, TrainState, rng_state, set_rng_state
from aifab.train.checkpoint import save as save_checkpoint
from aifab.train.device import Device, flops_per_token
from aifab.train.lr import lr_at
from aifab.train.parallel import Group, Strategy
from aifab.train.prepare import TrainSetup
from aifab.train.record import RunRecord, RunSummary

METRIC_FLUSH_STEPS = 10  # rows are batched so the DB sees one commit per 10 steps, not one per step
PERCENT = 100.0  # the progress bar counts percent of the budget (steps, seconds, or the larger share of both)
Batch = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]


@dataclass
class LoopState:
    """What changes from step to step: what a checkpoint saves and a resume restores."""

    t0: float  # perf_counter() at which the budget clock read 0 (a resumed run's earlier sessions count)
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # tokens trained on, over all ranks
    train_s: float = 0.0  # time inside optimizer steps: evaluation and checkpoints excluded
    loss: float = math.nan  # the last step's training loss
    val_initial: float = math.nan  # validation loss before the first step
    last_val: tuple[int, float] = (0, math.nan)  # (step, validation loss) of the newest evaluation
    last_checkpoint: int = 0  # step of the newest checkpoint (0: none yet)
    stopped_by: str = ""  # why the run stopped; "" while it runs

    def elapsed_s(self) -> float:
        """The budget clock: every session of the run, evaluations and checkpoints included."""
        return time.perf_counter() - self.t0

    def advance(self, loss: float, step_s: float, tokens: int) -> None:
        """Count one optimizer step that took `step_s` seconds over `tokens` tokens and ended at `loss`."""
        self.step += 1
        self.tokens += tokens
        self.train_s += step_s
        self.loss = loss


@dataclass(frozen=True)
class Harness:
    """What the loop computes with, fixed for the session."""

    cfg: TrainingSpec
    model: Transformer  # the plain module: its state_dict keys are the checkpoint's
    wrapped: torch.nn.Module  # `model` under DDP or FSDP2 (or itself): DDP's no_sync lives here
    forward: Callable[..., Any]  # `wrapped`, compiled when the device says so; shares its parameters
    optimizer: torch.optim.Optimizer
    batches: BatchLoader  # batch k is a pure function of (seed, k): the data order is reproducible and resumable
    val_batches: list[Batch]  # fixed, so every evaluation measures the same tokens
    rows: slice  # this rank's rows of every global batch
    dev: torch.device
    device: Device
    group: Group
    strategy: Strategy
    window: int
    lora: bool
    flops_per_token: int
    peak_flops: float | None  # the whole group's: tokens/s are the whole group's too

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.window * self.cfg.grad_accum_steps

    def mfu(self, tokens_per_s: float) -> float | None:
        return self.flops_per_token * tokens_per_s / self.peak_flops if self.peak_flops else None

    def to_dev(self, a: npt.NDArray[np.int64]) -> torch.Tensor:
        t = torch.from_numpy(a)
        return t if self.device.type == "cpu" else t.pin_memory().to(self.dev, non_blocking=True)

    def autocast(self) -> AbstractContextManager[Any]:
        if self.device.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


@dataclass(frozen=True)
class Finished:
    """What a session hands back: rank 0's, on every rank."""

    summary: RunSummary
    checkpoint_digest: str
    elapsed_s: float  # the budget clock at the end


def run(
    setup: TrainSetup,
    model: Transformer,
    group: Group,
    record: RunRecord,
    stop_check: Callable[[], str | None],
    keep_last: int,
) -> Finished:
    """Train `model` (fresh, a fine-tune's base, or to be loaded from `setup.resume_from`) until the budget or
    `stop_check` ends the run, after at least one step. Raises TrainError when the loss stops being finite."""
    cfg, h = setup.training, build(model, setup, group)
    state = resumed_state(h, setup) if setup.resume_from is not None else fresh_state(h, record)
    with progress(*bar_fields(), counts=False, disable=not group.main) as bar:
        task = bar.add_task("train", total=PERCENT, step=state.step, loss=math.nan, tps=0.0, mfu=0.0)
        while True:
            elapsed_s = state.elapsed_s()
            # clocks differ between ranks: rank 0 decides for all
            state.stopped_by = parallel.from_main(group, stop_reason(state.step, elapsed_s, cfg, stop_check))
            if state.stopped_by and state.step > 0:  # every run takes at least one step, so it has a checkpoint
                break
            lr = lr_at(state.step, budget_used(state.step, elapsed_s, cfg), cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
            t_step = time.perf_counter()
            loss = train_step(h, state.step, lr)
            if not math.isfinite(loss):
                raise diverged(loss, state)
            step_s = time.perf_counter() - t_step
            state.advance(loss, step_s, h.tokens_per_step)
            step_tps = h.tokens_per_step / max(step_s, 1e-9)  # this step's own rate: the history shows stalls
            mfu = {} if (m := h.mfu(step_tps)) is None else {"mfu": m}  # no row without a catalogued peak
            record.log(state.step, state.elapsed_s(), train_loss=loss, lr=lr, tokens_per_s=step_tps, **mfu)
            if state.step % cfg.eval_every == 0:
                evaluate(state, h, record)
            if state.step % cfg.checkpoint_every == 0:
                checkpoint(state, h, record, keep_last)
            if state.step % METRIC_FLUSH_STEPS == 0:
                record.flush()
            tps = state.tokens / max(state.train_s, 1e-9)
            used = PERCENT * budget_used(state.step, state.elapsed_s(), cfg)
            bar.update(task, completed=used, step=state.step, loss=loss, tps=tps, mfu=h.mfu(tps) or 0.0)
        bar.update(task, completed=PERCENT)
    if state.last_val[0] != state.step:
        evaluate(state, h, record)
    digest = checkpoint(state, h, record, keep_last)
    lora_digest = save_adapters(h, record) if h.lora else None
    return Finished(summarise(state, h, lora_digest), digest, state.elapsed_s())


def bar_fields() -> tuple[TextColumn, ...]:
    """The progress bar's live fields."""
    return (
        TextColumn("step {task.fields[step]}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TextColumn("mfu {task.fields[mfu]:.1%}"),
    )


def build(model: Transformer, setup: TrainSetup, group: Group) -> Harness:
    """Move `model` to the device, wrap it for the strategy, compile it if asked, and make its optimizer
    and data loaders."""
    cfg, device, window = setup.training, setup.device, setup.window
    dev = torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else torch.device("cpu")
    model.to(dev)
    wrapped = parallel.wrap(model, setup.strategy, dev)
    forward = torch.compile(wrapped) if device.compile else wrapped
    batches = setup.shards.loader("train", cfg.batch_size, window, seed=cfg.seed)
    val_loader = setup.shards.loader("val", cfg.batch_size, window, seed=cfg.seed + 1)
    # the fused CUDA kernel updates every parameter in a few launches; on CPU the plain (for-each) one
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), **fused)
    return Harness(
        cfg=cfg,
        model=model,
        wrapped=wrapped,
        forward=forward,
        optimizer=optimizer,
        batches=batches,
        val_batches=[val_loader.batch_at(i) for i in range(cfg.eval_batches)],
        rows=parallel.rows(group, cfg.batch_size),
        dev=dev,
        device=device,
        group=group,
        strategy=setup.strategy,
        window=window,
        lora=any(isinstance(m, LoraLinear) for m in model.modules()),
        flops_per_token=flops_per_token(setup.n_params, model.config.n_layer, model.config.d_model, window),
        peak_flops=device.peak_flops * group.world if device.peak_flops else None,
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's groups: decay matrices (embeddings, linear weights) but not norm gains."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def fresh_state(h: Harness, record: RunRecord) -> LoopState:
    """Step 0: the initial validation loss is measured, then the budget clock restarts, so that it counts
    training and not this first evaluation."""
    state = LoopState(t0=time.perf_counter())
    evaluate(state, h, record)
    state.val_initial = state.last_val[1]
    state.t0 = time.perf_counter()
    return state


def resumed_state(h: Harness, setup: TrainSetup) -> LoopState:
    """Load the checkpoint's model and optimizer into `h`, restore the RNG states, and continue the counters
    and the budget clock where the checkpoint left them."""
    ckpt, saved = setup.resume_from, setup.resume_state
    assert ckpt is not None and saved is not None
    missing, unexpected = parallel.load(h.model, h.optimizer, ckpt.model, ckpt.optimizer, h.strategy)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and h.model.config.tie_embeddings)]:
        raise TrainError(f"checkpoint {ckpt.path} does not match the model: missing {missing[:3]}")
    set_rng_state(saved.rng)
    return LoopState(
        t0=time.perf_counter() - saved.elapsed_s,  # the time budget counts the earlier sessions too
        step=ckpt.step,
        tokens=saved.tokens,
        train_s=saved.train_s,
        loss=saved.train_loss,
        val_initial=saved.val_loss_initial,
        last_val=saved.last_val,
        last_checkpoint=ckpt.step,
    )


def stop_reason(step: int, elapsed_s: float, cfg: TrainingSpec, stop_check: Callable[[], str | None]) -> str:
    """Why the run should stop before step `step + 1`: "steps", "seconds", the stop_check's reason, or ""."""
    if cfg.steps is not None and step >= cfg.steps:
        return "steps"
    if cfg.seconds is not None and elapsed_s >= cfg.seconds:
        return "seconds"
    return str(stop_check() or "")


def diverged(loss: float, state: LoopState) -> TrainError:
    """The error that ends a run whose loss at step `state.step + 1` is `loss` (NaN or infinite)."""
    kept = f"step {state.last_checkpoint}" if state.last_checkpoint else "none yet"
    return TrainError(
        f"the training loss became {loss} at step {state.step + 1}; the run stops here and its last "
        f"good checkpoint ({kept}) is kept. Lower training.lr, set training.grad_clip, or check the data"
    )


def budget_used(step: int, elapsed_s: float, cfg: TrainingSpec) -> float:
    """The share of the budget spent, 0 to 1 (more past it): the larger of the steps' and the seconds'."""
    return max(step / cfg.steps if cfg.steps else 0.0, elapsed_s / cfg.seconds if cfg.seconds else 0.0)


def train_step(h: Harness, step: int, lr: float) -> float:
    """Optimizer step `step + 1` at learning rate `lr`, over `grad_accum_steps` micro-batches. Returns its loss:
    the mean over micro-batches and ranks."""
    accum = h.cfg.grad_accum_steps
    for group in h.optimizer.param_groups:
        group["lr"] = lr
    h.optimizer.zero_grad(set_to_none=True)
    loss_sum = None
    for micro in range(accum):
        # micro-batch `micro` of step `step` is loader batch step*accum+micro: with accum=1, batch `step`
        x, y = h.batches.batch_at(step * accum + micro)
        # DDP averages gradients across ranks on the last micro-batch only
        last = h.strategy != "ddp" or micro == accum - 1
        sync = contextlib.nullcontext() if last else h.wrapped.no_sync()  # type: ignore[operator]
        with sync:
            with h.autocast():
                _, loss = h.forward(h.to_dev(x[h.rows]), h.to_dev(y[h.rows]))
            # gradients add up over micro-batches; 1/accum makes them the mean over the step's tokens
            (loss / accum if accum > 1 else loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    if h.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(h.model.parameters(), h.cfg.grad_clip)
    h.optimizer.step()
    assert loss_sum is not None
    return float(parallel.mean(h.group, loss_sum).item()) / accum  # a device sync point on GPU; once per step


@torch.no_grad()
def val_loss(h: Harness) -> float:
    """The mean loss over the fixed validation batches (and over ranks)."""
    h.model.eval()
    losses = []
    for x, y in h.val_batches:
        with h.autocast():
            loss = h.forward(h.to_dev(x[h.rows]), h.to_dev(y[h.rows]))[1]
        losses.append(parallel.mean(h.group, loss).item())
    h.model.train()
    return float(np.mean(losses))


def evaluate(state: LoopState, h: Harness, record: RunRecord) -> None:
    """Measure the validation loss at `state.step` and log it."""
    state.last_val = (state.step, val_loss(h))
    record.log(state.step, state.elapsed_s(), val_loss=state.last_val[1])


def checkpoint(state: LoopState, h: Harness, record: RunRecord, keep_last: int) -> str:
    """Write a resumable checkpoint at `state.step`, store the weights and point the run at them, so a failed
    run still names its last checkpoint; returns the weights' digest ("" on ranks other than 0). Metrics are
    flushed first: the history never lags its checkpoint. Under FSDP every rank takes part in gathering the
    full state; rank 0 writes it."""
    record.flush()
    full = parallel.model_state(h.model, h.strategy)
    optimizer_state = parallel.optimizer_state(h.model, h.optimizer, h.strategy)
    if not h.group.main:
        return ""
    cfg = h.cfg
    weights = state_for_save(h.model, full)  # with LoRA: the frozen base and the adapters, under their own names
    meta = {CONFIG_KEY: json.dumps(h.model.config.to_dict())}  # the same bytes as nn.weights.to_bytes
    plain = state_for_save(h.model, merged_state_dict(h.model, full)) if h.lora else weights
    digest = record.store.artifacts.put_bytes(st_save(plain, metadata=meta))
    saved = TrainState(
        run_id=record.run_id,
        tokens=state.tokens,
        train_s=state.train_s,
        elapsed_s=state.elapsed_s(),
        train_loss=state.loss,
        val_loss_initial=state.val_initial,
        last_val=state.last_val,
        schedule=LrScheduleInputs(cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio, cfg.steps, cfg.seconds),
        loader=LoaderPosition("train", cfg.seed, h.batches.order, state.step * cfg.grad_accum_steps),
        rng=rng_state(),
        training=cfg.model_dump(),
        model_config=h.model.config.to_dict(),
        weights_digest=digest,
    )
    ckpt_dir = record.store.work_dir("runs", record.run_id, "checkpoints")
    save_checkpoint(
        ckpt_dir, state.step, weights, optimizer_state, saved.to_json(), model_metadata=meta, keep_last=keep_last
    )
    record.point_at(digest)
    state.last_checkpoint = state.step
    return digest


def save_adapters(h: Harness, record: RunRecord) -> str:
    """Store a LoRA run's adapters alone (safetensors, rank and scaling in the metadata); return the digest."""
    adapted = [m for m in h.model.modules() if isinstance(m, LoraLinear)]
    meta = {"aifab.lora": json.dumps({"rank": adapted[0].lora_a.shape[0], "scaling": adapted[0].scaling})}
    return record.store.artifacts.put_bytes(st_save(lora_state_dict(h.model), metadata=meta))


def summarise(state: LoopState, h: Harness, lora_digest: str | None) -> RunSummary:
    tokens_per_s = state.tokens / max(state.train_s, 1e-9)
    return RunSummary(
        steps=state.step,
        tokens=state.tokens,
        train_loss_final=state.loss,
        val_loss_initial=state.val_initial,
        val_loss_final=state.last_val[1],
        tokens_per_s=tokens_per_s,
        train_s=state.train_s,
        stopped_by=state.stopped_by,
        mfu=h.mfu(tokens_per_s),
        flops_per_token=h.flops_per_token,
        peak_flops=h.peak_flops,
        device=h.device.name,
        dtype=h.device.dtype,
        compiled=h.device.compile,
        window=h.window,
        lora_digest=lora_digest,
    )
