"""What the scheduling policy sees: the pool, the pending and running jobs, and the resource arithmetic over them.

`ClusterState` is the policy's input (policy.py decides on it). `ClusterState.build` computes it from plain
lists, as the control plane does every round; the simulator instead keeps one and updates it in place
(`add_pending`, `remove_pending`, `add_running`, `remove_running`), so each event costs a few index updates,
not a rebuild. It indexes pending jobs by priority, least-attained-service queue and arrival, and keeps each
node's free GPUs, CPUs and memory, and each project's held resources.

`Resources` carries its own arithmetic (`+`, `-`, `covers`, `fits_quota`, `part`). `split_gang` is the one way
a gang (a job larger than any node) is split over nodes: the policy places with it, and `unplaceable` checks
with it. `unplaceable` says why a request could never fit a pool, even an empty one: the control plane refuses
such a job at submission.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

JobId = int | str

# Least-attained-service queues of `default`: a job whose attained GPU-seconds are below LAS_LIMITS_GPU_S[i] sits in
# queue i (0 first); above the last limit it sits in the last queue. One GPU-hour, then sixteen.
LAS_LIMITS_GPU_S = (3_600.0, 57_600.0)


@dataclass(frozen=True, slots=True)
class Resources:
    """What a job asks for, what a project holds, or what a project may hold (a quota: a field left at 0 is not
    limited). `Resources.ZERO` is nothing at all."""

    ZERO: ClassVar[Resources]

    gpus: int = 0
    cpus: float = 0.0
    memory_gb: float = 0.0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.gpus + other.gpus, self.cpus + other.cpus, self.memory_gb + other.memory_gb)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.gpus - other.gpus, self.cpus - other.cpus, self.memory_gb - other.memory_gb)

    def covers(self, other: Resources) -> bool:
        """Whether this asks for at least as much of everything as `other`."""
        return self.gpus >= other.gpus and self.cpus >= other.cpus and self.memory_gb >= other.memory_gb

    def fits_quota(self, held: Resources, quota: Resources | None) -> bool:
        """Whether a project holding `held` may take this request too under `quota` (None: no quota)."""
        if quota is None:
            return True
        return (
            (quota.gpus <= 0 or held.gpus + self.gpus <= quota.gpus)
            and (quota.cpus <= 0 or held.cpus + self.cpus <= quota.cpus + 1e-9)
            and (quota.memory_gb <= 0 or held.memory_gb + self.memory_gb <= quota.memory_gb + 1e-9)
        )

    def part(self, gpus: int) -> Resources:
        """The share of a gang request that comes with `gpus` of its GPUs: CPUs and memory in proportion."""
        return Resources(gpus, self.cpus * gpus / self.gpus, self.memory_gb * gpus / self.gpus)


Resources.ZERO = Resources()


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    gpu_ids: tuple[int, ...]  # every GPU index on the node (CUDA_VISIBLE_DEVICES values)
    cpus: float
    memory_gb: float


@dataclass(frozen=True, slots=True)
class Share:
    """What one job holds on one node."""

    node: str
    gpu_ids: tuple[int, ...]
    cpus: float
    memory_gb: float


Placement = tuple[Share, ...]  # one Share per node; a gang gets all its shares at once or nothing


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as the policy sees it."""

    id: JobId
    project: str
    priority: int  # higher runs first
    kind: str  # "train" | "serve" | "evaluate" | "data" | "command"
    request: Resources
    preemptible: bool  # training is (it checkpoints and resumes); serving replicas are not
    submitted_s: float  # arrival order for fifo, and the tie-break everywhere else
    # GPU-seconds of its finished attempts. For a running job the policy adds the current attempt itself, from
    # Running.started_s to ClusterState.now_s: do not include it here.
    attained_gpu_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Running:
    job: JobView
    placement: Placement
    started_s: float
    stopping: bool = False  # a Preempt was sent and is being carried out; its resources are not free yet


