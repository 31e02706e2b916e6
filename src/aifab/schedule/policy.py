"""Scheduling policy: which pending jobs start where, and which running jobs give way to them.

Pure code: a `ClusterState` goes in, a list of `Start` and `Preempt` decisions comes out. No I/O, no clocks, no
randomness, no store. The control plane and the simulator (`simulate.py`) call the same `Policy` objects.

What a decision promises (the control plane relies on it):
- A `Start` uses only resources free in the given state. Resources of jobs preempted in the same call count as
  free only in a later call, once the caller has removed those jobs from `running`.
- Two `Start`s of one call never overcommit a node; the GPU ids of a `Share` are distinct and free on its node.
- A `Start` never takes a project past its quota.
- A `Preempt` names a preemptible running job, and is issued only when the preemptions of that call let one
  specific waiting job of a higher class fit (its id is in the reason). One waiting job asks per call, and none
  while an earlier `Preempt` is still being carried out (`Running.stopping`).
- A job that asks for at most the GPUs of the largest node runs on one node; a larger job (a gang) gets whole
  free nodes, all at once or not at all.

Policies (`make_policy`), all one `RulePolicy` with different switches:
- `fifo`: arrival order; the first job that does not fit blocks everything behind it. Spreads jobs over nodes.
- `priority-fair`: higher priority first; within a priority, the project furthest below its fair share first
  (weighted dominant share: max of held GPU and CPU fractions of the pool, divided by the project's weight);
  quotas; backfill of later jobs that fit; preemption of lower-priority preemptible jobs. It packs jobs onto
  the fullest node that fits, keeping whole nodes free for gangs.
- `default`: `priority-fair` plus least-attained-service (Tiresias-style, no duration estimates needed): within a
  priority, jobs sit in discrete queues by the GPU-seconds they have already run (`state.LAS_LIMITS_GPU_S`); a lower
  queue goes first and may preempt jobs of a higher queue that have run at least `LAS_MIN_RUN_S` this attempt.

Why these choices, and what they measured on the simulator: docs/schedule.md.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from aifab.schedule.state import (
    ClusterState,
    Decision,
    JobId,
    JobView,
    NodeFree,
    PendingEntry,
    Placement,
    Preempt,
    Resources,
    Running,
    Share,
    Start,
    attained_now,
    las_queue,
    split_gang,
)

# A job preempted for LAS reasons must have run this long in its current attempt: a restart costs work (the steps
# since the last checkpoint, the reload), so a job must be able to pay for it before it can be asked to again.
LAS_MIN_RUN_S = 600.0
# Pending jobs one call considers at most. Bounds the work per call on long queues; jobs further back wait for
# the next call, when the ones ahead of them have started.
MAX_SCAN = 256
# Jobs in a row that do not fit after which a call stops looking further back for backfill: on a long queue of
# jobs too large for the free fragments, looking further rarely finds one, and costs time on every call.
MAX_MISSES = 32
# Waiting jobs one call lets ask for preemption at most, in order, stopping at the first that can be helped.
PREEMPT_TRIES = 2
# Running jobs one call considers as preemption victims at most, per waiting job.
MAX_VICTIM_SCAN = 128


class Policy(Protocol):
    """Decides on a `ClusterState` without changing it; the decisions keep the promises of this module's doc."""

    name: str

    def decide(self, state: ClusterState) -> list[Decision]: ...


