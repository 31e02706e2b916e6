"""Training runs: one run over one dataset version, ending in a safetensors checkpoint in the store.

Contract of `train()`: it creates a `runs` row (status running), logs the per-step metrics history
(train_loss, lr, and val_loss every `eval_every` steps), saves checkpoints every `checkpoint_every` steps
and at the end (resumable ones under the run's work dir, see checkpoint.py, plus the weights in the
artifact store), and marks the run completed; on any error the run is marked failed with the message and
the error propagates. The budget ends the run: `steps`, `seconds`, or `stop_check()` returning a reason
(the caller's energy or cost budget), whichever comes first. A run stopped for the reason `PREEMPTED` (the
control plane wants its devices back) is marked `preempted` instead: checkpointed, and resumable later.

The parts: `prepare` decides and checks everything before the row exists (prepare.py), `RunRecord` writes
the row (record.py), and `loop.run` trains (loop.py).
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aifab.spec import ModelSpec, TrainingSpec
from aifab.store import Store
from aifab.store.schema import RunStatus
from aifab.train.checkpoint import KEEP_LAST
from aifab.train.prepare import FineTune, TrainSetup, model_config_for, prepare, resumable_params
from aifab.train.record import RunRecord, RunSummary

__all__ = ["PREEMPTED", "FineTune", "TrainResult", "model_config_for", "resume", "train"]

PREEMPTED = RunStatus.PREEMPTED  # the stop_check reason, and the status, of a run stopped to give its devices back


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    checkpoint_digest: str
    tokenizer_digest: str
    model_config: dict[str, Any]  # ModelConfig.to_dict(): a result travels as JSON (Ray workers, --json)
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

    @classmethod
    def of(
        cls, run_id: str, setup: TrainSetup, summary: RunSummary, checkpoint_digest: str, elapsed_s: float
    ) -> "TrainResult":
        return cls(
            run_id=run_id,
            checkpoint_digest=checkpoint_digest,
            tokenizer_digest=setup.tokenizer_digest,
            model_config=setup.config.to_dict(),
            params=setup.n_params,
            steps=summary.steps,
            tokens=summary.tokens,
            elapsed_s=elapsed_s,
            tokens_per_s=summary.tokens_per_s,
            val_loss_initial=summary.val_loss_initial,
            val_loss_final=summary.val_loss_final,
            stopped_by=summary.stopped_by,
            mfu=summary.mfu,
            lora_digest=summary.lora_digest,
        )


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

    from aifab.nn.lora import apply_lora
    from aifab.nn.transformer import Transformer
    from aifab.nn.weights import from_bytes
    from aifab.train import loop, parallel

    group = parallel.init(use_cuda=cfg.device != "cpu" and torch.cuda.is_available())
    setup = prepare(store, dataset_version_id, model_spec, cfg, group.world, resume_run_id, base)
    record = RunRecord.start(store, setup, group)
    if on_run is not None and group.main:
        on_run(record.run_id)
    try:
        torch.manual_seed(cfg.seed)
        # the processes on one node share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // group.local_world))
        # a resumed run loads its checkpoint over the fresh init
        model = (
            from_bytes(setup.base_weights, setup.config)
            if setup.base_weights is not None
            else Transformer(setup.config)
        )
        if setup.lora is not None:
            apply_lora(model, setup.lora)
        finished: loop.Finished = loop.run(setup, model, group, record, stop_check, keep_last)
    except BaseException as e:
        record.mark_failed(e)
        raise
    finished = parallel.from_main(group, finished)  # the other ranks return rank 0's result
    record.finish(finished.summary, finished.checkpoint_digest, finished.elapsed_s)
    parallel.barrier(group)
    return TrainResult.of(record.run_id, setup, finished.summary, finished.checkpoint_digest, finished.elapsed_s)


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
    params = resumable_params(store, run_id)
    cfg = params.training
    if steps is not None or seconds is not None:
        cfg = cfg.model_copy(update={"steps": steps, "seconds": seconds})
    return train(store, params.dataset_version_id, ModelSpec(), cfg, stop_check, run_id, keep_last, on_run=on_run)
