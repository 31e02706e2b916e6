"""The sandbox for model-written code: results for ordinary programs, and hostile ones (loops, fork bombs, huge
allocations, network, writes outside its directory, reading system files) killed or refused while the caller
goes on. Each run starts an interpreter (tens of ms); the timeouts here are short so the file stays fast."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aifab.evaluate import sandbox
from aifab.evaluate.sandbox import OUTPUT_TAIL_CHARS, Isolation, isolation, run_tests
from aifab.evaluate.sandbox_child import Policy, Refused

ADD = "def add(a, b):\n    return a + b\n"
CHECK_ADD = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def live_in_session(sid: int) -> list[int]:
    """Processes (not zombies) in session `sid` (any session: -1), read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if sid in (-1, int(fields[3])) and fields[0] != b"Z":
                found.append(int(entry))
    return found


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def first_line(output: str) -> str:
    return output.strip().splitlines()[0]


# ---- ordinary programs ----------------------------------------------------------------------------------------


def test_a_correct_program_passes() -> None:
    result = run_tests(ADD, CHECK_ADD, entry_point="add")
    assert result.status == "passed" and result.passed
    assert result.exit_code == 0
    assert result.elapsed_s > 0


def test_tests_may_run_their_own_asserts_without_an_entry_point() -> None:
    assert run_tests(ADD, "assert add(1, 1) == 2\n").passed
    result = run_tests(ADD, "assert add(1, 1) == 3, 'wrong sum'\n")
    assert result.status == "failed"
    assert "wrong sum" in result.output_tail


def test_a_wrong_body_fails_with_the_failing_assert_shown() -> None:
    result = run_tests("def add(a, b):\n    return a - b\n", CHECK_ADD, entry_point="add")
    assert result.status == "failed" and not result.passed
    assert 'File "<tests>", line 2' in result.output_tail
    assert "assert candidate(2, 3) == 5" in result.output_tail
    assert "AssertionError" in result.output_tail


def test_an_exception_in_the_program_is_a_failure_with_its_line() -> None:
    result = run_tests("def add(a, b):\n    return a + b[0]\n", CHECK_ADD, entry_point="add")
    assert result.status == "failed"
    assert 'File "<program>", line 2' in result.output_tail and "TypeError" in result.output_tail


@pytest.mark.parametrize(
    ("program", "tests", "says"),
    [
        ("def add(a, b:\n    return a\n", CHECK_ADD, "SyntaxError"),  # a completion that does not parse
        (ADD, "def check(candidate:\n", "SyntaxError"),
        ("def plus(a, b):\n    return a + b\n", CHECK_ADD, "'add'"),  # no entry point
        (ADD, "assert True\n", "'check'"),  # no check()
        ("import no_such_module_anywhere\n" + ADD, CHECK_ADD, "ModuleNotFoundError"),
        ("raise SystemExit(0)\n" + ADD, CHECK_ADD, "SystemExit"),
        ("\0", CHECK_ADD, "null"),
    ],
)
def test_code_that_cannot_be_defined_is_an_error(program: str, tests: str, says: str) -> None:
    result = run_tests(program, tests, entry_point="add")
    assert result.status == "error"
    assert says in result.output_tail


def test_leaving_early_with_status_0_is_not_a_pass() -> None:
    """The child confirms a pass with a nonce the program never sees: exiting 0 before the tests is a failure."""
    result = run_tests("import os\nos._exit(0)\n" + ADD, CHECK_ADD, entry_point="add")
    assert result.status == "failed" and result.exit_code == 0
    exits = "def add(a, b):\n    import sys\n    sys.exit(0)\n"
    assert run_tests(exits, CHECK_ADD, entry_point="add").status == "failed"


def test_a_program_larger_than_a_pipe_buffer_arrives_whole() -> None:
    padding = "# " + "x" * 300_000 + "\n"
    assert run_tests(padding + ADD, CHECK_ADD + padding, entry_point="add").passed


