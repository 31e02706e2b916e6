"""The scheduling policies on small hand-built cluster states: quotas, fair share, preemption order, gangs,
head-of-line blocking versus backfill, least attained service, and requests that can never fit."""

import pytest

from aifab.schedule.policy import LAS_MIN_RUN_S, make_policy
from aifab.schedule.state import (
    LAS_LIMITS_GPU_S,
    ClusterState,
    Decision,
    JobView,
    Node,
    Placement,
    Preempt,
    Resources,
    Running,
    Share,
    Start,
    unplaceable,
)

ALL = ("fifo", "priority-fair", "default")


def node(name: str, gpus: int, cpus: float = 64.0, memory_gb: float = 512.0) -> Node:
    return Node(name, tuple(range(gpus)), cpus, memory_gb)


def job(
    id: int,
    gpus: int = 1,
    *,
    project: str = "a",
    priority: int = 0,
    submitted_s: float | None = None,
    preemptible: bool = True,
    kind: str = "train",
    attained_gpu_s: float = 0.0,
) -> JobView:
    return JobView(
        id,
        project,
        priority,
        kind,
        Resources(gpus, 2.0 * gpus, 8.0 * gpus),
        preemptible,
        float(id) if submitted_s is None else submitted_s,
        attained_gpu_s,
    )


def on(j: JobView, node_name: str, gpu_ids: tuple[int, ...], started_s: float = 0.0, **kw: bool) -> Running:
    r = j.request
    return Running(j, (Share(node_name, gpu_ids, r.cpus, r.memory_gb),), started_s, **kw)


def starts(decisions: list[Decision]) -> dict[int | str, Placement]:
    return {d.job_id: d.placement for d in decisions if isinstance(d, Start)}


def preempts(decisions: list[Decision]) -> list[int | str]:
    return [d.job_id for d in decisions if isinstance(d, Preempt)]


def decide(
    policy: str, nodes: list[Node], pending: list[JobView], running: list[Running], **kw: object
) -> list[Decision]:
    state = ClusterState.build(nodes, pending, running, **kw)  # type: ignore[arg-type]
    return make_policy(policy).decide(state)


# -- quotas and fair share --


@pytest.mark.parametrize("policy", ALL)
def test_quota_is_never_exceeded(policy: str) -> None:
    held = job(1, 1, project="a")
    pending = [job(2, 2, project="a"), job(3, 1, project="b")]
    d = decide(policy, [node("n", 8)], pending, [on(held, "n", (0,))], quotas={"a": Resources(gpus=2)})
    assert set(starts(d)) == {3}  # a holds 1 of its 2: a 2-GPU job would take it to 3


def test_quota_on_cpus_only_leaves_gpus_unlimited() -> None:
    d = decide("default", [node("n", 8)], [job(1, 4)], [], quotas={"a": Resources(cpus=4.0)})
    assert starts(d) == {}  # 4 GPUs come with 8 CPUs
    d = decide("default", [node("n", 8)], [job(1, 2)], [], quotas={"a": Resources(cpus=4.0)})
    assert set(starts(d)) == {1}


@pytest.mark.parametrize("policy", ["priority-fair", "default"])
def test_fair_share_starts_the_project_furthest_below_its_share(policy: str) -> None:
    running = [on(job(i, 1, project="a"), "n", (i,)) for i in range(3)]
    pending = [job(10, 1, project="a", submitted_s=0), job(11, 1, project="b", submitted_s=5)]
    d = decide(policy, [node("n", 4)], pending, running)
    assert set(starts(d)) == {11}  # a holds 3 GPUs, b none: b first although a's job came earlier


def test_fair_share_weight_lets_a_heavier_project_hold_more() -> None:
    running = [on(job(1, 2, project="a"), "n", (0, 1)), on(job(2, 1, project="b"), "n", (2,))]
    pending = [job(10, 1, project="a", submitted_s=9), job(11, 1, project="b", submitted_s=0)]
    assert set(starts(decide("priority-fair", [node("n", 4)], pending, running))) == {11}
    d = decide("priority-fair", [node("n", 4)], pending, running, weights={"a": 4.0})
    assert set(starts(d)) == {10}  # a: (2/4)/4 = 0.125 < b: 1/4


def test_fifo_ignores_projects_and_priorities() -> None:
    running = [on(job(i, 1, project="a"), "n", (i,)) for i in range(3)]
    pending = [job(10, 1, project="a", submitted_s=0), job(11, 1, project="b", priority=5, submitted_s=5)]
    assert set(starts(decide("fifo", [node("n", 4)], pending, running))) == {10}


# -- priorities and preemption --


