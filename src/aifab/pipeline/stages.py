"""The body of each built-in stage, defined once: data, train, evaluate, register, gate.

Every caller runs these same functions: a pipeline stage's job (`aifab stage run --task JSON`, via
`run_task`), the demo (the default pipeline run in this process), `aifab train` (train then register) and any
job that runs one of those commands. Each body takes the store, a meter that charges its work to the ledger,
and typed parameters and upstream outputs (contracts.py); it returns a typed output: ids and digests read back
from the store, so the next stage could run in another process.

A train stage survives its own retries: inside a job it remembers its run id (`attempt.remember`), and a later
attempt resumes that run from its newest checkpoint (`run_to_resume`, the one place that decides). On SIGTERM
(preemption) it checkpoints, leaves the run resumable and raises `Preempted`, and its job exits with
EXIT_PREEMPTED, so the control plane requeues it.
"""

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import TYPE_CHECKING, Any

from aifab.errors import AifabError, NotFound
from aifab.jobs import attempt
from aifab.pipeline.contracts import (
    DataOutput,
    DataParams,
    EvalOutput,
    EvaluateParams,
    GateOutput,
    GateParams,
    RegisterOutput,
    RegisterParams,
    StageError,
    Task,
    TrainOutput,
    TrainParams,
)
from aifab.spec import BudgetsSpec, ModelSpec, TrainingSpec
from aifab.store import Store
from aifab.store.schema import DatasetVersion, Run, RunStatus

if TYPE_CHECKING:
    from aifab.meter.ledger import Charge, Meter
    from aifab.train.trainer import FineTune, TrainResult

StopCheck = Callable[[], str | None]


class Preempted(Exception):
    """The stage stopped for preemption after checkpointing; the job exits with EXIT_PREEMPTED."""

    def __init__(self, run_id: str, step: int) -> None:
        super().__init__(f"run {run_id} preempted at step {step}")
        self.run_id, self.step = run_id, step


# ---- data ----------------------------------------------------------------------------------------------------


def data_stage(store: Store, meter: "Meter", p: DataParams, *, executor: str = "local") -> DataOutput:
    """Ingest the next version of dataset `p.dataset` (aifab.data.ingest), charged to it in the ledger."""
    from aifab.data.ingest import ingest

    with meter.measure("data", "dataset") as charge:
        ds = ingest(store, p.dataset, p.data, p.tokenizer, executor=executor)
        charge.subject_id, charge.tokens_out = str(ds.dataset_version_id), ds.tokens
    with store.db.session() as s:
        row = s.get(DatasetVersion, ds.dataset_version_id)
        assert row is not None
        manifest_digest, tokenizer_digest = row.manifest_digest, row.tokenizer_digest
    counts = {f.name: getattr(ds, f.name) for f in fields(DataOutput) if hasattr(ds, f.name)}
    return DataOutput(
        **counts, dataset=f"{ds.name}:{ds.version}", manifest_digest=manifest_digest, tokenizer_digest=tokenizer_digest
    )


# ---- train ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    """Continue a run with its own dataset, model and settings; `steps`/`seconds` replace its budget."""

    run_id: str
    steps: int | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class TrainRequest:
    """One training run to start (or `resume`): everything `aifab train` and a train stage can ask for."""

    dataset_version_id: int | None  # None only with `resume`
    model: ModelSpec
    training: TrainingSpec
    budgets: BudgetsSpec = field(default_factory=BudgetsSpec)
    base: "FineTune | None" = None  # fine-tune a registered model instead of a fresh init
    resume: Resume | None = None
    executor: str = "local"  # local (this process, or torchrun's rank) | ray (Ray Train workers)
    workers: int = 2  # with executor ray


