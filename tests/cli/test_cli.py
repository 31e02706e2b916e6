"""The command line as a user meets it: real processes, one-line errors, exit codes, no tracebacks."""

import json
import shutil
import socket
from pathlib import Path

import pytest

from aifab.store import Store
from helpers import aifab, one_line_error


def test_init_writes_a_valid_spec_and_refuses_to_overwrite(tmp_path: Path) -> None:
    proc = aifab("init", home=tmp_path / "h", cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "factory.yaml").read_text().startswith("# factory.yaml")
    assert aifab("validate", home=tmp_path / "h", cwd=tmp_path).returncode == 0
    one_line_error(aifab("init", home=tmp_path / "h", cwd=tmp_path), "already exists")
    assert aifab("init", "--force", home=tmp_path / "h", cwd=tmp_path).returncode == 0


def test_validate_checks_the_stages_as_a_dag(tmp_path: Path) -> None:
    spec = tmp_path / "factory.yaml"
    spec.write_text("stages:\n  a: {uses: command, needs: [b], run: [x]}\n  b: {uses: command, needs: [a], run: [x]}\n")
    one_line_error(aifab("validate", str(spec), home=tmp_path / "h"), "cycle", "'a'")
    spec.write_text("stages:\n  a: {uses: command, needs: [nowhere], run: [x]}\n")
    one_line_error(aifab("validate", str(spec), home=tmp_path / "h"), "'a'", "nowhere")
    spec.write_text("stages:\n  a: {uses: command, run: [x]}\n  b: {uses: command, needs: [a], run: [y]}\n")
    ok = aifab("validate", str(spec), home=tmp_path / "h")
    assert ok.returncode == 0 and "pipeline 2 stages" in ok.stdout


def test_malformed_spec_is_one_line_with_file_and_line(tmp_path: Path) -> None:
    spec = tmp_path / "factory.yaml"
    spec.write_text("name: demo\ntraining:\n  batch_size: ten\n")
    one_line_error(aifab("validate", str(spec), home=tmp_path / "h"), "factory.yaml:3", "training.batch_size")
    spec.write_text("training: [1, 2\n")
    one_line_error(aifab("demo", "--config", str(spec), home=tmp_path / "h"), "malformed YAML")


def test_missing_data_path(tmp_path: Path) -> None:
    one_line_error(aifab("demo", "--data", str(tmp_path / "nope"), home=tmp_path / "h"), "nope", "does not exist")


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n\n")
    one_line_error(aifab("demo", "--data", str(tmp_path / "empty"), home=tmp_path / "h"), "corpus is empty")


def test_unknown_model_and_run(tmp_path: Path) -> None:
    one_line_error(aifab("serve", "nosuch", home=tmp_path / "h"), "unknown model 'nosuch'")
    one_line_error(aifab("runs", "show", "abc", home=tmp_path / "h"), "unknown run 'abc'")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = aifab("--debug", "serve", "nosuch", home=tmp_path / "h")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_occupied_port(trained: tuple[Store, str], tmp_path: Path) -> None:
    store, ref = trained
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        one_line_error(aifab("serve", ref, "--port", str(port), home=store.home), f"port {port}", "in use")


def test_corrupt_weights_are_refused_and_left_in_place(trained: tuple[Store, str], tmp_path: Path) -> None:
    store, ref = trained
    home = tmp_path / "copy"
    shutil.copytree(store.home, home)
    from aifab.registry.models import resolve

    copy = Store(home)
    weights = copy.artifacts.path(resolve(copy, ref).weights_digest)
    copy.close()
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    one_line_error(aifab("serve", ref, "--port", "0", home=home), "corrupt")
    assert weights.exists()
    weights.unlink()
    one_line_error(aifab("serve", ref, "--port", "0", home=home), "missing")


def test_listings_show_what_the_store_holds(trained: tuple[Store, str]) -> None:
    store, _ = trained
    models = aifab("models", home=store.home)
    assert models.returncode == 0 and "tiny:1" in models.stdout and "latest" in models.stdout
    datasets = aifab("datasets", home=store.home)
    assert datasets.returncode == 0 and "tiny:1" in datasets.stdout
    runs = aifab("runs", home=store.home)
    assert runs.returncode == 0 and "completed" in runs.stdout


def test_runs_show_json_has_the_metrics_history(trained: tuple[Store, str]) -> None:
    from aifab.registry.models import resolve

    store, ref = trained
    run_id = resolve(store, ref).run_id
    assert run_id is not None
    proc = aifab("runs", "show", run_id, "--json", home=store.home)
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout.strip().splitlines()[-1])
    assert body["id"] == run_id and body["status"] == "completed"
    assert [p["step"] for p in body["metrics"]["train_loss"]] == list(range(1, 31))
    assert body["metrics"]["val_loss"][0]["step"] == 0
    assert body["lineage"] == [{"kind": "dataset", "id": "1", "relation": "input"}]


def test_models_alias_moves_a_pointer(trained: tuple[Store, str], tmp_path: Path) -> None:
    store, ref = trained
    home = tmp_path / "copy"
    shutil.copytree(store.home, home)
    proc = aifab("models", "alias", ref, "prod", home=home)
    assert proc.returncode == 0 and "tiny@prod -> tiny:1" in proc.stdout
    one_line_error(aifab("models", "alias", "tiny:7", "prod", home=home), "unknown model 'tiny:7'")


@pytest.mark.parametrize("args", [["serve", "../etc"], ["models", "alias", "tiny:1", "../x"]])
def test_hostile_names_are_rejected(tmp_path: Path, args: list[str]) -> None:
    one_line_error(aifab(*args, home=tmp_path / "h"), "invalid")
