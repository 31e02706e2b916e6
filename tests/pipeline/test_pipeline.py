"""Pipelines: a real tiny pipeline cached across runs, bad DAGs refused before any row is written, retries and
blocked descendants, and a train stage killed mid-run that resumes its own run from its checkpoint."""

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from aifab.errors import SpecError
from aifab.jobs import records
from aifab.jobs.control import ControlPlane, ControlSettings
from aifab.jobs.records import job_dir
from aifab.pipeline.dag import build_pipeline
from aifab.pipeline.runner import OnControl, PipelineReport, dry_run, run_pipeline
from aifab.schedule.state import Node
from aifab.spec import FactorySpec, parse_spec
from aifab.store import Store
from aifab.store.schema import DatasetVersion, Job, ModelVersion, Run, RunMetric, StageRun
from aifab.train.checkpoint import MARKER
from helpers import aifab, write_corpus

TINY = """
name: tiny
data: {{sources: [corpus], val_fraction: 0.2}}
tokenizer: {{vocab_size: 300}}
model: {{n_layer: 2, n_head: 2, d_model: 32, context_len: 32}}
training: {{steps: {steps}, seconds: null, batch_size: 4, eval_every: 3, eval_batches: 2, checkpoint_every: 3,
           warmup_steps: 1}}
evaluation: {{batches: 2, max_new_tokens: 4}}
orchestration: {{retries: 0, backoff_s: 0}}
"""


@pytest.fixture
def factory(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "corpus")
    return tmp_path / "factory.yaml"


@pytest.fixture
def control(store: Store) -> Iterator[ControlPlane]:
    cp = ControlPlane(store, ControlSettings(nodes=[Node("local", (), 4.0, 16.0)], poll_s=0.05))
    yield cp
    cp.close()


def load(path: Path, text: str) -> FactorySpec:
    path.write_text(text)
    return parse_spec(text, path)


def run(store: Store, control: ControlPlane, spec: FactorySpec, base: Path, *force: str) -> PipelineReport:
    return run_pipeline(store, build_pipeline(spec, base), OnControl(control), force)


def statuses(report: PipelineReport) -> dict[str, str]:
    return {s.name: s.status for s in report.stages}


def count(store: Store, table: Any) -> int:
    with store.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def rows(store: Store) -> dict[str, int]:
    return {t.__name__: count(store, t) for t in (StageRun, Job, DatasetVersion, Run, ModelVersion)}


# ---- caching ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_skips_every_stage_and_a_change_reruns_only_what_it_reaches(
    store: Store, control: ControlPlane, factory: Path
) -> None:
    spec = load(factory, TINY.format(steps=4))
    first = run(store, control, spec, factory.parent)
    assert first.ok and statuses(first) == dict.fromkeys(["data", "train", "evaluate", "register"], "ran")
    assert rows(store) == {"StageRun": 4, "Job": 4, "DatasetVersion": 1, "Run": 1, "ModelVersion": 1}
    with store.db.session() as s:
        assert {r.status for r in s.scalars(select(StageRun))} == {"done"}
    made = {s.name: s.outputs for s in first.stages}
    assert made["register"]["model"] == "tiny:1" and made["train"]["steps"] == 4

    second = run(store, control, spec, factory.parent)
    assert statuses(second) == dict.fromkeys(["data", "train", "evaluate", "register"], "skipped")
    assert rows(store) == {"StageRun": 4, "Job": 4, "DatasetVersion": 1, "Run": 1, "ModelVersion": 1}
    assert {s.name: s.outputs for s in second.stages} == made  # the outputs are reused as they were
    assert {s.name: s.key for s in second.stages} == {s.name: s.key for s in first.stages}
    assert all(p.status == "would-skip" for p in dry_run(store, build_pipeline(spec, factory.parent)).stages)

    # one parameter of train: it and its descendants rerun, data is reused
    changed = load(factory, TINY.format(steps=5))
    dry = dry_run(store, build_pipeline(changed, factory.parent))
    assert statuses(dry) == {
        "data": "would-skip",
        "train": "would-run",
        "evaluate": "would-run",
        "register": "would-run",
    }
    third = run(store, control, changed, factory.parent)
    assert statuses(third) == {"data": "skipped", "train": "ran", "evaluate": "ran", "register": "ran"}
    assert rows(store) == {"StageRun": 7, "Job": 7, "DatasetVersion": 1, "Run": 2, "ModelVersion": 2}
    assert {s.name: s.outputs for s in third.stages}["train"]["steps"] == 5

    # --force data: it reruns, and so does everything downstream of it
    fourth = run(store, control, changed, factory.parent, "data")
    assert statuses(fourth) == dict.fromkeys(["data", "train", "evaluate", "register"], "ran")
    assert rows(store) == {"StageRun": 11, "Job": 11, "DatasetVersion": 2, "Run": 3, "ModelVersion": 3}
    # --force register alone reruns only register (nothing is downstream of it)
    fifth = run(store, control, changed, factory.parent, "register")
    assert statuses(fifth) == {"data": "skipped", "train": "skipped", "evaluate": "skipped", "register": "ran"}


