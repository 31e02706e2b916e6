"""Run a model-written Python program against its tests in an isolated, limited subprocess (Linux).

`run_tests(program, tests)` starts `python -I -S -B -u sandbox_child.py` (the stdlib only: no site-packages, no
PYTHON* variables, no bytecode written) and hands it the program and the tests on a pipe. The result says
whether the tests passed; whatever the program does, the call returns and the caller can go on.

What is enforced, in layers (docs/security.md has the full list and what is not covered):

- **Process**: its own session and process group, killed as a whole (SIGKILL) at the wall-clock limit, then any
  process left in the session is found through /proc and killed too. Its own fresh temporary directory is its
  working directory, HOME and TMPDIR, and is removed afterwards. The environment is four variables (PATH, HOME,
  TMPDIR, LANG): nothing of the caller's (no AIFAB_*, no store path) reaches it. Only stdin (/dev/null once the
  payload is read), stdout, stderr and one verdict descriptor are open in it.
- **Limits** (set by the child on itself, hard = soft): address space `memory_mb`, CPU seconds (the wall-clock
  limit rounded up, plus one), file size FILE_LIMIT_BYTES (its output included), OPEN_FILES descriptors, no core
  dumps, no processes (RLIMIT_NPROC = 0, which the kernel does not apply to root).
- **Parent death**: the child is SIGKILLed if the caller dies (util-linux `setpriv --pdeathsig`, where present).
- **Namespaces**, where the kernel allows them (probed once per process; `isolation()` says which): a new
  network namespace, so there is no network at all, not even loopback; inside a new user namespace when
  possible, so that even when the caller is root the program holds no capability outside it.
- **An audit hook** (PEP 578) installed before the program runs, which ends the process on: creating a process
  (fork, exec, spawn, system, subprocess), signalling another process, any socket, ctypes, raising a limit,
  subinterpreters, sqlite extensions, native code from outside the stdlib, writing outside its directory,
  reading outside its directory and the stdlib (so /etc/passwd is refused). It is what stops a fork bomb when
  the caller is root.

Statuses: `passed` (the tests ran to the end), `failed` (an assertion or any exception while the tests ran),
`error` (the program or the tests did not compile or failed while being defined, an entry point or check is
missing, or the sandbox itself could not start), `timeout` (the wall-clock or CPU limit), `killed` (a refused
operation, the memory limit, or a signal). Only `passed` counts as a pass; a program that exits early with
status 0 is `failed`, because the child confirms a pass with a per-run nonce the program is not given.
"""

import contextlib
import marshal
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aifab.evaluate import sandbox_child as child

Status = Literal["passed", "failed", "timeout", "killed", "error"]

CHILD_SCRIPT = Path(child.__file__).resolve()
FILE_LIMIT_BYTES = 16 * 1024 * 1024  # any one file, its output included
OPEN_FILES = 64
OUTPUT_TAIL_CHARS = 4000
MIN_MEMORY_MB = 64  # the interpreter itself maps about 30 MB before the program allocates anything

# Audit events that end the program (prefixes: "socket." is every socket event).
REFUSED_EVENTS = (
    "os.fork",
    "os.forkpty",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.system",
    "os.kill",  # and os.killpg
    "subprocess.Popen",
    "pty.spawn",
    "socket.",
    "ctypes.",
    "resource.setrlimit",
    "resource.prlimit",
    "signal.pthread_kill",
    "sqlite3.enable_load_extension",
    "sqlite3.load_extension",
    "syslog.",
    "webbrowser.open",
    "ensurepip.",
)
# Modules whose import ends the program: they start processes, load native code, open files or shared memory in
# C past the audit hook, or start an interpreter without it.
REFUSED_IMPORTS = (
    "ctypes",
    "_ctypes",
    "_ctypes_test",
    "_posixsubprocess",
    "subprocess",
    "multiprocessing",
    "_multiprocessing",
    "_posixshmem",
    "concurrent.futures.process",
    "_xxsubinterpreters",
    "_xxinterpchannels",
    "_testcapi",
    "_testinternalcapi",
    "_testmultiphase",
    "_testbuffer",
    "_testimportmultiple",
    "_dbm",
    "_gdbm",
    "readline",
    "_tkinter",
)


