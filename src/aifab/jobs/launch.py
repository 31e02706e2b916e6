"""The launcher the local executor runs for each attempt: `python -m aifab.jobs.launch -- CMD...`.

It detaches (fork; the first process exits once the second has started the command), runs CMD in a
process group of its own, forwards SIGTERM/SIGINT/SIGHUP to that group, and when CMD ends writes
`exit.json` (exit code, attempt, ended_at) into `$AIFAB_JOB_DIR`. So a control plane that was dead while the
job finished can still learn how it ended, and nothing here is a child of the control plane.

`launch.json` (written before the first process exits) names the launcher's and the command's pids and their
start times (from /proc), so a reused pid is never mistaken for the job. A signal exit is reported as a
negative code (-15 for SIGTERM), like Python's `returncode`; a command that cannot start exits 127.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aifab.jobs.attempt import EXIT_FILE, LAUNCH_FILE, write_json_atomic

EXIT_CANNOT_START = 127


def proc_start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, from /proc/PID/stat), or None when there is no
    such live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):  # state: exited, waiting to be reaped
        return None
    return int(fields[19])  # field 22 of the whole line: starttime


def alive(pid: int, start_ticks: int) -> bool:
    """Process `pid` exists and is the one that started at `start_ticks`."""
    return proc_start_ticks(pid) == start_ticks


def _run(command: list[str], job_dir: Path, attempt: int, ready_fd: int) -> int:
    """The detached launcher: start the command, report, forward signals, wait, write exit.json."""
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        if child is None:
            pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        child = subprocess.Popen(command, process_group=0)
    except OSError as e:
        print(f"aifab launch: cannot start {command[0]!r}: {e.strerror or e}", file=sys.stderr, flush=True)
        write_json_atomic(job_dir / LAUNCH_FILE, _launch_info(attempt, None))
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
        code = EXIT_CANNOT_START
    else:
        write_json_atomic(job_dir / LAUNCH_FILE, _launch_info(attempt, child.pid))
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
        for signum in pending:
            forward(signum, None)
        code = child.wait()  # a negative code for a signal; signal handlers run while we wait
    write_json_atomic(job_dir / EXIT_FILE, {"attempt": attempt, "exit_code": code, "ended_at": time.time()})
    return 0


def _launch_info(attempt: int, child_pid: int | None) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "attempt": attempt,
        "pid": pid,
        "start_ticks": proc_start_ticks(pid),
        "child_pid": child_pid,
        "child_start_ticks": proc_start_ticks(child_pid) if child_pid is not None else None,
    }


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("usage: python -m aifab.jobs.launch -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1 :]
    job_dir, attempt = os.environ.get("AIFAB_JOB_DIR"), os.environ.get("AIFAB_JOB_ATTEMPT", "")
    if not job_dir or not attempt.isdigit():
        print("aifab launch: AIFAB_JOB_DIR and AIFAB_JOB_ATTEMPT must be set", file=sys.stderr)
        return 2
    read_fd, write_fd = os.pipe()
    if os.fork():  # the first process: wait until the launcher has started the command, then leave
        os.close(write_fd)
        ok = os.read(read_fd, 2) == b"ok"
        os.close(read_fd)
        return 0 if ok else 1
    os.close(read_fd)
    try:
        code = _run(command, Path(job_dir), int(attempt), write_fd)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)  # the forked launcher never returns into the caller's stack


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
