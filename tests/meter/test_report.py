"""`aifab ledger --by ...` and a model version's footprint, over ledger rows and lineage with known numbers.

The store holds a base model and a model fine-tuned from it, and an unrelated model whose tokenizer the
fine-tuning data borrowed:

    ds base-data:1 (100 J, an estimate) -> run r-base (train 1000 J, evaluate 50 J) -> model base:1
        serving base:1: 10 J serve + 5 J serve-idle, deployment dep-aaaa0001
    ds ft-data:1 (20 J) -> parent of ft-data:2 (30 J) -> run r-ft (train 200 J, evaluate 7 J) -> model ft:1,
        fine_tuned from base:1; serving ft:1: 3 J + 3 J on dep-bbbb0002, 4 J with no deployment
    run r-other (train 5000 J) -> model other:1, which lent its tokenizer to ft-data:2 (not part of its making)

cost_usd = energy_j / 1000, co2_g = energy_j / 10, device_s = energy_j / 100, tokens_in = 1 per row,
tokens_out = energy_j (as an int), so every sum can be checked from the energies.
"""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from aifab.errors import AifabError
from aifab.meter.report import (
    GROUPINGS,
    LedgerReport,
    LedgerRow,
    Sums,
    ledger_report,
    model_footprint,
    model_footprints,
    serving_energy,
)
from aifab.store import Store
from aifab.store.lineage import link
from aifab.store.schema import LedgerEntry, ModelVersion, Run
from helpers import aifab, dataset_row

# (stage, subject kind, subject id, energy J, estimated, deployment)
ROWS = [
    ("data", "dataset", "1", 100.0, True, None),
    ("train", "run", "r-base", 1000.0, False, None),
    ("evaluate", "run", "r-base", 50.0, False, None),
    ("serve", "model", "1", 10.0, False, "dep-aaaa0001"),
    ("serve-idle", "model", "1", 5.0, False, "dep-aaaa0001"),
    ("data", "dataset", "2", 20.0, False, None),
    ("data", "dataset", "3", 30.0, False, None),
    ("train", "run", "r-ft", 200.0, False, None),
    ("evaluate", "run", "r-ft", 7.0, False, None),
    ("serve", "model", "2", 3.0, False, "dep-bbbb0002"),
    ("serve", "model", "2", 3.0, False, "dep-bbbb0002"),
    ("serve", "model", "2", 4.0, False, None),
    ("train", "run", "r-other", 5000.0, False, None),
]
TOTAL_J = sum(r[3] for r in ROWS)  # 6432


def _model(name: str, run_id: str) -> ModelVersion:
    return ModelVersion(
        name=name, version=1, run_id=run_id, weights_digest="c" * 64, tokenizer_digest="d" * 64, params_count=10
    )


@pytest.fixture
def ledger_store(store: Store) -> Store:
    with store.db.session() as s:
        s.add_all(
            [
                dataset_row(name="base-data", version=1),  # id 1
                dataset_row(name="ft-data", version=1),  # id 2
                dataset_row(name="ft-data", version=2, parent_id=2),  # id 3
            ]
        )
        s.flush()
        for run_id, ds in (("r-base", 1), ("r-ft", 3), ("r-other", None)):
            s.add(Run(id=run_id, kind="train", status="completed", dataset_version_id=ds))
        s.flush()
        s.add_all([_model("base", "r-base"), _model("ft", "r-ft"), _model("other", "r-other")])  # ids 1, 2, 3
        s.flush()
        # the edges as the line writes them (data/ingest.py, train/trainer.py, registry/models.py)
        link(s, ("dataset", 1), ("run", "r-base"), "input")
        link(s, ("run", "r-base"), ("model", 1), "produced")
        link(s, ("dataset", 1), ("model", 1), "trained_on")
        link(s, ("dataset", 2), ("dataset", 3), "parent")
        link(s, ("model", 3), ("dataset", 3), "tokenizer")
        link(s, ("dataset", 3), ("run", "r-ft"), "input")
        link(s, ("run", "r-ft"), ("model", 2), "produced")
        link(s, ("dataset", 3), ("model", 2), "trained_on")
        link(s, ("model", 1), ("model", 2), "fine_tuned")
        link(s, ("run", "r-other"), ("model", 3), "produced")
        for stage, kind, id_, j, est, dep in ROWS:
            s.add(
                LedgerEntry(
                    stage=stage, subject_kind=kind, subject_id=id_, device="cpu", sampler="test", estimated=est,
                    elapsed_s=j / 100, device_s=j / 100, energy_j=j, cost_usd=j / 1000, co2_g=j / 10,
                    tokens_in=1, tokens_out=int(j), deployment=dep,
                )
            )  # fmt: skip
    return store


def _by_key(report: LedgerReport) -> dict[str, LedgerRow]:
    return {r.key: r for r in report.rows}


