"""The Ray executor: each job attempt is a named, detached Ray actor that runs the job's command as a subprocess
on whichever node Ray places it, with the same job semantics as the local executor (see executors.py).

Why an actor and not a task: a task is owned by the driver that submitted it and dies with it, and its
ObjectRef means nothing to another driver, so a restarted control plane could neither find nor signal it. A
detached actor outlives the control plane, is found again by name (`ray.get_actor`), and answers calls while
its command runs, so `terminate()` can deliver SIGTERM to the job's own process group as the local launcher does.

Per attempt the actor holds the job's `num_gpus`, `num_cpus` and `memory` (plus any custom `resources` given to
the executor); the command sees `CUDA_VISIBLE_DEVICES` from Ray's assignment (`ray.get_gpu_ids()`), the same
`AIFAB_*` variables as locally, and its output is appended to the job's log after a header line. A thread of
the actor starts the command and waits for it, then writes `exit.json` like the launcher; the command gets
SIGKILL when the actor's process dies (PR_SET_PDEATHSIG), so a killed actor or a dead node leaves no job
process behind that would keep writing checkpoints.

Requirements: the store (`AIFAB_HOME`, and `AIFAB_DB` when set) must be reachable at the same path from every
node, i.e. shared storage on a real cluster (a local `ray.cluster_utils.Cluster` shares this machine's disk),
and aifab must be importable by the nodes' Ray workers. Handles survive a control-plane restart only while the
Ray cluster does: run one (`ray start --head`) and point `RAY_ADDRESS` at it; a Ray started by the controller
itself ends with it, and its attempts come back as lost.

Handle: "ray:NAMESPACE:JOB_ID:ATTEMPT"; the actor is named "job-JOB_ID-attempt-ATTEMPT" in NAMESPACE (one per
store). A node that dies mid-attempt takes the actor with it: Ray reports it dead, there is no exit.json, and
`poll()` answers LOST, so the control plane requeues the job and training resumes from its checkpoint.
"""

import contextlib
import ctypes
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aifab.errors import AifabError
from aifab.jobs.attempt import EXIT_FILE, LAUNCH_FILE, RESULT_FILE, read_json, write_json_atomic
from aifab.jobs.executors import LOST, Poll
from aifab.jobs.launch import EXIT_CANNOT_START
from aifab.jobs.records import JobInfo, job_dir
from aifab.schedule.state import Node, Placement

START_TIMEOUT_S = 120.0  # Ray places the actor and it starts the command, or start() gives up
CALL_TIMEOUT_S = 30.0  # a signal or status call to a live actor
KILL_WAIT_S = 5.0  # after SIGKILL, how long the actor waits for the command's exit to record it
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def ray_nodes(resources: Mapping[str, float] | None = None) -> list[Node]:
    """The alive nodes of the connected Ray cluster as a pool for the control plane: GPUs, CPUs and memory from
    Ray's resources. With `resources` (custom Ray resources), only the nodes that offer them. Nodes with neither
    CPUs nor GPUs (e.g. a head started with `--num-cpus 0`) are left out. Names are "IP-NODEID8"."""
    from aifab.cluster import connect

    ray = connect(AifabError, "--executor ray")
    pool = []
    for n in ray.nodes():
        res: dict[str, float] = n.get("Resources") or {}
        if not n.get("Alive") or any(res.get(k, 0.0) < v for k, v in (resources or {}).items()):
            continue
        gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 0.0))
        if gpus == 0 and cpus == 0:
            continue
        memory_gb = round(float(res.get("memory", 0.0)) / 1024**3, 1)
        pool.append(Node(_node_name(n["NodeManagerAddress"], n["NodeID"]), tuple(range(gpus)), cpus, memory_gb))
    if not pool:
        wanted = f" offering {dict(resources)}" if resources else ""
        raise AifabError(f"the Ray cluster has no alive node{wanted} with CPUs or GPUs")
    return pool


