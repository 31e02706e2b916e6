"""`aifab serve MODEL`: the OpenAI-compatible API for a registered model: one version, an alias it follows as
the alias moves, and optionally a canary that takes a share of the requests."""

import math
import os
import signal
from typing import TYPE_CHECKING

import typer

from aifab.cli.common import app, open_store
from aifab.console import err
from aifab.errors import ServeError

if TYPE_CHECKING:
    from aifab.serve.launch import EngineSettings

DEFAULT_CANARY_PERCENT = 10.0


@app.command()
def serve(
    model: str = typer.Argument(..., help="name, name:VERSION or name@ALIAS (an alias is followed as it moves)"),
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
    canary: str | None = typer.Option(
        None, "--canary", help="Also serve this model (name:VERSION or name@ALIAS) and send it a share of requests."
    ),
    canary_percent: str | None = typer.Option(
        None, "--canary-percent", help=f"The canary's share of requests, 0 to 100 (default {DEFAULT_CANARY_PERCENT:g})."
    ),
    follow: bool = typer.Option(
        True, "--follow/--no-follow", help="Switch to the version an alias names when it moves (name@ALIAS only)."
    ),
    follow_interval: str = typer.Option("5", "--follow-interval", help="Seconds between looks at followed aliases."),
) -> None:
    """Serve a registered model over HTTP until interrupted."""
    from aifab.store.names import ModelRef

    if executor not in ("local", "ray"):
        raise ServeError(f"unknown executor {executor!r}: choose one of local, ray")
    if replicas > 1 and executor != "ray":
        raise ServeError("--replicas needs --executor ray (one process serves one engine)")
    ref = ModelRef.parse(model)  # a malformed or hostile name is one line before anything opens
    if canary is not None:
        ModelRef.parse(canary)
        if canary == model:
            raise ServeError(f"--canary {canary} is the model served already; name another version or alias")
    if canary_percent is not None and canary is None:
        raise ServeError("--canary-percent needs --canary (the model to send that share to)")
    percent = number(canary_percent, "--canary-percent", DEFAULT_CANARY_PERCENT)
    if not 0 <= percent <= 100:
        raise ServeError(f"--canary-percent must be between 0 and 100, not {canary_percent}")
    interval_s = number(follow_interval, "--follow-interval", 5.0)
    if interval_s <= 0:
        raise ServeError(f"--follow-interval must be a positive number of seconds, not {follow_interval}")
    following = follow and (ref.alias is not None or (canary is not None and ModelRef.parse(canary).alias is not None))
    key = api_key or os.environ.get("AIFAB_API_KEY") or None
    if executor == "ray":
        if canary is not None:
            raise ServeError("--canary needs --executor local: Ray Serve replicas serve one version for now")
        if following:
            raise ServeError(
                f"--executor ray does not follow aliases yet: add --no-follow to serve what {model} names now"
            )
        serve_ray(model, host, port, key, replicas, max_batch, max_queue)
        return
    from aifab.serve.launch import EngineSettings
    from aifab.serve.metering import new_deployment_id

    # the deployment id is stamped on every ledger row this process writes, whichever version wrote it
    graphs = None if cuda_graphs else False
    settings = EngineSettings(max_queue, max_batch, compile_, graphs, deployment=new_deployment_id())
    serve_local(model, canary, percent, follow, interval_s, host, port, key, settings)


def number(text: str | None, option: str, default: float) -> float:
    """`text` as a finite number, `default` when not given; one line naming `option` otherwise."""
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ServeError(f"{option} must be a number, not {text!r}")
    return value


def serve_local(
    model: str, canary: str | None, percent: float, follow: bool, interval_s: float, host: str, port: int,
    key: str | None, settings: "EngineSettings",
) -> None:  # fmt: skip
    """The fleet (`serve.fleet`) in this process: the primary's first engine on this thread, the others (a
    canary, the versions an alias moves to) each on a thread of its own."""
    from aifab.registry.models import resolve
    from aifab.serve.api import create_app
    from aifab.serve.engine import Engine
    from aifab.serve.fleet import Fleet
    from aifab.serve.launch import build_engine, start_engine
    from aifab.serve.metrics import MetricFamilies
    from aifab.web import BackgroundServer, bind

    store = open_store()
    mv = resolve(store, model)  # an unknown model (or canary) fails here, before anything loads
    if canary is not None:
        resolve(store, canary)
    sock = bind(host, port)  # an occupied port fails here, before the engine starts
    families = MetricFamilies()  # every version's series in one /metrics, labelled with the version

    def load(version: str) -> Engine:
        return start_engine(lambda: build_engine(store, version, settings, families))

    first: Engine | None = None
    try:
        # the first engine runs on this thread, the one that loaded its model: CPU decode is several times
        # faster there (see Engine); uvicorn runs on a thread of its own
        first = build_engine(store, f"{mv.name}:{mv.version}", settings, families)
        fleet = Fleet.open(
            store, load, model, canary=canary, canary_percent=percent if canary else 0.0, follow=follow,
            engines=[first], metrics=families, log=lambda line: err.print(line, markup=False, highlight=False),
        )  # fmt: skip
    except BaseException:
        if first is not None:
            first.close()
        sock.close()
        raise
    signal.signal(signal.SIGTERM, lambda *_: fleet.close())
    with BackgroundServer(create_app(fleet, api_key=key), sock=sock) as srv:
        auth = " with an API key" if key else ""
        err.print(
            f"serving {fleet.describe()} on {srv.url}/v1{auth}, deployment {settings.deployment} (Ctrl-C to stop)",
            markup=False,
            highlight=False,
        )
        try:
            fleet.watch(interval_s)
            first.run()  # until the fleet closes it: at exit, or when an alias moved away from it
            while not fleet.closed.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            fleet.close()


def serve_ray(model: str, host: str, port: int, key: str | None, replicas: int, max_batch: int, max_queue: int) -> None:
    from aifab.registry.models import resolve
    from aifab.serve.metering import new_deployment_id
    from aifab.serve.ray_serve import serve_on_ray

    store = open_store()
    deployment = new_deployment_id()  # stamped on every ledger row the Ray Serve app writes
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
