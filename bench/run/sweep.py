"""The sweep: every planned process of a matrix, one child process per cell, failures as data.

``plan`` orders the processes (repeats interleaved, calibration processes around them);
``sweep`` runs those not done yet in a run directory, each through bench/run/launch.py, and
appends its record (``Sweep.save``), one at a time or, with --devices, side by side on the
node's GPUs (bench/run/slots.py); an OOM at batch b skips the group's larger batches, and
with a --time-budget no process starts that the time left cannot finish (bench/run/budget.py).
``find_max_batch`` searches the largest batch of each group instead. The machine's load around
the sweep goes into meta.json (bench/run/contention.py); before it, the machine's noise warnings
are printed by the rule `ampbench env` uses (bench/telemetry/machine.py). The command around it:
bench/run/command.py. torch-free.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import store
from bench.analysis import noise
from bench.config import Cell, matrix
from bench.run import cluster, console, contention, slots
from bench.run.budget import Budget, estimate_s, now
from bench.run.launch import Settings, failure_record, run_child
from bench.store import record_line
from bench.telemetry import machine

DONE = ("ok", "unsupported", "skipped")  # statuses a resumed run does not repeat
_PROBE_WARMUP, _PROBE_STEPS = 1, 2
_PROBE_CAP = 1 << 16  # the doubling stops here even when everything fits
# A planned process: (cell, repeat, calibration, its place in the sweep: a multi-node cell's
# rendezvous port)
_Task = tuple[Cell, int, bool, int]


@dataclass
class Sweep:
    """The state of one run directory: its records and where to write the next ones."""

    run_dir: Path
    settings: Settings
    records: dict[tuple[str, int], dict[str, Any]]

    def save(self, record: dict[str, Any]) -> None:
        """Append ``record`` to records.jsonl (flushed + fsynced) and keep it. results.csv is
        derived once, when the sweep ends (or by a reader that finds it stale), not per cell."""
        store.append(self.run_dir, record)
        self.records[(record["cell_id"], record["repeat"])] = record

    def done(self, cell_id: str, repeat: int) -> bool:
        record = self.records.get((cell_id, repeat))
        return record is not None and record.get("status") in DONE


def _oom_limits(records: Iterable[dict[str, Any]], cells: dict[str, Cell]) -> dict[Any, int]:
    """Smallest OOM batch per cell group, from earlier records (so a resume skips alike)."""
    limits: dict[Any, int] = {}
    for record in records:
        cell = cells.get(record.get("cell_id"))
        if cell is not None and record.get("status") == "oom":
            limits[cell.group] = min(limits.get(cell.group, cell.batch_size), cell.batch_size)
    return limits


def _workdir(state: Sweep, cells: list[Cell]) -> Any:
    """Where children leave their records: the run directory when a cell spans several nodes
    (rank 0 may be on any of them: the run directory is the shared filesystem), else /tmp."""
    shared = state.run_dir if any(c.nnodes > 1 for c in cells) else None
    return tempfile.TemporaryDirectory(prefix=".cells-" if shared else "ampbench-cells-",
                                       dir=shared)


def plan(cells: list[Cell], repeats: int, calibration: int = noise.CALIBRATION_PROCESSES,
         ) -> list[tuple[Cell, int, bool]]:
    """Every (cell, repeat, calibration) in the order they run.

    Repeats are separate processes interleaved across cells (a, b, c, a, b, c), so drift hits
    every cell alike. With fewer than ``noise.MIN_OWN`` repeats a cell cannot measure its own
    between-process noise, so a calibration cell (the first single-process cell; in a sweep of
    torchrun cells only, the first on one node: a multi-node cell would hold its nodes for the
    calibration's minutes) gets ``calibration`` extra processes, half before the sweep and half
    after: their spread is the run's band for every cell (bench/analysis/noise.py).
    """
    tasks = [(cell, r, False) for r in range(repeats) for cell in cells]
    first = next((c for c in cells if c.num_processes == 1), None) or next(
        (c for c in cells if c.nnodes == 1), None)
    if first is None or repeats >= noise.MIN_OWN or calibration < 1:
        return tasks
    extra = [(first, repeats + i, True) for i in range(calibration)]
    half = len(extra) // 2
    return extra[:half] + tasks + extra[half:]


def _skipped(state: Sweep, cell: Cell, repeat: int, limit: int | None, budget: Budget | None,
             by_id: dict[str, Cell]) -> dict[str, Any] | bool | None:
    """Before a planned process starts: its ``skipped`` record past a batch that ran out of
    memory, None when the budget cannot finish it, False when it runs."""
    settings = state.settings
    if limit is not None and cell.batch_size > limit:
        return failure_record(cell, settings, repeat, "skipped",
                              f"batch {limit} already ran out of memory")
    if budget is not None and estimate_s(
            cell, state.records.values(), by_id, settings.timeout_s,
            settings.warmup + settings.steps, budget.flops) > budget.left():
        return None
    return False


def _process(state: Sweep, task: _Task, workdir: Path,
             on: tuple[slots.Slot, ...], cancel: threading.Event) -> dict[str, Any]:
    """The record of one planned process on the slots ``on``, its child's (in a thread of
    the pool: it only waits on the child)."""
    cell, repeat, _, place = task
    gpus = slots.gpus(on)
    # Others on this cell's GPUs (each GPU judged on its own): none of this run's cells is on
    # them just before or just after, so whoever holds one then is someone else.
    users = [machine.gpu_users(gpus)] if gpus else []
    before = contention.snapshot()
    started = now()
    record = run_child(cell, state.settings, repeat, workdir, place, slots.child_env(on),
                       cancel)
    # The child's wall time, start-up included: what the budget plans with.
    record["wall_s"] = round(now() - started, 3)
    # Others' work on this run's cores while the cell ran (not this runner's other cells,
    # its neighbours: bench/run/contention.py counts the runner's whole tree as its own).
    record["others_cpu_pct"] = contention.during(before, contention.snapshot()).get(
        "others_cpu_pct")
    if gpus:
        known = [n for n in [*users, machine.gpu_users(gpus)] if n is not None]
        record["num_others_on_gpu"] = max(known) if known else None
    return record


def _width(cell: Cell, on: tuple[slots.Slot, ...]) -> int:
    """The slots a cell takes: one GPU per rank; without --devices the run's only slot (a
    torchrun cell gets every GPU the runner sees, as ever)."""
    return 1 if on == slots.ONE else cell.num_processes


def _blocked(cell: Cell, running: list[_Task]) -> bool:
    """A larger batch waits while a smaller one of its group runs: an OOM there skips it."""
    return any(other.group == cell.group and other.batch_size < cell.batch_size
               for other, *_ in running)


def sweep(state: Sweep, cells: list[Cell], repeats: int,
          calibration: int = noise.CALIBRATION_PROCESSES,
          budget: Budget | None = None,
          on: tuple[slots.Slot, ...] = slots.ONE,
          executor: cluster.Options | None = None) -> list[tuple[Cell, int, bool]]:
    """Run every planned process that is not done yet; OOM at b skips larger batches. Records
    the machine's load around it in meta.json (warnings included). With a ``budget`` it
    starts no process the time left cannot finish (estimate_s) and returns the processes not
    run, in order; a resume runs them. On several slots (``on``: --devices) the processes run
    concurrently, one per free slot in plan order (a torchrun cell on as many as it has
    ranks), the batches of one group one at a time in ascending order; each record says
    where it ran (``device_slot``), when, and beside which others (``neighbours``). With an
    ``executor`` other than inline, the processes are jobs of a scheduler instead
    (bench/run/cluster.py), each record saying which (``scheduler_job``)."""
    tasks = plan(cells, repeats, calibration)
    todo = [(c, r, cal) for c, r, cal in tasks if not state.done(c.cell_id, r)]
    by_id = matrix.index(cells)
    limits = _oom_limits(state.records.values(), by_id)
    num_done = len(tasks) - len(todo)
    bar = console.progress(len(tasks), num_done)
    # This machine's state is the cells' only where they run here: not under Slurm.
    local = executor is None or executor.executor != "slurm"
    load, start = _machine_before(on) if local else ({}, None)

    def finish(record: dict[str, Any], task: _Task, where: str | None = None) -> None:
        nonlocal num_done
        cell, _, is_calibration, _ = task
        record["calibration"] = is_calibration
        state.save(record)
        if record["status"] == "oom":
            limits[cell.group] = min(limits.get(cell.group, cell.batch_size), cell.batch_size)
        num_done += 1
        console.write_line(f"[{num_done}/{len(tasks)}] {record_line(record)}"
                           f"{_tag(task, repeats)}{f' [device {where}]' if where else ''}")
        bar.update(1)

    pending = [(c, r, cal, place) for place, (c, r, cal) in enumerate(todo)]
    try:
        with _workdir(state, cells) as tmp, _pool(state, on, executor) as pool:
            in_time = True
            while pending or pool.running:
                if in_time:
                    in_time = _start_ready(state, pending, pool, Path(tmp), limits, budget,
                                           by_id, finish, lambda t: bar.set_postfix_str(
                                               t[0].label() + _tag(t, repeats)))
                if not pool.running:
                    break
                for done in pool.wait():
                    finish(_placed(done), done.task, slots.label(done.slots))
        return [(c, r, cal) for c, r, cal, _ in pending]  # in plan order
    finally:  # also on a stop: the load so far is worth keeping, but never worth a crash
        bar.close()
        with contextlib.suppress(Exception):
            during = contention.during(start, contention.snapshot()) if local else {}
            for warning in contention.warnings(during):
                print(f"warning: {warning}", file=sys.stderr)
            _record_load(state.run_dir, {**load, **during})


def _machine_before(on: tuple[slots.Slot, ...]) -> tuple[dict[str, Any], Any]:
    """This machine's load before a sweep and a snapshot to measure it during; the GPUs, the
    governors and others' use of the cores are warned about as `ampbench env` does."""
    here = machine.sample()
    for warning in machine.noise_warnings(here, slots.gpus(on)):
        print(f"warning: {warning}", file=sys.stderr)
    return here.load, contention.snapshot()


