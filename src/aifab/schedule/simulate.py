"""Discrete-event simulation of a GPU cluster driven by a scheduling policy: the same `Policy` objects the control
plane calls, on a trace of jobs (`traces.py`), to compare policies on completion times, utilisation and fairness.

The cluster is `gpus` GPUs in nodes of `gpus_per_node`. Events are job arrivals and finishes, taken in time order
(a heap of finishes merged with the sorted arrivals). At each instant that has events, the simulator applies them to
one `ClusterState` it keeps up to date incrementally, calls `policy.decide`, and applies the decisions; after a
preemption it calls again at the same instant, so the freed resources go to the job that asked for them. A
preempted job loses RESTART_COST_S of work and goes back to pending with its attained service.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aifab.schedule.policy import Policy
from aifab.schedule.state import (
    ClusterState,
    JobId,
    JobView,
    Node,
    Preempt,
    Resources,
    Running,
    Start,
    unplaceable,
)
from aifab.schedule.traces import TraceError, TraceJob

# A preempted training job resumes from its last checkpoint: it loses the steps since then plus the restart
# (process start, reloading weights and optimiser state). 30 s of lost work per preemption.
RESTART_COST_S = 30.0
GPUS_PER_NODE = 8
# Each simulated job takes CPUs and memory in proportion to its GPUs, never more than a node has: the simulation
# is about GPUs, and these keep the CPU and memory paths of the policy exercised.
CPUS_PER_GPU, NODE_CPUS_PER_GPU = 4.0, 8.0
MEMORY_GB_PER_GPU, NODE_MEMORY_GB_PER_GPU = 32.0, 64.0
# Calls of `decide` at one instant at most (each after preemptions); more means the policy keeps preempting.
MAX_CALLS_PER_INSTANT = 1_000


@dataclass(frozen=True)
class SimResult:
    policy: str
    jobs: int
    gpus: int
    avg_jct_s: float  # job completion time: finish - submission, averaged over jobs
    p99_jct_s: float
    utilization: float  # GPU-seconds held by jobs (lost work included) / GPU-seconds of the pool over the makespan
    # Jain's index over projects of each project's slowdown (its jobs' total JCT / their total run time):
    # 1 when every project is slowed down alike, 1/projects when one project takes all the delay.
    fairness: float
    makespan_s: float  # first submission to last finish
    preemptions: int
    decide_calls: int
    wall_s: float  # wall-clock seconds the simulation took
    jct_s: dict[JobId, float]  # per job


def make_nodes(gpus: int, gpus_per_node: int = GPUS_PER_NODE) -> list[Node]:
    """`gpus` GPUs as nodes of `gpus_per_node` (the last one smaller if it does not divide)."""
    nodes = []
    for i, first in enumerate(range(0, gpus, gpus_per_node)):
        size = min(gpus_per_node, gpus - first)
        nodes.append(Node(f"n{i}", tuple(range(size)), size * NODE_CPUS_PER_GPU, size * NODE_MEMORY_GB_PER_GPU))
    return nodes


def simulate(
    trace: Sequence[TraceJob],
    policy: Policy,
    gpus: int,
    *,
    gpus_per_node: int = GPUS_PER_NODE,
    quotas: dict[str, Resources] | None = None,
    weights: dict[str, float] | None = None,
    audit: Callable[[ClusterState], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> SimResult:
    """Runs `trace` on the cluster under `policy` until every job has finished.

    `audit(state)` runs after every instant (tests check invariants with it); `progress(finished_jobs)` runs every
    1,000 finishes. Raises TraceError if a job can never fit the cluster, or if jobs are left that will never start.
    The state's own bookkeeping raises ValueError on any overcommit a policy attempts.
    """
    nodes = make_nodes(gpus, gpus_per_node)
    jobs = sorted(trace, key=lambda j: j.submitted_s)
    for gpus_asked in sorted({j.gpus for j in jobs}):  # per distinct size: checking each job is O(jobs * nodes)
        why = unplaceable(_request(gpus_asked), nodes)
        if why:
            first = next(j for j in jobs if j.gpus == gpus_asked)
            raise TraceError(f"job {first.id} {why}")
    state = ClusterState.build(nodes, [], [], quotas, weights)
    trace_by_id: dict[JobId, TraceJob] = {j.id: j for j in jobs}
    remaining_s: dict[JobId, float] = {j.id: j.duration_s for j in jobs}
    attempt: dict[JobId, int] = {}
    finishes: list[tuple[float, int, JobId, int]] = []  # (time, tie-break, job, attempt); stale after a preemption
    jct_s: dict[JobId, float] = {}
    busy_gpu_s = 0.0
    preemptions = calls = seq = 0
    next_arrival = 0
    t_wall = time.perf_counter()
    while next_arrival < len(jobs) or finishes:
        now = finishes[0][0] if finishes else jobs[next_arrival].submitted_s
        if next_arrival < len(jobs):
            now = min(now, jobs[next_arrival].submitted_s)
        while next_arrival < len(jobs) and jobs[next_arrival].submitted_s <= now:
            j = jobs[next_arrival]
            state.add_pending(JobView(j.id, j.project, j.priority, "train", _request(j.gpus), j.preemptible, now))
            next_arrival += 1
        while finishes and finishes[0][0] <= now:
            _, _, job_id, n = heapq.heappop(finishes)
            if attempt.get(job_id) != n or job_id not in state.running:
                continue  # this attempt was preempted
            run = state.remove_running(job_id)
            busy_gpu_s += run.job.request.gpus * (now - run.started_s)
            jct_s[job_id] = now - trace_by_id[job_id].submitted_s
            if progress is not None and len(jct_s) % 1_000 == 0:
                progress(len(jct_s))
        state.now_s = now
        for _ in range(MAX_CALLS_PER_INSTANT):
            decisions = policy.decide(state)
            calls += 1
            preempted = False
            for d in decisions:
                if isinstance(d, Start):
                    job = state.remove_pending(d.job_id)
                    state.add_running(Running(job, d.placement, now))
                    attempt[job.id] = attempt.get(job.id, 0) + 1
                    seq += 1
                    heapq.heappush(finishes, (now + remaining_s[job.id], seq, job.id, attempt[job.id]))
                elif isinstance(d, Preempt):
                    run = state.remove_running(d.job_id)
                    if not run.job.preemptible:
                        raise ValueError(f"policy {policy.name} preempted job {d.job_id}, which is not preemptible")
                    ran_s = now - run.started_s
                    busy_gpu_s += run.job.request.gpus * ran_s
                    remaining_s[run.job.id] += RESTART_COST_S - ran_s
                    attempt[run.job.id] += 1
                    v = run.job
                    attained_gpu_s = v.attained_gpu_s + v.request.gpus * ran_s
                    state.add_pending(
                        JobView(
                            v.id, v.project, v.priority, v.kind, v.request, v.preemptible, v.submitted_s, attained_gpu_s
                        )
                    )
                    preemptions += 1
                    preempted = True
            if not preempted:
                break
        else:
            raise ValueError(f"policy {policy.name} kept preempting at t={now:.0f} s")
        if audit is not None:
            audit(state)
    wall_s = time.perf_counter() - t_wall
    if state.pending:
        left = sorted(state.pending, key=str)[:5]
        raise TraceError(f"{len(state.pending)} job(s) never started under {policy.name} (e.g. {left}); check quotas")
    return _result(policy.name, jobs, gpus, jct_s, busy_gpu_s, preemptions, calls, wall_s)


def _request(gpus: int) -> Resources:
    return Resources(gpus, gpus * CPUS_PER_GPU, gpus * MEMORY_GB_PER_GPU)


def _result(
    name: str,
    jobs: list[TraceJob],
    gpus: int,
    jct_s: dict[JobId, float],
    busy_gpu_s: float,
    preemptions: int,
    calls: int,
    wall_s: float,
) -> SimResult:
    ordered = sorted(jct_s.values())
    makespan_s = max(j.submitted_s + jct_s[j.id] for j in jobs) - jobs[0].submitted_s
    jct_by_project: dict[str, float] = {}
    run_by_project: dict[str, float] = {}
    for j in jobs:
        jct_by_project[j.project] = jct_by_project.get(j.project, 0.0) + jct_s[j.id]
        run_by_project[j.project] = run_by_project.get(j.project, 0.0) + j.duration_s
    slowdowns = [jct_by_project[p] / run_by_project[p] for p in jct_by_project]
    return SimResult(
        policy=name,
        jobs=len(jobs),
        gpus=gpus,
        avg_jct_s=sum(ordered) / len(ordered),
        p99_jct_s=ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        utilization=busy_gpu_s / (gpus * makespan_s) if makespan_s > 0 else 0.0,
        fairness=jain_index(slowdowns),
        makespan_s=makespan_s,
        preemptions=preemptions,
        decide_calls=calls,
        wall_s=wall_s,
        jct_s=jct_s,
    )


def jain_index(xs: Sequence[float]) -> float:
    """(sum x)^2 / (n * sum x^2): 1 when all equal, 1/n when one takes everything."""
    squares = sum(x * x for x in xs)
    return sum(xs) ** 2 / (len(xs) * squares) if squares else 1.0
