"""How a registered model version becomes a running engine: loaded, metered to the ledger, and its loop
started on a thread of its own.

On CPU the model is best loaded on the thread that runs its engine loop (see `Engine` on PyTorch's per-thread
OpenMP pools), so `start_engine` runs the whole build (load, then engine) on the new thread and the loop there.
`aifab serve` builds its first engine on its main thread with `build_engine` and runs that loop itself.
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aifab.errors import ServeError
from aifab.serve.engine import Engine
from aifab.serve.metrics import MetricFamilies, ServeMetrics
from aifab.store import Store


@dataclass(frozen=True)
class EngineSettings:
    """What every engine of one `aifab serve` process is built with."""

    max_queue: int = 64  # waiting requests before 429
    max_batch: int = 32  # sequences decoded together (KV-cache slots)
    compile: bool = False  # torch.compile the decode step
    graphs: bool | None = None  # CUDA graphs for decode steps; None: on CUDA only
    deployment: str | None = None  # stamped on every ledger row, whichever version wrote it


def build_engine(store: Store, ref: str, settings: EngineSettings, families: MetricFamilies | None = None) -> Engine:
    """Load `ref` on this thread and make its engine, not started: the caller runs `engine.run()` on this same
    thread. Each request's energy goes to the ledger, charged to this version (its own meter) and stamped with
    `settings.deployment`; its metrics report to `families` (own ones when None), labelled with the version.
    Raises what loading raises (NotFound, a corrupt artifact, ServeError for weights that do not load)."""
    from aifab.serve.loaded import LoadedModel
    from aifab.serve.metering import ledger_meter

    try:
        loaded = LoadedModel.load(store, ref)
    except ValueError as e:  # weights that are not a model's (their digest checked out): the user can act on it
        raise ServeError(f"{ref} cannot be loaded: {e}") from None
    meter = ledger_meter(store.db, loaded.version_id, deployment=settings.deployment)
    return Engine(
        loaded, max_queue=settings.max_queue, max_batch=settings.max_batch, start=False, compile=settings.compile,
        meter=meter, graphs=settings.graphs, metrics=ServeMetrics(loaded.id, families),
    )  # fmt: skip


def start_engine(build: Callable[[], Engine], name: str = "aifab-engine") -> Engine:
    """Run `build` on a new daemon thread, then the engine's loop on that thread until `engine.close()`.
    Returns the engine once it is built, or raises what `build` raised (and the thread ends)."""
    ready, box = threading.Event(), dict[str, Any]()

    def host() -> None:
        try:
            box["engine"] = build()
        except BaseException as e:  # handed to the caller, who reports it
            box["error"] = e
            return
        finally:
            ready.set()
        box["engine"].run()

    threading.Thread(target=host, name=name, daemon=True).start()
    ready.wait()
    if "error" in box:
        raise box["error"]
    engine: Engine = box["engine"]
    return engine