def _pool(state: Sweep, on: tuple[slots.Slot, ...],
          executor: cluster.Options | None) -> slots.Pool | cluster.ClusterPool:
    """Where the processes run: this machine's slots, or a scheduler's jobs."""
    if executor is None or executor.executor == "inline":
        return slots.Pool(on)
    return cluster.ClusterPool(executor, state.run_dir, state.settings)


def _tag(task: _Task, repeats: int) -> str:
    return " (calibration)" if task[2] else (f" #{task[1]}" if repeats > 1 else "")


def _start_ready(state: Sweep, pending: list[_Task], pool: slots.Pool | cluster.ClusterPool,
                 workdir: Path,
                 limits: dict[Any, int], budget: Budget | None, by_id: dict[str, Cell],
                 finish: Callable[[dict[str, Any], _Task], None],
                 started: Callable[[_Task], None]) -> bool:
    """Start the pending processes that can start now, in plan order (each taken out of
    ``pending``; a skipped one recorded at once); False when the budget stops the sweep."""
    for task in list(pending):
        cell, repeat, _, _ = task
        if _blocked(cell, pool.running):
            continue
        if not pool.fits(_width(cell, pool.slots)):
            break  # in plan order: it waits for its slots, the rest behind it
        # Judged when it could start: the records of those before it are in.
        early = _skipped(state, cell, repeat, limits.get(cell.group), budget, by_id)
        if early is None:  # the budget: nothing more starts
            return False
        pending.remove(task)
        if early is not False:
            finish(early, task)
            continue
        pool.start(task, _width(cell, pool.slots),
                   lambda t, on, cancel: _process(state, t, workdir, on, cancel))
        started(task)
    return True


