"""The sandbox's child: the script `python -I -S` runs to execute one untrusted program and its tests.

It imports nothing of aifab (the child has no aifab on its path) and only the stdlib, so that its startup stays
near the bare interpreter's. `aifab.evaluate.sandbox` starts it and reads what it leaves; docs/security.md says
what it enforces. Run as a script it:

1. reads one marshalled payload (a dict of strings, ints and tuples) from stdin, a pipe, so that nothing can
   read it twice, and points stdin at /dev/null;
2. lowers its own resource limits (address space, CPU seconds, file size, open files, core dumps, processes);
   hard limits equal soft ones, so the program cannot raise them back;
3. installs an audit hook (PEP 578) that ends the process, exit code `REFUSED`, on any refused operation: new
   processes, signals to other processes, sockets, ctypes, subinterpreters, writes outside its working
   directory, reads outside the stdlib and that directory;
4. runs the program, then the tests, then `check(<entry point>)` when one is named;
5. writes the run's nonce to the verdict descriptor only when all of that returned, so a program that exits
   early with status 0 is not taken for a pass.

Exit codes (the parent maps them to statuses): PASSED, FAILED (a test or the program raised while tested),
ERROR (the program or the tests did not compile or failed at module level), REFUSED, NO_MEMORY (MemoryError).
"""

from __future__ import annotations

import marshal
import os
import resource
import sys

# typing, collections.abc and json would cost this script more than the bare interpreter's start (json pulls in
# re and enum): the annotations below are for mypy only, and the payload is marshalled.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

PASSED = 0
FAILED = 1
ERROR = 2
REFUSED = 3
NO_MEMORY = 4

PROGRAM_NAME = "<program>"
TESTS_NAME = "<tests>"
SOURCES: dict[str, str] = {}  # file name -> source of the code run, for tracebacks

# Devices and files any ordinary program may read besides the stdlib and its own directory.
READABLE_FILES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/etc/localtime")
READABLE_DIRS = ("/usr/share/zoneinfo",)

# Events that create, change or remove a path: (indices of the path arguments, indices of their dir_fd arguments).
# The shutil and glob wrappers end in these os-level events, so they need no entry of their own.
WRITE_EVENTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "os.chdir": ((0,), ()),  # a working directory elsewhere would make relative writes land elsewhere
    "os.chflags": ((0,), ()),
    "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)),
    "os.link": ((0, 1), (2, 3)),  # the source too: a hard link to a file outside is that file
    "os.mkdir": ((0,), (2,)),
    "os.remove": ((0,), (1,)),
    "os.removexattr": ((0,), ()),
    "os.rename": ((0, 1), (2, 3)),
    "os.rmdir": ((0,), (1,)),
    "os.setxattr": ((0,), ()),
    "os.symlink": ((1,), (2,)),
    "os.truncate": ((0,), ()),
    "os.utime": ((0,), (3,)),
}
# Events that read a directory's entries: (path argument) -> checked like a read.
READ_EVENTS = ("os.listdir", "os.scandir")
# The os.open flags that make an open a write.
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Functions that change the file system or signal other processes without raising an audit event (CPython 3.11):
# removed from their modules before the program runs, and those modules' re-import refused.
UNAUDITED = {"posix": ("mkfifo", "mknod", "pidfd_open", "chroot"), "_signal": ("pidfd_send_signal",)}


class Refused(Exception):
    """An operation the sandbox does not allow; the hook turns it into exit code REFUSED."""


def refuse(message: str) -> None:
    # os.write, not print: the program may have replaced sys.stderr, and the hook must not run Python I/O
    # that could itself raise events.
    os.write(2, f"\nsandbox: refused {message}\n".encode(errors="replace"))
    os._exit(REFUSED)


