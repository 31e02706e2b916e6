"""`aifab serve MODEL`: the OpenAI-compatible API for one registered model."""

import os
import signal

import typer

from aifab.cli.common import app, open_store
from aifab.console import err
from aifab.errors import ServeError


@app.command()
def serve(
    model: str = typer.Argument(..., help="name, name:VERSION or name@ALIAS"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; loopback unless told otherwise."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    api_key: str | None = typer.Option(None, "--api-key", help="Require this bearer key (or set AIFAB_API_KEY)."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Waiting requests before 429."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, max=1024, help="Sequences decoded together."),
    executor: str = typer.Option(
        "local",
        "--executor",
        "--engine",
        help="local (this process) or ray (Ray Serve replicas on RAY_ADDRESS, or a local Ray); --engine is its old "
        "name.",
    ),
    replicas: int = typer.Option(1, "--replicas", min=1, help="With --executor ray: engine replicas (one GPU each)."),
    compile_: bool = typer.Option(
        False, "--compile", help="torch.compile the decode step (a minute of compiling at start; faster steps)."
    ),
    cuda_graphs: bool = typer.Option(
        True, "--cuda-graphs/--no-cuda-graphs", help="On CUDA, replay decode steps from graphs captured at start."
    ),
) -> None:
    """Serve a registered model over HTTP until interrupted."""
    from aifab.serve.api import create_app
    from aifab.serve.engine import Engine
    from aifab.serve.loaded import LoadedModel
    from aifab.serve.metering import ledger_meter, new_deployment_id
    from aifab.web import BackgroundServer, bind

    if executor not in ("local", "ray"):
        raise ServeError(f"unknown executor {executor!r}: choose one of local, ray")
    if replicas > 1 and executor != "ray":
        raise ServeError("--replicas needs --executor ray (one process serves one engine)")
    key = api_key or os.environ.get("AIFAB_API_KEY") or None
    store = open_store()
    deployment = new_deployment_id()  # stamped on every ledger row this process (or Ray Serve app) writes
    if executor == "ray":
        from aifab.registry.models import resolve
        from aifab.serve.ray_serve import serve_on_ray

        mv = resolve(store, model)  # an unknown model fails here, not in every replica
        auth = " with an API key" if key else ""

        def ready(url: str) -> None:
            err.print(
                f"serving {mv.name}:{mv.version} on {url} with {replicas} Ray Serve replicas{auth}, "
                f"deployment {deployment} (Ctrl-C to stop)"
            )

        serve_on_ray(
            str(store.home), model, host=host, port=port, replicas=replicas, max_batch=max_batch,
            max_queue=max_queue, api_key=key, on_ready=ready, deployment=deployment,
        )  # fmt: skip
        return
    loaded = LoadedModel.load(store, model)
    sock = bind(host, port)  # an occupied port fails here, before the engine starts
    # the engine runs on this thread, the one that loaded the model (see Engine: CPU decode is several times
    # faster there); uvicorn runs on a thread of its own
    meter = ledger_meter(store.db, loaded.version_id, deployment=deployment)  # each request's energy goes to the ledger
    engine = Engine(
        loaded, max_queue=max_queue, max_batch=max_batch, start=False, compile=compile_, meter=meter,
        graphs=None if cuda_graphs else False,
    )  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: engine.close())
    with BackgroundServer(create_app(engine, api_key=key), sock=sock) as srv:
        auth = " with an API key" if key else ""
        err.print(f"serving {loaded.id} on {srv.url}/v1{auth}, deployment {deployment} (Ctrl-C to stop)")
        try:
            engine.run()
        except KeyboardInterrupt:
            pass
        finally:
            engine.close()
