"""The fleet: which model versions one server serves, which version answers each request, and how a version
is replaced while serving without failing or dropping a request.

Routes. A fleet serves a *primary* route and, optionally, a *canary* route. A route is a model reference as
given (`demo@prod`, `demo:3`, `demo`) and the version that serves it now. A route whose reference is an alias
and that follows it is re-resolved by `poll()` (every `interval_s` on a watcher thread once `watch()` is
called): when the alias moves, the route moves to the new version. A `name:version` or bare `name` route
never moves.

Choosing (`pick(model)`), first match wins:
1. the id of a version a route serves now (`demo:3`): that version (a pinned request);
2. a route's reference as given: the canary route's gets the canary's version; the primary route's gets the
   canary's version for `canary_percent` percent of such requests and the primary's otherwise;
3. any other name a route's version was loaded under (`demo`, `demo@latest`: `LoadedModel.names`), the
   primary's before the canary's: as in 2.
The split is a smooth weighted round robin (`WeightedChoice`): deterministic, and after any n split requests
the canary has had n * canary_percent / 100 of them, to within one. A model matching nothing is
`UnknownModel`, whose message lists what is served.

Versions. Each version served has one engine (two routes on one version share it) and a count of requests in
flight: a request counts from `pick` until its engine emits its `Done`, or until the pick's `with` block ends
when no request was submitted (a 400 found after picking, a full queue).

Switch (a followed alias now names version N; the route is served by M):
1. N is loaded and its engine started by `load` (on a thread of its own) while M keeps serving. A version
   that fails to load is logged in one line, M keeps serving, and N is not tried again until the alias names
   another version. A version already served (the other route's, or one still draining) is reused.
2. Under the fleet's lock the route moves to N: every pick from then on gets N.
3. M, once no route serves it, is retiring: no pick gets it (a request pinned to it is unknown now), and
   when its last request in flight is done its engine is closed (its loop ends at its next step and flushes
   its meter to the ledger) and dropped, with its gauges. So every request picked before step 2 is answered
   by M and every one after it by N, and a switch fails none.

Each version's engine has its own meter (the ledger rows are charged to that version; `serve.launch`) and its
own series in the shared `MetricFamilies`, labelled with its id.

Thread safety: one re-entrant lock guards the routes and versions; `pick`, a lease's `submit` and release,
`poll` and `close` may be called from any thread (the HTTP event loop, an engine thread emitting `Done`, the
watcher, a signal handler). Closing an engine never blocks.
"""

import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aifab.errors import ServeError
from aifab.serve.engine import Done, Engine, Event, Request
from aifab.serve.loaded import LoadedModel
from aifab.serve.metrics import MetricFamilies
from aifab.store import Store

PRIMARY, CANARY = "primary", "canary"
Loader = Callable[[str], Engine]  # a version's id ("name:version") -> its engine, built and running


class UnknownModel(LookupError):
    """A request named a model this fleet does not serve; the message says what it serves."""


