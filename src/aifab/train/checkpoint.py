"""Resumable training checkpoints: one directory per step under the run's work dir.

Layout of `<dir>/step-000123/`:
- `model.safetensors`      the weights (`nn.weights.state_for_save`), with the model config in the metadata;
- `optimizer.safetensors`  every optimizer state tensor as `state.<param index>.<name>` (scalar step counts
                           included), with the param groups as JSON in the metadata; nothing is pickled;
- `state.json`             step, tokens, timings, lr schedule inputs, loader position, RNG states, specs:
                           a `TrainState` (the JSON keys are the file format; older checkpoints load);
- `COMPLETE`               written last: a directory without it is a torn write.

Contract:
- `save()` is atomic: files go into `.tmp-step-...`, are fsynced, `COMPLETE` is written and fsynced, the
  directory is renamed into place and the parent fsynced. Then all but the newest `keep_last` complete
  checkpoints (and stale temp dirs) are deleted.
- `load()` raises `CheckpointError` for anything missing, truncated or malformed.
- `latest_complete()` returns the newest checkpoint that loads, printing a one-line warning to stderr for
  each newer one it has to skip; None when there is none.
"""

import base64
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aifab.console import err
from aifab.errors import TrainError
from aifab.store.artifacts import fsync_path

if TYPE_CHECKING:
    from torch import Tensor

KEEP_LAST = 3
MARKER = "COMPLETE"
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
NAME_RE = re.compile(r"^step-(\d{6,})$")
PARAM_GROUPS_KEY = "aifab.param_groups"


class CheckpointError(TrainError):
    """A checkpoint directory is missing a file, or a file is truncated or malformed."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: dict[str, "Tensor"]  # as state_for_save wrote it
    optimizer: dict[str, Any]  # a torch optimizer state_dict, ready for `load_state_dict`
    state: dict[str, Any]  # state.json as written; a training run's parses with `TrainState.from_json`


@dataclass(frozen=True)
class LrScheduleInputs:
    """What the lr at a step depends on, recorded so a reader can tell whether a resume kept the budget."""

    peak_lr: float
    warmup_steps: int
    min_lr_ratio: float
    steps: int | None
    seconds: float | None


@dataclass(frozen=True)
class LoaderPosition:
    """Where the train loader stands: batch `position` of the (`split`, `seed`, `order`) sequence is next."""

    split: str
    seed: int
    order: str
    position: int


@dataclass(frozen=True)
class TrainState:
    """A training run's `state.json` (besides `step`, which `save` adds): what a resume restores.

    `to_json`/`from_json` keep the file's keys; `rng`, `training` and `model_config` stay the JSON forms of
    `rng_state()`, a TrainingSpec and a ModelConfig, as they were written."""

    run_id: str
    tokens: int
    train_s: float  # time inside optimizer steps
    elapsed_s: float  # the budget clock: every session of the run, evaluations and checkpoints included
    train_loss: float  # the last step's
    val_loss_initial: float
    last_val: tuple[int, float]  # (step, val loss) of the newest evaluation
    schedule: LrScheduleInputs
    loader: LoaderPosition
    rng: dict[str, Any]
    training: dict[str, Any]
    model_config: dict[str, Any]
    weights_digest: str

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "last_val": list(self.last_val)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainState":
        """Raises KeyError, TypeError or ValueError on a state that is not a training run's."""
        step, val = d["last_val"]
        return cls(
            run_id=str(d["run_id"]),
            tokens=int(d["tokens"]),
            train_s=float(d["train_s"]),
            elapsed_s=float(d["elapsed_s"]),
            train_loss=float(d["train_loss"]),
            val_loss_initial=float(d["val_loss_initial"]),
            last_val=(int(step), float(val)),
            schedule=LrScheduleInputs(**d["schedule"]),
            loader=LoaderPosition(**d["loader"]),
            rng=dict(d["rng"]),
            training=dict(d["training"]),
            model_config=dict(d["model_config"]),
            weights_digest=str(d["weights_digest"]),
        )


def dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---- RNG states: plain JSON, never pickled ---------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    import torch

    np_state: Any = np.random.get_state(legacy=True)  # a tuple: (kind, keys, pos, has_gauss, cached)
    py_state = random.getstate()
    return {
        "torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": [int(k) for k in np_state[1]],
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    raw = np.frombuffer(base64.b64decode(state["torch_cpu"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
    n = state["numpy"]
    keys = np.array(n["keys"], dtype=np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---- optimizer state to and from flat tensors --------------------------------------------------------------
def optimizer_to_flat(sd: dict[str, Any]) -> tuple[dict[str, "Tensor"], dict[str, str]]:
    """(tensors, metadata) for safetensors: `state.<i>.<name>` tensors; param groups as JSON metadata."""
    import torch

    tensors: dict[str, Tensor] = {}
    for idx, per_param in sd["state"].items():
        for name, value in per_param.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{idx}.{name}"] = t.detach().to("cpu").contiguous()
    return tensors, {PARAM_GROUPS_KEY: json.dumps(sd["param_groups"])}


def optimizer_from_flat(tensors: dict[str, "Tensor"], metadata: dict[str, str]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        prefix, idx, name = key.split(".", 2)
        if prefix != "state":
            raise ValueError(f"unexpected optimizer tensor {key!r}")
        state.setdefault(int(idx), {})[name] = t
    groups = json.loads(metadata[PARAM_GROUPS_KEY])
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


# ---- save / load -----------------------------------------------------------------------------------------
def save(
    root: Path,
    step: int,
    model_tensors: dict[str, "Tensor"],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    *,
    model_metadata: dict[str, str] | None = None,
    keep_last: int = KEEP_LAST,
) -> Path:
    """Write checkpoint `step` atomically under `root` and prune to the newest `keep_last`; return its path."""
    from safetensors.torch import save as st_save

    root.mkdir(parents=True, exist_ok=True)
    final = root / dir_name(step)
    tmp = root / f".tmp-{dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write(tmp / MODEL_FILE, st_save(model_tensors, metadata=model_metadata))
        opt_tensors, opt_meta = optimizer_to_flat(optimizer_state)
        _write(tmp / OPTIMIZER_FILE, st_save(opt_tensors, metadata=opt_meta))
        _write(tmp / STATE_FILE, json.dumps({**state, "step": step}, sort_keys=True).encode())
        _write(tmp / MARKER, b"")  # last: its presence vouches for the files above
        fsync_path(tmp)
        if final.exists():  # a torn or older copy of the same step (a resumed run passing it again)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep_last)
    return final


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory under `root`, complete or not, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := NAME_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, torn ones older than those, and temp dirs
    of this process's earlier writes or of dead writers."""
    complete = [(s, p) for s, p in checkpoints(root) if (p / MARKER).is_file()]
    if keep_last >= 1 and len(complete) > keep_last:
        oldest_kept = complete[-keep_last][0]
        for s, p in checkpoints(root):
            if s < oldest_kept:
                shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load(path: Path) -> Checkpoint:
    """Read one checkpoint directory; CheckpointError names what is wrong with it."""
    from safetensors import safe_open
    from safetensors.torch import load as st_load

    m = NAME_RE.match(path.name)
    if m is None:
        raise CheckpointError(f"{path}: not a checkpoint directory name")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path}: incomplete (no {MARKER} marker)")
    try:
        model = st_load((path / MODEL_FILE).read_bytes())
        opt_path = path / OPTIMIZER_FILE
        opt_tensors = st_load(opt_path.read_bytes())
        with safe_open(str(opt_path), framework="pt") as f:
            opt_meta = f.metadata() or {}
        optimizer = optimizer_from_flat(opt_tensors, opt_meta)
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or state.get("step") != int(m.group(1)):
            raise ValueError("state.json does not name this checkpoint's step")
    except CheckpointError:
        raise
    except Exception as e:  # safetensors and json raise their own types for truncated or garbled files
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{path}: unreadable: {type(e).__name__}: {first}") from None
    return Checkpoint(path=path, step=int(m.group(1)), model=model, optimizer=optimizer, state=state)


def latest_complete(root: Path) -> Checkpoint | None:
    """The newest checkpoint under `root` that loads; each newer torn one is skipped with a warning."""
    for _, path in reversed(checkpoints(root)):
        try:
            return load(path)
        except CheckpointError as e:
            err.print(f"warning: skipping checkpoint: {e}", markup=False, highlight=False, soft_wrap=True)
    return None