def within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class Policy:
    """What the audit hook allows. `workdir` is the program's own directory: it may read and write there, and
    read the files under `read_roots` (the stdlib) and a few devices."""

    def __init__(
        self, workdir: str, read_roots: Sequence[str], refused_events: Sequence[str], refused_imports: Sequence[str]
    ) -> None:
        self.workdir = os.path.realpath(workdir)
        self.read_roots = (*(os.path.realpath(r) for r in read_roots if r), *READABLE_DIRS)
        self.refused_events = tuple(refused_events)
        self.refused_imports = frozenset(refused_imports)

    @staticmethod
    def resolve(path: object, dir_fd: object = None) -> str | None:
        """The real path an event's path argument names (relative to `dir_fd` when one is given); None for a
        file descriptor, which was checked when it was opened."""
        if isinstance(path, int):
            return None
        name = os.fsdecode(path)  # type: ignore[arg-type]  # str, bytes or PathLike; anything else raises
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(name):
            # the directory a descriptor is open on; os.readlink raises no audit event
            name = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)
        return os.path.realpath(name)

    def may_write(self, path: object, dir_fd: object = None) -> bool:
        real = self.resolve(path, dir_fd)
        return real is None or within(real, self.workdir)

    def may_read(self, path: object) -> bool:
        real = self.resolve(path)
        if real is None or within(real, self.workdir) or real in READABLE_FILES:
            return True
        # a directory descriptor outside would let `dir_fd=` reach past these checks (open reports no dir_fd)
        return any(within(real, root) for root in self.read_roots) and not os.path.isdir(real)

    def within_stdlib(self, path: object) -> bool:
        real = self.resolve(path)
        return real is not None and any(within(real, root) for root in self.read_roots)

    def may_list(self, path: object) -> bool:
        real = self.resolve(os.curdir if path is None else path)
        return real is None or within(real, self.workdir) or any(within(real, r) for r in self.read_roots)

    def check(self, event: str, args: tuple[Any, ...]) -> None:
        """Raise Refused when `event` with `args` is not allowed."""
        if event.startswith(self.refused_events):
            raise Refused(event)
        if event == "import":
            name = str(args[0])
            if name in self.refused_imports or name.split(".")[0] in self.refused_imports:
                raise Refused(f"import {name}")
            # an extension module is announced with its file: native code runs past this hook, so only the
            # stdlib's may load (not one the program wrote into its directory)
            if len(args) > 1 and args[1] is not None and not self.within_stdlib(args[1]):
                raise Refused(f"import {name} from {args[1]!r} (native code outside the stdlib)")
        elif event == "open":
            path, mode, flags = args
            writing = bool(isinstance(flags, int) and flags & WRITE_FLAGS) or (
                isinstance(mode, str) and any(c in mode for c in "wax+")
            )
            if not (self.may_write(path) if writing else self.may_read(path)):
                raise Refused(f"open({path!r}) for {'writing' if writing else 'reading'}")
        elif event == "sqlite3.connect":
            # sqlite opens its database in C, past the open event; a "file:" URI names its path its own way
            database = os.fsdecode(args[0])
            if database not in (":memory:", "") and (database.startswith("file:") or not self.may_write(database)):
                raise Refused(f"sqlite3.connect({args[0]!r})")
        elif event in WRITE_EVENTS:
            paths, dir_fds = WRITE_EVENTS[event]
            for i, path in enumerate(paths):
                dir_fd = args[dir_fds[i]] if i < len(dir_fds) and dir_fds[i] < len(args) else None
                if path < len(args) and not self.may_write(args[path], dir_fd):
                    raise Refused(f"{event}({args[path]!r})")
        elif event in READ_EVENTS and not self.may_list(args[0] if args else None):
            raise Refused(f"{event}({args[0]!r})")

    def hook(self) -> Callable[[str, tuple[Any, ...]], None]:
        def audit(event: str, args: tuple[Any, ...]) -> None:
            try:
                self.check(event, args)
            except Refused as e:
                refuse(str(e))
            except Exception as e:  # an argument the checks cannot read must not let the operation through
                refuse(f"{event} (unreadable arguments: {type(e).__name__}: {e})")

        return audit


def strip_unaudited() -> None:
    """Remove the functions in UNAUDITED from their modules, and from the modules that re-export them."""
    for module_name, names in UNAUDITED.items():
        module = __import__(module_name)  # both are built in: no file is read, and signal's enum is not imported
        holders = [module, os if module_name == "posix" else sys.modules.get("signal")]
        for holder in holders:
            for name in names:
                if holder is not None and hasattr(holder, name):
                    delattr(holder, name)