@dataclass(frozen=True, slots=True)
class Start:
    job_id: JobId
    placement: Placement


@dataclass(frozen=True, slots=True)
class Preempt:
    job_id: JobId
    reason: str  # e.g. "for job 17 (priority 10)"


Decision = Start | Preempt


@dataclass(slots=True)
class NodeFree:
    """The free part of one node."""

    gpu_ids: list[int]  # sorted
    cpus: float
    memory_gb: float


def las_queue(attained_gpu_s: float) -> int:
    """The least-attained-service queue of a job that has run `attained_gpu_s` GPU-seconds (0 goes first)."""
    return bisect_left(LAS_LIMITS_GPU_S, attained_gpu_s + 1e-9)


def attained_now(run: Running, now_s: float) -> float:
    """GPU-seconds a running job has received over all its attempts, the current one up to `now_s`."""
    return run.job.attained_gpu_s + run.job.request.gpus * max(0.0, now_s - run.started_s)


PendingEntry = tuple[tuple[float, int, str], JobView]  # (submission order key, job): sorts by arrival, ids break ties


def _order_key(job: JobView) -> tuple[float, int, str]:
    if isinstance(job.id, int):
        return (job.submitted_s, job.id, "")
    return (job.submitted_s, 0, job.id)


@dataclass
class ClusterState:
    """The cluster as one call of `Policy.decide` sees it.

    `nodes`, `pending`, `running`, `quotas` (project -> most it may hold at once; absent = no limit), `weights`
    (fair-share weight per project, default 1) and `now_s` are the facts. Everything else is derived from them by
    `build` and kept up to date by `add_pending`, `remove_pending`, `add_running` and `remove_running` (the
    simulator uses these instead of rebuilding the state per event). Policies only read a state.
    """

    nodes: dict[str, Node]
    pending: dict[JobId, JobView] = field(default_factory=dict)
    running: dict[JobId, Running] = field(default_factory=dict)
    quotas: dict[str, Resources] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    now_s: float = 0.0

    # Derived indexes.
    free: dict[str, NodeFree] = field(init=False)
    by_free_gpus: list[dict[str, None]] = field(init=False)  # free GPU count -> nodes with exactly that many free
    node_sizes: tuple[int, ...] = field(init=False)  # distinct GPU counts of nodes, largest first
    max_node_gpus: int = field(init=False)
    total: Resources = field(init=False)
    free_gpus: int = field(init=False)
    usage: dict[str, Resources] = field(init=False)  # project -> what its running jobs hold
    pending_fifo: list[PendingEntry] = field(init=False)  # every pending job, in submission order
    # priority -> LAS queue -> project -> pending jobs in submission order
    pending_classes: dict[int, dict[int, dict[str, list[PendingEntry]]]] = field(init=False)
    pending_without_gpus: int = field(init=False)
    victims: dict[int, dict[JobId, Running]] = field(init=False)  # priority -> preemptible running, in start order
    stopping: int = field(init=False)  # running jobs with a Preempt being carried out

    def __post_init__(self) -> None:
        self.free = {n.name: NodeFree(sorted(n.gpu_ids), n.cpus, n.memory_gb) for n in self.nodes.values()}
        self.max_node_gpus = max((len(n.gpu_ids) for n in self.nodes.values()), default=0)
        self.node_sizes = tuple(sorted({len(n.gpu_ids) for n in self.nodes.values()}, reverse=True))
        self.by_free_gpus = [{} for _ in range(self.max_node_gpus + 1)]
        for n in self.nodes.values():
            self.by_free_gpus[len(n.gpu_ids)][n.name] = None
        self.total = Resources(
            sum(len(n.gpu_ids) for n in self.nodes.values()),
            sum(n.cpus for n in self.nodes.values()),
            sum(n.memory_gb for n in self.nodes.values()),
        )
        self.free_gpus = self.total.gpus
        self.usage = {}
        self.pending_fifo = []
        self.pending_classes = {}
        self.pending_without_gpus = 0
        self.victims = {}
        self.stopping = 0
        pending, running = list(self.pending.values()), sorted(self.running.values(), key=lambda r: r.started_s)
        self.pending, self.running = {}, {}
        for job in pending:
            self.add_pending(job)
        for run in running:
            self.add_running(run)

    @classmethod
    def build(
        cls,
        nodes: Iterable[Node],
        pending: Iterable[JobView],
        running: Iterable[Running],
        quotas: dict[str, Resources] | None = None,
        weights: dict[str, float] | None = None,
        now_s: float = 0.0,
    ) -> ClusterState:
        """A state from plain lists. Raises ValueError when running jobs overcommit a node or repeat a GPU id."""
        return cls(
            {n.name: n for n in nodes},
            {j.id: j for j in pending},
            {r.job.id: r for r in running},
            dict(quotas or {}),
            dict(weights or {}),
            now_s,
        )

    # -- keeping the indexes up to date --

    def add_pending(self, job: JobView) -> None:
        if job.id in self.pending or job.id in self.running:
            raise ValueError(f"job {job.id} is already pending or running")
        self.pending[job.id] = job
        entry = (_order_key(job), job)
        insort(self.pending_fifo, entry)
        queue = las_queue(job.attained_gpu_s)
        insort(
            self.pending_classes.setdefault(job.priority, {}).setdefault(queue, {}).setdefault(job.project, []), entry
        )
        if job.request.gpus == 0:
            self.pending_without_gpus += 1

    def remove_pending(self, job_id: JobId) -> JobView:
        job = self.pending.pop(job_id)
        key = _order_key(job)
        _remove_entry(self.pending_fifo, key)
        levels = self.pending_classes[job.priority]
        queue = las_queue(job.attained_gpu_s)
        projects = levels[queue]
        _remove_entry(projects[job.project], key)
        if not projects[job.project]:
            del projects[job.project]
            if not projects:
                del levels[queue]
                if not levels:
                    del self.pending_classes[job.priority]
        if job.request.gpus == 0:
            self.pending_without_gpus -= 1
        return job

    def add_running(self, run: Running) -> None:
        """Takes the placement's resources. Raises ValueError if they are not free (an overcommit)."""
        job = run.job
        if job.id in self.running:
            raise ValueError(f"job {job.id} is already running")
        for share in run.placement:
            node = self.free.get(share.node)
            if node is None:
                raise ValueError(f"job {job.id} is placed on unknown node {share.node!r}")
            before = len(node.gpu_ids)
            for gpu in share.gpu_ids:
                try:
                    node.gpu_ids.remove(gpu)
                except ValueError:
                    raise ValueError(f"job {job.id} takes GPU {gpu} of node {share.node}, which is not free") from None
            node.cpus -= share.cpus
            node.memory_gb -= share.memory_gb
            if node.cpus < -1e-6 or node.memory_gb < -1e-6:
                raise ValueError(f"job {job.id} overcommits CPUs or memory of node {share.node}")
            self._move_bucket(share.node, before, len(node.gpu_ids))
            self.free_gpus -= len(share.gpu_ids)
        self.running[job.id] = run
        self.usage[job.project] = self.usage.get(job.project, Resources.ZERO) + job.request
        if job.preemptible and not run.stopping:
            self.victims.setdefault(job.priority, {})[job.id] = run
        if run.stopping:
            self.stopping += 1

    def remove_running(self, job_id: JobId) -> Running:
        """Frees the job's resources and returns it."""
        run = self.running.pop(job_id)
        job = run.job
        for share in run.placement:
            node = self.free[share.node]
            before = len(node.gpu_ids)
            node.gpu_ids.extend(share.gpu_ids)
            node.gpu_ids.sort()
            node.cpus += share.cpus
            node.memory_gb += share.memory_gb
            self._move_bucket(share.node, before, len(node.gpu_ids))
            self.free_gpus += len(share.gpu_ids)
        self.usage[job.project] = self.usage[job.project] - job.request
        by_priority = self.victims.get(job.priority)
        if by_priority is not None and by_priority.pop(job_id, None) is not None and not by_priority:
            del self.victims[job.priority]
        if run.stopping:
            self.stopping -= 1
        return run

    def _move_bucket(self, node: str, before: int, after: int) -> None:
        if before != after:
            del self.by_free_gpus[before][node]
            self.by_free_gpus[after][node] = None