def _check_sums(row: LedgerRow | Sums, energy_j: float, entries: int) -> None:
    sums = row.sums if isinstance(row, LedgerRow) else row
    assert sums.energy_j == pytest.approx(energy_j)
    assert sums.cost_usd == pytest.approx(energy_j / 1000)
    assert sums.co2_g == pytest.approx(energy_j / 10)
    assert sums.device_s == pytest.approx(energy_j / 100)
    assert sums.tokens_out == int(energy_j) and sums.tokens_in == entries == sums.entries


def test_by_stage_sums_every_row_once(ledger_store: Store) -> None:
    report = ledger_report(ledger_store.db)  # stage is the default
    assert report.by == "stage"
    rows = _by_key(report)
    assert set(rows) == {"data", "train", "evaluate", "serve", "serve-idle"}
    _check_sums(rows["data"], 100 + 20 + 30, 3)
    _check_sums(rows["train"], 1000 + 200 + 5000, 3)
    _check_sums(rows["evaluate"], 57, 2)
    _check_sums(rows["serve"], 10 + 3 + 3 + 4, 4)
    _check_sums(rows["serve-idle"], 5, 1)
    assert rows["data"].sums.estimated is True and rows["train"].sums.estimated is False
    assert [r.key for r in report.rows] == ["train", "data", "evaluate", "serve", "serve-idle"]  # most first
    _check_sums(report.total, TOTAL_J, len(ROWS))
    assert report.total.estimated is True


def test_by_dataset_and_by_run_are_direct_charges(ledger_store: Store) -> None:
    ds = _by_key(ledger_report(ledger_store.db, "dataset"))
    assert set(ds) == {"base-data:1", "ft-data:1", "ft-data:2"}
    _check_sums(ds["base-data:1"], 100, 1)
    _check_sums(ds["ft-data:1"], 20, 1)
    _check_sums(ds["ft-data:2"], 30, 1)
    assert ds["base-data:1"].sums.estimated is True and ds["ft-data:2"].sums.estimated is False
    assert ds["ft-data:2"].id == "3"
    runs = ledger_report(ledger_store.db, "run")
    got = _by_key(runs)
    assert set(got) == {"r-base", "r-ft", "r-other"}
    _check_sums(got["r-base"], 1050, 2)
    _check_sums(got["r-ft"], 207, 2)
    _check_sums(got["r-other"], 5000, 1)
    _check_sums(runs.total, 6257, 5)


def test_by_deployment_groups_serving_rows(ledger_store: Store) -> None:
    report = ledger_report(ledger_store.db, "deployment")
    rows = _by_key(report)
    assert set(rows) == {"dep-aaaa0001", "dep-bbbb0002", "-"}
    _check_sums(rows["dep-aaaa0001"], 15, 2)
    _check_sums(rows["dep-bbbb0002"], 6, 2)
    _check_sums(rows["-"], 4, 1)
    _check_sums(report.total, 25, 5)


def test_by_model_adds_the_making_through_lineage(ledger_store: Store) -> None:
    report = ledger_report(ledger_store.db, "model")
    rows = _by_key(report)
    assert set(rows) == {"base:1", "ft:1", "other:1"}
    base, ft, other = rows["base:1"], rows["ft:1"], rows["other:1"]
    _check_sums(base, 100 + 1050 + 15, 5)
    assert base.making is not None and base.serving is not None
    assert base.making.energy_j == pytest.approx(1150) and base.serving.energy_j == pytest.approx(15)
    # the fine-tuned model: its own data (both versions), train and evaluate, plus its base's making, not the
    # base's serving, and not the model whose tokenizer its data borrowed
    _check_sums(ft, 1150 + 20 + 30 + 207 + 10, 3 + 2 + 2 + 3)  # base making, 2 data, 2 run, 3 serve rows
    assert ft.making is not None and ft.serving is not None and other.serving is not None
    assert ft.making.energy_j == pytest.approx(1407) and ft.serving.energy_j == pytest.approx(10)
    assert ft.making.cost_usd == pytest.approx(1.407) and ft.serving.co2_g == pytest.approx(1.0)
    assert ft.sums.estimated is True  # the base's data row was an estimate
    assert ft.model_version_id == 2
    _check_sums(other, 5000, 1)
    assert other.sums.estimated is False and other.serving.energy_j == 0
    # the total counts the base's rows once although two models show them
    _check_sums(report.total, TOTAL_J, len(ROWS))


def test_model_footprint_of_a_fine_tuned_model_includes_its_base(ledger_store: Store) -> None:
    fp = model_footprint(ledger_store.db, 2)
    assert asdict(fp.making) == pytest.approx({"energy_j": 1407.0, "cost_usd": 1.407, "co2_g": 140.7})
    assert asdict(fp.serving) == pytest.approx({"energy_j": 10.0, "cost_usd": 0.010, "co2_g": 1.0})
    assert fp.total.energy_j == pytest.approx(1417.0)
    assert fp.estimated is True
    base = model_footprint(ledger_store.db, 1)
    assert base.making.energy_j == pytest.approx(1150.0) and base.serving.energy_j == pytest.approx(15)
    assert model_footprints(ledger_store.db, [1, 2])[1] == base