def train_stage(store: Store, meter: "Meter", req: TrainRequest) -> TrainOutput | None:
    """Train (or resume) one run and return its output; None on a torchrun rank other than 0, which leaves the
    reporting to rank 0. Inside a job, a run an earlier attempt started is resumed (see `run_to_resume`), and a
    preemption checkpoints and raises Preempted."""
    from aifab.train.executors import EXECUTORS, run_on_ray
    from aifab.train.trainer import PREEMPTED, resume, train

    if req.executor not in EXECUTORS:
        raise AifabError(f"unknown executor {req.executor!r}: choose one of {', '.join(EXECUTORS)}")
    main = os.environ.get("RANK", "0") == "0"
    in_job = req.executor == "local" and main and attempt.current() is not None
    stop_check = first_reason(
        attempt.preemption_check() if in_job else None, budget_check(meter, req.budgets) if main else None
    )
    on_run = partial(attempt.remember, "run_id") if in_job else None  # a later attempt resumes this run
    target = req.resume
    resumed_from_step = 0
    if target is None and in_job and (own := run_to_resume(store)) is not None:
        target, resumed_from_step = Resume(own[0]), own[1]
        print(f"resuming run {own[0]} from step {own[1]} (an earlier attempt of this job started it)", file=sys.stderr)
    if target is not None:
        work = partial(
            resume, run_id=target.run_id, steps=target.steps, seconds=target.seconds, stop_check=stop_check,
            on_run=on_run,
        )  # fmt: skip
    elif req.dataset_version_id is None:
        raise AifabError("training needs a dataset version (or a run to resume)")
    else:
        work = partial(
            train, dataset_version_id=req.dataset_version_id, model_spec=req.model, cfg=req.training, base=req.base,
            stop_check=stop_check, on_run=on_run,
        )  # fmt: skip
    with measured(meter, "train", "run", record=main) as charge:
        result = run_on_ray(store, work, req.workers) if req.executor == "ray" else work(store)
        charge.subject_id, charge.tokens_in = result.run_id, result.tokens
    if leave_process_group():
        return None
    if result.stopped_by == PREEMPTED and in_job:  # the trainer checkpointed and left the run resumable
        raise Preempted(result.run_id, result.steps)
    return train_output(store, result, resumed_from_step)


def run_to_resume(store: Store) -> tuple[str, int] | None:
    """The run an earlier attempt of this job started and did not complete, with the step of its newest complete
    checkpoint; None when there is none or it cannot be resumed (then the attempt starts a fresh run)."""
    from aifab.train.checkpoint import latest_complete

    run_id = attempt.recall("run_id")
    if not isinstance(run_id, str):
        return None
    with store.db.session() as s:
        run = s.get(Run, run_id)
        if run is None or run.status == RunStatus.COMPLETED:
            return None
    ckpt = latest_complete(store.work_dir("runs", run_id, "checkpoints"))
    return (run_id, ckpt.step) if ckpt is not None else None


def train_output(store: Store, result: "TrainResult", resumed_from_step: int) -> TrainOutput:
    """A finished run as the stage's output, with the dataset and base model its row records."""
    with store.db.session() as s:
        run = s.get(Run, result.run_id)
        assert run is not None
        dataset_version_id = run.dataset_version_id
        init = (run.params or {}).get("init")
        ds = s.get(DatasetVersion, dataset_version_id) if dataset_version_id is not None else None
        manifest_digest = ds.manifest_digest if ds is not None else ""
    base_model = str(init["model"]) if isinstance(init, dict) and init.get("model") else None
    return TrainOutput(
        **asdict(result),  # every field of the result, and what the run's row adds
        manifest_digest=manifest_digest,
        dataset_version_id=dataset_version_id,
        base_model=base_model,
        resumed_from_step=resumed_from_step,
    )