def _placed(done: slots.Finished) -> dict[str, Any]:
    """A finished process's record with where, when and beside which others it ran."""
    return {**done.result, "device_slot": slots.label(done.slots),
            "started_unix_s": round(done.started_unix_s, 6),
            "ended_unix_s": round(done.ended_unix_s, 6),
            "neighbours": [f"{c.cell_id}:{r}" for c, r, *_ in done.neighbours]}


def _record_load(run_dir: Path, load: dict[str, Any]) -> None:
    """The machine's load into meta.json, with its warnings (the report shows them); a
    resumed run's replace the earlier ones."""
    meta = store.read_meta(run_dir)
    kept = [w for w in meta.get("warnings") or [] if not w.startswith("busy ")]
    store.write_meta(run_dir, {**meta, "machine_load": load,
                               "warnings": kept + contention.warnings(load)})


def find_max_batch(state: Sweep, cells: list[Cell],
                   on: tuple[slots.Slot, ...] = slots.ONE) -> None:
    """Per cell group, the largest batch that fits: doubling, then bisection; one record each.
    One probe at a time, on the first of the slots ``on`` (--devices).

    Each probe is a child cell with few steps; the recorded row is the largest probe that ran,
    with ``max_batch_search=True`` and ``max_batch``. Mixed precision's memory saving shows as
    a larger max_batch than fp32's.
    """
    starts: dict[Any, Cell] = {}
    for cell in cells:  # ascending batches: the first cell of a group is its smallest
        starts.setdefault(cell.group, cell)
    probe_settings = replace(state.settings, warmup=min(state.settings.warmup, _PROBE_WARMUP),
                             steps=min(state.settings.steps, _PROBE_STEPS))
    bar = console.progress(len(starts), 0)
    try:
        with _workdir(state, cells) as tmp:
            places = itertools.count()
            for first in starts.values():
                search = replace(first, batch_size=0)  # the search's own id: batch 0
                bar.set_postfix_str(f"max batch of {search.label()}")
                if not state.done(search.cell_id, 0):
                    record = _search(first, probe_settings, Path(tmp), bar, places,
                                     slots.child_env(on[:first.num_processes]))
                    record.update(cell_id=search.cell_id, repeat=0)
                    state.save(record)
                    console.write_line(f"max batch {record['max_batch']}: "
                                       f"{record_line(record)}")
                bar.update(1)
    finally:
        bar.close()


