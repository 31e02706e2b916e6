"""The resource arithmetic of `Resources` and the one way a gang is split over nodes (`split_gang`)."""

import subprocess
import sys

import pytest

from aifab.schedule.state import Node, NodeFree, Resources, split_gang, unplaceable


def test_resources_add_subtract_and_compare() -> None:
    a, b = Resources(2, 8.0, 64.0), Resources(1, 2.0, 16.0)
    assert a + b == Resources(3, 10.0, 80.0)
    assert a - b == Resources(1, 6.0, 48.0)
    assert Resources.ZERO + a == a and a - a == Resources.ZERO
    assert a.covers(b) and a.covers(a) and not b.covers(a)
    assert not Resources(2, 1.0, 64.0).covers(b)  # fewer CPUs: not at least as much of everything


def test_fits_quota_counts_what_is_held_and_leaves_zero_fields_unlimited() -> None:
    quota = Resources(gpus=4, cpus=0.0, memory_gb=100.0)  # CPUs not limited
    assert Resources(1, 1000.0, 10.0).fits_quota(Resources(3, 0.0, 90.0), quota)
    assert not Resources(2).fits_quota(Resources(3), quota)
    assert not Resources(memory_gb=10.5).fits_quota(Resources(memory_gb=90.0), quota)
    assert Resources(1000, 1e6, 1e6).fits_quota(Resources(1000), None)  # no quota at all


def test_part_gives_cpus_and_memory_in_proportion_to_gpus() -> None:
    assert Resources(16, 64.0, 512.0).part(4) == Resources(4, 16.0, 128.0)


def test_split_gang_skips_a_node_short_of_cpus_and_stops_once_every_gpu_is_given() -> None:
    request = Resources(16, 64.0, 256.0)  # 4 CPUs and 16 GB per GPU
    nodes = [
        ("empty", NodeFree([], 100.0, 1000.0)),  # no GPUs: passed over
        ("short", NodeFree(list(range(8)), 16.0, 1000.0)),  # 8 GPUs want 32 CPUs
        ("a", NodeFree(list(range(8)), 32.0, 128.0)),
        ("b", NodeFree([2, 5, 6, 7, 9, 10, 11, 12], 40.0, 200.0)),
        ("never", NodeFree(list(range(8)), 32.0, 128.0)),
    ]
    looked = list(split_gang(request, nodes))
    assert [(share.node, fits) for share, fits in looked] == [("short", False), ("a", True), ("b", True)]
    a, b = looked[1][0], looked[2][0]
    assert (a.gpu_ids, a.cpus, a.memory_gb) == ((0, 1, 2, 3, 4, 5, 6, 7), 32.0, 128.0)
    assert b.gpu_ids == (2, 5, 6, 7, 9, 10, 11, 12)


def test_split_gang_gives_the_last_node_only_the_gpus_still_missing() -> None:
    nodes = [Node(name, tuple(range(8)), 64.0, 1.0) for name in ("a", "b")]
    shares = [s for s, fits in split_gang(Resources(10, 20.0, 0.0), ((n.name, n) for n in nodes)) if fits]
    assert [(s.node, len(s.gpu_ids), s.cpus) for s in shares] == [("a", 8, 16.0), ("b", 2, 4.0)]


def test_split_gang_leaves_the_caller_to_see_that_the_nodes_ran_out() -> None:
    given = sum(len(s.gpu_ids) for s, fits in split_gang(Resources(16), [("a", NodeFree(list(range(8)), 1.0, 1.0))]))
    assert given == 8


@pytest.mark.parametrize("cpus", [32.0, 32.0 + 1e-12])  # a rounding error above the node's CPUs still fits
def test_unplaceable_gang_uses_the_same_split(cpus: float) -> None:
    nodes = [Node("a", tuple(range(8)), 16.0, 512.0), Node("b", tuple(range(8)), 16.0, 512.0)]
    assert unplaceable(Resources(16, cpus, 0.0), nodes) is None
    msg = unplaceable(Resources(16, 40.0, 0.0), nodes)
    assert msg is not None and "node a cannot hold its part (20 CPUs, 0 GB)" in msg


def test_schedule_imports_nothing_of_aifab_but_errors() -> None:
    """schedule/ is pure: the control plane and the simulator drive it, it drives nothing."""
    code = (
        "import sys, aifab.schedule.state, aifab.schedule.policy, aifab.schedule.simulate, aifab.schedule.traces; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('aifab.') "
        "and not m.startswith('aifab.schedule') and m != 'aifab.errors')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
