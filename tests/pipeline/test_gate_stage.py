"""The gate stage: the line gains it when factory.yaml has `gates:` (the model registered without the alias the
gate then moves), bad gate DAGs are refused before anything runs, and a refusal fails the stage with one line
naming gate, value and threshold, which `aifab run` reports instead of an exit code."""

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aifab.errors import SpecError
from aifab.meter.ledger import Meter, Prices
from aifab.pipeline import promote as promote_module
from aifab.pipeline.contracts import GateOutput, RegisterOutput, StageInput, Task
from aifab.pipeline.dag import build_pipeline
from aifab.pipeline.promote import GateRefused
from aifab.pipeline.runner import OnControl
from aifab.pipeline.stages import execute
from aifab.registry.aliases import alias_history
from aifab.registry.models import register, resolve
from aifab.spec import parse_spec
from aifab.store import Store
from gates_bench import Bench

GATES = "gates:\n  checks: [{metric: t/acc, min: 0.4, max_regression: 0.05}]\n"
PRICES = {"electricity_usd_per_kwh": 0.1, "grid_co2_g_per_kwh": 400.0, "pue": 1.0, "capex_usd_per_device_hour": 0.0}


def _pipeline(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "factory.yaml"
    return build_pipeline(parse_spec(text, path), tmp_path)


def test_the_line_gains_a_gate_stage_with_gates_and_registers_without_the_alias(tmp_path: Path) -> None:
    plain = _pipeline(tmp_path, "name: m\n")
    assert list(plain.stages) == ["data", "train", "evaluate", "register"]
    assert plain.stages["register"].params["aliases"] == ["latest"]
    gated = _pipeline(tmp_path, "name: m\norchestration: {retries: 3}\n" + GATES)
    assert list(gated.stages) == ["data", "train", "evaluate", "register", "gate"]
    assert gated.stages["register"].params["aliases"] == []
    gate = gated.stages["gate"]
    assert gate.needs == ("register",) and gate.params["alias"] == "latest"
    assert gate.params["gates"]["checks"] == [
        {"metric": "t/acc", "efficiency": None, "latency": None, "min": 0.4, "max": None, "max_regression": 0.05,
         "max_regression_pct": None},
    ]  # fmt: skip
    assert gate.retries == 0 and gated.stages["train"].retries == 3  # a refusal is a decision: not retried


def test_a_gate_stages_with_overrides_the_gates_section_and_its_task_files_are_deps(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("name: t\n")
    text = GATES + (
        "stages:\n  data: {uses: data}\n  train: {uses: train, needs: [data]}\n"
        "  register: {uses: register, needs: [train], with: {aliases: [latest]}}\n"
        "  gate: {uses: gate, needs: [register], retries: 2, with: {alias: prod, evaluations: {tasks: [t.yaml]}}}\n"
    )
    gate = _pipeline(tmp_path, text).stages["gate"]
    assert gate.params["alias"] == "prod" and gate.retries == 2
    assert gate.params["gates"]["evaluations"]["tasks"] == [str(tmp_path / "t.yaml")]
    assert gate.params["gates"]["checks"][0]["metric"] == "t/acc"  # the section's, not replaced
    assert str(tmp_path / "t.yaml") in gate.deps


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ("  gate: {uses: gate, with: {alias: prod}}\n", "stage 'gate' (uses gate) reads one `uses: register` stage"),
        (
            "  data: {uses: data}\n  train: {uses: train, needs: [data]}\n"
            "  register: {uses: register, needs: [train]}\n  gate: {uses: gate, needs: [register]}\n",
            "stage 'gate' promotes to @latest, which register stage 'register' already sets",
        ),
    ],
)
def test_a_gate_stage_in_a_bad_dag_is_refused_naming_it(tmp_path: Path, stages: str, message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        _pipeline(tmp_path, GATES + "stages:\n" + stages)


def test_a_gate_stage_without_checks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"stage 'gate' \(uses gate\) has no checks"):
        _pipeline(tmp_path, "gates: {champion: prod}\n")


def _registered(store: Store, n: int) -> RegisterOutput:
    for _ in range(n):
        w, t = store.artifacts.put_bytes(b"w"), store.artifacts.put_bytes(b"t")
        mv = register(store, "m", weights_digest=w, tokenizer_digest=t, config={}, params_count=1, metrics={})
    return RegisterOutput(mv.id, f"m:{mv.version}", [])


def _task(registered: RegisterOutput, tmp_path: Path) -> Task:
    gate = _pipeline(tmp_path, GATES).stages["gate"]
    inputs = {"register": StageInput("register", registered.to_json())}
    return Task("m", "gate", "gate", gate.params, inputs, PRICES, str(tmp_path))


def test_the_gate_stage_promotes_a_passing_model_and_refuses_a_worse_one(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = Bench({1: {"acc": 0.6}, 2: {"acc": 0.5}})
    monkeypatch.setattr(promote_module.Instruments, "real", classmethod(lambda cls: bench.tools()))
    meter = Meter(store.db, Prices(**PRICES))
    out = GateOutput.from_json(execute(store, _task(_registered(store, 1), tmp_path), meter))
    assert out.moved and out.model == "m:1" and out.alias == "latest" and out.champion is None
    assert resolve(store, "m@latest").version == 1
    with pytest.raises(GateRefused) as refused:
        execute(store, _task(_registered(store, 1), tmp_path), meter)
    assert str(refused.value).startswith("m:2 refused for m@latest: gate t/acc: 0.5 < 0.55 (champion 0.6 - 0.05)")
    assert resolve(store, "m@latest").version == 1
    assert [e.reason for e in alias_history(store, "m", "latest")] == ["promote"]


def test_the_runner_reports_a_failed_stages_own_line_not_just_its_exit_code() -> None:
    def ended(result: Any, error: str | None) -> str | None:
        info = SimpleNamespace(id=7, status="failed", result=result, error=error)
        control = SimpleNamespace(wait_any=lambda ids: info, nodes=None)
        return OnControl(control).wait_any([7]).error  # type: ignore[arg-type]

    assert ended({"error": "gate t/acc: 0.5 < 0.55"}, "exit code 2") == "job 7 failed: gate t/acc: 0.5 < 0.55"
    assert ended(None, "exit code 2") == "job 7 failed: exit code 2"
    assert ended({"error": 3}, "exit code 2") == "job 7 failed: exit code 2"