def test_outputs_gone_from_the_store_make_the_stage_run_again(
    store: Store, control: ControlPlane, factory: Path
) -> None:
    text = TINY.format(steps=3) + "stages:\n  data: {uses: data}\n"
    spec = load(factory, text)
    assert statuses(run(store, control, spec, factory.parent)) == {"data": "ran"}
    with store.db.session() as s:
        for row in s.scalars(select(DatasetVersion)):
            s.delete(row)
    assert statuses(run(store, control, spec, factory.parent)) == {"data": "ran"}


def test_the_data_stage_key_follows_its_source_files(store: Store, factory: Path) -> None:
    spec = load(factory, TINY.format(steps=3))
    before = dry_run(store, build_pipeline(spec, factory.parent)).stages[0].key
    assert dry_run(store, build_pipeline(spec, factory.parent)).stages[0].key == before
    (factory.parent / "corpus" / "new.py").write_text("def added(): return 1\n" * 5)
    assert dry_run(store, build_pipeline(spec, factory.parent)).stages[0].key != before


# ---- bad input is refused before anything runs -----------------------------------------------------------

BAD_DAGS = [
    ("stages:\n  a: {uses: command, run: [x], needs: [b]}\n  b: {uses: command, run: [x], needs: [a]}\n", "'a'"),
    ("stages:\n  a: {uses: command, run: [x], needs: [c]}\n  b: {uses: command, run: [x], needs: [a]}\n", "'c'"),
    ("stages:\n  t: {uses: train}\n", "'t'"),  # reads a data stage, and none is upstream
]


@pytest.mark.parametrize(("text", "named"), BAD_DAGS)
def test_a_bad_dag_is_refused_naming_the_stage(
    store: Store, control: ControlPlane, factory: Path, text: str, named: str
) -> None:
    with pytest.raises(SpecError, match=named) as e:
        run(store, control, load(factory, text), factory.parent)
    assert "\n" not in str(e.value)
    assert rows(store) == {"StageRun": 0, "Job": 0, "DatasetVersion": 0, "Run": 0, "ModelVersion": 0}


def test_a_cycle_message_names_its_stages(factory: Path) -> None:
    text = (
        "stages:\n  a: {uses: command, run: [x], needs: [c]}\n  b: {uses: command, run: [x], needs: [a]}\n"
        "  c: {uses: command, run: [x], needs: [b]}\n"
    )
    with pytest.raises(SpecError, match=r"cycle: a -> c -> b -> a"):
        build_pipeline(load(factory, text), factory.parent)


