"""evaluate_model end to end on registered models: results stored per (task, metric) and read back, the run and
its lineage and ledger row, context overflow reported, and every bad input refused before the model loads."""

from pathlib import Path

import pytest
from sqlalchemy import select

from aifab.errors import AifabError, NotFound
from aifab.evaluate.harness import evaluate_model
from aifab.evaluate.lm import EvalModel
from aifab.evaluate.results import latest_results
from aifab.evaluate.tasks import TaskError, render_examples
from aifab.store import Store
from aifab.store.schema import EvalResult, LedgerEntry, LineageEdge, Run
from evalkit import counting_model, curated_dataset, register_model, write_task

LL = """
    name: counting
    output_type: loglikelihood
    dataset: {path: data.jsonl}
    input: "{{ c }}"
    target: "{{ t }}"
    target_delimiter: ""
    metrics: [acc, perplexity]
"""
ROWS = [{"c": "abc", "t": "def"}, {"c": "mno", "t": "pqz"}, {"c": "abcdefghijklmnopqrstuvwxyz", "t": "ab"}]


def rows_of(store: Store, model_version_id: int) -> list[EvalResult]:
    with store.db.session() as s:
        return list(s.scalars(select(EvalResult).where(EvalResult.model_version_id == model_version_id)))


def test_results_are_recorded_with_the_run_lineage_and_ledger(store: Store, tmp_path: Path) -> None:
    ref = register_model(store, counting_model(), "count")
    report = evaluate_model(store, ref, task_files=[write_task(tmp_path, LL, ROWS)], progress=False)
    assert report.model == "count:1" and [r.metric for r in report.results] == ["acc", "perplexity"]
    acc = report.results[0]
    assert acc.value == pytest.approx(2 / 3) and acc.examples == 3 and acc.stderr is not None and acc.suite is None
    assert any("1 of 3 examples do not fit the 16-token context: cut on the left" in n for n in report.notes)
    stored = rows_of(store, report.model_version_id)
    assert {(r.task, r.metric) for r in stored} == {("counting", "acc"), ("counting", "perplexity")}
    assert all(r.run_id == report.run_id and len(r.task_digest) == 64 and r.energy_j >= 0 for r in stored)
    assert stored[0].details["truncated"] == 1 and stored[0].details["examples"] == 3
    with store.db.session() as s:
        run = s.get(Run, report.run_id)
        assert run is not None and run.kind == "evaluate" and run.status == "completed" and run.elapsed_s
        edges = {(e.src_kind, e.src_id, e.relation) for e in s.scalars(select(LineageEdge).where(
            LineageEdge.dst_kind == "run", LineageEdge.dst_id == report.run_id))}  # fmt: skip
        assert edges == {("model", str(report.model_version_id), "evaluated_by")}
        ledger = list(s.scalars(select(LedgerEntry).where(LedgerEntry.subject_id == report.run_id)))
        assert [(e.stage, e.subject_kind) for e in ledger] == [("evaluate", "run")]
        assert ledger[0].energy_j == pytest.approx(report.energy_j)
    got = latest_results(store, report.model_version_id)
    assert got[("counting", "acc")] == acc


def test_latest_results_are_the_newest_of_each_metric(store: Store, tmp_path: Path) -> None:
    ref = register_model(store, counting_model(), "count")
    first = evaluate_model(store, ref, task_files=[write_task(tmp_path, LL, ROWS)], progress=False)
    second = evaluate_model(store, ref, task_files=[write_task(tmp_path, LL, ROWS[:2])], progress=False)
    latest = latest_results(store, first.model_version_id)
    assert latest[("counting", "acc")].value == 0.5 and latest[("counting", "acc")] == second.results[0]
    assert latest[("counting", "acc")].task_digest != first.results[0].task_digest  # other data, other task
    assert len(rows_of(store, first.model_version_id)) == 4  # the older rows stay
    assert latest_results(store, 999) == {}
    limited = evaluate_model(store, ref, task_files=[write_task(tmp_path, LL, ROWS)], limit=1, progress=False)
    assert limited.results[0].examples == 1 and limited.results[0].task_digest != first.results[0].task_digest