def test_footprint_follows_a_models_run_without_edges(store: Store) -> None:
    """A model whose lineage edges are missing still finds its run and the run's dataset by their columns."""
    with store.db.session() as s:
        s.add(dataset_row())
        s.flush()
        s.add(Run(id="r1", kind="train", status="completed", dataset_version_id=1))
        s.flush()
        s.add(_model("m", "r1"))
        for stage, kind, id_, j in (("data", "dataset", "1", 2.0), ("train", "run", "r1", 40.0)):
            s.add(
                LedgerEntry(
                    stage=stage, subject_kind=kind, subject_id=id_, device="cpu", sampler="t", estimated=False,
                    elapsed_s=0, device_s=0, energy_j=j, cost_usd=0, co2_g=0,
                )
            )  # fmt: skip
    assert model_footprint(store.db, 1).making.energy_j == pytest.approx(42.0)
    assert model_footprint(store.db, 99).entries == 0  # an unknown model has no footprint, not an error


def test_empty_ledger_and_unknown_grouping(store: Store) -> None:
    for by in GROUPINGS:
        report = ledger_report(store.db, by)
        assert report.rows == [] and report.total.energy_j == 0 and report.total.estimated is False
    with pytest.raises(AifabError, match="choose one of stage, dataset, run, model, deployment"):
        ledger_report(store.db, "nonsense")


def test_cli_json_shape(ledger_store: Store) -> None:
    r = aifab("ledger", "--by", "model", "--json", home=ledger_store.home)
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(body) == {"by", "rows", "total"} and body["by"] == "model"
    ft = next(row for row in body["rows"] if row["key"] == "ft:1")
    sums = {"energy_j", "cost_usd", "co2_g", "tokens_in", "tokens_out", "device_s", "estimated", "entries"}
    assert set(ft) == sums | {"key", "model_version_id", "making", "serving"}
    assert ft["making"]["energy_j"] == pytest.approx(1407) and ft["estimated"] is True
    assert set(body["total"]) == sums and body["total"]["energy_j"] == pytest.approx(TOTAL_J)
    r = aifab("ledger", "--json", home=ledger_store.home)
    body = json.loads(r.stdout.strip().splitlines()[-1])
    assert body["by"] == "stage" and {row["key"] for row in body["rows"]} >= {"data", "serve"}


def test_cli_table_labels_estimates_and_models_shows_the_footprint(ledger_store: Store) -> None:
    r = aifab("ledger", "--by", "dataset", home=ledger_store.home)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "base-data:1" in x)
    assert "100 J" in line and "estimate" in line
    assert "measured" in next(x for x in r.stdout.splitlines() if "ft-data:2" in x)
    assert "total" in r.stdout
    r = aifab("models", home=ledger_store.home)
    assert r.returncode == 0, r.stderr
    assert "1.41 kJ / 10.0 J (est.)" in next(x for x in r.stdout.splitlines() if "ft:1" in x)
    assert "5.00 kJ / 0 J" in next(x for x in r.stdout.splitlines() if "other:1" in x)


def test_cli_unknown_grouping_is_one_line(tmp_path: Path) -> None:
    r = aifab("ledger", "--by", "nonsense", home=tmp_path / "home")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: unknown --by 'nonsense': choose one of stage, dataset, run, model, deployment"
    ]


def test_json_rows_carry_what_their_grouping_adds(ledger_store: Store) -> None:
    sums = {"energy_j", "cost_usd", "co2_g", "tokens_in", "tokens_out", "device_s", "estimated", "entries"}
    for by, extra in (("stage", set()), ("deployment", set()), ("dataset", {"id"}), ("run", {"id"})):
        body = ledger_report(ledger_store.db, by).to_json()
        rows = body["rows"]
        assert isinstance(rows, list) and rows
        assert all(set(row) == {"key"} | extra | sums for row in rows), by
    assert json.loads(json.dumps(body)) == body  # plain JSON types only


def test_serving_energy_sums_request_rows_only(ledger_store: Store) -> None:
    """ft:1 (id 2) has three `serve` rows, 3 + 3 + 4 J and tokens_out = the joules; base:1 also has idle rows."""
    ft = serving_energy(ledger_store.db, 2)
    assert (ft.energy_j, ft.tokens_out, ft.entries, ft.estimated) == (10.0, 10, 3, False)
    assert ft.j_per_token == pytest.approx(1.0)
    base = serving_energy(ledger_store.db, 1)
    assert (base.energy_j, base.entries) == (10.0, 1)  # the 5 J serve-idle row is not a request's
    none = serving_energy(ledger_store.db, 3)
    assert (none.entries, none.tokens_out, none.j_per_token) == (0, 0, None)


def test_report_imports_only_the_store() -> None:
    """meter/ imports only store/ (and the errors every package shares)."""
    code = (
        "import sys, aifab.meter.report; print(' '.join(sorted(m for m in sys.modules if m.startswith('aifab.') "
        "and not m.startswith(('aifab.meter', 'aifab.store', 'aifab.errors')))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
