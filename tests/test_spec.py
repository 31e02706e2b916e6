"""factory.yaml: defaults, the example `aifab init` writes, and one-line errors that name file, line and key."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from aifab.errors import AifabError, SpecError
from aifab.spec import DataSpec, FactorySpec, TrainingSpec, example_yaml, load_spec


def _write(tmp_path: Path, text: str, name: str = "factory.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path) -> str:
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# ---- defaults and the example ----------------------------------------------------------------------------


def test_defaults_validate() -> None:
    spec = FactorySpec()
    assert spec == FactorySpec.model_validate({})
    assert spec.name == "demo"
    assert spec.data.sources == []
    assert spec.serving.host == "127.0.0.1"  # servers bind loopback unless told otherwise
    assert spec.training.batch_size >= 1


def test_example_yaml_loads_and_equals_defaults(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, example_yaml()))
    assert spec == FactorySpec()


def _keys(model: type[BaseModel]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        out[name] = _keys(ann) if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return out


def _yaml_keys(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _yaml_keys(v) if isinstance(v, dict) else None for k, v in data.items()}


def test_example_yaml_documents_every_key() -> None:
    """The example factory.yaml says it lists every key with its default; a new field must appear there too."""
    assert _yaml_keys(yaml.safe_load(example_yaml())) == _keys(FactorySpec)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_gives_defaults(tmp_path: Path, text: str) -> None:
    assert load_spec(_write(tmp_path, text)) == FactorySpec()


def test_partial_file_overrides_only_its_keys(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, "name: mine\ntraining:\n  steps: 7\n  seconds: null\n"))
    assert spec.name == "mine"
    assert spec.training.steps == 7
    assert spec.training.seconds is None
    assert spec.training.batch_size == TrainingSpec().batch_size
    assert spec.model == FactorySpec().model


def test_load_spec_accepts_str_path(tmp_path: Path) -> None:
    assert load_spec(str(_write(tmp_path, "name: x\n"))).name == "x"


# ---- unknown keys ---------------------------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: demo\n\ntrainig:\n  steps: 3\n")
    assert _error(path) == f"{path}:3: trainig: unknown key"


def test_unknown_nested_key_names_file_line_and_path(tmp_path: Path) -> None:
    path = _write(tmp_path, "# my factory\nname: demo\n\ntraining:\n  steps: 3\n  stepz: 3\n")
    msg = _error(path)
    assert msg.startswith(f"{path}:6: ")
    assert "training.stepz" in msg
    assert "unknown key" in msg


def test_unknown_key_line_in_later_section(tmp_path: Path) -> None:
    text = "data:\n  extensions: [.py]\nmodel:\n  preset: tiny\nserving:\n  port: 9000\n  hots: 0.0.0.0\n"
    path = _write(tmp_path, text)
    assert _error(path) == f"{path}:7: serving.hots: unknown key"


# ---- wrong values ---------------------------------------------------------------------------------------


def test_wrong_type_names_line_key_and_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: demo\ntraining:\n  steps: 5\n  batch_size: ten\n")
    msg = _error(path)
    assert msg.startswith(f"{path}:4: training.batch_size: ")
    assert "'ten'" in msg


def test_out_of_range_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "tokenizer:\n  vocab_size: 100000\n")
    msg = _error(path)
    assert msg.startswith(f"{path}:2: tokenizer.vocab_size: ")
    assert "100000" in msg


def test_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: demo\ntraining: 3\n")
    msg = _error(path)
    assert msg.startswith(f"{path}:2: training: ")


def test_bad_literal(tmp_path: Path) -> None:
    path = _write(tmp_path, "model:\n  preset: huge\n")
    msg = _error(path)
    assert msg.startswith(f"{path}:2: model.preset: ")
    assert "'huge'" in msg


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("electricity_usd_per_kwh: -0.1", "electricity_usd_per_kwh"),
        ("electricity_usd_per_kwh: cheap", "electricity_usd_per_kwh"),
        ("grid_co2_g_per_kwh: -5", "grid_co2_g_per_kwh"),
        ("pue: 0.9", "pue"),
        ("capex_usd_per_device_hour: -1", "capex_usd_per_device_hour"),
    ],
)
def test_bad_prices_name_the_field(tmp_path: Path, line: str, field: str) -> None:
    path = _write(tmp_path, f"meter:\n  {line}\n")
    assert _error(path).startswith(f"{path}:2: meter.{field}: ")


@pytest.mark.parametrize("name", ["../x", "-flag", "has space", "abc\\n"])
def test_bad_model_name(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, f'name: "{name}"\n')
    msg = _error(path)
    assert msg.startswith(f"{path}:1: name: ")


def test_bad_extension(tmp_path: Path) -> None:
    path = _write(tmp_path, "data:\n  extensions: [py]\n")
    msg = _error(path)
    assert "data.extensions" in msg and "'py'" in msg


def test_several_errors_reports_first_and_counts_the_rest(tmp_path: Path) -> None:
    path = _write(tmp_path, "training:\n  steps: 0\n  batch_size: 0\n  lr: -1\n")
    msg = _error(path)
    assert msg.startswith(f"{path}:2: training.steps: ")
    assert msg.endswith("(and 2 more)")


# ---- malformed files ------------------------------------------------------------------------------------


def test_malformed_yaml_unclosed_bracket(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: demo\ndata:\n  sources: [./a, ./b\nmodel:\n  preset: tiny\n")
    msg = _error(path)
    m = re.fullmatch(rf"{re.escape(str(path))}:(\d+): malformed YAML: .+", msg)
    assert m is not None, msg
    assert 3 <= int(m.group(1)) <= 5


def test_malformed_yaml_bad_indentation(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: demo\ntraining:\n  steps: 3\n batch_size: 4\n")
    msg = _error(path)
    assert re.fullmatch(rf"{re.escape(str(path))}:\d+: malformed YAML: .+", msg), msg


def test_tab_indentation_is_malformed(tmp_path: Path) -> None:
    path = _write(tmp_path, "training:\n\tsteps: 3\n")
    assert f"{path}:2: malformed YAML" in _error(path)


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = _write(tmp_path, text)
    msg = _error(path)
    assert msg.startswith(f"{path}:1: ")
    assert "mapping" in msg and kind in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert _error(path) == f"{path}: file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    msg = _error(tmp_path)
    assert msg.startswith(f"{tmp_path}: cannot read")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "factory.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    assert _error(path).startswith(f"{path}: cannot read")


def test_spec_error_is_an_aifab_error() -> None:
    assert issubclass(SpecError, AifabError)
    assert SpecError.exit_code != 0


# ---- data sources ---------------------------------------------------------------------------------------


def test_missing_data_path_names_path_key_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "data:\n  sources: [./nope]\n")
    msg = _error(path)
    assert msg.startswith(f"{path}:2: data.sources.0: ")
    assert "./nope" in msg
    assert "does not exist" in msg


def test_missing_data_path_in_block_list_points_at_its_item(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    path = _write(tmp_path, "name: demo\ndata:\n  sources:\n    - corpus\n    - ./nope\n")
    msg = _error(path)
    assert msg.startswith(f"{path}:5: data.sources.1: ")
    assert "./nope" in msg


def test_glob_that_matches_nothing(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    path = _write(tmp_path, "data:\n  sources: ['docs/**/*.nothing']\n")
    msg = _error(path)
    assert msg.startswith(f"{path}:2: data.sources.0: ")
    assert "docs/**/*.nothing" in msg
    assert "matches no files" in msg


def test_glob_is_resolved_against_the_yaml_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    (project / "docs" / "sub").mkdir(parents=True)
    (project / "docs" / "sub" / "a.md").write_text("# a\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_spec(_write(project, "data:\n  sources: ['docs/**/*.md']\n"))
    assert spec.data.sources == [str(project / "docs" / "**" / "*.md")]


def test_relative_source_is_resolved_against_the_yaml_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "corpus").mkdir(parents=True)
    (project / "notes.txt").write_text("hello\n")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "corpus").mkdir(parents=True)  # a decoy with the same name in the cwd
    monkeypatch.chdir(elsewhere)
    spec = load_spec(_write(project, "data:\n  sources: [corpus, ./notes.txt]\n"))
    assert spec.data.sources == [str((project / "corpus").resolve()), str((project / "notes.txt").resolve())]


def test_source_only_in_cwd_is_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    cwd = tmp_path / "cwd"
    (cwd / "only_here").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    path = _write(project, "data:\n  sources: [only_here]\n")
    assert "only_here" in _error(path)


def test_absolute_source_is_kept(tmp_path: Path) -> None:
    corpus = tmp_path / "abs corpus"
    corpus.mkdir()
    project = tmp_path / "project"
    project.mkdir()
    spec = load_spec(_write(project, f'data:\n  sources: ["{corpus}"]\n'))
    assert spec.data.sources == [str(corpus.resolve())]


def test_dataspec_in_python_checks_sources_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path)
    assert DataSpec(sources=["here"]).sources == [str((tmp_path / "here").resolve())]
    with pytest.raises(ValueError, match="does not exist"):
        DataSpec(sources=["not-here"])


# ---- one line, always -----------------------------------------------------------------------------------

BAD_FILES = [
    "bogus: 1\n",
    "training:\n  stepz: 3\n",
    "training:\n  batch_size: ten\n",
    "data: [\n",
    "data:\n  sources: [./nope]\n",
    "- a\n",
    'name: "multi\\nline"\n',
    "evaluation:\n  prompts: 3\n",
    "meter:\n  pue: 9\n",
]


@pytest.mark.parametrize("text", BAD_FILES)
def test_every_error_is_one_line_starting_with_the_file(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    msg = _error(path)  # asserts one line
    assert re.match(rf"{re.escape(str(path))}:\d+: ", msg), msg