def test_the_heldout_and_code_suites_on_a_registered_model(store: Store, problems: Path) -> None:
    texts = [f"line one of {i}\nline two of {i}\n    indented three {i}\n    indented four {i}" for i in range(30)]
    ds = curated_dataset(store, texts, val_fraction=0.5)
    ref = register_model(store, counting_model(), "count", dataset_version_id=ds.id)
    report = evaluate_model(store, ref, progress=False)  # the standard suites
    got = {(r.task, r.metric): r for r in report.results}
    assert set(got) == {
        ("heldout-bpb", "bits_per_byte"), ("heldout-bpb", "perplexity"), ("heldout-next-line", "acc"),
        ("heldout-next-line", "acc_norm"), ("python-code", "exact_match"), ("python-code", "pass@1"),
    }  # fmt: skip
    assert got[("heldout-bpb", "bits_per_byte")].suite == "heldout"
    # the counting model completes "x = (" with "1)": right for the first problem only
    assert got[("python-code", "exact_match")].value == pytest.approx(1 / 3)
    assert got[("python-code", "pass@1")].value == pytest.approx(1 / 3)
    with store.db.session() as s:
        edges = {(e.src_kind, e.relation) for e in s.scalars(select(LineageEdge).where(
            LineageEdge.dst_kind == "run", LineageEdge.dst_id == report.run_id))}  # fmt: skip
    assert edges == {("model", "evaluated_by"), ("dataset", "evaluated_on")}
    only_code = evaluate_model(store, ref, suites=["python-code"], progress=False)
    assert {r.task for r in only_code.results} == {"python-code"}


def test_bad_inputs_are_refused_before_the_model_loads(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = register_model(store, counting_model(), "count")

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(EvalModel, "load", no_load)
    bad = write_task(tmp_path, LL.replace("{{ c }}", "{{ missing }}"), ROWS)
    with pytest.raises(TaskError, match=r"task.yaml:4: input: row 1: template fails: 'missing' is undefined"):
        evaluate_model(store, ref, task_files=[bad], progress=False)
    later_row = write_task(
        tmp_path, LL.replace("{{ t }}", "{{ t.x }}"), [{"c": "a", "t": {"x": "b"}}, {"c": "a", "t": "b"}]
    )
    with pytest.raises(TaskError, match="row 2"):
        evaluate_model(store, ref, task_files=[later_row], progress=False)
    with pytest.raises(AifabError, match=r"unknown suite 'nope' \(built-in suites: heldout, python-code\)"):
        evaluate_model(store, ref, suites=["nope"], progress=False)
    with pytest.raises(AifabError, match="has no training dataset in its lineage: name one with --dataset"):
        evaluate_model(store, ref, suites=["heldout"], progress=False)
    with pytest.raises(NotFound, match="unknown dataset 'nope'"):
        evaluate_model(store, ref, suites=["heldout"], dataset="nope", progress=False)
    with pytest.raises(NotFound, match="unknown model"):
        evaluate_model(store, "ghost:1", task_files=[bad], progress=False)
    with pytest.raises(AifabError, match="--limit must be a positive"):
        evaluate_model(store, ref, task_files=[bad], limit=0, progress=False)
    with store.db.session() as s:
        assert s.scalars(select(Run)).first() is None  # nothing was started


def test_a_task_that_cannot_run_fails_the_run_and_stores_no_result(store: Store, tmp_path: Path) -> None:
    ref = register_model(store, counting_model(), "count")
    long = write_task(tmp_path, LL, [{"c": "a", "t": "b" * 40}])
    with pytest.raises(AifabError, match="none of its examples fit the model's context"):
        evaluate_model(store, ref, task_files=[long], progress=False)
    with store.db.session() as s:
        run = s.scalars(select(Run)).one()
        assert run.status == "failed" and "none of its examples fit" in (run.error or "")
        assert s.scalars(select(EvalResult)).first() is None


def test_the_shipped_code_problems_pass_with_their_canonical_bodies_only() -> None:
    from aifab.evaluate.runners import run_code, same_text
    from aifab.evaluate.suites import python_code_task

    task = python_code_task()
    assert len(task.rows) == 40 and task.spec.metric_names() == ["exact_match", "pass@1"]
    examples = render_examples(task, 3)
    canonical = [[ex.target or ""] for ex in examples]
    assert run_code(task, examples, canonical) == [1, 1, 1]
    assert run_code(task, examples, [["    pass\n"]] * 3) == [0, 0, 0]
    assert all(same_text(ex.target or "", "\n" + (ex.target or "") + "  \n\n") for ex in examples)
