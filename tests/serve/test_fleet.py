"""Several versions behind one server (`serve.fleet`): an alias that moves under load switches versions without
failing a request, a canary takes its share, a request may pin a version, and /metrics and the ledger tell the
versions apart.

The store holds `tiny:1` (the trained tiny model, `tiny@prod`), `tiny:2` (random weights of the same shape,
`tiny@candidate`) and `tiny:3` (weights that do not load); greedy text tells 1 and 2 apart, and each answer is
checked against its version's single-sequence reference."""

import gc
import re
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from aifab.nn.generate import generate
from aifab.nn.sampling import SamplingParams
from aifab.registry.models import set_alias
from aifab.serve.api import create_app
from aifab.serve.engine import Engine
from aifab.serve.fleet import CANARY, PRIMARY, Fleet, Route, UnknownModel, WeightedChoice
from aifab.serve.launch import EngineSettings, build_engine, start_engine
from aifab.serve.loaded import LoadedModel
from aifab.serve.metering import new_deployment_id
from aifab.serve.metrics import MetricFamilies
from aifab.store import Store
from aifab.store.schema import LedgerEntry
from aifab.web import BackgroundServer
from serving import WAIT_S, assert_error, two_versions, wait_until

PROMPTS = ["def function_", "return value", "class", "if other is None"]
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def store(trained: tuple[Store, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = two_versions(trained, tmp_path_factory.mktemp("fleet") / "home")
    yield s
    s.close()


@pytest.fixture(autouse=True)
def aliases(store: Store) -> None:
    """Each test starts with prod on 1 and candidate on 2 (tests move them)."""
    set_alias(store, "tiny:1", "prod")
    set_alias(store, "tiny:2", "candidate")


@pytest.fixture(scope="module")
def references(store: Store) -> dict[str, dict[str, str]]:
    """version -> prompt -> its greedy text, from single-sequence generation (`nn.generate`)."""
    refs = {}
    for vid in ("tiny:1", "tiny:2"):
        lm = LoadedModel.load(store, vid)
        refs[vid] = {p: greedy_text(lm, p) for p in PROMPTS}
    assert refs["tiny:1"] != refs["tiny:2"], "the two versions must answer differently for the test to mean anything"
    return refs


def greedy_text(lm: LoadedModel, prompt: str) -> str:
    out = []
    for t in generate(lm.model, [*lm.prefix_ids, *lm.encode(prompt)], SamplingParams(MAX_TOKENS, temperature=0)):
        if t in lm.stop_ids:
            break
        out.append(t)
    text: str = lm.tokenizer.decode(out)
    return text


class Harness:
    """A fleet over the test store, its app on a free port, and what it logged."""

    def __init__(self, store: Store, primary: str, max_batch: int = 8, **kw: Any) -> None:
        self.families, self.lines = MetricFamilies(), list[str]()
        self.deployment = new_deployment_id()  # this harness's ledger rows (the store is the module's)
        settings = EngineSettings(max_queue=256, max_batch=max_batch, deployment=self.deployment)
        self.loads: list[str] = []
        self.answered: list[str] = []  # the version of each answer, as they come

        def load(vid: str) -> Engine:
            self.loads.append(vid)
            return start_engine(lambda: build_engine(store, vid, settings, self.families))

        self.fleet = Fleet.open(store, load, primary, metrics=self.families, log=self.lines.append, **kw)
        self.server = BackgroundServer(create_app(self.fleet))

    def __enter__(self) -> "Harness":
        self.server.__enter__()
        self.client = httpx.Client(base_url=self.server.url, timeout=WAIT_S)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.__exit__()
        self.fleet.close()

    def ask(self, model: str, prompt: str = PROMPTS[0], path: str = "/v1/completions") -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0}
        body |= {"prompt": prompt} if path == "/v1/completions" else {"messages": [{"role": "user", "content": prompt}]}
        r = self.client.post(path, json=body)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        self.answered.append(out["model"])
        return out

    def many(self, model: str, n: int, start: int = 0, workers: int = 16) -> list[tuple[str, str, str]]:
        """n concurrent completions; (prompt, answering version, text) of each."""

        def one(i: int) -> tuple[str, str, str]:
            prompt = PROMPTS[i % len(PROMPTS)]
            data = self.ask(model, prompt)
            return prompt, data["model"], data["choices"][0]["text"]

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, range(start, start + n)))


def check_answers(answers: list[tuple[str, str, str]], refs: dict[str, dict[str, str]]) -> dict[str, int]:
    """Every answer is its version's greedy text for its prompt; the count per version."""
    for prompt, version, text in answers:
        assert text == refs[version][prompt], (version, prompt)
    return {v: sum(1 for _, got, _ in answers if got == v) for v in refs}


