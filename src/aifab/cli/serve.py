"""`aifab serve MODEL`: the OpenAI-compatible API for one registered model."""

import os

import typer

from aifab.cli.common import app, open_store
from aifab.console import err


@app.command()
def serve(
    model: str = typer.Argument(..., help="name, name:VERSION or name@ALIAS"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; loopback unless told otherwise."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    api_key: str | None = typer.Option(None, "--api-key", help="Require this bearer key (or set AIFAB_API_KEY)."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Waiting requests before 429."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, max=1024, help="Sequences decoded together."),
) -> None:
    """Serve a registered model over HTTP until interrupted."""
    from aifab.serve.api import create_app
    from aifab.serve.engine import Engine, LoadedModel
    from aifab.serve.server import bind, serve_forever

    store = open_store()
    loaded = LoadedModel.load(store, model)
    sock = bind(host, port)  # an occupied port fails here, before the engine starts
    engine = Engine(loaded, max_queue=max_queue, max_batch=max_batch)
    key = api_key or os.environ.get("AIFAB_API_KEY") or None
    bound_host, bound_port = sock.getsockname()[:2]  # the real port when --port 0 asked for any free one
    auth = " with an API key" if key else ""
    err.print(f"serving {loaded.id} on http://{bound_host}:{bound_port}/v1{auth} (Ctrl-C to stop)")
    try:
        serve_forever(create_app(engine, api_key=key), sock)
    finally:
        engine.close()
