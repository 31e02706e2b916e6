"""factory.yaml's `gates:` section: what it accepts, its defaults, the commented example, and one-line errors that
name file, line and key for every bad input."""

import re
from pathlib import Path

import pytest
import yaml

from aifab.errors import SpecError
from aifab.spec import FactorySpec, GatesSpec, example_yaml, load_spec


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "factory.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, text))
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


GOOD = """\
name: m
gates:
  champion: prod
  evaluations: {suites: [heldout], tasks: [task.yaml], limit: 200}
  load_test: {requests: 16, concurrency: 4, max_tokens: 8}
  checks:
    - {metric: heldout-bpb/bits_per_byte, max_regression: 0.02}
    - {metric: heldout-next-line/acc, min: 0.3, max_regression_pct: 5}
    - {efficiency: j_per_token, max: 0.5}
    - {efficiency: usd_per_mtok, max_regression_pct: 10}
    - {latency: ttft_p95_s, max: 0.5}
    - {latency: tpot_p95_s, max: 0.05}
"""


def test_a_full_gates_section_loads_with_paths_resolved(tmp_path: Path) -> None:
    (tmp_path / "task.yaml").write_text("name: t\n")
    gates = load_spec(_write(tmp_path, GOOD)).gates
    assert gates is not None
    assert gates.champion == "prod"
    assert gates.evaluations.tasks == [str((tmp_path / "task.yaml").resolve())]
    assert gates.load_test.requests == 16 and gates.load_test.prompt_tokens == 64  # unset keys keep defaults
    assert [c.kind for c in gates.checks] == ["metric", "metric", "efficiency", "efficiency", "latency", "latency"]
    assert gates.checks[1].bounds() == [("min", 0.3), ("max_regression_pct", 5.0)]


def test_no_gates_by_default_and_an_empty_section_is_all_defaults(tmp_path: Path) -> None:
    assert FactorySpec().gates is None
    assert load_spec(_write(tmp_path, "gates: {}\n")).gates == GatesSpec()