class WeightedChoice:
    """Smooth weighted round robin over named targets: deterministic, and after n picks each target has had n
    times its share of them, to within one. Weights need not be whole numbers; a target of weight 0 is never
    picked."""

    def __init__(self, weights: dict[str, float]) -> None:
        if any(not math.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero: {weights}")
        self.weights = {k: w for k, w in weights.items() if w > 0}
        self.total = sum(self.weights.values())
        self.current = dict.fromkeys(self.weights, 0.0)

    def next(self) -> str:
        for k, w in self.weights.items():
            self.current[k] += w
        best = max(self.current, key=lambda k: self.current[k])  # ties: the first named
        self.current[best] -= self.total
        return best


@dataclass
class Route:
    role: str  # PRIMARY or CANARY
    ref: str  # as given: "demo@prod", "demo:3", "demo"
    follow: bool  # an alias that `poll` re-resolves
    version: str  # the id of the version serving it now ("demo:3")


@dataclass
class Served:
    """A version being served: its engine, and its requests in flight (see the module's docstring)."""

    engine: Engine
    inflight: int = 0

    @property
    def loaded(self) -> LoadedModel:
        return self.engine.loaded


class Lease:
    """One request's hold on the version picked for it: `with fleet.pick(model) as lease:` read
    `lease.loaded` (tokenizer, context), then `lease.submit(request)` once. The hold passes to the request when
    submitted (released at its `Done`), so a stream may outlive the block; else it ends with the block.
    Requests put straight on `lease.engine` (several prompts of one HTTP request) are covered only while the
    block lasts: the block must not end before their `Done`s."""

    def __init__(self, fleet: "Fleet", served: Served) -> None:
        self._fleet, self._served, self._held = fleet, served, True

    @property
    def loaded(self) -> LoadedModel:
        return self._served.loaded

    @property
    def engine(self) -> Engine:
        return self._served.engine

    def submit(self, req: Request) -> None:
        """Queue `req` on the picked version's engine; `QueueFull` as `Engine.submit`."""
        if not self._held:
            raise ServeError("a lease submits one request")
        emit, fleet, served = req.emit, self._fleet, self._served

        def counted(event: Event) -> None:
            try:
                emit(event)
            finally:
                if isinstance(event, Done):  # exactly one per request (the engine's contract)
                    fleet.release(served)

        req.emit = counted
        served.engine.submit(req)
        self._held = False  # the request holds it now (even if its Done came already)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self._held = False
            self._fleet.release(self._served)


@dataclass
class _Watch:
    failed: dict[str, str] = field(default_factory=dict)  # role -> the version that failed to load for it
    problems: set[str] = field(default_factory=set)  # resolve errors logged already (each once)
    thread: threading.Thread | None = None


class Fleet:
    def __init__(
        self,
        routes: Iterable[Route],
        engines: Iterable[Engine],
        *,
        store: Store | None = None,
        load: Loader | None = None,
        canary_percent: float = 0.0,
        metrics: MetricFamilies | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        """Serve `routes` with `engines` (one per version the routes name, keyed by `loaded.id`). `store` and
        `load` are needed by routes that follow. Most callers use `open` or `single`."""
        check_percent(canary_percent)
        self._lock = threading.RLock()
        self._poll_lock = threading.Lock()  # one switch at a time
        self._routes = {r.role: r for r in routes}
        needed = {r.version for r in self._routes.values()}
        self._versions = {}
        for e in engines:
            if e.loaded.id in needed:
                self._versions[e.loaded.id] = Served(e)
            else:  # built for a version the routes no longer name (an alias moved meanwhile)
                e.close()
        missing = needed - set(self._versions)
        if PRIMARY not in self._routes or missing:
            raise ServeError(f"a fleet needs a primary route and an engine for each version (missing {missing})")
        self.store, self.load, self.canary_percent = store, load, canary_percent
        self.metrics = metrics or MetricFamilies()
        self.log = log or logging.getLogger(__name__).warning
        self._choice = WeightedChoice({PRIMARY: 100.0 - canary_percent, CANARY: canary_percent})
        self._watch = _Watch()
        self.closed = threading.Event()

    @classmethod
    def single(cls, engine: Engine) -> "Fleet":
        """One engine that never changes (`create_app(engine)`); its metrics' registry is the fleet's."""
        mid = engine.loaded.id
        return cls([Route(PRIMARY, mid, False, mid)], [engine], metrics=engine.metrics.families)

    @classmethod
    def open(
        cls,
        store: Store,
        load: Loader,
        primary: str,
        *,
        canary: str | None = None,
        canary_percent: float = 0.0,
        follow: bool = True,
        engines: Iterable[Engine] = (),
        metrics: MetricFamilies | None = None,
        log: Callable[[str], None] | None = None,
    ) -> "Fleet":
        """Resolve `primary` (and `canary`) in the registry and serve them, loading with `load` each version
        not among `engines`. With `follow`, a reference that is an alias is followed. Raises what resolving or
        loading raises (nothing is left running then)."""
        from aifab.registry.models import resolve
        from aifab.store.names import ModelRef

        check_percent(canary_percent)
        if canary is None and canary_percent:
            raise ServeError("--canary-percent needs --canary (the model to send that share to)")
        by_id = {e.loaded.id: e for e in engines}
        started: list[Engine] = []
        routes = []
        try:
            for role, ref in ((PRIMARY, primary), (CANARY, canary)):
                if ref is None:
                    continue
                mv = resolve(store, ref)
                vid = f"{mv.name}:{mv.version}"
                if vid not in by_id:
                    by_id[vid] = load(vid)
                    started.append(by_id[vid])
                routes.append(Route(role, ref, follow and ModelRef.parse(ref).alias is not None, vid))
            return cls(
                routes, by_id.values(), store=store, load=load, canary_percent=canary_percent, metrics=metrics,
                log=log,
            )  # fmt: skip
        except BaseException:
            for e in started:
                e.close()
            raise

    # --- requests --------------------------------------------------------------------------------------------

    def pick(self, model: str) -> Lease:
        """The version that answers a request for `model` (see the module's docstring), held until the lease
        is released. Raises UnknownModel."""
        with self._lock:
            role = self._role_for(model)
            if role is None:
                live = {r.version: r for r in self._routes.values()}
                if model not in live:
                    raise UnknownModel(f"unknown model {model!r}; this server serves {self.describe()}")
                vid = model
            else:
                vid = self._routes[role].version
            served = self._versions[vid]
            served.inflight += 1
            return Lease(self, served)

    def _role_for(self, model: str) -> str | None:
        """The route a request for `model` goes to (the split applied), or None for a version id or unknown."""
        routes = self._routes.values()
        if any(model == r.version for r in routes):
            return None
        matched = next((r for r in routes if model == r.ref), None) or next(
            (r for r in routes if model in self._versions[r.version].loaded.names), None
        )
        if matched is None:
            return None
        if matched.role == PRIMARY and CANARY in self._routes:
            return self._choice.next()
        return matched.role

    def release(self, served: Served) -> None:
        """One request of `served` is done (called by leases); a retiring version with none left stops."""
        with self._lock:
            served.inflight -= 1
            self._retire_if_idle(served)

    def _retire_if_idle(self, served: Served) -> None:
        vid = served.loaded.id
        if served.inflight or self._versions.get(vid) is not served:
            return
        if any(r.version == vid for r in self._routes.values()):
            return
        del self._versions[vid]
        served.engine.close()
        served.engine.metrics.unwatch()
        self.log(f"{vid} finished its requests and stopped")

    # --- views -----------------------------------------------------------------------------------------------

    def served(self) -> list[LoadedModel]:
        """The versions the routes serve now (primary first), each once; retiring ones are not listed."""
        with self._lock:
            ids = dict.fromkeys(r.version for r in self._routes.values())
            return [self._versions[v].loaded for v in ids]

    def route(self, role: str) -> Route | None:
        with self._lock:
            r = self._routes.get(role)
            return None if r is None else Route(r.role, r.ref, r.follow, r.version)

    def engines(self) -> list[Engine]:
        """Every engine running, retiring ones included."""
        with self._lock:
            return [s.engine for s in self._versions.values()]

    def describe(self) -> str:
        """What is served, for messages: `demo:3 (demo@prod), demo:4 (demo@candidate, 10%)`."""
        with self._lock:
            parts = []
            for r in self._routes.values():
                share = f", {self.canary_percent:g}%" if r.role == CANARY else ""
                parts.append(r.version if r.ref == r.version and not share else f"{r.version} ({r.ref}{share})")
            return ", ".join(parts)

    # --- following aliases ----------------------------------------------------------------------------------

    def poll(self) -> None:
        """Look up each followed alias once and switch the routes whose alias moved (see the module's
        docstring). Never raises: a problem is logged in one line, once."""
        from aifab.registry.models import resolve

        with self._poll_lock:
            for route in [r for r in self._routes.values() if r.follow]:
                if self.closed.is_set() or self.store is None:
                    return
                try:
                    mv = resolve(self.store, route.ref)
                except Exception as e:  # the alias was removed, the database is busy...: keep serving
                    self._once(f"cannot look up {route.ref} ({one_line(e)}); still serving {route.version}")
                    continue
                vid = f"{mv.name}:{mv.version}"
                if vid == route.version:
                    self._watch.failed.pop(route.role, None)
                elif self._watch.failed.get(route.role) != vid:
                    self._switch(route, vid)

    def _once(self, line: str) -> None:
        if line not in self._watch.problems:
            self._watch.problems.add(line)
            self.log(line)

    def _switch(self, route: Route, vid: str) -> None:
        with self._lock:
            served = self._versions.get(vid)
        if served is None:
            try:
                if self.load is None:
                    raise ServeError("this server cannot load models")
                served = Served(self.load(vid))
            except Exception as e:
                self._watch.failed[route.role] = vid
                why = one_line(e)
                self.log(f"{route.ref} moved to {vid}, which failed to load ({why}); still serving {route.version}")
                return
        with self._lock:
            if self.closed.is_set():
                served.engine.close()
                return
            self._versions.setdefault(vid, served)
            old = self._versions[route.version]
            route.version = vid
            self.log(
                f"{route.ref} moved to {vid}: serving it now; {old.loaded.id} finishes its {old.inflight} "
                "requests in flight"
            )
            self._retire_if_idle(old)

    def watch(self, interval_s: float) -> None:
        """Poll every `interval_s` seconds on a daemon thread until `close()` (nothing when no route follows)."""
        if interval_s <= 0 or not math.isfinite(interval_s):
            raise ServeError(f"--follow-interval must be a positive number of seconds, not {interval_s}")
        if not any(r.follow for r in self._routes.values()):
            return

        def loop() -> None:
            while not self.closed.wait(interval_s):
                self.poll()

        self._watch.thread = threading.Thread(target=loop, name="aifab-follow", daemon=True)
        self._watch.thread.start()

    def close(self) -> None:
        """Stop watching and close every engine (requests still running are cancelled)."""
        self.closed.set()
        for e in self.engines():
            e.close()
        thread = self._watch.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)


def check_percent(percent: float) -> None:
    if not (isinstance(percent, int | float) and math.isfinite(percent) and 0 <= percent <= 100):
        raise ServeError(f"--canary-percent must be between 0 and 100, not {percent}")


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