def _remove_entry(entries: list[PendingEntry], key: tuple[float, int, str]) -> None:
    i = bisect_left(entries, (key,))  # a 1-tuple sorts just before the entry it is the key of
    del entries[i]


def unplaceable(request: Resources, nodes: Iterable[Node]) -> str | None:
    """Why `request` can never fit the pool `nodes`, even when it is empty (names the resource and sizes); else None."""
    nodes = list(nodes)
    if request.gpus < 0 or request.cpus < 0 or request.memory_gb < 0:
        return f"asks for negative resources ({request.gpus} GPUs, {request.cpus:g} CPUs, {request.memory_gb:g} GB)"
    if not nodes:
        return "the pool has no nodes"
    total_gpus = sum(len(n.gpu_ids) for n in nodes)
    if request.gpus > total_gpus:
        return f"asks for {request.gpus} GPUs but the pool has {total_gpus} on {len(nodes)} node(s)"
    largest = max(len(n.gpu_ids) for n in nodes)
    if request.gpus <= largest:
        able = [n for n in nodes if len(n.gpu_ids) >= request.gpus]
        most_cpus = max(n.cpus for n in able)
        if request.cpus > most_cpus:
            return f"asks for {request.cpus:g} CPUs on one node but the largest such node has {most_cpus:g}"
        most_memory = max(n.memory_gb for n in able if n.cpus >= request.cpus)
        if request.memory_gb > most_memory:
            return (
                f"asks for {request.memory_gb:g} GB of memory on one node but the largest such node has {most_memory:g}"
            )
        return None
    # A gang: the largest nodes first.
    by_size = sorted(nodes, key=lambda n: len(n.gpu_ids), reverse=True)
    for share, fits in split_gang(request, ((n.name, n) for n in by_size)):
        if not fits:
            return (
                f"asks for {request.gpus} GPUs over whole nodes with {request.cpus:g} CPUs and {request.memory_gb:g} GB"
                f", but node {share.node} cannot hold its part ({share.cpus:g} CPUs, {share.memory_gb:g} GB)"
            )
    return None