@dataclass(frozen=True)
class SandboxResult:
    """How one program fared against its tests.

    `output_tail` is the end of its stdout and stderr together (a traceback for a failure); `reason` is one line
    saying why the status is what it is; `exit_code` is the child's (negative: the signal that ended it; None:
    it never started)."""

    status: Status
    elapsed_s: float
    output_tail: str
    exit_code: int | None = None
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    """What this machine lets the sandbox use besides its own limits and audit hook.

    `network`: the namespaces the child runs in. `parent_death`: the child is SIGKILLed if the process that
    started it dies (util-linux `setpriv --pdeathsig`), so a crashed evaluator leaves no sleeping program.
    `wrapper` is the command the child's interpreter runs under."""

    network: Literal["user+net namespace", "net namespace", "none"]
    parent_death: bool
    wrapper: tuple[str, ...]


_probe_lock = threading.Lock()
_isolation: Isolation | None = None


def _works(wrapper: Sequence[str]) -> bool:
    probe = [*wrapper, sys.executable, "-I", "-S", "-c", "pass"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def isolation() -> Isolation:
    """What works here, probed once per process: a user and network namespace (unprivileged user namespaces,
    or root), else a network namespace alone (root), else none; and a parent-death signal."""
    global _isolation
    with _probe_lock:
        if _isolation is None:
            setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
            death = (setpriv, "--pdeathsig", "KILL", "--")
            parent_death = os.path.exists(setpriv) and _works(death)
            tail = death if parent_death else ()
            unshare = shutil.which("unshare") or "/usr/bin/unshare"
            namespaces: list[tuple[Literal["user+net namespace", "net namespace"], tuple[str, ...]]] = [
                ("user+net namespace", (unshare, "--user", "--map-root-user", "--net", "--")),
                ("net namespace", (unshare, "--net", "--")),
            ]
            _isolation = Isolation("none", parent_death, tail)
            for network, wrapper in namespaces if os.path.exists(unshare) else []:
                if _works((*wrapper, *tail)):
                    _isolation = Isolation(network, parent_death, (*wrapper, *tail))
                    break
        return _isolation


def run_tests(
    program: str,
    tests: str,
    *,
    entry_point: str | None = None,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
) -> SandboxResult:
    """Run `program`, then `tests`, in a sandboxed subprocess; never raises for anything the program does.

    `tests` is code that checks the program's definitions: with `entry_point`, it must define
    `check(candidate)`, which is called with the program's function of that name; without, it runs its own
    asserts at module level. The wall-clock limit `timeout_s` covers the interpreter's start (tens of ms).
    Raises TypeError or ValueError for arguments that are not strings or sensible limits."""
    for name, value in (("program", program), ("tests", tests)):
        if not isinstance(value, str):
            raise TypeError(f"run_tests: {name} must be a str, not {type(value).__name__}")
    if entry_point is not None and not (isinstance(entry_point, str) and entry_point.isidentifier()):
        raise ValueError(f"run_tests: entry_point must be a Python identifier, not {entry_point!r}")
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"run_tests: timeout_s must be a positive number of seconds, not {timeout_s!r}")
    if not (isinstance(memory_mb, int) and memory_mb >= MIN_MEMORY_MB):
        raise ValueError(f"run_tests: memory_mb must be an int of at least {MIN_MEMORY_MB}, not {memory_mb!r}")

    payload: dict[str, object] = {
        "program": program,
        "tests": tests,
        "entry_point": entry_point,
        "memory_mb": memory_mb,
        "cpu_s": math.ceil(timeout_s) + 1,  # the wall clock normally ends it first; this binds if we cannot
        "file_bytes": FILE_LIMIT_BYTES,
        "open_files": OPEN_FILES,
        "refused_events": REFUSED_EVENTS,
        "refused_imports": REFUSED_IMPORTS,
    }
    wrapper = isolation().wrapper
    workdir = tempfile.mkdtemp(prefix="aifab-sandbox-")
    try:
        # output and verdict are unlinked files outside the workdir: the child holds only their descriptors
        with tempfile.TemporaryFile() as output, tempfile.TemporaryFile() as verdict:
            return _run(payload, wrapper, workdir, timeout_s, output.fileno(), verdict.fileno())
    finally:
        _remove(workdir)