def budget_check(meter: "Meter", budgets: BudgetsSpec) -> StopCheck | None:
    """A stop_check for the trainer: the energy or cost budget, measured from now; None without a budget."""
    if budgets.energy_j is None and budgets.cost_usd is None:
        return None
    start_j = meter.sampler.energy_j()

    def check() -> str | None:
        spent_j = meter.spent_j(start_j)
        if budgets.energy_j is not None and spent_j >= budgets.energy_j:
            return "energy budget"
        if budgets.cost_usd is not None and meter.prices.cost_usd(spent_j) >= budgets.cost_usd:
            return "cost budget"
        return None

    return check


def first_reason(*checks: StopCheck | None) -> StopCheck:
    """One stop_check from several: the first reason any of them gives."""
    active = [c for c in checks if c is not None]

    def check() -> str | None:
        return next((r for r in (c() for c in active) if r), None)

    return check


@contextlib.contextmanager
def measured(meter: "Meter", stage: str, subject_kind: str, *, record: bool = True) -> Iterator["Charge"]:
    """`meter.measure`, or on a torchrun rank other than 0 (`record` False) a charge that is never written."""
    if record:
        with meter.measure(stage, subject_kind) as charge:
            yield charge
    else:
        from aifab.meter.ledger import Charge

        yield Charge(stage, subject_kind)


def leave_process_group() -> bool:
    """Leave the torchrun process group, if there is one; True on ranks other than 0."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return False
    rank = dist.get_rank()
    dist.barrier()  # no rank tears its gloo connections down while a peer still uses them (that aborts the peer)
    dist.destroy_process_group()
    return rank != 0


# ---- evaluate and register -----------------------------------------------------------------------------------


def evaluate_stage(store: Store, meter: "Meter", p: EvaluateParams, trained: TrainOutput) -> EvalOutput:
    """Validation loss, perplexity and seeded samples of the run's checkpoint, charged to the run."""
    from aifab.evaluate import evaluate

    with meter.measure("evaluate", "run", trained.run_id):
        ev = evaluate(
            store,
            trained.checkpoint_digest,
            trained.tokenizer_digest,
            trained.manifest_digest,
            batches=p.evaluation.batches,
            batch_size=p.batch_size,
            prompts=p.evaluation.prompts,
            max_new_tokens=p.evaluation.max_new_tokens,
            seed=p.seed,
        )
    return EvalOutput(
        run_id=trained.run_id,
        checkpoint_digest=trained.checkpoint_digest,
        val_loss=ev.val_loss,
        perplexity=ev.perplexity,
        val_tokens=ev.val_tokens,
        samples=[{"prompt": prompt, "completion": text} for prompt, text in ev.samples],
    )


def register_stage(
    store: Store, p: RegisterParams, trained: TrainOutput, evaluated: EvalOutput | None = None
) -> RegisterOutput:
    """Register the run's checkpoint as the next version of `p.name`, with its metrics (the evaluation's when
    there is one), its lineage, and, for a fine-tune, its base model's link and generation settings."""
    from aifab.registry.models import register, resolve

    metrics: dict[str, float] = {"val_loss_initial": trained.val_loss_initial, "val_loss": trained.val_loss_final}
    if evaluated is not None:
        metrics.update(val_loss=evaluated.val_loss, perplexity=evaluated.perplexity)
    base_id, generation = None, {}
    if trained.base_model is not None:
        with contextlib.suppress(NotFound):  # the base version is gone: nothing to inherit
            base = resolve(store, trained.base_model)
            base_id, generation = base.id, dict(base.generation or {})  # a fine-tune generates like its base
    mv = register(
        store,
        p.name,
        weights_digest=trained.checkpoint_digest,
        tokenizer_digest=trained.tokenizer_digest,
        config=trained.model_config,
        params_count=trained.params,
        metrics=metrics,
        run_id=trained.run_id,
        dataset_version_id=trained.dataset_version_id,
        aliases=p.aliases,
        base_model_id=base_id,
        generation=generation,
    )
    return RegisterOutput(model_version_id=mv.id, model=f"{mv.name}:{mv.version}", aliases=list(p.aliases))