def test_without_namespaces_the_sandbox_still_runs_and_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel allows no namespace (isolation() finds none), the other layers still hold."""
    monkeypatch.setattr(sandbox, "_isolation", Isolation("none", False, ()))
    assert run_tests(ADD, CHECK_ADD, entry_point="add").passed
    assert run_tests("import os\nos.fork()\n", "").status == "killed"
    assert run_tests("import socket\nsocket.socket()\n", "").status == "killed"


def test_a_sandbox_that_cannot_start_is_an_error_not_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_isolation", Isolation("none", False, ("/nonexistent/unshare", "--")))
    result = run_tests(ADD, CHECK_ADD, entry_point="add")
    assert result.status == "error" and result.exit_code is None
    assert "could not start" in result.reason and "/nonexistent/unshare" in result.reason


def test_output_is_kept_as_a_bounded_tail() -> None:
    result = run_tests("print('hello from the program')\n" + ADD, CHECK_ADD, entry_point="add")
    assert result.passed and "hello from the program" in result.output_tail
    flood = "while True:\n    print('x' * 1000)\n"  # stopped by the file size limit on its output
    result = run_tests(flood, "", timeout_s=10)
    assert not result.passed
    assert 0 < len(result.output_tail) <= OUTPUT_TAIL_CHARS


# ---- hostile programs ------------------------------------------------------------------------------------------


def test_an_infinite_loop_times_out_and_the_caller_goes_on() -> None:
    result = run_tests("while True:\n    pass\n", "", timeout_s=0.5)
    assert result.status == "timeout" and not result.passed
    assert "wall-clock" in result.reason
    assert run_tests(ADD, CHECK_ADD, entry_point="add").passed


def test_a_sleeping_program_times_out() -> None:
    result = run_tests("import time\ntime.sleep(60)\n", "", timeout_s=0.5)
    assert result.status == "timeout"


def test_the_program_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A crashed (SIGKILLed) evaluator leaves no sleeping program behind, where setpriv can arrange that."""
    if not isolation().parent_death:
        pytest.skip("no setpriv --pdeathsig here")
    script = "from aifab.evaluate.sandbox import run_tests\n"
    script += "run_tests('import time\\ntime.sleep(120)\\n', '', timeout_s=120)\n"
    evaluator = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        children: list[int] = []
        while not children and time.monotonic() < deadline:
            children = [pid for pid in live_in_session(-1) if parent_of(pid) == evaluator.pid]
            time.sleep(0.05)
        assert children, "the sandboxed program never started"
    finally:
        evaluator.kill()
        evaluator.wait()
    deadline = time.monotonic() + 10
    while live_in_session(children[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_in_session(children[0]) == []


def test_a_fork_bomb_is_refused_and_leaves_no_process() -> None:
    program = "import os\nprint(os.getsid(0), flush=True)\nwhile True:\n    os.fork()\n"
    result = run_tests(program, "", timeout_s=5)
    assert result.status == "killed"
    assert "refused os.fork" in result.output_tail
    assert live_in_session(int(first_line(result.output_tail))) == []
    assert run_tests(ADD, CHECK_ADD, entry_point="add").passed


@pytest.mark.parametrize(
    "program",
    [
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        "import os\nos.posix_spawn('/bin/true', ['true'], {})",
        "import os\nos.execv('/bin/true', ['true'])",
        "import _posixsubprocess",
        "import multiprocessing",
        "import pty\npty.fork()",
        "import ctypes\nctypes.CDLL(None).fork()",
        "import os\nos.kill(os.getppid(), 0)",
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
    ],
)
def test_other_ways_to_start_a_process_or_reach_out_are_refused(program: str) -> None:
    result = run_tests(program + "\n", "")
    assert result.status == "killed", result.output_tail
    assert "sandbox: refused" in result.output_tail


def test_native_code_the_program_writes_is_not_loaded() -> None:
    """An extension module runs past the audit hook: one copied into the program's directory must not load."""
    program = textwrap.dedent("""
        import _bisect, os, shutil, sys
        name = os.path.basename(_bisect.__file__)
        shutil.copyfile(_bisect.__file__, os.path.join(os.getcwd(), name.replace("_bisect", "_mine")))
        sys.path.insert(0, os.getcwd())
        import _mine
    """)
    result = run_tests(program, "")
    assert result.status == "killed"
    assert "native code outside the stdlib" in result.output_tail


def test_functions_the_audit_hook_cannot_see_are_gone() -> None:
    """os.mkfifo/mknod and pidfd signalling raise no audit event in CPython 3.11: the child removes them."""
    tests = textwrap.dedent("""
        import os, signal
        assert not hasattr(os, "mkfifo") and not hasattr(os, "mknod") and not hasattr(os, "pidfd_open")
        assert not hasattr(signal, "pidfd_send_signal")
    """)
    assert run_tests("", tests).passed
    result = run_tests("import sys\ndel sys.modules['posix']\nimport posix\n", "")
    assert result.status == "killed" and "import posix" in result.output_tail


def test_processes_left_behind_are_killed_when_the_hook_is_bypassed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second line of defence: with fork allowed, forked children (one in a process group of its own) still
    die with the session at the timeout."""
    monkeypatch.setattr(sandbox, "REFUSED_EVENTS", tuple(e for e in sandbox.REFUSED_EVENTS if e != "os.fork"))
    program = textwrap.dedent("""
        import os, time
        print(os.getsid(0), flush=True)
        for i in range(3):
            try:
                if os.fork() == 0:
                    if i == 0:
                        os.setpgid(0, 0)  # leaves the group, not the session
                    time.sleep(600)
                    os._exit(0)
            except OSError:  # RLIMIT_NPROC = 0 binds when the tests do not run as root
                pass
        while True:
            pass
    """)
    result = run_tests(program, "", timeout_s=1)
    assert result.status == "timeout"
    assert live_in_session(int(first_line(result.output_tail))) == []


@pytest.mark.parametrize(
    "program",
    [
        "x = bytearray(10 ** 10)",
        "blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 6))",
        "x = [0] * 10 ** 9",
    ],
)
def test_a_huge_allocation_is_killed(program: str) -> None:
    result = run_tests(program + "\n", "", memory_mb=128)
    assert result.status == "killed"
    assert "memory" in result.reason
    assert run_tests(ADD, CHECK_ADD, entry_point="add").passed


def test_memory_limit_is_the_one_asked_for() -> None:
    program = "block = bytearray(200 * 1024 * 1024)\n"
    assert run_tests(program, "", memory_mb=128).status == "killed"
    assert run_tests(program, "", memory_mb=512).passed


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A socket listening on 127.0.0.1 in this process; the test checks that no connection reached it."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        yield server
        with pytest.raises(TimeoutError):
            server.accept()


def test_a_socket_to_the_caller_is_refused(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
    result = run_tests(program, "")
    assert result.status == "killed" and "refused socket" in result.output_tail


def test_without_the_hook_the_network_namespace_still_has_no_network(
    monkeypatch: pytest.MonkeyPatch, listener: socket.socket
) -> None:
    if isolation().network == "none":
        pytest.skip("this kernel lets the sandbox make no network namespace")
    monkeypatch.setattr(sandbox, "REFUSED_EVENTS", tuple(e for e in sandbox.REFUSED_EVENTS if e != "socket."))
    port = listener.getsockname()[1]
    program = f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    program += "except OSError:\n    unreachable = True\nelse:\n    unreachable = False\n"
    result = run_tests(program, "assert unreachable\n")
    assert result.passed, result.output_tail


@pytest.mark.parametrize(
    "attack",
    [
        "open(STORE + '/evil', 'w').write('x')",
        "import pathlib\npathlib.Path(STORE, 'evil').write_text('x')",
        "import os\nos.close(os.open(STORE + '/evil', os.O_CREAT | os.O_WRONLY))",
        "import os\nos.mkdir(STORE + '/evil')",
        "open('mine', 'w').write('x')\nimport os\nos.rename('mine', STORE + '/evil')",
        "import os\nos.symlink(STORE, 'door')\nopen('door/evil', 'w').write('x')",
        "import sqlite3\nsqlite3.connect(STORE + '/evil').execute('create table t (x)')",
        "import sqlite3\nsqlite3.connect('file:' + STORE + '/evil', uri=True).execute('create table t (x)')",
        "import shutil\nopen('mine', 'w').write('x')\nshutil.copy('mine', STORE + '/evil')",
        "import os\nos.chdir(STORE)\nopen('evil', 'w').write('x')",
        "import os\nos.remove(STORE + '/kept')",
        "open(STORE + '/kept', 'a').write('x')",
        "import os\nos.truncate(STORE + '/kept', 0)",
        "import os\nos.chmod(STORE + '/kept', 0o777)",
        "import os\nos.link(STORE + '/kept', 'alias')\nopen('alias', 'a').write('x')",
        "import tempfile\ntempfile.mkstemp(dir=STORE)",
    ],
)
def test_nothing_the_program_writes_reaches_a_directory_outside_its_own(attack: str, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "kept").write_text("precious")
    os.chmod(store / "kept", 0o644)
    result = run_tests(f"STORE = {str(store)!r}\n{attack}\n", "")
    assert result.status == "killed", result.output_tail
    assert "sandbox: refused" in result.output_tail
    assert sorted(p.name for p in store.iterdir()) == ["kept"]
    assert (store / "kept").read_text() == "precious"
    assert (store / "kept").stat().st_mode & 0o777 == 0o644


def test_reading_system_files_is_refused_but_the_stdlib_is_readable() -> None:
    """Decided: reads are limited to the stdlib, the program's directory and a few devices, so that nothing of
    the caller's (the store, keys, /etc/passwd) can come back in the output."""
    result = run_tests("print(open('/etc/passwd').read())\n", "")
    assert result.status == "killed" and "/etc/passwd" in result.output_tail
    assert "root:" not in result.output_tail
    assert run_tests("import os\nos.listdir('/')\n", "").status == "killed"
    tests = "import os, random\nassert 'def ' in open(os.__file__).read()\nassert len(os.urandom(4)) == 4\n"
    assert run_tests("", tests).passed


def test_the_temporary_directory_is_its_home_and_is_removed(tmp_path: Path) -> None:
    program = textwrap.dedent("""
        import os
        here = os.getcwd()
        print(here, flush=True)
        assert os.environ["HOME"] == here and os.environ["TMPDIR"] == here
        os.makedirs("locked/inner")
        open("locked/inner/file", "w").write("x")
        os.chmod("locked/inner", 0)
        os.chmod("locked", 0)
    """)
    result = run_tests(program, "")
    assert result.passed, result.output_tail
    workdir = Path(first_line(result.output_tail))
    assert workdir.name.startswith("aifab-sandbox-")
    assert not workdir.exists()


def test_no_environment_variable_of_the_caller_leaks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIFAB_HOME", str(tmp_path))
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    tests = textwrap.dedent("""
        import os
        assert "AIFAB_HOME" not in os.environ
        assert set(os.environ) <= {"PATH", "HOME", "TMPDIR", "LANG"}, sorted(os.environ)
    """)
    assert run_tests("", tests).passed


# ---- arguments -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        ({"program": b"x = 1"}, TypeError, "program must be a str"),
        ({"tests": None}, TypeError, "tests must be a str"),
        ({"timeout_s": 0}, ValueError, "timeout_s"),
        ({"timeout_s": float("nan")}, ValueError, "timeout_s"),
        ({"timeout_s": "5"}, ValueError, "timeout_s"),
        ({"memory_mb": 8}, ValueError, "memory_mb"),
        ({"memory_mb": 512.0}, ValueError, "memory_mb"),
        ({"entry_point": "not a name"}, ValueError, "entry_point"),
    ],
)
def test_bad_arguments_raise_one_clear_line(kwargs: dict[str, object], error: type[Exception], says: str) -> None:
    args: dict[str, object] = {"program": ADD, "tests": CHECK_ADD, **kwargs}
    with pytest.raises(error, match=says) as info:
        run_tests(**args)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


# ---- the audit hook's policy, in this process ------------------------------------------------------------------


def test_the_policy_resolves_links_and_directory_descriptors(tmp_path: Path) -> None:
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    (work / "door").symlink_to(outside)
    policy = Policy(str(work), [str(tmp_path / "stdlib")], ["os.fork"], ["ctypes"])
    assert policy.may_write(str(work / "file"))
    assert not policy.may_write(str(work / "door" / "file"))
    assert not policy.may_write(str(work / ".." / "outside" / "file"))
    fd = os.open(outside, os.O_RDONLY)
    try:
        assert not policy.may_write("file", fd)
    finally:
        os.close(fd)
    with pytest.raises(Refused):
        policy.check("open", (str(outside / "f"), "w", os.O_WRONLY | os.O_CREAT))
    with pytest.raises(Refused):
        policy.check("os.rename", (str(work / "a"), str(outside / "b"), None, None))
    with pytest.raises(Refused):
        policy.check("import", ("ctypes.util", None, [], [], []))
    with pytest.raises(Refused):
        policy.check("os.fork", ())
    policy.check("open", (str(work / "f"), "w", os.O_WRONLY | os.O_CREAT))
    policy.check("import", ("json", None, [], [], []))
