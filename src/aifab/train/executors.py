"""Where a training run executes: in this process ("local", or one rank of a torchrun group), or on Ray Train
("ray"), as N workers of a `TorchTrainer` on the cluster `aifab.cluster.connect()` reaches.

Both run the same entry point, `trainer.train` (or `trainer.resume`). Ray Train starts the workers, places
them (one GPU each when the cluster has them) and creates their process group; `train` joins that group as it
joins torchrun's, so DDP/FSDP2, checkpoints and exact resume behave as under torchrun. Rank 0 writes the run's
rows and checkpoints and hands its `TrainResult` back through a file under the store, because every worker
opens the store itself: on several nodes its home must be on a shared filesystem and its database a server
(`AIFAB_DB`), not the default SQLite file.

What may change here: the Ray Train options (failure retries, placement). What may not: the job a worker runs
is `job(store)` and nothing else, so a Ray run is the same run, with the same rows, as a local one.
"""

import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aifab.errors import AifabError, TrainError
from aifab.store import Store
from aifab.train.trainer import TrainResult

EXECUTORS = ("local", "ray")  # where `aifab train --executor` may run a run
Job = Callable[[Store], TrainResult]  # picklable: a module-level function or a functools.partial of one
# what the driver's store settings become in each worker's environment
_STORE_ENV = ("AIFAB_DB",)


def run_on_ray(store: Store, job: Job, workers: int, use_gpu: bool | None = None) -> TrainResult:
    """Run `job` on `workers` Ray Train workers and return rank 0's result.

    `use_gpu` None means: one GPU per worker when the cluster has a GPU for every worker, else CPUs. A worker's
    AifabError (a refused config, a NaN loss) is raised here as itself, so the CLI prints its one-line message.
    """
    if workers < 1:
        raise TrainError(f"--workers must be at least 1, not {workers}")
    ray = _connect()
    from ray.train import RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer

    total = ray.cluster_resources()
    if use_gpu is None:
        use_gpu = total.get("GPU", 0) >= workers
    # Ray Train would wait forever for workers the cluster cannot place; refuse instead (each takes 1 CPU, and
    # 1 GPU with use_gpu). A cluster that autoscales reports its current nodes only, so start them first.
    for resource in ("CPU", "GPU") if use_gpu else ("CPU",):
        if total.get(resource, 0) < workers:
            raise TrainError(
                f"--workers {workers} needs {workers} {resource}s but the Ray cluster has {total.get(resource, 0):g}; "
                "lower --workers or add nodes"
            )
    name = f"train-{uuid.uuid4().hex[:12]}"
    out_dir = store.work_dir("ray", name)  # absolute: Ray workers run in a directory of their own
    env = {"AIFAB_NO_PROGRESS": "1", **{k: os.environ[k] for k in _STORE_ENV if k in os.environ}}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"home": str(store.home), "job": job, "result": str(out_dir / "result.json")},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        # Ray Train V2's RunConfig; the type stubs mypy sees are V1's, which lack worker_runtime_env
        run_config=RunConfig(  # type: ignore[call-arg]
            name=name, storage_path=str(store.work_dir("ray")), worker_runtime_env={"env_vars": env}
        ),
    )
    try:
        trainer.fit()
    except WorkerGroupError as e:
        raise _worker_error(e.worker_failures) from None
    result = Path(out_dir / "result.json")
    if not result.exists():
        raise TrainError(f"Ray Train run {name} finished without a result from rank 0 (looked in {result})")
    return TrainResult(**json.loads(result.read_text()))


def _connect() -> Any:
    from aifab.cluster import connect

    connect(TrainError)
    try:
        import ray.train.torch  # a Ray without the train extra lacks it
    except ImportError:
        raise TrainError("--executor ray needs Ray Train: pip install 'aifab[ray]'") from None
    return ray


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: open the store, run the job; rank 0 writes the result for the driver."""
    import torch.distributed as dist

    store = Store(config["home"])
    try:
        result: TrainResult = config["job"](store)
    finally:
        store.close()
    if not dist.is_initialized() or dist.get_rank() == 0:
        path = Path(config["result"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(result)))
        tmp.replace(path)


def _worker_error(failures: Mapping[int, BaseException]) -> Exception:
    """The error to show for failed workers: the lowest failing rank's own AifabError when it is one (each
    rank usually refuses the same config), else a TrainError that names each rank's exception."""
    for rank in sorted(failures):
        err = _unwrap(failures[rank])
        if isinstance(err, AifabError):
            return err
    lines = [f"rank {rank}: {type(_unwrap(e)).__name__}: {_unwrap(e)}" for rank, e in sorted(failures.items())]
    return TrainError("Ray Train workers failed:\n" + "\n".join(lines))


def _unwrap(err: BaseException) -> BaseException:
    """Ray may wrap a worker's exception (RayTaskError); the user's own exception is its `cause`."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err
