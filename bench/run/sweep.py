"""The matrix runner: one child process per cell, failures as data, resumable at any moment.

    python -m bench run                       # auto preset: gpu with CUDA, cpu otherwise
    python -m bench run --preset quick --out results/runs/smoke
    python -m bench run --resume results/runs/20261122-224500-nvidia-h100

Each cell runs as ``python -m bench cell ... --out <tmp json>`` in its own session (process
group) under a timeout (bench/run/launch.py); a cell with world_size > 1 runs under torchrun
(``python -m torch.distributed.run``), standalone on one node. Its record is appended to
records.jsonl (flush + fsync) and results.csv is derived after every cell. A child that dies
without a record becomes a record too (oom | timeout | error); a timeout or Ctrl-C kills the
child's whole process tree. SIGTERM and SIGHUP stop the run like Ctrl-C (children killed,
temporary directories removed, the resume command printed, exit 128+N), and a child polices
itself too (bench/run/proctree.py): it dies with this runner, however it dies, and at its own
timeout. One runner per run directory (bench/paths.py's lock). Running again into the same
directory runs only the cells that are missing or failed. After the sweep: accuracy parity
(bench.parity) and the report (bench.report); a failure there is reported and the sweep's
records stay.

Several nodes (``--nnodes N``): this one runner starts each cell through a launcher that runs
one torchrun on every node (``--launcher "srun --nodes=2 --ntasks-per-node=1"``, the default
inside a SLURM allocation); the torchruns meet at ``--rdzv-endpoint`` (c10d rendezvous, default
this host, port 29500 upwards), a rendezvous of their own per cell. Global rank 0, wherever it
lands, writes the record into the run directory, which must be on a filesystem all nodes
share. A timeout kills the launcher, and srun takes the ranks on every node down with it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import itertools
import math
import os
import re
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import BadInput, config, paths, store
from bench.analysis import noise
from bench.config import Cell, Matrix, matrix
from bench.run import contention
from bench.run.launch import Settings, failure_record, run_child

DONE = ("ok", "unsupported", "skipped")  # statuses a resumed run does not repeat
BUDGET_EXIT = 3  # stopped by --time-budget, the resume command printed (DESIGN.md)
# What --time-budget keeps back for the report after the last cell or parity run (plots
# included; a few seconds on a GPU box, more on a busy 2-core one).
_REPORT_RESERVE_S = 30.0
_clock = time.monotonic  # the budget's clock (tests replace it)
_PROBE_WARMUP, _PROBE_STEPS = 1, 2
_PROBE_CAP = 1 << 16  # the doubling stops here even when everything fits
_RDZV_PORT = 29500


# ---------------------------------------------------------------- the sweep


@dataclass
class Sweep:
    """The state of one run directory: its records and where to write the next ones."""

    run_dir: Path
    settings: Settings
    records: dict[tuple[str, int], dict[str, Any]]

    def save(self, record: dict[str, Any]) -> None:
        store.append(self.run_dir, record)  # flushed + fsynced before results.csv is touched
        self.records[(record["cell_id"], record["repeat"])] = record
        store.write_csv(self.run_dir, self.records.values())

    def done(self, cell_id: str, repeat: int) -> bool:
        record = self.records.get((cell_id, repeat))
        return record is not None and record.get("status") in DONE


@dataclass(frozen=True)
class Budget:
    """``--time-budget``: when the run must be over, and what it keeps back for the report."""

    text: str  # as given: 25m, 540s ...
    deadline: float  # on _clock()
    reserve_s: float = 0.0

    def left(self) -> float:
        """Seconds still free for cells and parity runs."""
        return self.deadline - self.reserve_s - _clock()


def estimate_s(cell: Cell, records: Iterable[dict[str, Any]], cells: dict[str, Cell],
               timeout_s: float, num_steps: int | None = None) -> float:
    """How long ``cell``'s process will take, never more than the timeout (which bounds every
    process). A group that has run (all but the batch): its slowest ok process, scaled up to
    this batch. Else the cost model of _modelled_s from the ok processes finished so far,
    ``num_steps`` (warmup + timed) steps long; the timeout when it has nothing to go on."""
    finished = [(cells.get(r["cell_id"]) or _cell_of(r), r) for r in records
                if r.get("status") == "ok" and _number(r.get("wall_s")) is not None]
    finished = [(other, r) for other, r in finished if other is not None]
    known = [r["wall_s"] * max(1.0, cell.batch_size / other.batch_size)
             for other, r in finished if other.group == cell.group]
    if known:
        return min(max(known), timeout_s)
    guess = _modelled_s(cell, finished, num_steps)
    return timeout_s if guess is None else min(guess, timeout_s)


# The cost model's margin on an unseen cell's training time: its step time comes from another
# cell's, scaled by FLOPs per step, and the FLOP rate a step achieves differs between models
# and policies by up to 2-3x (config.gpu_quick: tf32 at ~60 TFLOP/s for ResNet-50 and ~130 for
# the transformers).
_STEP_MARGIN = 2.0


def _modelled_s(cell: Cell, finished: list[tuple[Cell, dict[str, Any]]],
                num_steps: int | None) -> float | None:
    """An unseen group's process from the finished ones: start-up + steps x step time, or
    None (then the timeout) when no process of its kind has finished.

    A finished process's wall_s is its start-up (interpreter, torch and CUDA, model build, FLOP
    count, cuDNN autotuning, torch.compile in a compiled cell's first step, and the exit) plus
    its warmup and timed steps at its median step time: start-up is what is left of wall_s.
    Start-up is taken from processes of the same kind (eager or compiled, one process or
    torchrun): the longest so far, so for a compiled cell the eager start-up plus the longest
    compile measured. The first process of a kind has no such measure and gets the timeout.
    Step time: a finished cell's, times this cell's FLOPs per step over its (analytic,
    models/), from the cells closest in kind (the same model and policy in another group, else
    the same policy, else the same model, else any), the slowest of them, times _STEP_MARGIN.
    """
    flops = _flops_per_step(cell)
    if flops is None:
        return None
    kind = (cell.compile, cell.num_processes > 1)
    start_s: list[float] = []
    by_closeness: dict[int, list[tuple[float, int]]] = {}  # (step time at cell's FLOPs, steps)
    for other, record in finished:
        step_ms = _number(record.get("step_ms_median"))
        warmup, timed = (_number(record.get(k)) for k in ("warmup_steps", "timed_steps"))
        other_flops = _flops_per_step(other)
        if step_ms is None or warmup is None or timed is None or not other_flops:
            continue
        ran = int(warmup + timed)
        if (other.compile, other.num_processes > 1) == kind:
            start_s.append(max(0.0, record["wall_s"] - ran * step_ms / 1e3))
        closeness = _closeness(cell, other)
        by_closeness.setdefault(closeness, []).append((step_ms / 1e3 * flops / other_flops, ran))
    if not start_s or not by_closeness:
        return None
    step_s, ran = max(by_closeness[min(by_closeness)])
    return max(start_s) + (num_steps or ran) * step_s * _STEP_MARGIN


def _cell_of(record: dict[str, Any]) -> Cell | None:
    """The cell a record of another matrix measured (a run directory that several sweeps
    wrote into, as `ampbench validate`'s steps do), from its key fields; None if they are
    damaged."""
    try:
        return Cell(model=str(record["model"]), precision=str(record["precision"]),
                    batch_size=int(record["batch_size"]), seq_len=record.get("seq_len"),
                    image_size=record.get("image_size"),
                    grad_accum=int(record.get("grad_accum") or 1),
                    compile=bool(record.get("compile")),
                    world_size=int(record.get("world_size") or 1))
    except (KeyError, TypeError, ValueError):
        return None


def _closeness(cell: Cell, other: Cell) -> int:
    """0 the same model and policy, 1 the same policy, 2 the same model, 3 neither."""
    if other.precision == cell.precision:
        return 0 if other.model == cell.model else 1
    return 2 if other.model == cell.model else 3


def _flops_per_step(cell: Cell) -> float | None:
    """Analytic training FLOPs of one optimizer step on one rank (models/); None for a model
    the registry does not know. Imports the model's file, and with it torch: the runner has
    imported torch already to check the device."""
    import models

    try:
        spec = models.get(cell.model)
    except ValueError:
        return None
    size = cell.seq_len or cell.image_size or spec.default_size
    return float(spec.flops_per_sample(size) * cell.batch_size * cell.grad_accum)


def _number(value: Any) -> float | None:
    """``value`` when it is a finite real number (not a bool), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _oom_limits(records: Iterable[dict[str, Any]], cells: dict[str, Cell]) -> dict[Any, int]:
    """Smallest OOM batch per cell group, from earlier records (so a resume skips alike)."""
    limits: dict[Any, int] = {}
    for record in records:
        cell = cells.get(record.get("cell_id"))
        if cell is not None and record.get("status") == "oom":
            limits[cell.group] = min(limits.get(cell.group, cell.batch_size), cell.batch_size)
    return limits


def _progress(total: int, initial: int) -> Any:
    """A progress bar on a terminal; nothing where stderr is a file or a pipe (CI logs), where
    the one plain line per finished cell is the progress."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, file=sys.stderr, unit="cell", dynamic_ncols=True,
                disable=not sys.stderr.isatty(),
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")


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


def sweep(state: Sweep, cells: list[Cell], repeats: int,
          calibration: int = noise.CALIBRATION_PROCESSES,
          budget: Budget | None = None) -> list[tuple[Cell, int, bool]]:
    """Run every planned process that is not done yet; OOM at b skips larger batches. Records
    the machine's load around it in meta.json (warnings included). With a ``budget`` it
    stops before the first process the time left cannot finish (estimate_s) and returns the
    processes not run, in order; a resume runs them."""
    from tqdm import tqdm

    from bench.cell.main import summary_line

    tasks = plan(cells, repeats, calibration)
    todo = [(c, r, cal) for c, r, cal in tasks if not state.done(c.cell_id, r)]
    by_id = matrix.index(cells)
    limits = _oom_limits(state.records.values(), by_id)
    bar = _progress(len(tasks), len(tasks) - len(todo))
    num_done = len(tasks) - len(todo)
    machine = contention.before_sweep()
    start = contention.snapshot()
    for warning in contention.warnings(machine):
        print(f"warning: {warning}", file=sys.stderr)
    not_run: list[tuple[Cell, int, bool]] = []
    try:
        with _workdir(state, cells) as tmp:
            for slot, (cell, repeat, is_calibration) in enumerate(todo):
                tag = " (calibration)" if is_calibration else (
                    f" #{repeat}" if repeats > 1 else "")
                bar.set_postfix_str(cell.label() + tag)
                limit = limits.get(cell.group)
                if limit is not None and cell.batch_size > limit:
                    record = failure_record(cell, state.settings, repeat, "skipped",
                                            f"batch {limit} already ran out of memory")
                elif budget is not None and estimate_s(
                        cell, state.records.values(), by_id, state.settings.timeout_s,
                        state.settings.warmup + state.settings.steps) > budget.left():
                    not_run = todo[slot:]  # in plan order: the calibration stays last
                    break
                else:
                    before = contention.snapshot()
                    started = _clock()
                    record = run_child(cell, state.settings, repeat, Path(tmp), slot)
                    # The child's wall time, start-up included: what the budget plans with.
                    record["wall_s"] = round(_clock() - started, 3)
                    # Others' work on this run's cores while the cell ran: a contended cell.
                    record["others_cpu_pct"] = contention.during(before, contention.snapshot()).get(
                        "others_cpu_pct")
                record["calibration"] = is_calibration
                state.save(record)
                if record["status"] == "oom":
                    limits[cell.group] = min(limits.get(cell.group, cell.batch_size),
                                             cell.batch_size)
                num_done += 1
                tqdm.write(f"[{num_done}/{len(tasks)}] {summary_line(record)}{tag}",
                           file=sys.stderr)
                bar.update(1)
    finally:  # also on a stop: the load so far is worth keeping, but never worth a crash
        bar.close()
        with contextlib.suppress(Exception):
            during = contention.during(start, contention.snapshot())
            for warning in contention.warnings(during):
                print(f"warning: {warning}", file=sys.stderr)
            _record_load(state.run_dir, {**machine, **during})
    return not_run


def _record_load(run_dir: Path, machine: dict[str, Any]) -> None:
    """The machine's load into meta.json, with its warnings (the report shows them); a
    resumed run's replace the earlier ones."""
    meta = store.read_meta(run_dir)
    kept = [w for w in meta.get("warnings") or [] if not w.startswith("busy ")]
    store.write_meta(run_dir, {**meta, "machine_load": machine,
                               "warnings": kept + contention.warnings(machine)})


def find_max_batch(state: Sweep, cells: list[Cell]) -> None:
    """Per cell group, the largest batch that fits: doubling, then bisection; one record each.

    Each probe is a child cell with few steps; the recorded row is the largest probe that ran,
    with ``max_batch_search=True`` and ``max_batch``. Mixed precision's memory saving shows as
    a larger max_batch than fp32's.
    """
    from tqdm import tqdm

    from bench.cell.main import summary_line

    starts: dict[Any, Cell] = {}
    for cell in cells:  # ascending batches: the first cell of a group is its smallest
        starts.setdefault(cell.group, cell)
    probe_settings = replace(state.settings, warmup=min(state.settings.warmup, _PROBE_WARMUP),
                             steps=min(state.settings.steps, _PROBE_STEPS))
    bar = _progress(len(starts), 0)
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
                    tqdm.write(f"max batch {record['max_batch']}: {summary_line(record)}",
                               file=sys.stderr)
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


# ---------------------------------------------------------------- summary


def _column(record: dict[str, Any]) -> tuple[Any, ...]:
    """A record's cell key without model and precision: one column of the summary."""
    return (record["batch_size"], record.get("seq_len") or record.get("image_size"),
            record.get("grad_accum") or 1, bool(record.get("compile")),
            record.get("world_size") or 1)


def _column_label(column: tuple[Any, ...], show_size: bool) -> str:
    batch, size, accum, compiled, world = column
    return "".join([f"b={batch}", f" size={size}" if show_size else "",
                    f" ga={accum}" if accum != 1 else "", " compile" if compiled else "",
                    f" ws={world}" if world != 1 else ""])


def summarize(records: Iterable[dict[str, Any]]) -> str:
    """Per model: policies x cells (batch size, world size ...), median samples/s of the ok
    processes with the speedup over fp32 in the same column and its noise interval."""
    from tabulate import tabulate

    records = list(records)
    cells = [r for r in records if not r.get("max_batch_search")]
    searched = [r for r in records if r.get("max_batch_search")]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in cells:
        if r.get("status") == "ok":
            groups.setdefault((r["model"], r["precision"], _column(r)), []).append(r)
    estimates, band = noise.cell_estimates(groups, "samples_per_s")
    blocks = []
    for model in dict.fromkeys(r["model"] for r in cells):
        rows = [r for r in cells if r["model"] == model]
        columns = sorted({_column(r) for r in rows}, key=lambda c: (c[4], c[2], c[3], c[1], c[0]))
        show_size = len({c[1] for c in columns}) > 1
        body = []
        for policy in dict.fromkeys(r["precision"] for r in rows):
            emulated = any(store.truthy(r.get("emulated")) for r in rows
                           if r["precision"] == policy)
            line = [f"{policy} (emulated)" if emulated else policy]
            for column in columns:
                value = estimates.get((model, policy, column))
                base = estimates.get((model, "fp32", column))
                if value is None:  # no ok process: the last one's status, or nothing ran
                    group = [r for r in rows if r["precision"] == policy and _column(r) == column]
                    line.append(group[-1]["status"] if group else "")
                    continue
                text = f"{value.value:,.1f}"
                if base is not None and policy != "fp32":
                    ratio = value.ratio(base)
                    width = (f" ±{ratio.half_width:.2f}" if math.isfinite(ratio.half_width)
                             else "")
                    text += f" ({ratio.value:.2f}x{width}{'*' if ratio.beyond_noise else ''})"
                line.append(text)
            body.append(line)
        headers = ["policy", *(_column_label(c, show_size) for c in columns)]
        blocks.append(f"{model}: samples/s (speedup over fp32; * beyond the noise)\n"
                      + tabulate(body, headers=headers, tablefmt="github"))
    if estimates:
        blocks.append(f"noise: {noise.describe(band)}")
    if searched:
        body = [[r["model"], r["precision"], r["max_batch"]] for r in searched]
        blocks.append("largest batch that fits\n" + tabulate(
            body, headers=["model", "policy", "max batch"], tablefmt="github"))
    return "\n\n".join(blocks) or "no records"


# ---------------------------------------------------------------- the command


def _resolve_device(name: str) -> str:
    """The device every child gets, checked here: a bad one is one line, not a failed sweep."""
    from bench.cell.main import resolve_device

    device = resolve_device(name)  # BadInput for a name it does not know or a missing GPU
    return "cuda" if device.type == "cuda" and name in ("auto", "cuda") else str(device)


def _choose_matrix(args: argparse.Namespace) -> tuple[Matrix, Path | None, dict[str, Any]]:
    """(matrix before overrides, run directory if known, its meta) from the flags."""
    run_dir = None
    if args.resume or args.out:
        run_dir = paths.output_dir(args.resume or args.out, "--resume" if args.resume else "--out")
    meta: dict[str, Any] = {}
    if args.resume and not (run_dir / store.META).is_file():
        raise BadInput(f"--resume {args.resume}: not a run directory (no {store.META})")
    if run_dir is not None and (run_dir / store.META).is_file():
        meta = store.read_meta(run_dir)  # {} with a warning when damaged
    if args.matrix:
        return config.load(args.matrix), run_dir, meta
    if args.preset:
        return config.preset(args.preset), run_dir, meta
    if meta.get("matrix"):
        return config.from_dict(meta["matrix"], str(run_dir / store.META)), run_dir, meta
    if args.resume:
        raise BadInput(f"--resume {args.resume}: {store.META} holds no matrix; finish the run "
                       f"with --out {args.resume} and the --preset or --matrix it ran")
    return config.preset("auto"), run_dir, meta


def _known_run_id(meta: dict[str, Any], run_dir: Path | None) -> str | None:
    """The run id of a run directory: meta.json's, else its records' (meta.json damaged)."""
    candidates = [meta.get("run_id")]
    if run_dir is not None and not _valid_run_id(meta.get("run_id")):
        candidates += [r.get("run_id") for r in store.load_records(run_dir)]
    return next((c for c in candidates if _valid_run_id(c)), None)


def _valid_run_id(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}", value) \
        is not None


def resume_command(args: argparse.Namespace, run_dir: Path) -> str:
    """The command that finishes ``run_dir``: every flag this run was started with, the
    matrix taken from its meta.json (so --preset, --matrix and --out give way to --resume)."""
    from bench.cli import command_parser

    argv = ["python", "-m", "bench", "run", "--resume", str(run_dir)]
    for action in command_parser("run")._actions:
        if not action.option_strings or action.dest in ("help", "preset", "matrix", "resume",
                                                        "out"):
            continue
        value = getattr(args, action.dest, None)
        if value is None or value is False or value == action.default:
            continue
        argv.append(action.option_strings[-1])
        if value is not True:
            argv.append(",".join(map(str, value)) if isinstance(value, list | tuple)
                        else str(value))
    return shlex.join(argv)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the runner is, so that it stops like on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                      if hasattr(signal, name))


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise Stopped once; later ones wait for the cleanup that the
    first one started (children killed, temporary directories removed)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def later(signum: int, frame: Any) -> None:
        print(f"ampbench run: {signal.Signals(signum).name}: still cleaning up",
              file=sys.stderr)

    def first(signum: int, frame: Any) -> None:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, later)
        raise Stopped(signum)

    before = {sig: signal.signal(sig, first) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@dataclass
class _Session:
    """What `ampbench run` holds while it runs: the run directory's lock, and enough to say
    how to resume when it is stopped."""

    args: argparse.Namespace
    hold: contextlib.ExitStack
    run_dir: Path | None = None
    state: Sweep | None = None

    def lock(self, run_dir: Path) -> None:
        self.hold.enter_context(paths.lock(run_dir, "ampbench run"))
        self.run_dir = run_dir

    def stopped(self, signum: int) -> int:
        """Say what was kept and how to resume; the exit code for being stopped by signum."""
        name = signal.Signals(signum).name
        if self.run_dir is None or not (self.run_dir / store.META).exists():
            print(f"\nampbench run: stopped by {name} before the sweep began; nothing written",
                  file=sys.stderr)
        else:
            records = self.state.records.values() if self.state else []
            done = sum(1 for r in records if r.get("status") in DONE)
            print(f"\nampbench run: stopped by {name}; {done} finished cell(s) kept in "
                  f"{self.run_dir}\nresume with: {resume_command(self.args, self.run_dir)}",
                  file=sys.stderr)
        return 128 + signum


def _multi_node(args: argparse.Namespace, mx: Matrix) -> tuple[tuple[str, ...], str]:
    """(launcher, rendezvous endpoint) for cells on several nodes; ((), "") for one node."""
    if mx.nnodes == 1:
        return (), ""
    launcher = args.launcher
    if launcher is None and "SLURM_JOB_ID" in os.environ:
        launcher = f"srun --nodes={mx.nnodes} --ntasks-per-node=1"
    if not launcher:
        raise BadInput(f"cells on {mx.nnodes} nodes need --launcher, a command that starts one "
                       f'torchrun per node (e.g. "srun --nodes={mx.nnodes} --ntasks-per-node=1")')
    endpoint = args.rdzv_endpoint or f"{socket.gethostname()}:{_RDZV_PORT}"
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"--rdzv-endpoint '{endpoint}' is not HOST:PORT")
    return tuple(shlex.split(launcher)), endpoint