class Capacity(Protocol):
    """What a node offers: a whole `Node`, or the free part of one (`NodeFree`)."""

    @property
    def gpu_ids(self) -> Sequence[int]: ...
    @property
    def cpus(self) -> float: ...
    @property
    def memory_gb(self) -> float: ...


def split_gang(request: Resources, nodes: Iterable[tuple[str, Capacity]]) -> Iterator[tuple[Share, bool]]:
    """Splits a gang `request` over `nodes` (name, what it offers), in the order given, until every GPU is given.

    Each node gives all its GPUs (the first ones of `gpu_ids`), or the ones still missing, with CPUs and memory in
    proportion (`Resources.part`). Yields (share, fits) per node it looks at: a node short of the CPUs or memory
    of its share yields fits=False and gives nothing, so the caller skips it or gives up. Nodes without GPUs are
    passed over. The caller checks whether the fitting shares add up to the request: `nodes` may run out first.
    """
    left = request.gpus
    for name, offer in nodes:
        give = min(left, len(offer.gpu_ids))
        if give == 0:
            continue
        part = request.part(give)
        fits = part.cpus <= offer.cpus + 1e-9 and part.memory_gb <= offer.memory_gb + 1e-9
        yield Share(name, tuple(offer.gpu_ids[:give]), part.cpus, part.memory_gb), fits
        if fits:
            left -= give
            if left == 0:
                return