def _node_name(ip: str, node_id: str) -> str:
    return f"{ip}-{node_id[:8]}"


def _die_with_parent() -> Callable[[], None]:
    """A preexec_fn: in the forked child, before exec, ask for SIGKILL when the thread that started it dies.
    The C function is looked up here, before the fork, so the child only calls it."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class _Attempt:
    """The actor of one attempt (runs in a Ray worker). `begin()` starts the command and returns where;
    `status()` is its exit code or None; `send(signum)` signals its process group."""

    def __init__(self, job_id: int, attempt: int, command: list[str], env: dict[str, str], jdir: str, log: str):
        self.job_id, self.attempt, self.command, self.env = job_id, attempt, command, env
        self.jdir, self.log = Path(jdir), Path(log)
        self.child: subprocess.Popen[bytes] | None = None
        self.code: int | None = None
        self.started, self.done = threading.Event(), threading.Event()

    def begin(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        node_id = ctx.get_node_id()
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]  # Ray's assignment on this node
        where = _node_name(ray.util.get_node_ip_address(), node_id)  # type: ignore[no-untyped-call]
        env = {**os.environ, **self.env, "CUDA_VISIBLE_DEVICES": ",".join(gpu_ids), "PYTHONUNBUFFERED": "1"}
        when = datetime.now(UTC).isoformat(timespec="seconds")
        header = f"=== job {self.job_id} attempt {self.attempt} started {when} on {where} gpus [{','.join(gpu_ids)}]"
        threading.Thread(target=self._run, args=(env, f"{header} (ray) ===\n"), daemon=True).start()
        self.started.wait()
        info = {
            "attempt": self.attempt,
            "executor": "ray",
            "node": where,
            "node_id": node_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "child_pid": self.child.pid if self.child is not None else None,
            "gpu_ids": gpu_ids,
        }
        write_json_atomic(self.jdir / LAUNCH_FILE, info)
        return info

    def _run(self, env: dict[str, str], header: str) -> None:
        """Start the command and wait for it (this thread lives exactly as long as the command: the child's
        PDEATHSIG is tied to it), then record its exit like the launcher."""
        with open(self.log, "ab") as f:
            f.write(header.encode())
            f.flush()
            try:
                self.child = subprocess.Popen(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    env=env,
                    process_group=0,  # its own group: a signal reaches everything it started
                    preexec_fn=_die_with_parent(),
                )
            except OSError as e:
                f.write(f"aifab ray executor: cannot start {self.command[0]!r}: {e.strerror or e}\n".encode())
                code = EXIT_CANNOT_START
                self.started.set()
            else:
                self.started.set()
                code = self.child.wait()  # negative for a signal, like the launcher
        write_json_atomic(self.jdir / EXIT_FILE, {"attempt": self.attempt, "exit_code": code, "ended_at": time.time()})
        self.code = code  # set after exit.json, so a code from status() means the file is there too
        self.done.set()

    def status(self) -> int | None:
        return self.code

    def send(self, signum: int, wait_s: float = 0.0) -> int | None:
        """Signal the command's process group; wait up to `wait_s` for it to end. Its exit code or None."""
        if self.child is not None and self.code is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signum)
        self.done.wait(wait_s)
        return self.code