def _after_sweep(stage: str, call: Any) -> None:
    """Run parity or the report after the sweep: a failure there is reported, never fatal, so
    the sweep's records and a finished stage's files stay."""
    try:
        call()
    except KeyboardInterrupt:
        raise
    except BadInput as exc:
        print(f"ampbench run: {stage}: {exc}", file=sys.stderr)
    except Exception as exc:
        print(f"ampbench run: {stage} failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def _budget(args: argparse.Namespace) -> Budget | None:
    """``--time-budget`` as a Budget that starts now; None without one."""
    text = getattr(args, "time_budget", None)
    if not text:
        return None
    if args.find_max_batch:
        raise BadInput("--time-budget does not apply to --find-max-batch, whose probes cannot "
                       "be estimated ahead")
    from bench.cli import duration_s

    seconds = duration_s(text)
    reserve_s = 0.0 if args.no_report else min(_REPORT_RESERVE_S, seconds / 4)
    return Budget(text, _clock() + seconds, reserve_s)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _parity(run_dir: Path, mx: Matrix, device: str, budget: Budget | None) -> list[str]:
    """The parity stage of a run; returns the parity runs the budget left for a resume."""
    from bench import parity

    print("ampbench run: accuracy parity ...", file=sys.stderr)
    not_run: list[str] = []

    def stage() -> None:
        try:
            path = parity.run_parity(
                run_dir, models=[a.name for a in mx.models] + parity.tasks_for(mx.precisions),
                precisions=list(mx.precisions),
                steps=mx.parity_steps or None, seeds=mx.parity_seeds, device=device,
                time_left=budget.left if budget else None, unknown_s=mx.timeout_s)
        except parity.OutOfTime as stop:
            not_run.extend(stop.not_run)
            path = stop.path
        if path is not None:
            print(parity.verdict_table(path))

    _after_sweep("parity", stage)
    return not_run


_INCOMPLETE = "incomplete:"


def _mark_incomplete(run_dir: Path, budget: Budget | None, cells: list[str],
                     parity_runs: list[str]) -> None:
    """meta.json's ``incomplete`` and a warning (the report shows it) naming what the time
    budget left out; both go when nothing is left out."""
    meta = store.read_meta(run_dir)
    warnings = [w for w in meta.get("warnings") or [] if not w.startswith(_INCOMPLETE)]
    meta.pop("incomplete", None)
    if budget is not None and (cells or parity_runs):
        meta["incomplete"] = {"time_budget": budget.text, "cells": cells,
                              "parity_runs": parity_runs}

        def some(items: list[str]) -> str:
            more = f", and {len(items) - 3} more" if len(items) > 3 else ""
            return f" ({', '.join(items[:3])}{more})" if items else ""

        missing = [f"{len(items)} {what}{some(items)}" for items, what in (
            (cells, "cell process(es)"), (parity_runs, "parity run(s)")) if items]
        warnings.append(f"{_INCOMPLETE} --time-budget {budget.text} ran out before "
                        f"{' and '.join(missing)} could start; this report covers what "
                        "finished, and `ampbench run --resume` on this run directory runs "
                        "only the rest")
    store.write_meta(run_dir, {**meta, "warnings": warnings})


def _prices(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, float]:
    """The run's prices for meta.json: the flags', else those a resumed run recorded."""
    return store.prices(meta, {key: getattr(args, key, None) for key in store.PRICES})


def main(args: argparse.Namespace) -> int:
    """`ampbench run`: sweep the matrix into a run directory; exit 0 when the sweep finished,
    3 when --time-budget stopped it and 128+N when signal N did (Ctrl-C, SIGTERM, SIGHUP),
    each time with the resume command printed."""
    with contextlib.ExitStack() as hold, _stop_on_signals():
        session = _Session(args, hold)
        try:
            return _run(args, session)
        except Stopped as stop:
            return session.stopped(stop.signum)
        except KeyboardInterrupt:  # SIGINT that arrived before the handlers were in place
            return session.stopped(signal.SIGINT)


def _run(args: argparse.Namespace, session: _Session) -> int:
    budget = _budget(args)
    base, run_dir, meta = _choose_matrix(args)
    prices = _prices(args, meta)
    mx = config.override(
        base, models_=args.models, precisions=args.precisions, batch_sizes=args.batch_sizes,
        steps=args.steps, warmup=args.warmup, repeats=args.repeats,
        calibration=args.calibration, device=args.device,
        timeout_s=args.timeout, world_size=args.world_size, nnodes=args.nnodes,
    )
    cells = matrix.expand(mx)
    matrix.index(cells)
    launcher, rdzv_endpoint = _multi_node(args, mx)
    if args.preset and mx.device.startswith("cuda") and not _has_cuda():
        raise BadInput(f"preset '{args.preset}' needs a CUDA GPU and this machine has none; "
                       "here run --preset cpu (or quick)")
    device = _resolve_device(mx.device)
    if ":" in device and any(c.num_processes > 1 for c in cells):
        raise BadInput(f"device '{device}': a cell on several processes gives each rank the GPU "
                       "of its local rank; use --device cuda")

    from bench.telemetry.env import cpu_model, fingerprint

    env = fingerprint(device)
    stamp = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}"
    slug = store.device_slug(env["device_name"])[:24].rstrip("-")
    run_id = _known_run_id(meta, run_dir) or f"{stamp}-{slug}"
    run_dir = run_dir or paths.output_dir(store.RUNS / run_id, "run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    session.lock(run_dir)  # one runner per run directory; before anything is read or written
    store.write_meta(run_dir, {
        "run_id": run_id, "created": meta.get("created") or env["timestamp"],
        "updated": env["timestamp"], **env, "cpu_model": cpu_model(),
        "find_max_batch": bool(args.find_max_batch), "matrix": mx.to_dict(), **prices,
    })
    settings = Settings(run_id, device, mx.warmup, mx.steps, mx.timeout_s, env, launcher,
                        rdzv_endpoint)
    state = Sweep(run_dir, settings, {(r.get("cell_id"), r.get("repeat")): r
                                      for r in store.load_records(run_dir)})
    session.state = state
    print(f"ampbench run: {len(cells)} cells x {mx.repeats} repeat(s) of matrix '{mx.name}' "
          f"on {device} -> {run_dir}", file=sys.stderr)
    not_run: list[tuple[Cell, int, bool]] = []
    if args.find_max_batch:
        find_max_batch(state, cells)
    else:
        not_run = sweep(state, cells, mx.repeats, mx.calibration, budget)
    store.write_csv(run_dir, state.records.values())
    print(summarize(state.records.values()))

    parity_not_run: list[str] = []
    if mx.parity and not args.no_parity:
        parity_not_run = _parity(run_dir, mx, device, budget)
    # Before the report, which shows it: what this run still lacks (nothing: the mark goes).
    _mark_incomplete(run_dir, budget, [f"{c.label()}{' (calibration)' if cal else ''}"
                                       for c, _, cal in not_run], parity_not_run)
    if not args.no_report:
        from bench import report

        _after_sweep("report", lambda: print(f"report: {report.write_report(run_dir)}",
                                             file=sys.stderr))
    failed = sum(1 for r in state.records.values() if r.get("status") not in DONE)
    print(f"\nresults: {run_dir / store.RESULTS} ({len(state.records)} records, {failed} failed)"
          f"\nrecords: {run_dir / store.RECORDS}", file=sys.stderr)
    if budget is not None and (not_run or parity_not_run):
        print(f"\nampbench run: --time-budget {budget.text} is spent: {len(not_run)} cell "
              f"process(es) and {len(parity_not_run)} parity run(s) not started; the report "
              f"covers what finished\nresume with: {resume_command(args, run_dir)}",
              file=sys.stderr)
        return BUDGET_EXIT
    return 0
