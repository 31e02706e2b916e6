import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from aifab.train import checkpoint as ckpt
from aifab.train.checkpoint import MARKER, latest_complete, load, save


def trained_pair(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model and an AdamW that has taken two steps, so it holds real state."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    return model, opt


def write(root: Path, step: int, keep_last: int = 3) -> Path:
    model, opt = trained_pair(step)
    state = {"tokens": step * 10, "rng": ckpt.rng_state(), "loader": {"position": step}}
    return save(root, step, dict(model.state_dict()), opt.state_dict(), state, keep_last=keep_last)


def test_a_checkpoint_round_trips_model_optimizer_and_state(tmp_path: Path) -> None:
    model, opt = trained_pair()
    path = save(tmp_path, 7, dict(model.state_dict()), opt.state_dict(), {"tokens": 70, "rng": ckpt.rng_state()})
    assert path.name == "step-000007"
    files = sorted(p.name for p in path.iterdir())
    assert files == [MARKER, "model.safetensors", "optimizer.safetensors", "state.json"]
    c = load(path)
    assert c.step == 7 and c.state["tokens"] == 70 and c.state["step"] == 7
    for k, v in model.state_dict().items():
        assert torch.equal(c.model[k], v)
    fresh_model, _ = trained_pair(seed=1)
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    fresh.load_state_dict(c.optimizer)
    want, got = opt.state_dict(), fresh.state_dict()
    assert want["param_groups"] == got["param_groups"]
    for idx, per_param in want["state"].items():
        for name, value in per_param.items():
            assert torch.equal(got["state"][idx][name], value), (idx, name)  # scalar step counts too


def test_rng_states_round_trip_through_json() -> None:
    import random

    import numpy as np

    state = json.loads(json.dumps(ckpt.rng_state()))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    ckpt.set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and (got[1] == expected[1]).all() and got[2] == expected[2]


def test_writes_are_atomic_and_a_failed_write_leaves_the_previous_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, 5)

    def boom(*a: Any, **k: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path, 10)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000005"]  # no temp dir, no half checkpoint
    c = latest_complete(tmp_path)
    assert c is not None and c.step == 5


def test_a_dead_writers_temp_dir_is_ignored_and_cleaned(tmp_path: Path) -> None:
    write(tmp_path, 5)
    dead = tmp_path / ".tmp-step-000010-999999999"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    c = latest_complete(tmp_path)
    assert c is not None and c.step == 5
    write(tmp_path, 10)
    assert not dead.exists()


def test_only_the_last_k_complete_checkpoints_are_kept(tmp_path: Path) -> None:
    for step in (5, 10, 15, 20, 25):
        write(tmp_path, step, keep_last=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000015", "step-000020", "step-000025"]
    write(tmp_path, 30, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000025", "step-000030"]


def _drop_marker(p: Path) -> None:
    (p / MARKER).unlink()


def _truncate_model(p: Path) -> None:
    f = p / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _corrupt_state(p: Path) -> None:
    (p / "state.json").write_text('{"step": 10, "tokens": ')


def _drop_optimizer(p: Path) -> None:
    (p / "optimizer.safetensors").unlink()


@pytest.mark.parametrize("tear", [_drop_marker, _truncate_model, _corrupt_state, _drop_optimizer])
def test_a_torn_newest_checkpoint_is_skipped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tear: Any
) -> None:
    write(tmp_path, 5)
    newest = write(tmp_path, 10)
    tear(newest)
    c = latest_complete(tmp_path)
    assert c is not None and c.step == 5
    err = capsys.readouterr().err
    assert "warning: skipping checkpoint" in err and "step-000010" in err
    with pytest.raises(ckpt.CheckpointError):
        load(newest)


def test_no_complete_checkpoint_gives_none(tmp_path: Path) -> None:
    assert latest_complete(tmp_path / "missing") is None
    _drop_marker(write(tmp_path, 5))
    assert latest_complete(tmp_path) is None


def test_nothing_is_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("unpickling is forbidden")

    for mod, attr in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, attr, refuse)
    write(tmp_path, 5)
    write(tmp_path, 10)
    c = latest_complete(tmp_path)
    assert c is not None and c.step == 10
    assert b"pickle" not in (c.path / "state.json").read_bytes()


def test_a_training_state_keeps_the_state_json_keys(tmp_path: Path) -> None:
    """state.json is a file format: a checkpoint written before TrainState existed parses, and one written
    now has the same keys."""
    written_before = {
        "elapsed_s": 12.5,
        "last_val": [10, 4.25],
        "loader": {"order": "random", "position": 10, "seed": 0, "split": "train"},
        "model_config": {"n_layer": 2},
        "rng": ckpt.rng_state(),
        "run_id": "abc",
        "schedule": {"min_lr_ratio": 0.1, "peak_lr": 0.003, "seconds": None, "steps": 23, "warmup_steps": 3},
        "step": 10,
        "tokens": 1280,
        "train_loss": 4.5,
        "train_s": 3.25,
        "training": {"steps": 23},
        "val_loss_initial": 5.75,
        "weights_digest": "d" * 64,
    }
    model, opt = trained_pair()
    path = save(tmp_path, 10, dict(model.state_dict()), opt.state_dict(), written_before)
    state = ckpt.TrainState.from_json(load(path).state)
    assert state.last_val == (10, 4.25) and state.loader.position == 10 and state.schedule.steps == 23
    again = save(tmp_path, 11, dict(model.state_dict()), opt.state_dict(), state.to_json())
    reread = json.loads((again / "state.json").read_text())
    assert reread == {**written_before, "step": 11}
    with pytest.raises(KeyError):
        ckpt.TrainState.from_json({"tokens": 1})