def set_limits(memory_mb: int, cpu_s: int, file_bytes: int, open_files: int) -> None:
    """Lower this process's limits; soft and hard alike, so they cannot be raised again."""
    for limit, value in (
        (resource.RLIMIT_AS, memory_mb * 1024 * 1024),
        (resource.RLIMIT_CPU, cpu_s),
        (resource.RLIMIT_FSIZE, file_bytes),
        (resource.RLIMIT_NOFILE, open_files),
        (resource.RLIMIT_CORE, 0),
        # binds every user but root (the kernel exempts uid 0): no fork, no thread; the audit hook covers root
        (resource.RLIMIT_NPROC, 0),
    ):
        _, hard = resource.getrlimit(limit)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))


def describe(exc: BaseException) -> str:
    """The exception with a traceback of the program's and the tests' own frames only. Other frames' source
    is never read: this script's own lies outside what the hook lets it read."""
    import linecache
    import traceback

    for name, source in SOURCES.items():  # so that the frames show the program's and the tests' lines
        linecache.cache[name] = (len(source), None, source.splitlines(keepends=True), name)
    frames = [(f, n) for f, n in traceback.walk_tb(exc.__traceback__) if f.f_code.co_filename in SOURCES]
    stack = traceback.StackSummary.extract(iter(frames), lookup_lines=False)
    head = ["Traceback (most recent call last):\n", *stack.format()] if stack else []
    return "".join([*head, *traceback.format_exception_only(type(exc), exc)])


def run(program: str, tests: str, entry_point: str | None) -> int:
    """Run the program, then the tests, then check(entry point) when one is named; the exit code says how."""
    SOURCES.update({PROGRAM_NAME: program, TESTS_NAME: tests})
    namespace: dict[str, Any] = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    stage = ERROR  # what an exception means: the code failed to compile or define, or the tests failed
    try:
        program_code = compile(program, PROGRAM_NAME, "exec")
        tests_code = compile(tests, TESTS_NAME, "exec")
        exec(program_code, namespace)
        if entry_point is None:
            stage = FAILED  # the tests run themselves at module level
        exec(tests_code, namespace)
        if entry_point is not None:
            candidate, check = namespace.get(entry_point), namespace.get("check")
            if not callable(candidate) or not callable(check):
                missing = entry_point if not callable(candidate) else "check"
                sys.stderr.write(
                    f"sandbox: the {'program' if missing == entry_point else 'tests'} define no function {missing!r}\n"
                )
                return ERROR
            stage = FAILED
            check(candidate)
    except MemoryError:
        return NO_MEMORY
    except BaseException as e:  # SyntaxError, a failed assert, any error, or sys.exit() from the program
        try:
            sys.stderr.write(describe(e))
        except BaseException:  # an exception whose str() raises too
            sys.stderr.write(f"{type(e).__name__} (unprintable)\n")
        return stage
    return PASSED


def main() -> None:
    payload = marshal.loads(sys.stdin.buffer.read())  # from the parent, which runs this same interpreter
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    verdict_fd: int = payload["verdict_fd"]
    nonce: str = payload.pop("nonce")
    set_limits(payload["memory_mb"], payload["cpu_s"], payload["file_bytes"], payload["open_files"])
    strip_unaudited()
    # with -I -S, sys.path is the stdlib alone: imports from it keep working under the hook
    refused_imports = [*payload["refused_imports"], *UNAUDITED]
    policy = Policy(os.getcwd(), sys.path, payload["refused_events"], refused_imports)
    sys.argv = ["program"]
    sys.addaudithook(policy.hook())
    code = run(payload["program"], payload["tests"], payload["entry_point"])
    if code == PASSED:
        os.write(verdict_fd, nonce.encode())
    os._exit(code)  # skip interpreter teardown: the program's atexit handlers and finalizers do not run


if __name__ == "__main__":
    main()