class _Call:
    """Scratch for one decide call: what its Starts have taken, on top of the (unchanged) state."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.touched: dict[str, NodeFree] = {}  # nodes this call placed jobs on: their free part now
        self.touched_by_free: list[dict[str, None]] = [{} for _ in range(state.max_node_gpus + 1)]
        self.usage: dict[str, Resources] = {}
        self.free_gpus = state.free_gpus
        self._served: dict[int, list[tuple[int, float, Running]]] = {}

    def served(self, priority: int) -> list[tuple[int, float, Running]]:
        """Preemptible running jobs of `priority` past LAS_MIN_RUN_S, as (LAS queue, started_s, job), the latest
        queue first, then the most recently started. Looks at the MAX_VICTIM_SCAN oldest only (the most served);
        computed once per call."""
        found = self._served.get(priority)
        if found is None:
            found = []
            now_s = self.state.now_s
            for scanned, run in enumerate(self.state.victims.get(priority, {}).values()):  # in start order
                if scanned >= MAX_VICTIM_SCAN or now_s - run.started_s < LAS_MIN_RUN_S:
                    break  # every later one started later still
                found.append((las_queue(attained_now(run, now_s)), run.started_s, run))
            found.sort(key=lambda e: (-e[0], -e[1]))
            self._served[priority] = found
        return found

    def node_free(self, name: str) -> NodeFree:
        return self.touched.get(name) or self.state.free[name]

    def held(self, project: str) -> Resources:
        return self.usage.get(project) or self.state.usage.get(project, Resources.ZERO)

    def share_of(self, project: str) -> float:
        """Weighted dominant share: the larger of the project's GPU and CPU fractions, over its weight."""
        held, total = self.held(project), self.state.total
        gpu = held.gpus / total.gpus if total.gpus else 0.0
        cpu = held.cpus / total.cpus if total.cpus else 0.0
        return max(gpu, cpu) / self.state.weights.get(project, 1.0)

    def take(self, job: JobView, placement: Placement) -> None:
        for share in placement:
            now = self.node_free(share.node)
            before = len(now.gpu_ids)
            taken = set(share.gpu_ids)
            after = NodeFree(
                [g for g in now.gpu_ids if g not in taken], now.cpus - share.cpus, now.memory_gb - share.memory_gb
            )
            if share.node in self.touched:
                del self.touched_by_free[before][share.node]
            self.touched[share.node] = after
            self.touched_by_free[len(after.gpu_ids)][share.node] = None
            self.free_gpus -= len(share.gpu_ids)
        self.usage[job.project] = self.held(job.project) + job.request

    def candidates(self, gpus: int, pack: bool) -> Iterator[str]:
        """Nodes with at least `gpus` free GPUs: the fullest first when packing, else the emptiest first."""
        sizes = range(gpus, self.state.max_node_gpus + 1)
        for free in sizes if pack else reversed(sizes):
            yield from self.touched_by_free[free]
            for name in self.state.by_free_gpus[free]:
                if name not in self.touched:
                    yield name

    def place(self, request: Resources, pack: bool) -> Placement | None:
        """Where `request` fits now, or None. One node if it can; otherwise whole free nodes, largest first."""
        if request.gpus > self.free_gpus:
            return None
        if request.gpus <= self.state.max_node_gpus:
            for name in self.candidates(request.gpus, pack):
                node = self.node_free(name)
                if node.cpus >= request.cpus - 1e-9 and node.memory_gb >= request.memory_gb - 1e-9:
                    return (Share(name, tuple(node.gpu_ids[: request.gpus]), request.cpus, request.memory_gb),)
            return None
        state = self.state
        whole = (  # nodes with every GPU free, none of them taken by this call; the largest first
            (name, state.free[name])
            for size in state.node_sizes
            for name in state.by_free_gpus[size]
            if name not in self.touched and len(state.nodes[name].gpu_ids) == size
        )
        shares = [share for share, fits in split_gang(request, whole) if fits]
        return tuple(shares) if sum(len(s.gpu_ids) for s in shares) == request.gpus else None