def gated(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold every step of `engine` until the returned event is set, so its requests stay in flight."""
    gate, execute = threading.Event(), engine._execute

    def held(step: Any) -> Any:
        assert gate.wait(WAIT_S)
        return execute(step)

    monkeypatch.setattr(engine, "_execute", held)
    return gate


# --- the switch -------------------------------------------------------------------------------------------------


def test_an_alias_moved_under_load_fails_no_request(
    store: Store, references: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 requests are in flight on tiny:1 (its steps held) when prod moves to tiny:2; 180 more follow. All 200
    succeed, the 20 from tiny:1 and the 180 from tiny:2, and tiny:1 stops once its last one is answered."""
    with Harness(store, "tiny@prod") as h:
        [old] = h.fleet.engines()
        gate = gated(old, monkeypatch)
        with ThreadPoolExecutor(20) as pool:
            before = pool.submit(h.many, "tiny@prod", 20, 0, 20)
            wait_until(lambda: old.running + old.queue.qsize() == 20, "20 requests in flight on tiny:1")
            set_alias(store, "tiny:2", "prod")
            h.fleet.poll()
            assert h.fleet.route(PRIMARY).version == "tiny:2"  # type: ignore[union-attr]
            assert not old.stopped.is_set()  # it still owes 20 answers
            after = h.many("tiny@prod", 180, 20)  # answered by tiny:2 while tiny:1 is held
            gate.set()
            answers = before.result(WAIT_S) + after
        assert check_answers(answers, references) == {"tiny:1": 20, "tiny:2": 180}
        assert old.stopped.wait(WAIT_S)  # closed once its requests were done, and its loop ended
        assert [lm.id for lm in h.fleet.served()] == ["tiny:2"]
        assert [e.loaded.id for e in h.fleet.engines()] == ["tiny:2"]
        assert h.lines == [
            "tiny@prod moved to tiny:2: serving it now; tiny:1 finishes its 20 requests in flight",
            "tiny:1 finished its requests and stopped",
        ]
        assert [m["id"] for m in h.client.get("/v1/models").json()["data"]] == ["tiny:2"]
        text = h.client.get("/metrics").text
        assert metric(text, "aifab_requests_total", "tiny:1") == 20  # the stopped version's counts stay
        assert metric(text, "aifab_requests_total", "tiny:2") == 180
        assert 'aifab_running_requests{model="tiny:1"}' not in text  # its gauges went with its engine
        assert 'aifab_running_requests{model="tiny:2"}' in text


def test_the_watcher_switches_under_free_running_load(store: Store, references: dict[str, dict[str, str]]) -> None:
    """The watcher thread (not the test) sees the alias move while 200 concurrent requests run; none fails and
    each is answered by exactly one version, with its tokens."""
    with Harness(store, "tiny@prod") as h:
        [old] = h.fleet.engines()
        h.fleet.watch(0.05)
        with ThreadPoolExecutor(1) as pool:
            load = pool.submit(h.many, "tiny@prod", 200)
            wait_until(lambda: len(h.answered) >= 50, "the first 50 answers")
            set_alias(store, "tiny:2", "prod")
            answers = load.result(WAIT_S * 4)
        counts = check_answers(answers, references)
        assert sum(counts.values()) == 200 and counts["tiny:1"] >= 50 and counts["tiny:2"] > 0
        wait_until(old.stopped.is_set, "tiny:1 to stop")


def test_a_replaced_version_is_freed(store: Store) -> None:
    """Once stopped, nothing holds the old version's model: its memory goes back."""
    with Harness(store, "tiny@prod") as h:
        h.ask("tiny@prod")
        [old] = h.fleet.engines()
        stopped, model = old.stopped, weakref.ref(old.loaded.model)
        del old
        set_alias(store, "tiny:2", "prod")
        h.fleet.poll()
        assert stopped.wait(WAIT_S)
        wait_until(lambda: gc.collect() >= 0 and model() is None, "tiny:1's model to be freed")


@pytest.mark.gpu
def test_on_cuda_a_version_captures_its_graphs_while_the_old_one_serves(store: Store) -> None:
    """On CUDA each engine captures its decode graphs as it is built, so the new version captures while the old
    one runs steps on its own thread: 400 requests across the switch, none fails. (Token equality with the
    reference is the CPU tests' business: bf16 batched and single-sequence logits may differ in a near-tie.)"""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with Harness(store, "tiny@prod", max_batch=64) as h:
        [old] = h.fleet.engines()
        assert old.loaded.device.type == "cuda" and old.graphs is not None
        h.fleet.watch(0.01)
        with ThreadPoolExecutor(1) as pool:
            load = pool.submit(h.many, "tiny@prod", 400, 0, 32)
            wait_until(lambda: len(h.answered) >= 50, "the first 50 answers")
            set_alias(store, "tiny:2", "prod")
            answers = load.result(WAIT_S * 4)
        assert len(answers) == 400 and {v for _, v, _ in answers} == {"tiny:1", "tiny:2"}
        wait_until(old.stopped.is_set, "tiny:1 to stop")


def test_a_version_that_fails_to_load_is_logged_once_and_the_old_one_serves_on(
    store: Store, references: dict[str, dict[str, str]]
) -> None:
    with Harness(store, "tiny@prod") as h:
        set_alias(store, "tiny:3", "prod")
        h.fleet.poll()
        h.fleet.poll()  # not tried again while the alias stays on it
        assert h.loads == ["tiny:1", "tiny:3"]
        [line] = h.lines
        assert line.startswith("tiny@prod moved to tiny:3, which failed to load (")
        assert line.endswith("; still serving tiny:1") and "\n" not in line
        assert h.ask("tiny@prod")["model"] == "tiny:1"
        set_alias(store, "tiny:2", "prod")  # a good version next: switched to
        h.fleet.poll()
        assert h.loads == ["tiny:1", "tiny:3", "tiny:2"]
        assert h.ask("tiny@prod")["model"] == "tiny:2"


def test_a_version_never_switches(store: Store) -> None:
    with Harness(store, "tiny:1", canary="tiny@candidate", follow=False) as h:
        set_alias(store, "tiny:1", "candidate")
        h.fleet.poll()
        assert h.fleet.route(PRIMARY) == Route(PRIMARY, "tiny:1", False, "tiny:1")
        assert h.fleet.route(CANARY) == Route(CANARY, "tiny@candidate", False, "tiny:2")  # follow=False
        assert h.lines == [] and h.loads == ["tiny:1", "tiny:2"]
        assert h.ask("tiny:1")["model"] == "tiny:1"


def test_an_alias_that_comes_back_reuses_the_engine_still_serving(store: Store) -> None:
    """Canary and primary on the same version share one engine; when prod moves to the canary's version, no
    version is loaded: the canary's engine serves both routes."""
    with Harness(store, "tiny@prod", canary="tiny@candidate", canary_percent=50) as h:
        assert h.loads == ["tiny:1", "tiny:2"]
        set_alias(store, "tiny:2", "prod")
        h.fleet.poll()
        assert h.loads == ["tiny:1", "tiny:2"]
        assert {h.ask("tiny@prod")["model"] for _ in range(4)} == {"tiny:2"}
        assert [lm.id for lm in h.fleet.served()] == ["tiny:2"]


def test_the_canary_alias_is_followed_too(store: Store) -> None:
    with Harness(store, "tiny@prod", canary="tiny@candidate", canary_percent=50) as h:
        [_, canary] = h.fleet.engines()
        set_alias(store, "tiny:1", "candidate")
        h.fleet.poll()
        assert h.fleet.route(CANARY).version == "tiny:1"  # type: ignore[union-attr]
        assert canary.stopped.wait(WAIT_S)  # tiny:2 served nothing any more
        assert {h.ask("tiny")["model"] for _ in range(4)} == {"tiny:1"}
        assert h.lines[-1] == "tiny:2 finished its requests and stopped"


# --- the canary ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("percent", [10, 12.5, 33.3, 50, 0.1, 99.9, 0, 100])
def test_the_split_is_within_one_request_of_the_share_after_every_request(percent: float) -> None:
    choice = WeightedChoice({PRIMARY: 100 - percent, CANARY: percent})
    picks = [choice.next() for _ in range(1000)]
    canary = 0
    for n, pick in enumerate(picks, 1):
        canary += pick == CANARY
        assert abs(canary - n * percent / 100) < 1, (n, canary)
    again = WeightedChoice({PRIMARY: 100 - percent, CANARY: percent})
    assert [again.next() for _ in range(1000)] == picks  # deterministic


@pytest.mark.parametrize("weights", [{}, {"a": 0.0}, {"a": -1.0, "b": 2.0}, {"a": float("nan")}])
def test_bad_weights_are_refused(weights: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="weights"):
        WeightedChoice(weights)


def test_the_canary_gets_its_share_and_metrics_and_ledger_tell_versions_apart(
    store: Store, references: dict[str, dict[str, str]]
) -> None:
    with Harness(store, "tiny@prod", canary="tiny@candidate", canary_percent=25) as h:
        answers = h.many("tiny@prod", 200)
        counts = check_answers(answers, references)
        assert counts == {"tiny:1": 150, "tiny:2": 50}  # 25% of 200, to within one (here exact)
        cards = h.client.get("/v1/models").json()["data"]
        assert [c["id"] for c in cards] == ["tiny:1", "tiny:2"]
        text = h.client.get("/metrics").text
        engines, deployment = h.fleet.engines(), h.deployment
    for vid, n in counts.items():
        assert metric(text, "aifab_requests_total", vid) == n
        assert metric(text, "aifab_time_to_first_token_seconds_count", vid) == n
        assert metric(text, "aifab_energy_joules_total", vid, 'kind="requests"') > 0
    for e in engines:
        assert e.stopped.wait(WAIT_S)  # closed: its meter flushed to the ledger as the loop ended
    with store.db.session() as s:
        rows = s.execute(
            select(LedgerEntry.subject_id, func.count())
            .where(LedgerEntry.stage == "serve", LedgerEntry.deployment == deployment)
            .group_by(LedgerEntry.subject_id)
        ).all()
    assert dict(rows) == {"1": counts["tiny:1"], "2": counts["tiny:2"]}  # model version ids 1 and 2


def metric(text: str, name: str, version: str, extra: str = "") -> float:
    """The sum of `name`'s samples for `version` (and `extra`, a label="value" pair) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and f'model="{version}"' in m[1] and extra in m[1]:
            total += float(m[2])
    return total


def test_a_request_may_pin_a_served_version(store: Store, references: dict[str, dict[str, str]]) -> None:
    with Harness(store, "tiny@prod", canary="tiny@candidate", canary_percent=50) as h:
        for vid in ("tiny:1", "tiny:2"):
            assert {h.ask(vid, p)["choices"][0]["text"] == references[vid][p] for p in PROMPTS} == {True}
            assert {h.ask(vid, p)["model"] for p in PROMPTS} == {vid}
            assert h.ask(vid, path="/v1/chat/completions")["model"] == vid
            batch = {"model": vid, "prompt": PROMPTS[:2], "max_tokens": MAX_TOKENS, "temperature": 0}
            data = h.client.post("/v1/completions", json=batch).json()  # one version answers a whole batch
            assert data["model"] == vid and [c["text"] for c in data["choices"]] == [
                references[vid][p] for p in PROMPTS[:2]
            ]
        assert {h.ask("tiny@candidate")["model"] for _ in range(4)} == {"tiny:2"}  # the canary's own ref
        assert {h.ask("tiny")["model"] for _ in range(4)} == {"tiny:1", "tiny:2"}  # the bare name: the split
        r = h.client.post("/v1/completions", json={"model": "tiny:3", "prompt": "def"})
        assert_error(r, 400, "model")
        assert "tiny:1 (tiny@prod), tiny:2 (tiny@candidate, 50%)" in r.json()["error"]["message"]


def test_pick_refuses_what_is_not_served(store: Store) -> None:
    with Harness(store, "tiny@prod") as h:
        for model in ("tiny:2", "tiny@candidate", "other", ""):
            with pytest.raises(UnknownModel, match="this server serves tiny:1 \\(tiny@prod\\)"):
                h.fleet.pick(model)


def test_a_request_that_ends_before_its_engine_is_reached_still_lets_its_version_retire(store: Store) -> None:
    """A 400 found after the version is picked (a prompt too long for it) releases the pick."""
    with Harness(store, "tiny@prod") as h:
        [old] = h.fleet.engines()
        r = h.client.post("/v1/completions", json={"model": "tiny@prod", "prompt": "def " * 40})
        assert_error(r, 400, "prompt")
        set_alias(store, "tiny:2", "prod")
        h.fleet.poll()
        assert old.stopped.wait(WAIT_S)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"canary_percent": 101}, "--canary-percent must be between 0 and 100"),
        ({"canary_percent": float("nan")}, "--canary-percent must be between 0 and 100"),
        ({"canary_percent": 10}, "--canary-percent needs --canary"),
    ],
)
def test_open_refuses_bad_canary_settings(store: Store, kw: dict[str, Any], message: str) -> None:
    from aifab.errors import ServeError

    def load(vid: str) -> Engine:
        raise AssertionError(f"{vid} loaded: the settings should be refused first")

    with pytest.raises(ServeError, match=message):
        Fleet.open(store, load, "tiny@prod", **kw)


def test_create_app_still_takes_one_engine(loaded: LoadedModel) -> None:
    engine = Engine(loaded)
    try:
        fleet = Fleet.single(engine)
        assert [lm.id for lm in fleet.served()] == ["tiny:1"] and fleet.describe() == "tiny:1"
        assert fleet.metrics.registry is engine.metrics.registry
        fleet.poll()  # follows nothing
    finally:
        engine.close()