def _search(first: Cell, settings: Settings, workdir: Path, bar: Any,
            places: Iterator[int], env: dict[str, str]) -> dict[str, Any]:
    def probe(batch: int) -> dict[str, Any]:
        bar.set_postfix_str(f"probe {replace(first, batch_size=batch).label()}")
        return run_child(replace(first, batch_size=batch), settings, 0, workdir, next(places),
                         env)

    best: dict[str, Any] | None = None
    low, high = 0, None  # low fits; high does not
    batch = first.batch_size
    while high is None and batch <= _PROBE_CAP:
        record = probe(batch)
        if record["status"] == "ok":
            best, low, batch = record, batch, batch * 2
        elif record["status"] == "oom":
            high = batch
        else:  # error, timeout, unsupported: no capacity to report
            return {**record, "max_batch_search": True, "max_batch": None}
    while high is not None and high - low > 1:
        mid = (low + high) // 2
        record = probe(mid)
        if record["status"] == "ok":
            best, low = record, mid
        elif record["status"] == "oom":
            high = mid
        else:
            break
    if best is None:  # not even batch 1 fits
        record = failure_record(first, settings, 0, "oom", "batch 1 does not fit")
        return {**record, "max_batch_search": True, "max_batch": 0}
    return {**best, "max_batch_search": True, "max_batch": low}