@dataclass
class RulePolicy:
    """The one scheduling algorithm, with switches; `make_policy` names the combinations (`POLICIES`)."""

    name: str
    fair: bool  # priority classes, fair share between projects, backfill; else strict arrival order
    las: bool  # least-attained-service queues within a priority, with preemption across them
    preempt: bool  # preempt lower-priority preemptible jobs for a waiting higher-priority one
    pack: bool  # place on the fullest node that fits; else on the emptiest (spreading, the Kubernetes default)

    def decide(self, state: ClusterState) -> list[Decision]:
        call = _Call(state)
        decisions: list[Decision] = []
        blocked = self._fill_fair(call, decisions) if self.fair else self._fill_fifo(call, decisions)
        if self.preempt and state.stopping == 0:
            for waiting in blocked:
                preempts = self._preempt_for(waiting, call)
                if preempts:
                    decisions.extend(preempts)
                    break
        return decisions

    def _fill_fifo(self, call: _Call, decisions: list[Decision]) -> list[JobView]:
        state = call.state
        for scanned, (_, job) in enumerate(state.pending_fifo):
            if scanned >= MAX_SCAN:
                break
            if not job.request.fits_quota(call.held(job.project), state.quotas.get(job.project)):
                continue  # it could not run however free the pool was; it does not hold up the queue
            placement = call.place(job.request, self.pack)
            if placement is None:
                return [job]  # head-of-line blocking
            call.take(job, placement)
            decisions.append(Start(job.id, placement))
        return []

    def _fill_fair(self, call: _Call, decisions: list[Decision]) -> list[JobView]:
        """Starts what fits, class by class; within a class the project furthest below its share goes first, and
        once its next job does not fit, the other projects take their turn before it tries another. Returns the
        first PREEMPT_TRIES jobs that did not fit, in order: they may ask for preemption."""
        state = call.state
        budget, misses_in_a_row = MAX_SCAN, 0
        blocked: list[JobView] = []
        failed: list[Resources] = []  # requests that did not fit: any request at least as large fails too
        for priority in sorted(state.pending_classes, reverse=True):
            for group in self._groups(state.pending_classes[priority]):
                heap = [(0, call.share_of(p), p) for p in group]  # (misses this call, share, project)
                heapq.heapify(heap)
                while heap:
                    if budget == 0 or misses_in_a_row == MAX_MISSES:
                        return blocked
                    misses, _, project = heap[0]
                    entry = next(group[project], None)
                    if entry is None:
                        heapq.heappop(heap)
                        continue
                    job = entry[1]
                    budget -= 1
                    if not job.request.fits_quota(call.held(project), state.quotas.get(project)):
                        continue
                    if any(job.request.covers(f) for f in failed):
                        placement = None
                    else:
                        placement = call.place(job.request, self.pack)
                    if placement is None:
                        if len(blocked) < PREEMPT_TRIES:
                            blocked.append(job)
                        if not any(job.request.covers(f) for f in failed):
                            failed.append(job.request)
                        if call.free_gpus == 0 and state.pending_without_gpus == 0:
                            return blocked  # nothing more can start in this call
                        misses_in_a_row += 1
                        heapq.heapreplace(heap, (misses + 1, call.share_of(project), project))
                        continue
                    call.take(job, placement)
                    decisions.append(Start(job.id, placement))
                    misses_in_a_row = 0
                    heapq.heapreplace(heap, (misses, call.share_of(project), project))
        return blocked

    def _groups(self, levels: dict[int, dict[str, list[PendingEntry]]]) -> Iterator[dict[str, Iterator[PendingEntry]]]:
        """The pending jobs of one priority, as groups scheduled one after the other; each maps a project to its
        jobs in submission order. With LAS a group is one queue; without, the whole priority."""
        if self.las:
            for queue in sorted(levels):
                yield {project: iter(entries) for project, entries in levels[queue].items()}
            return
        by_project: dict[str, list[list[PendingEntry]]] = {}
        for queue in sorted(levels):
            for project, entries in levels[queue].items():
                by_project.setdefault(project, []).append(entries)
        yield {p: iter(lists[0]) if len(lists) == 1 else heapq.merge(*lists) for p, lists in by_project.items()}

    def _victim_order(self, waiting: JobView, call: _Call) -> Iterator[tuple[Running, str]]:
        """Running jobs that may give way to `waiting`, in the order they should: lowest priority first, then the
        most recently started; with LAS then jobs of its own priority in a later queue that have run at least
        LAS_MIN_RUN_S, the latest queue first, then the most recently started. Yields (job, reason)."""
        state = call.state
        why = f"for job {waiting.id} (priority {waiting.priority})"
        for priority in sorted(state.victims):
            if priority >= waiting.priority:
                break
            for run in reversed(state.victims[priority].values()):
                yield run, why
        if not self.las:
            return
        queue = las_queue(waiting.attained_gpu_s)
        for run_queue, _, run in call.served(waiting.priority):
            if run_queue <= queue:
                break
            yield run, f"for job {waiting.id} (priority {waiting.priority}, LAS queue {queue} ahead of {run_queue})"

    def _preempt_for(self, waiting: JobView, call: _Call) -> list[Decision]:
        """Preemptions that let `waiting` fit, or none. Victims accumulate in order until one node (or enough whole
        nodes for a gang) would hold it; only the victims on those nodes are preempted."""
        state, request = call.state, waiting.request
        gang = request.gpus > state.max_node_gpus
        freed: dict[str, list[float]] = {}  # node -> [gpus, cpus, memory_gb] the victims so far would free there
        on_node: dict[str, list[tuple[Running, str]]] = {}
        whole: list[str] = []  # gang: nodes the victims so far would empty
        whole_gpus = 0
        if gang:  # nodes already empty count towards the gang
            for size in state.node_sizes:
                whole_gpus += size * sum(
                    1 for n in state.by_free_gpus[size] if n not in call.touched and len(state.nodes[n].gpu_ids) == size
                )
        for scanned, (run, why) in enumerate(self._victim_order(waiting, call)):
            if scanned >= MAX_VICTIM_SCAN:
                break
            if run.stopping:
                continue
            for share in run.placement:
                got = freed.setdefault(share.node, [0, 0.0, 0.0])
                got[0] += len(share.gpu_ids)
                got[1] += share.cpus
                got[2] += share.memory_gb
                on_node.setdefault(share.node, []).append((run, why))
                node = call.node_free(share.node)
                gpus, cpus, memory_gb = len(node.gpu_ids) + int(got[0]), node.cpus + got[1], node.memory_gb + got[2]
                if not gang:
                    if gpus >= request.gpus and cpus >= request.cpus - 1e-9 and memory_gb >= request.memory_gb - 1e-9:
                        return _preempts(on_node[share.node])
                elif gpus == len(state.nodes[share.node].gpu_ids) and share.node not in whole:
                    whole.append(share.node)
                    whole_gpus += gpus
                    if whole_gpus >= request.gpus:
                        return _preempts([v for n in whole for v in on_node[n]])
        return []


def _preempts(victims: list[tuple[Running, str]]) -> list[Decision]:
    seen: dict[JobId, Preempt] = {}
    for run, why in victims:
        seen.setdefault(run.job.id, Preempt(run.job.id, why))
    return list(seen.values())


POLICIES = {
    "fifo": lambda: RulePolicy("fifo", fair=False, las=False, preempt=False, pack=False),
    "priority-fair": lambda: RulePolicy("priority-fair", fair=True, las=False, preempt=True, pack=True),
    "default": lambda: RulePolicy("default", fair=True, las=True, preempt=True, pack=True),
}


def make_policy(name: str) -> Policy:
    """A fresh policy by name. Raises ValueError naming the known names."""
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name]()
