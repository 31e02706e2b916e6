"""Executors start and watch job attempts. The control plane talks to them through `Executor` only; each backend
is one file (this one holds the protocol and the local backend with its pool, `detect_nodes`; Ray lives in its
own file).

Contract: `start()` returns a handle, a short string stored in `jobs.handle` that must still work after the
control plane restarts. `poll()` returns the attempt's exit code once it ended, None while it runs, or `LOST`
when it is gone without an exit code. A job ends its attempt with `attempt.EXIT_PREEMPTED` to be requeued.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal, Protocol

from aifab.errors import AifabError
from aifab.jobs.attempt import EXIT_FILE, LAUNCH_FILE, RESULT_FILE, read_json
from aifab.jobs.launch import alive, proc_start_ticks
from aifab.jobs.records import JobInfo, job_dir
from aifab.schedule.state import Node, Placement

LOST: Final = "lost"
Poll = int | Literal["lost"] | None
LAUNCH_TIMEOUT_S = 60.0


class Executor(Protocol):
    name: str  # stored in jobs.executor

    def start(self, job: JobInfo, placement: Placement) -> str:
        """Start attempt `job.attempts` of `job` on `placement` (all shares at once); return its handle."""
        ...

    def poll(self, handle: str) -> Poll:
        """The exit code once the attempt ended, None while it runs, LOST when it is gone without one."""
        ...

    def terminate(self, handle: str) -> None:
        """Ask the attempt to stop (SIGTERM): a preemptible job checkpoints and exits EXIT_PREEMPTED."""
        ...

    def kill(self, handle: str) -> None:
        """Stop the attempt now (SIGKILL), including what it started."""
        ...

    def reattach(self, handle: str) -> bool:
        """After a control-plane restart: True when the attempt still runs, so polling it goes on."""
        ...


def detect_nodes() -> list[Node]:
    """This machine as one node, the pool of the local executor: GPUs (NVML, else torch when an NVIDIA driver is
    present), usable CPUs and total memory from /proc/meminfo."""
    cpus = float(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else float(os.cpu_count() or 1)
    memory_gb = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = int(line.split()[1]) / 1024**2  # kB -> GiB
    except OSError:
        pass
    return [Node(socket.gethostname() or "local", tuple(range(_gpu_count())), cpus, round(memory_gb, 1))]


def _gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: NVML raises its own error classes
        pass
    if not Path("/proc/driver/nvidia").exists():
        return 0
    import torch

    return int(torch.cuda.device_count())


class LocalExecutor:
    """Attempts as local processes, each under the launcher (see launch.py), in a session of its own so they
    outlive the control plane. `CUDA_VISIBLE_DEVICES` is the placement's GPU ids ("" for none); the job sees
    `AIFAB_HOME` (this store), `AIFAB_JOB_ID`, `AIFAB_JOB_ATTEMPT` and `AIFAB_JOB_DIR`. Output of every attempt
    is appended to `$AIFAB_HOME/jobs/<id>/job.log` after a header line.

    Handle: "PID:START_TICKS:JOB_ID:ATTEMPT" of the launcher; the start time tells a reused pid apart."""

    name = "local"

    def __init__(self, home: Path) -> None:
        self.home = home

    def start(self, job: JobInfo, placement: Placement) -> str:
        attempt = job.attempts
        jdir = job_dir(self.home, job.id)
        jdir.mkdir(parents=True, exist_ok=True)
        for stale in (EXIT_FILE, RESULT_FILE, LAUNCH_FILE):  # an earlier attempt's; state.json is kept
            (jdir / stale).unlink(missing_ok=True)
        gpu_ids = [g for share in placement for g in share.gpu_ids]
        env = {
            **os.environ,
            **{k: str(v) for k, v in job.env.items()},
            "AIFAB_HOME": str(self.home),
            "AIFAB_JOB_ID": str(job.id),
            "AIFAB_JOB_ATTEMPT": str(attempt),
            "AIFAB_JOB_DIR": str(jdir),
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpu_ids)),
            "PYTHONUNBUFFERED": "1",  # the log shows output as it happens
        }
        log = Path(job.log_path) if job.log_path else jdir / "job.log"
        nodes = ",".join(dict.fromkeys(s.node for s in placement)) or "-"
        when = datetime.now(UTC).isoformat(timespec="seconds")
        with open(log, "ab") as f:
            header = (
                f"=== job {job.id} attempt {attempt} started {when} on {nodes} gpus [{','.join(map(str, gpu_ids))}]"
            )
            f.write(f"{header} ===\n".encode())
            f.flush()
            launcher = subprocess.Popen(
                [sys.executable, "-m", "aifab.jobs.launch", "--", *job.command],
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own session: no terminal signal or controller death reaches it
            )
            try:
                code = launcher.wait(timeout=LAUNCH_TIMEOUT_S)  # the first launcher process exits once detached
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
                raise AifabError(f"job {job.id}: the launcher did not start within {LAUNCH_TIMEOUT_S:.0f} s") from None
        info = read_json(jdir / LAUNCH_FILE)
        if code != 0 or not isinstance(info, dict) or info.get("attempt") != attempt:
            raise AifabError(f"job {job.id}: the launcher failed (exit {code}); see {log}")
        return f"{info['pid']}:{info['start_ticks']}:{job.id}:{attempt}"

    def _parse(self, handle: str) -> tuple[int, int, Path, int]:
        try:
            pid, start, job_id, attempt = (int(p) for p in handle.split(":"))
        except ValueError:
            raise AifabError(f"not a local executor handle: {handle!r}") from None
        return pid, start, job_dir(self.home, job_id), attempt

    def _exit_code(self, jdir: Path, attempt: int) -> int | None:
        info = read_json(jdir / EXIT_FILE)
        if isinstance(info, dict) and info.get("attempt") == attempt and isinstance(info.get("exit_code"), int):
            return int(info["exit_code"])
        return None

    def poll(self, handle: str) -> Poll:
        pid, start, jdir, attempt = self._parse(handle)
        if (code := self._exit_code(jdir, attempt)) is not None:
            return code
        if alive(pid, start):
            return None
        code = self._exit_code(jdir, attempt)  # written just before the launcher exited
        return LOST if code is None else code

    def terminate(self, handle: str) -> None:
        pid, start, _, _ = self._parse(handle)
        if alive(pid, start):  # the launcher forwards it to the command's process group
            os.kill(pid, signal.SIGTERM)

    def kill(self, handle: str) -> None:
        pid, start, jdir, attempt = self._parse(handle)
        info = read_json(jdir / LAUNCH_FILE)
        if isinstance(info, dict) and info.get("attempt") == attempt and info.get("child_pid"):
            child = int(info["child_pid"])
            if proc_start_ticks(child) == info.get("child_start_ticks"):
                with contextlib.suppress(ProcessLookupError):  # its whole group; the launcher writes exit.json
                    os.killpg(child, signal.SIGKILL)
                return
        if alive(pid, start):
            os.kill(pid, signal.SIGKILL)

    def reattach(self, handle: str) -> bool:
        pid, start, _, _ = self._parse(handle)
        return alive(pid, start)