@pytest.mark.parametrize("policy", ["priority-fair", "default"])
def test_preempts_lowest_priority_then_most_recently_started(policy: str) -> None:
    running = [
        on(job(1, priority=1), "n", (0,), started_s=1),
        on(job(2, priority=0), "n", (1,), started_s=10),
        on(job(3, priority=0), "n", (2,), started_s=20),
        on(job(4, priority=0, preemptible=False, kind="serve"), "n", (3,), started_s=30),
    ]
    d = decide(policy, [node("n", 4)], [job(9, priority=5)], running, now_s=40)
    assert starts(d) == {}  # its resources are not free until the caller reports job 3 gone
    assert preempts(d) == [3]
    (p,) = [x for x in d if isinstance(x, Preempt)]
    assert "job 9" in p.reason and "priority 5" in p.reason


@pytest.mark.parametrize("policy", ["priority-fair", "default"])
def test_never_preempts_a_serving_replica(policy: str) -> None:
    serve = on(job(1, 2, kind="serve", preemptible=False), "n", (0, 1))
    assert decide(policy, [node("n", 2)], [job(9, 1, priority=5)], [serve]) == []


@pytest.mark.parametrize("policy", ["priority-fair", "default"])
def test_no_preemption_that_would_not_make_the_waiting_job_fit(policy: str) -> None:
    running = [on(job(1), "n", (0,)), on(job(2, kind="serve", preemptible=False), "n", (1,))]
    assert decide(policy, [node("n", 2)], [job(9, 2, priority=5)], running) == []
    # nor for a job of the same or lower priority, outside LAS
    assert decide("priority-fair", [node("n", 2)], [job(9, 1, priority=0)], running) == []


def test_preempts_only_on_the_node_where_the_waiting_job_will_fit() -> None:
    running = [
        on(job(1), "a", (0,), started_s=1),
        on(job(2), "b", (0,), started_s=5),
        on(job(3), "b", (1,), started_s=3),
        on(job(4), "a", (1,), started_s=4),
    ]
    d = decide("priority-fair", [node("a", 2), node("b", 2)], [job(9, 2, priority=1)], running)
    # most recent first: 2 (b), 4 (a), 3 (b): node b is empty first; job 4 on node a is left alone
    assert sorted(preempts(d)) == [2, 3]


def test_no_new_preemption_while_one_is_being_carried_out() -> None:
    running = [on(job(1), "n", (0,), stopping=True), on(job(2), "n", (1,))]
    assert decide("priority-fair", [node("n", 2)], [job(9, 1, priority=5)], running) == []


def test_fifo_never_preempts() -> None:
    assert decide("fifo", [node("n", 1)], [job(9, priority=5)], [on(job(1), "n", (0,))]) == []


# -- least attained service (default only) --


def test_default_preempts_a_long_running_job_of_the_same_priority_for_a_new_one() -> None:
    long_s = LAS_LIMITS_GPU_S[0] + LAS_MIN_RUN_S  # one GPU: past queue 0 and past the minimum run
    running = [on(job(1), "n", (0,), started_s=0), on(job(2), "n", (1,), started_s=long_s - 10)]
    d = decide("default", [node("n", 2)], [job(9, submitted_s=long_s)], running, now_s=long_s)
    assert preempts(d) == [1]
    assert "LAS queue" in next(x for x in d if isinstance(x, Preempt)).reason
    assert decide("priority-fair", [node("n", 2)], [job(9, submitted_s=long_s)], running, now_s=long_s) == []


def test_default_lets_a_job_run_its_minimum_before_preempting_it() -> None:
    # a job that arrived with attained service already in a later queue, restarted just now
    restarted = job(1, attained_gpu_s=10 * LAS_LIMITS_GPU_S[-1])
    running = [on(restarted, "n", (0,), started_s=100.0)]
    now_s = 100.0 + LAS_MIN_RUN_S / 2
    assert decide("default", [node("n", 1)], [job(9)], running, now_s=now_s) == []
    assert preempts(decide("default", [node("n", 1)], [job(9)], running, now_s=100.0 + LAS_MIN_RUN_S)) == [1]


def test_default_starts_the_least_attained_job_first() -> None:
    pending = [job(1, attained_gpu_s=2 * LAS_LIMITS_GPU_S[0], submitted_s=0), job(2, submitted_s=50)]
    assert set(starts(decide("default", [node("n", 1)], pending, []))) == {2}
    assert set(starts(decide("priority-fair", [node("n", 1)], pending, []))) == {1}


# -- gangs and placement --


@pytest.mark.parametrize("policy", ALL)
def test_gang_gets_whole_nodes_or_nothing(policy: str) -> None:
    nodes = [node("a", 4), node("b", 4), node("c", 4)]
    busy = [on(job(1), "a", (0,)), on(job(2), "b", (3,))]
    assert starts(decide(policy, nodes, [job(9, 8)], busy)) == {}  # 10 GPUs are free but only one whole node
    placement = starts(decide(policy, nodes, [job(9, 8)], busy[:1]))[9]
    assert sorted(s.node for s in placement) == ["b", "c"]
    assert all(s.gpu_ids == (0, 1, 2, 3) for s in placement)
    assert sum(s.cpus for s in placement) == pytest.approx(16.0)