def test_an_oversize_request_is_refused_before_any_stage_runs(
    store: Store, control: ControlPlane, factory: Path
) -> None:
    text = TINY.format(steps=3) + (
        "stages:\n  data: {uses: data}\n"
        "  train: {uses: train, needs: [data], resources: {gpus: 2, cpus: 1, memory_gb: 1}}\n"
    )
    with pytest.raises(SpecError, match=r"stage 'train' can never run: it asks for 2 GPUs"):
        run(store, control, load(factory, text), factory.parent)
    assert rows(store)["Job"] == rows(store)["StageRun"] == 0
    # the pool of the spec itself is checked too
    pool = text.replace(
        "orchestration: {retries: 0, backoff_s: 0}",
        "orchestration: {pool: [{name: n, cpus: 8, memory_gb: 8, gpus: 1}]}",
    )
    with pytest.raises(SpecError, match=r"stage 'train' can never run"):
        run_pipeline(store, build_pipeline(load(factory, pool), factory.parent), OnControl(control), nodes=None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stages:\n  s: {uses: trian}\n", "stages.s.uses: unknown uses 'trian'"),
        ("stages:\n  s: {uses: train, needs: data}\n", "stages.s.needs: Input should be a valid list"),
        ("stages:\n  s: {uses: train, retries: -1}\n", "stages.s.retries: Input should be greater than or equal to 0"),
        ("stages:\n  s: {uses: train, backoff_s: soon}\n", "stages.s.backoff_s: Input should be a valid number"),
        ("stages:\n  s: {uses: train, with: {stpes: 3}}\n", "stages.s: with.stpes: unknown key for `uses: train`"),
        ("stages:\n  s: {uses: train, with: {steps: ten}}\n", "stages.s: with.steps: Input should be a valid integer"),
        ("stages:\n  s: {uses: command}\n", "stages.s: a `uses: command` stage needs `run:`"),
        ("stages:\n  s: {uses: data, resources: {gpus: -1}}\n", "stages.s.resources.gpus"),
        ("stages:\n  s: data\n", "stages.s: Input should be a valid dictionary"),
        ("orchestration: {policy: lifo}\n", "orchestration.policy"),
        ("orchestration: {quotas: {research: {gpus: many}}}\n", "orchestration.quotas.research.gpus"),
    ],
)
def test_malformed_stage_settings_are_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(text, tmp_path / "factory.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_cli_refuses_a_cycle_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    factory, home = tmp_path / "factory.yaml", tmp_path / "home"
    factory.write_text(BAD_DAGS[0][0])
    r = aifab("run", str(factory), home=home)
    assert r.returncode == 2 and "cycle" in r.stderr and "'a'" in r.stderr and "Traceback" not in r.stderr
    forced = aifab("run", str(factory.with_name("ok.yaml")), home=home)
    assert forced.returncode == 2 and "file not found" in forced.stderr
    store = Store(home)
    try:
        assert rows(store)["Job"] == rows(store)["StageRun"] == 0
    finally:
        store.close()


# ---- failure, retries, resume -----------------------------------------------------------------------------

FLAKY = """
stages:
  flaky:  {{uses: command, retries: 1, backoff_s: 0, run: [{py}, -c, "{flaky}"]}}
  after_flaky: {{uses: command, needs: [flaky], retries: 0, run: [{py}, -c, "pass"]}}
  broken: {{uses: command, retries: 2, backoff_s: 0, run: [{py}, -c, "import sys; sys.exit(3)"]}}
  after_broken: {{uses: command, needs: [broken], run: [{py}, -c, "pass"]}}
  last: {{uses: command, needs: [after_broken, after_flaky], run: [{py}, -c, "pass"]}}
"""


def test_a_failing_stage_is_retried_then_fails_and_its_descendants_do_not_run(
    store: Store, control: ControlPlane, factory: Path
) -> None:
    flaky = "import os, sys; sys.exit(0 if os.environ['AIFAB_JOB_ATTEMPT'] == '2' else 1)"
    spec = load(factory, FLAKY.format(py=sys.executable, flaky=flaky))
    report = run(store, control, spec, factory.parent)
    assert not report.ok
    assert statuses(report) == {
        "flaky": "ran",
        "after_flaky": "ran",
        "broken": "failed",
        "after_broken": "blocked",
        "last": "blocked",
    }
    by_name = {s.name: s for s in report.stages}
    with store.db.session() as s:
        jobs = {j.name: j for j in s.scalars(select(Job))}
        runs = {r.stage: r for r in s.scalars(select(StageRun))}
    assert jobs["demo.flaky"].attempts == 2  # one retry, then it succeeded
    assert jobs["demo.broken"].attempts == 3 and jobs["demo.broken"].status == "failed"  # 1 + 2 retries
    assert set(runs) == {"flaky", "after_flaky", "broken"}  # the blocked stages never got a row or a job
    assert runs["broken"].status == "failed" and by_name["broken"].job_id == jobs["demo.broken"].id
    assert "after_broken" not in {j.removeprefix("demo.") for j in jobs}

    # the failure is not cached: the next run retries the failed stage and skips the good ones
    again = run(store, control, spec, factory.parent)
    assert statuses(again)["flaky"] == "skipped" and statuses(again)["broken"] == "failed"


CRASH_STEPS = 400
CRASH = f"""
name: crashy
data: {{sources: [corpus], val_fraction: 0.2}}
tokenizer: {{vocab_size: 300}}
model: {{n_layer: 2, n_head: 2, d_model: 32, context_len: 32}}
training: {{steps: {CRASH_STEPS}, seconds: null, batch_size: 4, eval_every: 50, eval_batches: 2,
           checkpoint_every: 5, warmup_steps: 5}}
stages:
  data: {{uses: data, retries: 0}}
  train: {{uses: train, needs: [data], retries: 1, backoff_s: 0}}
"""


def complete_steps(runs: Path) -> list[int]:
    out = []
    for ckpt in runs.glob("*/checkpoints/step-*"):
        if (ckpt / MARKER).exists():
            out.append(int(ckpt.name[5:]))
    return out


@pytest.mark.slow
def test_a_train_stage_killed_mid_run_is_retried_and_resumes_its_run_from_the_checkpoint(
    store: Store, control: ControlPlane, factory: Path
) -> None:
    spec = load(factory, CRASH)
    result: dict[str, PipelineReport] = {}
    runner = threading.Thread(target=lambda: result.update(r=run(store, control, spec, factory.parent)))
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while max(complete_steps(store.home / "work" / "runs"), default=0) < 10:
            assert runner.is_alive() and time.monotonic() < deadline, "training ended before it could be killed"
            time.sleep(0.002)
        newest = max(int(p.name) for p in (store.home / "jobs").iterdir())  # the train stage's job: data's is done
        train_launch = json.loads((job_dir(store.home, newest) / "launch.json").read_text())
        os.kill(train_launch["child_pid"], signal.SIGKILL)  # the stage process itself, as a crash would
    finally:
        runner.join(timeout=300)
    report = result["r"]
    assert report.ok, report.to_dict()
    train = {s.name: s for s in report.stages}["train"]
    with store.db.session() as s:
        (run_row,) = s.scalars(select(Run)).all()  # one run, continued: not a second one from scratch
        job = s.get(Job, train.job_id)
        steps = sorted(m.step for m in s.scalars(select(RunMetric).where(RunMetric.key == "train_loss")))
    assert job is not None and job.attempts == 2 and job.status == "succeeded"
    assert train.outputs["run_id"] == run_row.id and run_row.status == "completed"
    assert train.outputs["resumed_from_step"] >= 10 and train.outputs["steps"] == CRASH_STEPS
    assert steps == list(range(1, CRASH_STEPS + 1))  # every step once: none lost, none doubled
    log = (job_dir(store.home, job.id) / "job.log").read_text()
    assert f"resuming run {run_row.id} from step {train.outputs['resumed_from_step']}" in log


# ---- against a running controller -----------------------------------------------------------------------------

TWO_STEPS = """
name: two-steps
stages:
  first:  {{uses: command, run: [{py}, -c, "print('first')"]}}
  second: {{uses: command, needs: [first], run: [{py}, -c, "print('second')"]}}
"""


def test_aifab_run_submits_to_the_running_controller(tmp_path: Path) -> None:
    """While `aifab controller` holds the store, `aifab run` sends its stages to it (an embedded control plane
    could not take the store's lock); the second run skips both stages."""
    import subprocess

    from aifab.jobs.service import CONTROLLER_FILE
    from helpers import cli_env

    home = tmp_path / "home"
    factory = tmp_path / "factory.yaml"
    factory.write_text(TWO_STEPS.format(py=sys.executable))
    proc = subprocess.Popen(
        [sys.executable, "-m", "aifab", "controller", "--port", "0"],
        env=cli_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (home / CONTROLLER_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (home / CONTROLLER_FILE).exists(), "the controller did not start"
        first = aifab("run", str(factory), "--json", home=home)
        assert first.returncode == 0, first.stderr
        assert {s["stage"]: s["status"] for s in json.loads(first.stdout.splitlines()[-1])["stages"]} == {
            "first": "ran",
            "second": "ran",
        }
        again = aifab("run", str(factory), "--json", home=home)
        assert again.returncode == 0, again.stderr
        assert {s["status"] for s in json.loads(again.stdout.splitlines()[-1])["stages"]} == {"skipped"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    store = Store(home)
    try:
        with store.db.session() as s:
            logs = [Path(j.log_path or "").read_text() for j in s.scalars(select(Job).order_by(Job.id))]
    finally:
        store.close()
    assert len(logs) == 2 and "first" in logs[0] and "second" in logs[1]


def test_a_stage_starts_when_its_own_inputs_end_not_when_earlier_stages_do(
    store: Store, control: ControlPlane, tmp_path: Path
) -> None:
    """`slow` and `fast` run at once; `after_fast` starts as soon as `fast` ends, while `slow` still runs."""
    spec = load(
        tmp_path / "factory.yaml",
        f"""
stages:
  slow:       {{uses: command, run: [{sys.executable}, -c, "import time; time.sleep(8)"]}}
  fast:       {{uses: command, run: [{sys.executable}, -c, "pass"]}}
  after_fast: {{uses: command, needs: [fast], run: [{sys.executable}, -c, "pass"]}}
""",
    )
    report = run(store, control, spec, tmp_path)
    assert statuses(report) == {"slow": "ran", "fast": "ran", "after_fast": "ran"}
    job = {s.name: s.job_id for s in report.stages}
    slow_end = {e.event: e.at for e in records.events(store, job["slow"] or 0)}["succeeded"]
    after_start = {e.event: e.at for e in records.events(store, job["after_fast"] or 0)}["placed"]
    assert after_start < slow_end