class RayExecutor:
    """Attempts as detached Ray actors (see the module docstring). `home` is the store, at the same path on every
    node; `resources` are custom Ray resources every attempt also asks for (e.g. {"trainer": 1}). Connects to
    Ray through `aifab.cluster.connect` (the cluster at $RAY_ADDRESS, else a local one) unless already connected."""

    name = "ray"

    def __init__(
        self, home: Path, resources: Mapping[str, float] | None = None, *, start_timeout_s: float = START_TIMEOUT_S
    ) -> None:
        from aifab.cluster import connect

        self.ray = connect(AifabError, "--executor ray")
        self.home = home
        self.resources = dict(resources or {})
        self.start_timeout_s = start_timeout_s
        self.namespace = "aifab-" + hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]
        self._cls = self.ray.remote(_Attempt)
        self._actors: dict[str, Any] = {}  # handle -> actor handle, cached between polls
        self._pings: dict[str, Any] = {}  # handle -> an outstanding status() call

    # -- the Executor protocol ----------------------------------------------------------------------------------

    def start(self, job: JobInfo, placement: Placement) -> str:
        if len(placement) > 1:
            raise AifabError(
                f"job {job.id}: the Ray executor runs an attempt on one node, but it was placed across "
                f"{len(placement)} nodes; ask for what one node holds (multi-node training: aifab train --engine ray)"
            )
        from ray.exceptions import GetTimeoutError, RayError
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        attempt = job.attempts
        jdir = job_dir(self.home, job.id)
        jdir.mkdir(parents=True, exist_ok=True)
        for stale in (EXIT_FILE, RESULT_FILE, LAUNCH_FILE):  # an earlier attempt's; state.json is kept
            (jdir / stale).unlink(missing_ok=True)
        handle = f"ray:{self.namespace}:{job.id}:{attempt}"
        self._release(handle)  # a leftover of this very attempt (a control plane that died while starting it)
        env = {k: v for k, v in os.environ.items() if k.startswith("AIFAB_") and not k.startswith("AIFAB_JOB_")}
        env.update({k: str(v) for k, v in job.env.items()})
        env.update(
            AIFAB_HOME=str(self.home), AIFAB_JOB_ID=str(job.id), AIFAB_JOB_ATTEMPT=str(attempt), AIFAB_JOB_DIR=str(jdir)
        )
        gpus = sum(len(s.gpu_ids) for s in placement) if placement else job.gpus
        cpus = sum(s.cpus for s in placement) if placement else job.cpus
        memory_gb = sum(s.memory_gb for s in placement) if placement else job.memory_gb
        options: dict[str, Any] = {
            "name": self._actor_name(job.id, attempt),
            "namespace": self.namespace,
            "lifetime": "detached",  # outlives the control plane
            "max_restarts": 0,  # a dead actor is a lost attempt; the control plane decides what comes next
            "max_concurrency": 4,  # status and signals are answered while the command runs
            "num_gpus": gpus,
            "num_cpus": cpus,
            "memory": int(memory_gb * 1024**3) or None,
            "resources": self.resources or None,
        }
        node_id = self._node_ids().get(placement[0].node) if placement else None
        if node_id is not None:  # the policy's node, while it lives; else wherever Ray finds room
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
        log = job.log_path or str(jdir / "job.log")
        actor = self._cls.options(**options).remote(job.id, attempt, list(job.command), env, str(jdir), log)
        try:
            self.ray.get(actor.begin.remote(), timeout=self.start_timeout_s)
        except GetTimeoutError:
            self.ray.kill(actor, no_restart=True)
            asked = f"{gpus} GPUs, {cpus:g} CPUs, {memory_gb:g} GB" + (f", {self.resources}" if self.resources else "")
            raise AifabError(
                f"job {job.id}: Ray did not start attempt {attempt} within {self.start_timeout_s:.0f} s; "
                f"no node has room for {asked}"
            ) from None
        except RayError as e:
            with contextlib.suppress(RayError):
                self.ray.kill(actor, no_restart=True)
            raise AifabError(f"job {job.id}: the Ray actor of attempt {attempt} did not start: {e}") from None
        self._actors[handle] = actor
        return handle

    def poll(self, handle: str) -> Poll:
        from ray.exceptions import ActorUnavailableError, RayActorError

        jdir, attempt = self._parse(handle)
        if (code := self._exit_code(jdir, attempt)) is not None:
            self._release(handle)
            return code
        actor = self._actor(handle)
        if actor is None:  # gone: ended (exit.json written just now) or lost with its node
            code = self._exit_code(jdir, attempt)
            return LOST if code is None else code
        ping = self._pings.get(handle)
        if ping is None:
            ping = self._pings[handle] = actor.status.remote()
        ready, _ = self.ray.wait([ping], timeout=0)
        if not ready:
            return None
        del self._pings[handle]
        try:
            code = self.ray.get(ping)
        except ActorUnavailableError:  # unreachable for now (e.g. a network blip): ask again next round
            return None
        except RayActorError:  # dead: its node died or it was killed before the command ended
            self._actors.pop(handle, None)
            code = self._exit_code(jdir, attempt)
            return LOST if code is None else code
        if code is not None:
            self._release(handle)
        return None if code is None else int(code)

    def terminate(self, handle: str) -> None:
        self._send(handle, signal.SIGTERM)

    def kill(self, handle: str) -> None:
        self._send(handle, signal.SIGKILL, wait_s=KILL_WAIT_S)  # the actor records the exit (-9) first
        self._release(handle)

    def reattach(self, handle: str) -> bool:
        from ray.exceptions import GetTimeoutError, RayActorError

        self._parse(handle)
        actor = self._actor(handle)
        if actor is None:
            return False
        try:
            return self.ray.get(actor.status.remote(), timeout=CALL_TIMEOUT_S) is None
        except GetTimeoutError:
            return True  # it exists but is slow to answer; polling goes on and finds out
        except RayActorError:
            return False

    # -- helpers ------------------------------------------------------------------------------------------------

    @staticmethod
    def _actor_name(job_id: int, attempt: int) -> str:
        return f"job-{job_id}-attempt-{attempt}"

    def _parse(self, handle: str) -> tuple[Path, int]:
        parts = handle.split(":")
        if len(parts) != 4 or parts[0] != "ray" or not parts[2].isdigit() or not parts[3].isdigit():
            raise AifabError(f"not a Ray executor handle: {handle!r}")
        return job_dir(self.home, int(parts[2])), int(parts[3])

    def _actor(self, handle: str) -> Any:
        """The attempt's actor, or None when no actor of that name lives."""
        if handle in self._actors:
            return self._actors[handle]
        _, namespace, job_id, attempt = handle.split(":")
        try:
            actor = self.ray.get_actor(self._actor_name(int(job_id), int(attempt)), namespace=namespace)
        except ValueError:  # no such named actor (never started, ended and released, or dead)
            return None
        self._actors[handle] = actor
        return actor

    def _release(self, handle: str) -> None:
        """End the attempt's actor (its command has ended): frees its resources on the cluster."""
        from ray.exceptions import RayError

        actor = self._actor(handle)
        self._actors.pop(handle, None)
        self._pings.pop(handle, None)
        if actor is not None:
            with contextlib.suppress(RayError, ValueError):
                self.ray.kill(actor, no_restart=True)

    def _send(self, handle: str, signum: int, wait_s: float = 0.0) -> None:
        from ray.exceptions import GetTimeoutError, RayActorError

        self._parse(handle)
        actor = self._actor(handle)
        if actor is None:
            return
        with contextlib.suppress(GetTimeoutError, RayActorError):  # a dead actor took its command with it
            self.ray.get(actor.send.remote(signum, wait_s), timeout=CALL_TIMEOUT_S + wait_s)

    @staticmethod
    def _exit_code(jdir: Path, attempt: int) -> int | None:
        info = read_json(jdir / EXIT_FILE)
        if isinstance(info, dict) and info.get("attempt") == attempt and isinstance(info.get("exit_code"), int):
            return int(info["exit_code"])
        return None

    def _node_ids(self) -> dict[str, str]:
        """Pool node name -> Ray node id, for the alive nodes."""
        return {_node_name(n["NodeManagerAddress"], n["NodeID"]): n["NodeID"] for n in self.ray.nodes() if n["Alive"]}