def gate_stage(store: Store, meter: "Meter", p: GateParams, registered: RegisterOutput) -> GateOutput:
    """Promote the registered model to `p.alias` through `p.gates` (aifab.pipeline.promote), its load test priced
    like the meter's ledger. A refusal raises GateRefused, whose one line names the failing gate, its value and
    its threshold; the decision is stored either way."""
    from aifab.pipeline.promote import GateRefused, promote

    report = promote(store, registered.model, p.alias, p.gates, progress=False, prices=meter.prices)
    if report.promotion_id is not None and not report.moved:
        raise GateRefused(report)
    verdicts = [v.to_json() for v in report.verdicts]
    return GateOutput(report.promotion_id, report.model, p.alias, report.champion, report.moved, verdicts)


# ---- a task, as a pipeline stage's job runs it ---------------------------------------------------------------


def execute(store: Store, task: Task, meter: "Meter | None" = None) -> dict[str, Any]:
    """Run a built-in stage's body on `task` and return its outputs as JSON. `meter` defaults to one with the
    task's prices."""
    from aifab.meter.ledger import Meter, Prices

    meter = meter or Meter(store.db, Prices(**task.prices))
    p = task.params
    out: DataOutput | TrainOutput | EvalOutput | RegisterOutput | GateOutput
    if task.uses == "data":
        out = data_stage(store, meter, DataParams.from_json(p))
    elif task.uses == "train":
        tp, data = TrainParams.from_json(p), DataOutput.from_json(task.upstream("data"))
        trained = train_stage(store, meter, TrainRequest(data.dataset_version_id, tp.model, tp.training, tp.budgets))
        assert trained is not None  # a stage's job is one process, rank 0
        out = trained
    elif task.uses == "evaluate":
        out = evaluate_stage(store, meter, EvaluateParams.from_json(p), TrainOutput.from_json(task.upstream("train")))
    elif task.uses == "register":
        evals = task.upstream_all("evaluate")
        evaluated = EvalOutput.from_json(evals[0]) if evals else None
        out = register_stage(
            store, RegisterParams.from_json(p), TrainOutput.from_json(task.upstream("train")), evaluated
        )
    elif task.uses == "gate":
        out = gate_stage(store, meter, GateParams.from_json(p), RegisterOutput.from_json(task.upstream("register")))
    else:
        raise StageError(f"stage {task.stage!r}: `uses: {task.uses}` has no built-in body")
    return out.to_json()


def exec_command(task: Task) -> None:
    """Replace this process with a `uses: command` stage's argv, run in the factory.yaml's directory, with
    `AIFAB_STAGE_INPUTS` (upstream outputs) and `AIFAB_STAGE_PARAMS` (its `with:`) as JSON in its environment.
    The job's own environment (AIFAB_JOB_DIR...) passes through, so a Python command may call
    `aifab.jobs.attempt.write_result` to hand outputs downstream."""
    argv = task.params["run"]
    env = {
        **os.environ,
        **task.params["env"],
        "AIFAB_STAGE": task.stage,
        "AIFAB_STAGE_INPUTS": json.dumps({k: v.outputs for k, v in task.inputs.items()}),
        "AIFAB_STAGE_PARAMS": json.dumps(task.params["with"]),
    }
    os.chdir(task.base)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        raise AifabError(f"stage {task.stage!r}: cannot run {argv[0]!r}: {e.strerror or e}") from None


def run_task(store: Store, task: Task) -> dict[str, Any]:
    """What `aifab stage run` does: execute, then report the outputs to the job (or print them outside one)."""
    if task.uses == "command":
        exec_command(task)  # does not return
    t0 = time.perf_counter()
    try:
        outputs = execute(store, task)
    except AifabError as e:
        if attempt.current() is not None:  # the runner reports this line, not just the exit code
            attempt.write_result({"error": str(e)})
        raise
    if attempt.current() is not None:
        attempt.write_result(outputs)
    print(f"stage {task.stage!r} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return outputs
