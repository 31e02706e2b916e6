"""`aifab serve MODEL --engine ray --replicas N`: N engine replicas behind one endpoint on Ray Serve.

Each replica is a Ray actor that loads the model from the store, starts its own `Engine` (its own KV cache,
queue and batch) and serves the same FastAPI app as `aifab serve` does alone (`api.create_app`), so the API,
its errors, its limits and its metrics are the same. Ray Serve's HTTP proxy listens on --host/--port and
routes each request to a replica; a replica answers 429 when its own queue is full.

Replicas read the store themselves: on one machine that needs nothing, on several nodes the store's home
must be on a shared filesystem and its database a server (`AIFAB_DB`), which the replicas inherit.

What may change here: placement and routing options. What may not: a replica serves `create_app(engine)`,
nothing else, so both engines behave alike.
"""

import os
import signal
import sys
import time
from typing import Any

from aifab.errors import ServeError

APP_NAME = "aifab"


class EngineReplica:
    """One Ray Serve replica: the model, its engine, and the app in front of them."""

    def __init__(
        self, home: str, ref: str, max_batch: int, max_queue: int, api_key: str | None, deployment: str | None = None
    ) -> None:
        from aifab.serve.launch import EngineSettings, build_engine, start_engine
        from aifab.store import Store

        settings = EngineSettings(max_queue, max_batch, deployment=deployment)  # one deployment: all replicas
        # the store stays open: the meter writes each request's charge to the ledger. The model is loaded on
        # the engine's own thread, the only one that runs torch (see Engine on why); a failure to load is
        # raised here, so Ray Serve reports it
        self.engine = start_engine(lambda: build_engine(Store(home), ref, settings))
        self.api_key = api_key

    def __serve_build_asgi_app__(self) -> Any:  # Ray Serve calls this once the replica is constructed
        from aifab.serve.api import create_app

        return create_app(self.engine, api_key=self.api_key)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def serve_on_ray(
    home: str,
    ref: str,
    *,
    host: str,
    port: int,
    replicas: int,
    max_batch: int,
    max_queue: int,
    api_key: str | None,
    on_ready: Any = print,
    deployment: str | None = None,
) -> None:
    """Deploy `replicas` engines of model `ref` behind http://host:port and block until SIGINT or SIGTERM.

    Every replica stamps its ledger rows with the same `deployment` id (a fresh one unless given)."""
    from aifab.cluster import connect
    from aifab.serve.metering import new_deployment_id
    from aifab.web import bind

    deployment = deployment or new_deployment_id()
    if replicas < 1:
        raise ServeError(f"--replicas must be at least 1, not {replicas}")
    probe = bind(host, port)  # an occupied port is a one-line error before Ray starts anything
    port = probe.getsockname()[1]  # port 0: the free port the system picked
    probe.close()
    ray = connect(ServeError)
    try:
        from ray import serve
    except ImportError:
        raise ServeError("--engine ray needs Ray Serve: pip install 'aifab[ray]'") from None
    total = ray.cluster_resources()
    use_gpu = total.get("GPU", 0) >= replicas
    cpus = 0 if use_gpu else 1
    if not use_gpu and total.get("CPU", 0) < replicas:
        raise ServeError(
            f"--replicas {replicas} needs {replicas} CPUs but the Ray cluster has {total.get('CPU', 0):g}; "
            "lower --replicas or add nodes"
        )
    env = {k: os.environ[k] for k in ("AIFAB_DB",) if k in os.environ}
    replica_cls = serve.ingress()(EngineReplica)
    ray_deployment: Any = serve.deployment(
        replica_cls,
        name="engine",
        num_replicas=replicas,
        # Ray Serve would hold requests back at 5 per replica by default; each engine queues and batches
        # its own, and answers 429 past its queue
        max_ongoing_requests=max_batch + max_queue + 1,
        graceful_shutdown_wait_loop_s=0.5,  # on shutdown, in-flight requests get a few seconds, not Ray's 20
        graceful_shutdown_timeout_s=5,
        ray_actor_options={"num_cpus": cpus, "num_gpus": 1 if use_gpu else 0, "runtime_env": {"env_vars": env}},
    )
    stop = {"now": False}

    def ask_stop(*_: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, ask_stop)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(
            ray_deployment.bind(home, ref, max_batch, max_queue, api_key, deployment), name=APP_NAME, route_prefix="/"
        )
        if not stop["now"]:
            on_ready(f"http://{host}:{port}/v1")
        while not stop["now"]:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    sys.stdout.flush()