@pytest.mark.parametrize("policy", ALL)
def test_a_job_that_fits_one_node_is_never_split(policy: str) -> None:
    nodes = [node("a", 4), node("b", 4)]
    busy = [on(job(1, 2), "a", (0, 1)), on(job(2, 2), "b", (0, 1))]
    assert starts(decide(policy, nodes, [job(9, 4)], busy)) == {}  # 4 GPUs free, but on two nodes
    (share,) = starts(decide(policy, nodes, [job(9, 3)], busy[:1]))[9]
    assert share.node == "b"


def test_default_and_priority_fair_pack_and_fifo_spreads() -> None:
    nodes = [node("a", 4), node("b", 4)]
    busy = [on(job(1, 3), "a", (0, 1, 2))]
    for policy in ("default", "priority-fair"):
        (share,) = starts(decide(policy, nodes, [job(9)], busy))[9]
        assert share == Share("a", (3,), 2.0, 8.0)  # the fullest node that fits: b stays whole for a gang
    (share,) = starts(decide("fifo", nodes, [job(9)], busy))[9]
    assert share.node == "b"


@pytest.mark.parametrize("policy", ALL)
def test_starts_of_one_call_never_overcommit(policy: str) -> None:
    pending = [job(i, 1) for i in range(5)]
    d = starts(decide(policy, [node("a", 2), node("b", 1)], pending, [on(job(99), "a", (1,))]))
    assert len(d) == 2
    held = [(s.node, g) for p in d.values() for s in p for g in s.gpu_ids]
    assert sorted(held) == [("a", 0), ("b", 0)]


# -- head-of-line blocking --


def test_fifo_blocks_behind_the_head_and_the_others_backfill() -> None:
    running = [on(job(1, 2), "n", (0, 1))]
    pending = [job(2, 4, submitted_s=0), job(3, 1, submitted_s=1)]
    assert decide("fifo", [node("n", 4)], pending, running) == []
    for policy in ("priority-fair", "default"):
        assert set(starts(decide(policy, [node("n", 4)], pending, running))) == {3}


# -- requests that can never fit, names, state --


def test_unplaceable_names_the_resource_and_the_sizes() -> None:
    nodes = [node("a", 8, cpus=32), node("b", 8, cpus=32)]
    assert unplaceable(Resources(gpus=8, cpus=32), nodes) is None
    assert unplaceable(Resources(gpus=16, cpus=64), nodes) is None
    msg = unplaceable(Resources(gpus=20), nodes)
    assert msg is not None and "20 GPUs" in msg and "16" in msg
    msg = unplaceable(Resources(gpus=1, cpus=40), nodes)
    assert msg is not None and "40 CPUs" in msg and "32" in msg
    msg = unplaceable(Resources(gpus=1, memory_gb=1000), nodes)
    assert msg is not None and "1000 GB" in msg and "512" in msg
    msg = unplaceable(Resources(gpus=16, cpus=100), nodes)
    assert msg is not None and "node a" in msg
    assert unplaceable(Resources(gpus=1), []) == "the pool has no nodes"


def test_make_policy_names_the_known_policies() -> None:
    assert {make_policy(n).name for n in ALL} == set(ALL)
    with pytest.raises(ValueError, match=r"unknown scheduling policy 'lottery'; known: fifo, priority-fair, default"):
        make_policy("lottery")


def test_state_refuses_running_jobs_that_overcommit() -> None:
    with pytest.raises(ValueError, match="GPU 0 of node n, which is not free"):
        ClusterState.build([node("n", 2)], [], [on(job(1), "n", (0,)), on(job(2), "n", (0,))])


def test_state_keeps_free_resources_and_usage_up_to_date() -> None:
    state = ClusterState.build([node("a", 4), node("b", 4)], [job(1, 2, project="x")], [])
    assert state.free_gpus == 8 and list(state.by_free_gpus[4]) == ["a", "b"]
    j = state.remove_pending(1)
    state.add_running(on(j, "a", (1, 2)))
    assert state.free["a"].gpu_ids == [0, 3] and list(state.by_free_gpus[2]) == ["a"]
    assert state.usage["x"] == Resources(2, 4.0, 16.0)
    state.remove_running(1)
    assert state.free["a"].gpu_ids == [0, 1, 2, 3] and state.usage["x"] == Resources()
    assert state.pending == {} and state.pending_classes == {} and state.pending_fifo == []


def test_default_never_preempts_a_job_of_the_same_las_queue() -> None:
    running = [on(job(1), "n", (0,), started_s=0.0)]  # one GPU, past its minimum run, still below the first limit
    now_s = LAS_MIN_RUN_S + 1
    assert now_s < LAS_LIMITS_GPU_S[0]
    assert decide("default", [node("n", 1)], [job(9, submitted_s=now_s)], running, now_s=now_s) == []