def test_the_examples_commented_gates_block_parses_and_names_every_key() -> None:
    """The example documents `gates:` in comments (its default is null); uncommented, that block must load."""
    text = example_yaml()
    block = text[text.index("# gates:") : text.index("\ngates: null")]
    body = "\n".join(re.sub(r"^# ?", "", line) for line in block.splitlines())
    gates = GatesSpec.model_validate(yaml.safe_load(body)["gates"])
    assert gates.checks and {c.kind for c in gates.checks} == {"metric", "efficiency", "latency"}
    for name, field in GatesSpec.model_fields.items():
        assert f"  {name}:" in block
        sub = field.annotation
        for key in getattr(sub, "model_fields", {}):
            assert f"    {key}:" in block, key


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gates: [1]\n", ":1: gates: Input should be a valid dictionary"),
        ("gates:\n  champ: prod\n", ":2: gates.champ: unknown key"),
        ("gates:\n  champion: ../prod\n", ":2: gates.champion: String should match pattern"),
        ("gates:\n  checks: {metric: a/acc}\n", ":2: gates.checks: Input should be a valid list"),
        (
            "gates:\n  checks:\n    - {metric: heldout-bpb/bits_per_bytes, max: 1}\n",
            ":3: gates.checks.0.metric: unknown metric 'bits_per_bytes' (known: ",
        ),
        (
            "gates:\n  checks:\n    - {metric: acc, min: 1}\n",
            ":3: gates.checks.0.metric: metric 'acc' must be TASK/METRIC",
        ),
        (
            "gates:\n  checks:\n    - {metric: a/acc, min: 1}\n    - {efficiency: watts, max: 1}\n",
            ":4: gates.checks.1.efficiency: Input should be 'j_per_token' or 'usd_per_mtok' (got 'watts')",
        ),
        (
            "gates:\n  checks:\n    - {latency: ttft_p95_s, max: fast}\n",
            ":3: gates.checks.0.max: Input should be a valid number, unable to parse string as a number (got 'fast')",
        ),
        (
            "gates:\n  checks:\n    - {latency: ttft_p95_s, max: .nan}\n",
            ":3: gates.checks.0.max: Input should be a finite",
        ),
        (
            "gates:\n  checks:\n    - {metric: a/acc, max_regression_pct: -150}\n",
            ":3: gates.checks.0.max_regression_pct: Input should be greater than or equal to -100 (got -150)",
        ),
        (
            "gates:\n  checks:\n    - {metric: a/acc, efficiency: j_per_token, max: 1}\n",
            ":3: gates.checks.0: a check names exactly one of metric, efficiency or latency "
            "(got metric and efficiency)",
        ),
        ("gates:\n  checks:\n    - {max: 1}\n", ":3: gates.checks.0: a check names exactly one of"),
        (
            "gates:\n  checks:\n    - {metric: a/acc}\n",
            ":3: gates.checks.0: check 'a/acc' has no bound: give min, max, max_regression or max_regression_pct",
        ),
        (
            "gates:\n  checks:\n    - {metric: a/acc, min: 2, max: 1}\n",
            ":3: gates.checks.0: check 'a/acc': min 2.0 is above",
        ),
        ("gates:\n  checks:\n    - {metric: a/acc, mn: 1}\n", ":3: gates.checks.0.mn: unknown key"),
        (
            "gates:\n  evaluations:\n    limit: 0\n",
            ":3: gates.evaluations.limit: Input should be greater than or equal",
        ),
        ("gates:\n  evaluations:\n    suites: [../x]\n", ":3: gates.evaluations.suites: invalid suite name '../x'"),
        (
            "gates:\n  evaluations:\n    tasks: [missing.yaml]\n",
            ":3: gates.evaluations.tasks: task file 'missing.yaml' does not exist",
        ),
        (
            "gates:\n  load_test:\n    requests: 0\n",
            ":3: gates.load_test.requests: Input should be greater than or equal",
        ),
        ("gates:\n  load_test:\n    concurency: 4\n", ":3: gates.load_test.concurency: unknown key"),
    ],
)
def test_bad_gates_get_one_line_naming_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    msg = _error(tmp_path, text)
    assert msg.startswith(str(tmp_path / "factory.yaml") + expected), msg


def test_a_directory_is_not_a_task_file(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    assert "task file 'tasks' does not exist" in _error(tmp_path, "gates:\n  evaluations: {tasks: [tasks]}\n")


GATE_STAGES = """\
stages:
  data: {uses: data}
  train: {uses: train, needs: [data]}
  register: {uses: register, needs: [train], with: {aliases: []}}
  gate:
    uses: gate
    needs: [register]
    with:
      alias: prod
      champion: prod
      checks: [{metric: heldout-next-line/acc, min: 0.3}]
"""


def test_a_gate_stage_takes_its_alias_and_the_gates_keys_in_with(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, GATE_STAGES))
    assert spec.stages is not None
    over = spec.stages["gate"].overrides
    assert over["alias"] == "prod"
    assert over["gates"] == {"champion": "prod", "checks": [{"metric": "heldout-next-line/acc", "min": 0.3}]}


@pytest.mark.parametrize(
    ("with_", "expected"),
    [
        ("{alias: ../prod}", "with.alias: invalid name '../prod'"),
        ("{alias: [prod]}", "with.alias: expected a str of names"),
        ("{checks: [{metric: a/acc}]}", "with.checks.0: check 'a/acc' has no bound"),
        (
            "{steps: 3}",
            "with.steps: unknown key for `uses: gate` (known: champion, evaluations, load_test, checks, alias)",
        ),
    ],
)
def test_a_gate_stages_bad_with_is_one_line_with_its_line(tmp_path: Path, with_: str, expected: str) -> None:
    text = f"stages:\n  gate:\n    uses: gate\n    with: {with_}\n"
    msg = _error(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'factory.yaml'}:2: stages.gate: ") and expected in msg, msg
