"""Is anyone else using the cores? Others' CPU time just before a sweep and during it.

A benchmark on a busy machine measures the neighbours. The CPU time the machine spent on the
cores this process may use (``/proc/stat``, per CPU of its affinity) is compared with the CPU
time of the runner and its children (``getrusage``): what is left was others' work. It is
sampled for a second before the sweep and over the whole sweep. (The 1-minute load average is
recorded too, but not judged: it still counts a run that has just finished, ours included.)
Hypervisor steal time is reported where the kernel counts it. Linux only; elsewhere nothing
is measured and nothing is claimed. torch-free.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

from bench.run import proctree

# Others' share of this process's cores (or steal) above which the numbers are suspect.
BUSY_SHARE = 0.10
_PROC_STAT = "/proc/stat"
_BEFORE_S = 1.0  # how long others' use of the cores is sampled before the sweep


def _cores() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class Snapshot:
    """CPU seconds of this process's cores (busy, steal, all) and of the runner's own tree."""

    wall: float
    busy_s: float
    steal_s: float
    total_s: float
    own_s: float


def _own_cpu_s() -> float:
    """CPU seconds of the runner's tree: itself, its children that ended (getrusage) and
    those still running (/proc), so that cells running side by side (--devices) are the
    runner's own work, not others'."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + _live_children_s()


def _live_children_s() -> float:
    """CPU seconds of this process's running descendants, with the children they reaped."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for pid in proctree.descendants(os.getpid()):
        total += proctree.cpu_ticks(pid) or 0
    return total / tick


def snapshot(stat_path: str = _PROC_STAT) -> Snapshot | None:
    """Now, or None where /proc/stat cannot be read (not Linux)."""
    cores = _cores()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = steal = total = 0.0
    try:
        with open(stat_path, encoding="ascii") as f:
            for line in f:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
                    continue
                # user nice system idle iowait irq softirq steal [guest guest_nice]
                values = [float(v) for v in fields[:8]]
                values += [0.0] * (8 - len(values))
                total += sum(values)
                busy += sum(values[:3]) + sum(values[5:7])
                steal += values[7]
    except (OSError, ValueError):
        return None
    if total == 0:
        return None
    return Snapshot(time.monotonic(), busy / tick, steal / tick, total / tick, _own_cpu_s())


def before_sweep(seconds: float = _BEFORE_S) -> dict[str, Any]:
    """Others' share of this process's cores over the next ``seconds``, the cores, and the
    1-minute load average (for the record)."""
    out: dict[str, Any] = {"cores": len(_cores())}
    with contextlib.suppress(AttributeError, OSError):
        out["loadavg_before"] = round(os.getloadavg()[0], 2)
    start = snapshot()
    time.sleep(seconds if start is not None else 0)
    sampled = during(start, snapshot())
    if sampled:
        out["others_cpu_pct_before"] = sampled["others_cpu_pct"]
    return out


def during(start: Snapshot | None, end: Snapshot | None) -> dict[str, Any]:
    """Others' share of this process's cores between two snapshots, and the steal share."""
    if start is None or end is None or end.total_s <= start.total_s:
        return {}
    total = end.total_s - start.total_s
    others = (end.busy_s - start.busy_s) - (end.own_s - start.own_s)
    return {"others_cpu_pct": round(max(others, 0.0) / total * 100, 1),
            "steal_pct": round((end.steal_s - start.steal_s) / total * 100, 1),
            "seconds": round(end.wall - start.wall, 1)}


def contended(others_cpu_pct: Any) -> bool:
    """A cell during which others used more than BUSY_SHARE of the run's cores."""
    try:
        return float(others_cpu_pct) > BUSY_SHARE * 100
    except (TypeError, ValueError):
        return False  # not measured (an older run, not Linux): no claim either way


def contended_rows(rows: Any) -> bool:
    """Whether any of a cell's rows (a frame of results.csv) ran contended: others used more
    than BUSY_SHARE of the run's cores, or held a context on its GPU (``num_others_on_gpu``,
    `run --devices`: each GPU judged on its own)."""
    cores = "others_cpu_pct" in rows and any(map(contended, rows["others_cpu_pct"]))
    gpu = "num_others_on_gpu" in rows and any(_positive(v) for v in rows["num_others_on_gpu"])
    return bool(cores or gpu)


def _positive(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False  # not measured: no claim


def warnings(load: dict[str, Any]) -> list[str]:
    """One sentence per sign that other work competed for the cores."""
    out = []
    if load.get("others_cpu_pct_before", 0) > BUSY_SHARE * 100:
        # Worded for `ampbench env` as well as a run: both warn by bench/telemetry/machine.py.
        out.append(f"busy machine: other processes used {load['others_cpu_pct_before']:g}% of "
                   f"the {load.get('cores', '?')} cores ampbench may use (a one-second "
                   f"sample); they compete with a benchmark and its numbers "
                   f"measure them too")
    if load.get("others_cpu_pct", 0) > BUSY_SHARE * 100:
        out.append(f"busy machine: other processes used {load['others_cpu_pct']:g}% of this "
                   f"run's cores during the sweep; rerun on an idle machine before trusting "
                   f"differences")
    if load.get("steal_pct", 0) > BUSY_SHARE * 100:
        out.append(f"busy host: the hypervisor took {load['steal_pct']:g}% of the CPU time "
                   f"(steal) during the sweep")
    return out
