"""Scheduling benchmark: FIFO, priority with fair share, and our default policy on the same trace, simulated.

The trace is synthetic (`aifab.schedule.traces.synthetic_trace`: Philly-shaped sizes and heavy-tailed run times,
seeded) or a Philly/Helios CSV (`--trace`). Synthetic arrivals are Poisson at a rate that offers `--load` times
what the pool can serve (default 1.0: the GPU-seconds submitted equal the pool's GPU-seconds over the submission
window), so the cluster is busy and jobs queue, as in a shared cluster; bursts of long, wide jobs overfill it.
Each policy runs the same discrete-event simulation (`aifab.schedule.simulate`), calling the same policy objects
the control plane calls.

Metrics per policy: average and p99 job completion time (JCT), utilisation (GPU-seconds held / GPU-seconds of the
pool over the makespan; the drain after the last arrival counts), fairness (Jain's index over projects of
total JCT / total run time: 1 = every project slowed alike), makespan, preemptions, and the simulation's wall time.

Last line JSON:
- jobs, gpus: the trace's size and the pool's.
- sim_seconds: wall seconds the default policy's simulation took (target: under 60 for 100,000 jobs on 10,000 GPUs).
- avg_jct_ratio_vs_fifo: default's average JCT / FIFO's (target: at most 0.6 on the synthetic trace).
- utilization: default's. Also p99_jct_ratio_vs_fifo, fairness, preemptions, and the same for priority-fair.
"""

import argparse
import json
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table

from aifab.errors import AifabError
from aifab.schedule.policy import make_policy
from aifab.schedule.simulate import SimResult, simulate
from aifab.schedule.traces import TraceJob, read_trace_csv, synthetic_trace

POLICIES = ("fifo", "priority-fair", "default")


def run(trace: list[TraceJob], gpus: int, console: Console) -> dict[str, SimResult]:
    results = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        for name in POLICIES:
            task = bar.add_task(f"{name:14s}", total=len(trace))

            def show(done: int, task: TaskID = task) -> None:
                bar.update(task, completed=done)

            results[name] = simulate(trace, make_policy(name), gpus, progress=show)
            bar.update(task, completed=len(trace))
    return results


def table(results: dict[str, SimResult], title: str) -> Table:
    t = Table(title=title)
    for col in ("policy", "avg JCT h", "p99 JCT h", "util", "fairness", "makespan d", "preempts", "sim s"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    for name, r in results.items():
        t.add_row(
            name,
            f"{r.avg_jct_s / 3600:.2f}",
            f"{r.p99_jct_s / 3600:.1f}",
            f"{r.utilization:.3f}",
            f"{r.fairness:.3f}",
            f"{r.makespan_s / 86400:.2f}",
            str(r.preemptions),
            f"{r.wall_s:.1f}",
        )
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--gpus", type=int, default=10_000)
    p.add_argument("--trace", help="a Philly- or Helios-format CSV instead of the synthetic trace")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load", type=float, default=1.0, help="offered load of the synthetic trace (1.0 = the pool)")
    p.add_argument("--quick", action="store_true", help="10,000 jobs on 1,000 GPUs (under 2 minutes on 2 cores)")
    args = p.parse_args()
    if args.quick:
        args.jobs, args.gpus = 10_000, 1_000
    console = Console(stderr=True)
    try:
        t0 = time.perf_counter()
        if args.trace:
            trace = read_trace_csv(args.trace, limit=args.jobs)
            source = f"{args.trace} ({len(trace)} jobs)"
        else:
            trace = synthetic_trace(args.jobs, args.gpus, seed=args.seed, load=args.load)
            source = f"synthetic, seed {args.seed}, load {args.load:g}"
        trace_s = time.perf_counter() - t0
        results = run(trace, args.gpus, console)
    except AifabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    title = f"{len(trace):,} jobs on {args.gpus:,} GPUs, {source} (trace built in {trace_s:.1f} s)"
    Console(width=110).print(table(results, title))
    ours, fifo, fair = results["default"], results["fifo"], results["priority-fair"]
    out = {
        "jobs": len(trace),
        "gpus": args.gpus,
        "sim_seconds": round(ours.wall_s, 2),
        "avg_jct_ratio_vs_fifo": round(ours.avg_jct_s / fifo.avg_jct_s, 4),
        "utilization": round(ours.utilization, 4),
        "p99_jct_ratio_vs_fifo": round(ours.p99_jct_s / fifo.p99_jct_s, 4),
        "fairness": round(ours.fairness, 4),
        "preemptions": ours.preemptions,
        "priority_fair_avg_jct_ratio_vs_fifo": round(fair.avg_jct_s / fifo.avg_jct_s, 4),
        "priority_fair_sim_seconds": round(fair.wall_s, 2),
        "fifo_sim_seconds": round(fifo.wall_s, 2),
        "trace": "csv" if args.trace else "synthetic",
        "seed": args.seed,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
