"""The discrete-event simulator and its traces: invariants under every policy, the restart cost of a preemption,
default against FIFO on a heavy-tailed trace, and the Philly/Helios CSV reader on good and malformed files."""

import itertools
from pathlib import Path

import pytest

from aifab.schedule.policy import make_policy
from aifab.schedule.simulate import RESTART_COST_S, jain_index, simulate
from aifab.schedule.state import ClusterState
from aifab.schedule.traces import TraceError, TraceJob, read_trace_csv, synthetic_trace

ALL = ("fifo", "priority-fair", "default")


def no_overcommit(state: ClusterState) -> None:
    """Every GPU of every node is either free or held by exactly one running job; CPUs and memory add up."""
    for name, node in state.nodes.items():
        held = [g for r in state.running.values() for s in r.placement if s.node == name for g in s.gpu_ids]
        assert sorted(held + state.free[name].gpu_ids) == sorted(node.gpu_ids)
        cpus = sum(s.cpus for r in state.running.values() for s in r.placement if s.node == name)
        assert cpus + state.free[name].cpus == pytest.approx(node.cpus)
        assert state.free[name].cpus >= -1e-6 and state.free[name].memory_gb >= -1e-6
    assert state.free_gpus == sum(len(f.gpu_ids) for f in state.free.values())


@pytest.mark.parametrize("policy", ALL)
def test_invariants_on_a_small_seeded_trace(policy: str) -> None:
    trace = synthetic_trace(300, 64, seed=3, load=1.2)
    result = simulate(trace, make_policy(policy), 64, audit=no_overcommit)
    assert len(result.jct_s) == len(trace)  # every job finished
    for j in trace:
        assert result.jct_s[j.id] >= j.duration_s - 1e-6
    assert 0 < result.utilization <= 1
    assert 0 < result.fairness <= 1
    assert result.p99_jct_s > 0 and result.makespan_s > 0


def test_same_seed_same_result() -> None:
    a = simulate(synthetic_trace(200, 32, seed=7), make_policy("default"), 32)
    b = simulate(synthetic_trace(200, 32, seed=7), make_policy("default"), 32)
    assert a.jct_s == b.jct_s and a.preemptions == b.preemptions


def test_default_beats_fifo_on_a_heavy_tailed_trace() -> None:
    trace = synthetic_trace(2_000, 128, seed=1)
    fifo = simulate(trace, make_policy("fifo"), 128)
    ours = simulate(trace, make_policy("default"), 128)
    assert ours.avg_jct_s < 0.6 * fifo.avg_jct_s


def test_a_preempted_job_pays_the_restart_cost() -> None:
    trace = [
        TraceJob(1, "a", 0.0, 1_000.0, 8, priority=0),
        TraceJob(2, "a", 100.0, 100.0, 8, priority=1),
    ]
    result = simulate(trace, make_policy("priority-fair"), 8)
    assert result.preemptions == 1
    assert result.jct_s[2] == pytest.approx(100.0)
    # ran 100 s, waited 100 s for job 2, then the other 900 s plus the restart
    assert result.jct_s[1] == pytest.approx(1_000.0 + 100.0 + RESTART_COST_S)
    fifo = simulate(trace, make_policy("fifo"), 8)
    assert fifo.preemptions == 0 and fifo.jct_s[2] == pytest.approx(1_000.0)


def test_a_job_wider_than_the_cluster_is_refused_before_simulating() -> None:
    with pytest.raises(TraceError, match="job 1 asks for 16 GPUs but the pool has 8"):
        simulate([TraceJob(1, "a", 0.0, 10.0, 16)], make_policy("default"), 8)


def test_jain_index() -> None:
    assert jain_index([2.0, 2.0, 2.0]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)


# -- CSV traces --

