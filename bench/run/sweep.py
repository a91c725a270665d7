"""The sweep: every planned process of a matrix, one child process per cell, failures as data.

``plan`` orders the processes (repeats interleaved, calibration processes around them);
``sweep`` runs those not done yet in a run directory, each through bench/run/launch.py, and
appends its record (``Sweep.save``); an OOM at batch b skips the group's larger batches, and
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import store
from bench.analysis import noise
from bench.config import Cell, matrix
from bench.run import console, contention
from bench.run.budget import Budget, estimate_s, now
from bench.run.launch import Settings, failure_record, run_child
from bench.store import record_line
from bench.telemetry import machine

DONE = ("ok", "unsupported", "skipped")  # statuses a resumed run does not repeat
_PROBE_WARMUP, _PROBE_STEPS = 1, 2
_PROBE_CAP = 1 << 16  # the doubling stops here even when everything fits


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
    between-process noise, so a calibration cell (the first single-process cell) gets
    ``calibration`` extra processes, half before the sweep and half after: their spread is the
    run's band for every cell (bench/analysis/noise.py).
    """
    tasks = [(cell, r, False) for r in range(repeats) for cell in cells]
    first = next((c for c in cells if c.num_processes == 1), None)
    if first is None or repeats >= noise.MIN_OWN or calibration < 1:
        return tasks
    extra = [(first, repeats + i, True) for i in range(calibration)]
    half = len(extra) // 2
    return extra[:half] + tasks + extra[half:]


def _process(state: Sweep, cell: Cell, repeat: int, workdir: Path, slot: int,
             limit: int | None, budget: Budget | None,
             by_id: dict[str, Cell]) -> dict[str, Any] | None:
    """The record of one planned process: ``skipped`` past a batch that ran out of memory,
    None when the budget cannot finish it, else its child's."""
    settings = state.settings
    if limit is not None and cell.batch_size > limit:
        return failure_record(cell, settings, repeat, "skipped",
                              f"batch {limit} already ran out of memory")
    if budget is not None and estimate_s(
            cell, state.records.values(), by_id, settings.timeout_s,
            settings.warmup + settings.steps, budget.flops) > budget.left():
        return None
    before = contention.snapshot()
    started = now()
    record = run_child(cell, settings, repeat, workdir, slot)
    # The child's wall time, start-up included: what the budget plans with.
    record["wall_s"] = round(now() - started, 3)
    # Others' work on this run's cores while the cell ran: a contended cell.
    record["others_cpu_pct"] = contention.during(before, contention.snapshot()).get(
        "others_cpu_pct")
    return record


def sweep(state: Sweep, cells: list[Cell], repeats: int,
          calibration: int = noise.CALIBRATION_PROCESSES,
          budget: Budget | None = None) -> list[tuple[Cell, int, bool]]:
    """Run every planned process that is not done yet; OOM at b skips larger batches. Records
    the machine's load around it in meta.json (warnings included). With a ``budget`` it
    stops before the first process the time left cannot finish (estimate_s) and returns the
    processes not run, in order; a resume runs them."""
    tasks = plan(cells, repeats, calibration)
    todo = [(c, r, cal) for c, r, cal in tasks if not state.done(c.cell_id, r)]
    by_id = matrix.index(cells)
    limits = _oom_limits(state.records.values(), by_id)
    num_done = len(tasks) - len(todo)
    bar = console.progress(len(tasks), num_done)
    # The GPUs, the governors and others' use of the cores: warned about as `ampbench env` does.
    here = machine.sample()
    load = here.load
    start = contention.snapshot()
    for warning in machine.noise_warnings(here):
        print(f"warning: {warning}", file=sys.stderr)
    try:
        with _workdir(state, cells) as tmp:
            for slot, (cell, repeat, is_calibration) in enumerate(todo):
                tag = " (calibration)" if is_calibration else (
                    f" #{repeat}" if repeats > 1 else "")
                bar.set_postfix_str(cell.label() + tag)
                record = _process(state, cell, repeat, Path(tmp), slot, limits.get(cell.group),
                                  budget, by_id)
                if record is None:
                    return todo[slot:]  # in plan order: the calibration stays last
                record["calibration"] = is_calibration
                state.save(record)
                if record["status"] == "oom":
                    limits[cell.group] = min(limits.get(cell.group, cell.batch_size),
                                             cell.batch_size)
                num_done += 1
                console.write_line(f"[{num_done}/{len(tasks)}] {record_line(record)}{tag}")
                bar.update(1)
    finally:  # also on a stop: the load so far is worth keeping, but never worth a crash
        bar.close()
        with contextlib.suppress(Exception):
            during = contention.during(start, contention.snapshot())
            for warning in contention.warnings(during):
                print(f"warning: {warning}", file=sys.stderr)
            _record_load(state.run_dir, {**load, **during})
    return []


def _record_load(run_dir: Path, load: dict[str, Any]) -> None:
    """The machine's load into meta.json, with its warnings (the report shows them); a
    resumed run's replace the earlier ones."""
    meta = store.read_meta(run_dir)
    kept = [w for w in meta.get("warnings") or [] if not w.startswith("busy ")]
    store.write_meta(run_dir, {**meta, "machine_load": load,
                               "warnings": kept + contention.warnings(load)})


def find_max_batch(state: Sweep, cells: list[Cell]) -> None:
    """Per cell group, the largest batch that fits: doubling, then bisection; one record each.

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
            slots = itertools.count()
            for first in starts.values():
                search = replace(first, batch_size=0)  # the search's own id: batch 0
                bar.set_postfix_str(f"max batch of {search.label()}")
                if not state.done(search.cell_id, 0):
                    record = _search(first, probe_settings, Path(tmp), bar, slots)
                    record.update(cell_id=search.cell_id, repeat=0)
                    state.save(record)
                    console.write_line(f"max batch {record['max_batch']}: "
                                       f"{record_line(record)}")
                bar.update(1)
    finally:
        bar.close()


def _search(first: Cell, settings: Settings, workdir: Path, bar: Any,
            slots: Iterator[int]) -> dict[str, Any]:
    def probe(batch: int) -> dict[str, Any]:
        bar.set_postfix_str(f"probe {replace(first, batch_size=batch).label()}")
        return run_child(replace(first, batch_size=batch), settings, 0, workdir, next(slots))

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
