"""Helpers for code running inside a job: which attempt this is, state kept across attempts, the result the
control plane copies into `jobs.result`, and cooperative preemption.

The executor sets `AIFAB_JOB_ID`, `AIFAB_JOB_ATTEMPT` (1 for the first start) and `AIFAB_JOB_DIR` (the same
directory for every attempt of one job). A preempted job gets SIGTERM; it should checkpoint, then exit with
`EXIT_PREEMPTED` so the control plane requeues it instead of counting a failure. This module imports nothing
heavy: it runs in every job and in the launcher.
"""

import json
import os
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aifab.errors import AifabError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "I checkpointed after SIGTERM; requeue me"
STATE_FILE = "state.json"  # remember()/recall(): survives attempts
RESULT_FILE = "result.json"  # write_result(): copied into jobs.result when the attempt ends
EXIT_FILE = "exit.json"  # written by the launcher when the command ends: exit code, attempt, ended_at
LAUNCH_FILE = "launch.json"  # written by the launcher when the command starts: its pids


@dataclass(frozen=True)
class Attempt:
    job_id: int
    attempt: int  # 1 for the first start; preemptions and retries add one each
    job_dir: Path


def current() -> Attempt | None:
    """This process's job attempt, or None outside a job. A malformed environment is an AifabError."""
    job_id, attempt, job_dir = (os.environ.get(k) for k in ("AIFAB_JOB_ID", "AIFAB_JOB_ATTEMPT", "AIFAB_JOB_DIR"))
    if job_dir is None:
        return None
    try:
        return Attempt(int(job_id or ""), int(attempt or ""), Path(job_dir))
    except ValueError:
        raise AifabError(
            f"AIFAB_JOB_ID={job_id!r} and AIFAB_JOB_ATTEMPT={attempt!r} must be integers when AIFAB_JOB_DIR is set"
        ) from None


def _require() -> Attempt:
    att = current()
    if att is None:
        raise AifabError("not inside a job: AIFAB_JOB_DIR is not set")
    return att


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as JSON so a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # makes the rename durable
    finally:
        os.close(dir_fd)


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (a file being replaced is never half read)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def remember(key: str, value: Any) -> None:
    """Keep `value` (JSON-serializable) under `key` for later attempts of this job."""
    path = _require().job_dir / STATE_FILE
    state = read_json(path) or {}
    state[key] = value
    write_json_atomic(path, state)


def recall(key: str, default: Any = None) -> Any:
    """What an earlier attempt (or this one) remembered under `key`, else `default`."""
    state = read_json(_require().job_dir / STATE_FILE) or {}
    return state.get(key, default)


def write_result(result: dict[str, Any]) -> None:
    """Report this attempt's result (JSON object); the control plane copies it into `jobs.result`."""
    if not isinstance(result, dict):
        raise AifabError(f"a job result must be a JSON object (dict), not {type(result).__name__}")
    write_json_atomic(_require().job_dir / RESULT_FILE, result)


def preemption_check() -> Callable[[], str | None]:
    """Install a SIGTERM handler and return a `stop_check` for the trainer: it returns "preempted" once SIGTERM
    has arrived, else None. Call it from the main thread (Python delivers signals there)."""
    got: list[int] = []

    def on_term(signum: int, _frame: Any) -> None:
        got.append(signum)

    signal.signal(signal.SIGTERM, on_term)
    return lambda: "preempted" if got else None
