"""Workload traces for the scheduling simulator: a seeded synthetic trace shaped like Microsoft's Philly cluster, or
a CSV in the Philly or Helios trace format.

A trace is a list of `TraceJob`s sorted by submission time, the first submitted at 0 s.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aifab.errors import AifabError


class TraceError(AifabError):
    """A trace file is missing or malformed, or a trace does not fit the simulated cluster."""


@dataclass(frozen=True, slots=True)
class TraceJob:
    id: int
    project: str
    submitted_s: float
    duration_s: float  # run time on its GPUs without interruption
    gpus: int
    priority: int = 0
    preemptible: bool = True


# The synthetic trace follows the shape of the Philly statistics in Jeon et al., "Analysis of Large-Scale Multi-Tenant
# GPU Clusters for DNN Training Workloads", USENIX ATC 2019 (section 3, the run-time CDFs split by GPU count, and
# the GPU-count mix). The numbers below are our approximations of those curves, not values copied from the paper:
# - GPU-count mix: most jobs use one GPU; a minority uses 2-8 GPUs on one server; a small tail spans many 8-GPU
#   servers (16 to 64 GPUs here).
GPU_MIX = ((1, 0.70), (2, 0.08), (4, 0.10), (8, 0.08), (16, 0.025), (32, 0.01), (64, 0.005))
# - Run time: minutes to weeks, heavy-tailed; jobs with more GPUs run longer. Log-normal around a median of
#   MEDIAN_RUN_S for one GPU, growing by MEDIAN_GROWTH_PER_DOUBLING per doubling of the GPU count, with a wide
#   spread (RUN_SIGMA: the mean is about 5x the median), clipped to [MIN_RUN_S, MAX_RUN_S].
MEDIAN_RUN_S = 900.0
MEDIAN_GROWTH_PER_DOUBLING = 1.25
RUN_SIGMA = 1.8
MIN_RUN_S, MAX_RUN_S = 60.0, 2 * 86_400.0
# - Tenants: Philly's virtual clusters differ a lot in size; submissions here come from PROJECTS projects with
#   Zipf-like shares (project k submits in proportion to 1/(k+1)).
PROJECTS = 10
# - A tenth of jobs are urgent (priority 1); the rest are priority 0. Every job is preemptible training.
URGENT_FRACTION = 0.1


def synthetic_trace(jobs: int, gpus: int, seed: int = 0, load: float = 1.0) -> list[TraceJob]:
    """`jobs` jobs whose Poisson arrivals offer `load` times the GPU-seconds a pool of `gpus` GPUs can serve.

    The arrival rate is load * gpus / mean(gpus * run time) over the drawn jobs, so at load 1.0 the pool is busy
    and jobs queue (bursts of long, wide jobs fill it), as in a shared cluster. Jobs wider than the pool are left out
    of the mix. Same arguments, same trace.
    """
    if jobs <= 0 or gpus <= 0:
        raise TraceError(f"a synthetic trace needs jobs > 0 and gpus > 0, got jobs={jobs}, gpus={gpus}")
    rng = random.Random(seed)
    mix = [(g, p) for g, p in GPU_MIX if g <= gpus]
    sizes, weights = [g for g, _ in mix], [p for _, p in mix]
    projects = [f"p{k}" for k in range(PROJECTS)]
    project_weights = [1 / (k + 1) for k in range(PROJECTS)]
    drawn = []
    for _ in range(jobs):
        g = rng.choices(sizes, weights)[0]
        median_s = MEDIAN_RUN_S * MEDIAN_GROWTH_PER_DOUBLING ** math.log2(g)
        duration_s = min(MAX_RUN_S, max(MIN_RUN_S, rng.lognormvariate(math.log(median_s), RUN_SIGMA)))
        project = rng.choices(projects, project_weights)[0]
        priority = 1 if rng.random() < URGENT_FRACTION else 0
        drawn.append((g, duration_s, project, priority))
    mean_gpu_s = sum(g * d for g, d, _, _ in drawn) / jobs
    rate_per_s = load * gpus / mean_gpu_s
    out, t = [], 0.0
    for i, (g, duration_s, project, priority) in enumerate(drawn):
        out.append(TraceJob(i, project, t, duration_s, g, priority))
        t += rng.expovariate(rate_per_s)
    return out


# CSV columns, by what they mean; the first name present wins. Helios (Hu et al., SC'21) writes job_id, user, vc,
# gpu_num, cpu_num, node_num, state, submit_time, start_time, end_time, duration; the Philly trace converted to
# CSV uses the same names (vc is Philly's virtual cluster).
_ID = ("job_id", "jobid", "id")
_PROJECT = ("vc", "virtual_cluster", "project", "user")
_GPUS = ("gpu_num", "num_gpus", "gpus")
_SUBMIT = ("submit_time", "submitted_time", "submit")
_DURATION = ("duration", "run_time", "runtime")
_START, _END = ("start_time",), ("end_time",)


def read_trace_csv(path: str | Path, limit: int | None = None) -> list[TraceJob]:
    """Jobs of a Philly- or Helios-format CSV: submission times (seconds, or 'YYYY-MM-DD HH:MM:SS') shifted so the
    first is 0, the GPU count, and the run time (`duration`, else end_time - start_time). Jobs with no GPUs or
    no run time are left out. At most `limit` jobs, the earliest submitted. Raises TraceError naming the file,
    line and column of the first bad value."""
    path = Path(path)
    try:
        f = path.open(newline="", encoding="utf-8")
    except OSError as e:
        raise TraceError(f"{path}: cannot read the trace ({e.strerror})") from None
    rows: list[tuple[str, str, float, float, int, str]] = []
    with f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        if not header:
            raise TraceError(
                f"{path}: empty file; expected a CSV header such as job_id,vc,gpu_num,submit_time,duration"
            )
        gpus_col, submit_col = _need(header, _GPUS, path), _need(header, _SUBMIT, path)
        duration_col = _pick(header, _DURATION, path)
        start_col, end_col = _pick(header, _START, path), _pick(header, _END, path)
        if duration_col is None and (start_col is None or end_col is None):
            raise TraceError(f"{path}: no 'duration' column and no start_time/end_time pair to compute it from")
        id_col, project_col = _pick(header, _ID, path), _pick(header, _PROJECT, path)
        for row in reader:
            line = reader.line_num
            if None in row or any(v is None for v in row.values()):
                raise TraceError(f"{path}:{line}: expected {len(header)} columns, found a different number")
            gpus = _whole(row[gpus_col], path, line, gpus_col)
            submit_s = _time_s(row[submit_col], path, line, submit_col)
            if duration_col is not None and row[duration_col].strip():
                duration_s = _number(row[duration_col], path, line, duration_col)
            elif start_col is not None and end_col is not None:
                duration_s = _time_s(row[end_col], path, line, end_col) - _time_s(row[start_col], path, line, start_col)
            else:
                raise TraceError(f"{path}:{line}: column {duration_col!r}: empty")
            if duration_s < 0:
                raise TraceError(f"{path}:{line}: run time is negative ({duration_s:g} s)")
            if gpus == 0 or duration_s == 0:
                continue
            job_id = row[id_col].strip() if id_col else str(line)
            project = row[project_col].strip() if project_col else "default"
            rows.append((job_id, project or "default", submit_s, duration_s, gpus, f"{path}:{line}"))
    if not rows:
        raise TraceError(f"{path}: no jobs with GPUs and a run time")
    rows.sort(key=lambda r: r[2])
    rows = rows[:limit] if limit is not None else rows
    t0 = rows[0][2]
    return [TraceJob(i, project, s - t0, d, g) for i, (_, project, s, d, g, _) in enumerate(rows)]


def _need(header: list[str], names: tuple[str, ...], path: Path) -> str:
    name = _pick(header, names, path, required=True)
    assert name is not None
    return name


def _pick(header: list[str], names: tuple[str, ...], path: Path, required: bool = False) -> str | None:
    for name in names:
        if name in header:
            return name
    if required:
        raise TraceError(f"{path}: missing column {names[0]!r} (header: {','.join(header)})")
    return None


def _number(value: str, path: Path, line: int, column: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise TraceError(f"{path}:{line}: column {column!r}: expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise TraceError(f"{path}:{line}: column {column!r}: expected a finite number, got {value!r}")
    return x


def _whole(value: str, path: Path, line: int, column: str) -> int:
    try:
        x = int(value)
    except ValueError:
        raise TraceError(f"{path}:{line}: column {column!r}: expected a whole number, got {value!r}") from None
    if x < 0:
        raise TraceError(f"{path}:{line}: column {column!r}: expected a count >= 0, got {value!r}")
    return x


def _time_s(value: str, path: Path, line: int, column: str) -> float:
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
    try:
        moment = datetime.fromisoformat(value)
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()  # naive times: no DST jumps
    except ValueError:
        raise TraceError(
            f"{path}:{line}: column {column!r}: expected seconds or a 'YYYY-MM-DD HH:MM:SS' time, got {value!r}"
        ) from None