def _run(
    payload: dict[str, object], wrapper: tuple[str, ...], workdir: str, timeout_s: float, out_fd: int, verdict_fd: int
) -> SandboxResult:
    nonce = secrets.token_hex(16)
    data = marshal.dumps({**payload, "nonce": nonce, "verdict_fd": verdict_fd})
    command = [*wrapper, sys.executable, "-I", "-S", "-B", "-u", str(CHILD_SCRIPT)]
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=out_fd,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,  # setsid: its own session and process group, to be killed as one
            pass_fds=(verdict_fd,),
        )
    except OSError as e:
        return SandboxResult("error", 0.0, "", None, f"the sandbox could not start: {e}")
    feeder = _feed(proc, data)
    try:
        timed_out = not _exited(proc.pid, timeout_s)
    finally:
        # the child is not reaped yet, so its pid (= its session and group id) cannot have been reused
        _kill_session(proc.pid)
        rc = proc.wait()
        if feeder is not None:
            feeder.join()
    elapsed_s = time.monotonic() - start
    passed = os.pread(verdict_fd, 64, 0) == nonce.encode()
    tail = _tail(out_fd)
    status, reason = _classify(rc, timed_out, passed, payload)
    if timed_out:
        reason = f"ran past the wall-clock limit of {timeout_s:g} s"
    return SandboxResult(status, elapsed_s, tail, rc, reason)


def _feed(proc: "subprocess.Popen[bytes]", data: bytes) -> threading.Thread | None:
    """Write the payload to the child's stdin without ever blocking the caller: what the pipe takes at once (all
    of it, usually), then the rest from a thread, whose write fails once the child is gone."""
    assert proc.stdin is not None
    stdin = proc.stdin
    fd = stdin.fileno()
    os.set_blocking(fd, False)
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        sent = 0
    except OSError:  # the child is already gone
        sent = len(data)
    if sent == len(data):
        stdin.close()
        return None

    def rest() -> None:
        os.set_blocking(fd, True)
        with contextlib.suppress(OSError):  # the child ended before reading it all
            stdin.write(data[sent:])
        with contextlib.suppress(OSError):
            stdin.close()

    thread = threading.Thread(target=rest, daemon=True)
    thread.start()
    return thread


def _exited(pid: int, timeout_s: float) -> bool:
    """Wait up to timeout_s for the child to exit, without reaping it; False if it is still running."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (kernel before 5.3): poll
        pidfd = None
    if pidfd is not None:
        try:
            return bool(select.select([pidfd], [], [], timeout_s)[0])
        finally:
            os.close(pidfd)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.005)
    return False


def _classify(rc: int, timed_out: bool, passed: bool, payload: dict[str, object]) -> tuple[Status, str]:
    if timed_out or rc == -signal.SIGXCPU:
        return "timeout", f"ran past the CPU limit of {payload['cpu_s']} s"
    if rc == child.PASSED:
        if passed:
            return "passed", "every test passed"
        return "failed", "exited with status 0 before its tests finished"
    if rc == child.FAILED:
        return "failed", "a test failed"
    if rc == child.ERROR:
        return "error", "the program or its tests could not be compiled or defined"
    if rc == child.REFUSED:
        return "killed", "attempted an operation the sandbox refuses"
    if rc == child.NO_MEMORY:
        return "killed", f"ran out of its {payload['memory_mb']} MB of memory"
    if rc < 0:
        return "killed", f"killed by {signal.Signals(-rc).name}" if -rc in signal.valid_signals() else "killed"
    return "failed", f"exited with status {rc}"


def _tail(fd: int) -> str:
    size = os.fstat(fd).st_size
    start = max(0, size - 4 * OUTPUT_TAIL_CHARS)  # up to 4 bytes a character in UTF-8
    text = os.pread(fd, size - start, start).decode(errors="replace")
    return text[-OUTPUT_TAIL_CHARS:]


def _session_members(sid: int) -> list[int]:
    """Live processes (not zombies) whose session id is `sid`, read from /proc; [] where there is no /proc."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # it ended meanwhile
            continue
        # fields after the command name (which may hold spaces and parentheses): state ppid pgrp session ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != b"Z":
            members.append(int(entry))
    return members


def _kill_session(sid: int) -> None:
    """SIGKILL the child's process group, then any process still in its session (one that changed its group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)
    for _ in range(10):  # a member that forks while being killed leaves a new one behind: look again
        members = _session_members(sid)
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _remove(workdir: str) -> None:
    """Remove the program's directory, whatever modes it left on what it made there."""

    def loosen(func: object, path: str, exc: object) -> None:
        # a directory the program made unreadable or unwritable: give it back to us and retry
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            shutil.rmtree(path)
        else:
            os.unlink(path)

    shutil.rmtree(workdir, onerror=loosen)