HELIOS = """job_id,user,vc,jobname,gpu_num,cpu_num,node_num,state,submit_time,start_time,end_time,duration,queue
j1,u1,vcA,train,8,48,1,COMPLETED,2020-04-01 00:00:10,2020-04-01 00:00:20,2020-04-01 01:00:20,3600,10
j2,u2,vcB,eval,0,4,1,COMPLETED,2020-04-01 00:00:00,2020-04-01 00:00:00,2020-04-01 00:10:00,600,0
j3,u2,vcB,train,2,8,1,FAILED,2020-04-01 00:00:05,2020-04-01 00:00:05,2020-04-01 00:02:05,120,0
"""

PHILLY = """job_id,vc,gpu_num,submit_time,start_time,end_time
a,vc1,1,100,100,400
b,vc2,4,50,60,1060
"""


def test_reads_a_helios_csv(tmp_path: Path) -> None:
    path = tmp_path / "helios.csv"
    path.write_text(HELIOS)
    jobs = read_trace_csv(path)
    assert [(j.project, j.submitted_s, j.duration_s, j.gpus) for j in jobs] == [
        ("vcB", 0.0, 120.0, 2),  # the CPU-only job is left out; times start at the first GPU job
        ("vcA", 5.0, 3600.0, 8),
    ]


def test_reads_a_philly_csv_without_duration(tmp_path: Path) -> None:
    path = tmp_path / "philly.csv"
    path.write_text(PHILLY)
    jobs = read_trace_csv(path)
    assert [(j.project, j.submitted_s, j.duration_s, j.gpus) for j in jobs] == [
        ("vc2", 0.0, 1000.0, 4),
        ("vc1", 50.0, 300.0, 1),
    ]
    assert len(read_trace_csv(path, limit=1)) == 1
    result = simulate(jobs, make_policy("default"), 8)
    assert result.jct_s[0] == pytest.approx(1000.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("job_id,vc,submit_time,duration\n1,a,0,10\n", r"bad\.csv: missing column 'gpu_num'"),
        ("job_id,gpu_num,submit_time\n1,1,0\n", r"bad\.csv: no 'duration' column"),
        (
            "gpu_num,submit_time,duration\n1,0,10\nx,5,10\n",
            r"bad\.csv:3: column 'gpu_num': expected a whole number, got 'x'",
        ),
        ("gpu_num,submit_time,duration\n1,0,ten\n", r"bad\.csv:2: column 'duration': expected a number, got 'ten'"),
        ("gpu_num,submit_time,duration\n1,yesterday,10\n", r"bad\.csv:2: column 'submit_time': expected seconds or"),
        ("gpu_num,submit_time,duration\n1,0,10,99\n", r"bad\.csv:2: expected 3 columns"),
        ("gpu_num,submit_time,duration\n-1,0,10\n", r"bad\.csv:2: column 'gpu_num': expected a count >= 0"),
        ("gpu_num,submit_time,duration\n1,0,-5\n", r"bad\.csv:2: run time is negative"),
        ("", r"bad\.csv: empty file"),
        ("gpu_num,submit_time,duration\n0,0,10\n", r"bad\.csv: no jobs with GPUs"),
    ],
)
def test_malformed_csv_names_file_line_and_column(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        read_trace_csv(path)


def test_missing_csv_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"nope\.csv: cannot read the trace"):
        read_trace_csv(tmp_path / "nope.csv")


def test_synthetic_trace_is_heavy_tailed_and_seeded() -> None:
    trace = synthetic_trace(5_000, 1_000, seed=0)
    assert trace == synthetic_trace(5_000, 1_000, seed=0) and trace != synthetic_trace(5_000, 1_000, seed=1)
    durations = sorted(j.duration_s for j in trace)
    mean_s, median_s = sum(durations) / len(durations), durations[len(durations) // 2]
    assert mean_s > 3 * median_s  # heavy tail
    assert sum(j.gpus == 1 for j in trace) > len(trace) / 2 and max(j.gpus for j in trace) > 8
    assert all(a.submitted_s <= b.submitted_s for a, b in itertools.pairwise(trace))
    with pytest.raises(TraceError, match="jobs > 0"):
        synthetic_trace(0, 8)
