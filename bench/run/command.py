"""`ampbench run`, the matrix runner: one child process per cell, failures as data, resumable at
any moment.

    python -m bench run                       # auto preset: gpu with CUDA, cpu otherwise
    python -m bench run --preset quick --out results/runs/smoke
    python -m bench run --resume results/runs/20261122-224500-nvidia-h100

The runner imports no torch: one child process at start (bench/run/device.py, the device
probe) resolves the device, fingerprints the environment, says whether CUDA is there (the
``auto`` preset) and counts the FLOPs --time-budget estimates with. Each cell runs as ``python
-m bench cell ... --out <tmp json>`` in its own session (process group) under a timeout
(bench/run/launch.py); a cell with world_size > 1 runs under torchrun (``python -m
torch.distributed.run``), standalone on one node. Its record is appended to records.jsonl
(flush + fsync; bench/run/sweep.py). A child that dies without a record becomes a record too
(oom | timeout | error); a timeout or Ctrl-C kills the child's whole process tree. SIGTERM and
SIGHUP stop the run like Ctrl-C (children killed, temporary directories removed, the resume
command printed, exit 128+N; bench/run/signals.py), and a child polices itself too
(bench/run/proctree.py): it dies with this runner, however it dies, and at its own timeout. One
runner per run directory (bench/run/lock.py). Running again into the same directory runs only
the cells that are missing or failed; --resume (or --out without --preset or --matrix) keeps
every choice of the original run (meta.json: the matrix with --no-parity in it,
--find-max-batch, --no-report): a flag left out is restored, one that contradicts the run is
one line, exit 2; --time-budget, --launcher and --rdzv-endpoint are each call's own. After the
sweep: accuracy parity (bench.parity) and the report (bench.report); a failure there is
reported and the sweep's records stay.

Where cells run: side by side on a node's GPUs (``--devices all``: bench/run/slots.py), or as
jobs of a Slurm cluster (``--executor slurm``, submitit's; ``local`` the same path here:
bench/run/cluster.py), records still written by this process alone. A cell on several nodes
(``--nnodes N``) starts through a launcher that runs one torchrun per node (``--launcher "srun
--nodes=2 --ntasks-per-node=1"``, the default in a SLURM allocation), meeting at
``--rdzv-endpoint`` (default this host, port 29500 up, one per cell); rank 0 writes the record
into the run directory, on a filesystem all nodes share.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import os
import re
import shlex
import signal
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import BadInput, config, paths, store
from bench.analysis import noise
from bench.cli_types import duration_s
from bench.config import Cell, Matrix, matrix
from bench.run import budget as budgets
from bench.run import cluster, console, device, lock, node, slots
from bench.run.budget import Budget
from bench.run.launch import Settings
from bench.run.signals import Stopped, stop_on_signals
from bench.run.sweep import DONE, Sweep, find_max_batch, sweep

BUDGET_EXIT = 3  # stopped by --time-budget, the resume command printed (DESIGN.md)
_RDZV_PORT = 29500
_INCOMPLETE = "incomplete:"


# ---------------------------------------------------------------- the flags


def _choose_matrix(args: argparse.Namespace) -> tuple[Matrix | None, Path | None, dict[str, Any]]:
    """(matrix before overrides, run directory if known, its meta) from the flags; the matrix
    is None for the ``auto`` preset, which the device probe decides."""
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
    if args.preset not in (None, "auto"):
        return config.preset(args.preset), run_dir, meta
    if meta.get("matrix") and not args.preset:
        base = config.from_dict(meta["matrix"], str(run_dir / store.META))
        _keep(args, base, meta, f"{'--resume' if args.resume else '--out'} {run_dir}")
        return base, run_dir, meta
    if args.resume:
        raise BadInput(f"--resume {args.resume}: {store.META} holds no matrix; finish the run "
                       f"with --out {args.resume} and the --preset or --matrix it ran")
    return None, run_dir, meta


# The flag that sets each field of a run's matrix (meta.json's "matrix").
_FLAGS = {"models": "--models/--batch-sizes", "precisions": "--precisions", "steps": "--steps",
          "warmup": "--warmup", "repeats": "--repeats", "calibration": "--calibration",
          "world_size": "--world-size", "nnodes": "--nnodes", "strategies": "--strategy",
          "device": "--device", "timeout_s": "--timeout", "parity": "--no-parity"}


def _keep(args: argparse.Namespace, base: Matrix, meta: dict[str, Any], where: str) -> None:
    """A run continued from its meta.json keeps every choice of the original: the flags it
    left out are restored (``args`` updated, so a resume command repeats them), and one that
    contradicts the run is BadInput naming it. --time-budget, --launcher and --rdzv-endpoint
    are each call's own; a price or --no-report given applies from this call on."""
    node.keep(args, base.nnodes, meta, where)  # --world-size node: the GPUs the run recorded
    kept = base.to_dict()
    for key, value in _override(args, base).to_dict().items():
        # --devices is where the cells run, not what they measure (each record says where it
        # ran): left out it is kept, given it applies from this call on.
        if value != kept[key] and key != "devices":
            raise BadInput(f"{where}: {_FLAGS.get(key, key)} makes {key} {value}, the run has "
                           f"{kept[key]} ({store.META}); a resumed run keeps every choice of "
                           "the original: leave the flag out, or start a new run directory")
    if args.find_max_batch and not meta.get("find_max_batch"):
        raise BadInput(f"{where}: --find-max-batch, but the run is a sweep ({store.META}); a "
                       "resumed run keeps every choice of the original: leave the flag out, "
                       "or start a new run directory")
    args.find_max_batch = bool(meta.get("find_max_batch"))
    args.no_parity = args.no_parity or not base.parity
    args.no_report = args.no_report or bool(meta.get("no_report"))


def _override(args: argparse.Namespace, base: Matrix) -> Matrix:
    """``base`` with the flags' overrides, checked."""
    return config.override(
        base, models_=args.models, precisions=args.precisions, batch_sizes=args.batch_sizes,
        steps=args.steps, warmup=args.warmup, repeats=args.repeats,
        calibration=args.calibration, device=args.device,
        devices=slots.check_devices(args.devices) if getattr(args, "devices", None) else None,
        timeout_s=args.timeout, world_size=args.world_size, nnodes=args.nnodes,
        strategies=getattr(args, "strategy", None),
        parity=False if args.no_parity else None,  # kept in meta.json: a resume keeps it off
    )


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


def _budget(args: argparse.Namespace) -> Budget | None:
    """``--time-budget`` as a Budget that starts now; None without one."""
    text = getattr(args, "time_budget", None)
    if not text:
        return None
    if args.find_max_batch:
        raise BadInput("--time-budget does not apply to --find-max-batch, whose probes cannot "
                       "be estimated ahead")
    seconds = duration_s(text)
    reserve_s = 0.0 if args.no_report else min(budgets.REPORT_RESERVE_S, seconds / 4)
    return Budget(text, budgets.now() + seconds, reserve_s)


def _prices(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, float]:
    """The run's prices for meta.json: the flags', else those a resumed run recorded."""
    return store.prices(meta, {key: getattr(args, key, None) for key in store.PRICES})


# ---------------------------------------------------------------- before anything is written


@dataclass
class _Setup:
    """Everything decided before the run directory is touched: the matrix, its cells, the
    device, the probe's answer and how multi-node cells start."""

    mx: Matrix
    cells: list[Cell]
    launch: tuple[tuple[str, ...], str]  # (launcher, rendezvous endpoint)
    found: device.Probe
    run_dir: Path | None
    meta: dict[str, Any]
    slots: tuple[slots.Slot, ...] = slots.ONE  # --devices: where cells run side by side
    executor: cluster.Options = cluster.INLINE  # --executor: or as a scheduler's jobs

    @property
    def device(self) -> str:
        return self.found.checked_device()


_Plan = tuple[Matrix, list[Cell], tuple[tuple[str, ...], str]]  # matrix, cells, launch


def _planned(args: argparse.Namespace, mx: Matrix) -> _Plan:
    """The matrix, its cells (ids checked) and the multi-node launch; BadInput if any is bad."""
    cells = matrix.expand(matrix.resolve_node(mx, node.PLANNED))  # node: 1 GPU until probed
    matrix.index(cells)
    return mx, cells, _multi_node(args, mx)


def _plans(args: argparse.Namespace, options: list[Matrix]) -> list[_Plan | None]:
    """Each option with the flags' overrides, planned; None where the flags do not fit it.
    BadInput when they fit none, and no probe could change that: one option, or every option
    refused alike (auto's two candidates and an unknown model, say)."""
    plans: list[_Plan | None] = []
    errors = []
    for option in options:
        try:
            plans.append(_planned(args, _override(args, option)))
        except BadInput as exc:
            plans.append(None)
            errors.append(str(exc))
    if len(errors) == len(options) and len(set(errors)) == 1:
        raise BadInput(errors[0])
    return plans


def _to_price(plans: list[_Plan], run_dir: Path | None, budget: Budget | None) -> list[Cell]:
    """The cells whose FLOPs the budget's estimates may need (none without a budget): those of
    the matrix (of both of auto's candidates while the probe has not said which) and those
    measured in the run directory already."""
    if budget is None:
        return []
    records: list[dict[str, Any]] = []
    if run_dir is not None and (run_dir / store.RECORDS).exists():
        # Quietly: the locked run reads them again, and warns then about damaged lines.
        with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(BadInput):
            records = store.load_records(run_dir)
    return budgets.cells_to_price([c for _, cells, _ in plans for c in cells], records)


def _references(plans: list[_Plan]) -> list[tuple[str, int | None]]:
    """The models of the user's own in the plans, with their input sizes: the probe runs
    each once (bench/cell/check.py) before any cell starts."""
    return list(dict.fromkeys((axis.name, axis.resolved_size) for mx, _, _ in plans
                              for axis in mx.models if axis.spec.source is not None))


def _setup(args: argparse.Namespace, budget: Budget | None,
           chosen: tuple[Matrix | None, Path | None, dict[str, Any]]) -> _Setup:
    """The flags (``chosen`` by ``_choose_matrix``) and the device probe, all checked:
    BadInput (one line) before anything is written. The flags are checked before the probe's
    seconds where they can be: auto's preset is the probe's to choose."""
    base, run_dir, meta = chosen
    options = [base] if base is not None else [config.auto(False), config.auto(True)]
    plans = _plans(args, options)
    asked = plans[0][0].device if base is not None and plans[0] else args.device or "auto"
    found = device.probe(asked, _to_price([p for p in plans if p], run_dir, budget),
                         _references([p for p in plans if p]))
    found.checked_models()  # a user's module that breaks the contract: exit 2, nothing written
    plan = plans[0] if base is not None else plans[int(found.cuda)]
    mx, cells, launch = plan or _planned(args, _override(args, config.auto(found.cuda)))
    if args.preset and mx.device.startswith("cuda") and not found.cuda:
        raise BadInput(f"preset '{args.preset}' needs a CUDA GPU and this machine has none; "
                       "here run --preset cpu (or quick)")
    mx, cells, found = node.resolve(args, mx, cells, found)  # world size node: the GPUs counted
    setup = _Setup(mx, cells, launch, found, run_dir, meta)
    if ":" in setup.device and any(c.num_processes > 1 for c in cells):
        raise BadInput(f"device '{setup.device}': a cell on several processes gives each rank "
                       "the GPU of its local rank; use --device cuda")
    setup.slots = slots.resolve(mx.devices, getattr(args, "device_slots", None), setup.device,
                                found.cuda, int(found.env.get("device_count") or 0),
                                os.environ.get("CUDA_VISIBLE_DEVICES"))
    slots.check_cells(setup.slots, cells)
    return setup


# ---------------------------------------------------------------- the run directory


def _known_run_id(meta: dict[str, Any], run_dir: Path | None) -> str | None:
    """The run id of a run directory: meta.json's, else its records' (meta.json damaged)."""
    candidates = [meta.get("run_id")]
    if run_dir is not None and not _valid_run_id(meta.get("run_id")):
        candidates += [r.get("run_id") for r in store.load_records(run_dir)]
    return next((c for c in candidates if _valid_run_id(c)), None)


def _valid_run_id(value: Any) -> bool:
    return isinstance(value, str) and bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}", value))


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


@dataclass
class _Session:
    """What `ampbench run` holds while it runs: the run directory's lock, and enough to say
    how to resume when it is stopped."""

    args: argparse.Namespace
    hold: contextlib.ExitStack
    run_dir: Path | None = None
    state: Sweep | None = None

    def lock(self, run_dir: Path) -> None:
        self.hold.enter_context(lock.lock(run_dir, "ampbench run"))
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


def _open(args: argparse.Namespace, session: _Session, setup: _Setup) -> Sweep:
    """The run directory, locked, its meta.json written, its records read: the sweep's state."""
    env = setup.found.env
    stamp = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}"
    slug = store.device_slug(env["device_name"])[:24].rstrip("-")
    run_id = _known_run_id(setup.meta, setup.run_dir) or f"{stamp}-{slug}"
    run_dir = setup.run_dir or paths.output_dir(store.RUNS / run_id, "run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    session.lock(run_dir)  # one runner per run directory; before anything is read or written
    records = store.load_records(run_dir)  # before meta.json: a newer schema's run is refused
    store.write_meta(run_dir, {
        "run_id": run_id, "created": setup.meta.get("created") or env["timestamp"],
        "updated": env["timestamp"], **env, "cpu_model": setup.found.cpu_model,
        "find_max_batch": bool(args.find_max_batch), "no_report": bool(args.no_report),
        "matrix": setup.mx.to_dict(), "executor": setup.executor.to_json(),
        **_prices(args, setup.meta),
    })
    mx = setup.mx
    settings = Settings(run_id, setup.device, mx.warmup, mx.steps, mx.timeout_s, env,
                        *setup.launch)
    state = Sweep(run_dir, settings, {(r.get("cell_id"), r.get("repeat")): r for r in records})
    session.state = state
    return state


# ---------------------------------------------------------------- after the sweep


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


def _parity(run_dir: Path, mx: Matrix, device_name: str, budget: Budget | None,
            data_dir: str | None = None) -> list[str]:
    """The parity stage of a run (the matrix's models and parity tasks, and those of
    ``data_dir``); returns the parity runs the budget left for a resume."""
    from bench import parity
    from bench.parity import data
    print("ampbench run: accuracy parity ...", file=sys.stderr)
    not_run: list[str] = []

    def stage() -> None:
        try:
            own = data.check_data_dir(data_dir).tasks() if data_dir else []
            path = parity.run_parity(
                run_dir, models=[a.name for a in mx.models] + parity.tasks_for(mx.precisions)
                + list(mx.parity_tasks) + own,
                precisions=list(mx.precisions), data_dir=data_dir,
                steps=mx.parity_steps or None, seeds=mx.parity_seeds, device=device_name,
                time_left=budget.left if budget else None, unknown_s=mx.timeout_s,
                timeout_s=mx.timeout_s, sharing=parity.Sharing.of_matrix(mx.parity_strategy,
                                                                         mx.world_size))
        except parity.OutOfTime as stop:
            not_run.extend(stop.not_run)
            path = stop.path
        if path is not None:
            print(parity.verdict_table(path))

    _after_sweep("parity", stage)
    return not_run


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


def _finish(args: argparse.Namespace, state: Sweep, mx: Matrix, budget: Budget | None,
            not_run: list[tuple[Cell, int, bool]]) -> int:
    """Parity, the report and the closing lines; the exit code of the run."""
    run_dir = state.run_dir
    parity_not_run: list[str] = []
    if mx.parity and not args.no_parity:
        parity_not_run = _parity(run_dir, mx, state.settings.device, budget,
                                 getattr(args, "data_dir", None))
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


# ---------------------------------------------------------------- the command


def main(args: argparse.Namespace) -> int:
    """`ampbench run`: sweep the matrix into a run directory; exit 0 when the sweep finished,
    3 when --time-budget stopped it and 128+N when signal N did (Ctrl-C, SIGTERM, SIGHUP),
    each time with the resume command printed."""
    with contextlib.ExitStack() as hold, stop_on_signals("ampbench run"):
        session = _Session(args, hold)
        try:
            return _run(args, session)
        except Stopped as stop:
            return session.stopped(stop.signum)
        except KeyboardInterrupt:  # SIGINT that arrived before the handlers were in place
            return session.stopped(signal.SIGINT)


def _run(args: argparse.Namespace, session: _Session) -> int:
    chosen = _choose_matrix(args)  # first: a resumed run's kept flags count for the budget
    if getattr(args, "data_dir", None):  # a bad data file: exit 2 before any cell runs
        from bench.parity.data import check_data_dir
        check_data_dir(args.data_dir)
    budget = _budget(args)
    executor = cluster.options(args, chosen[2])  # flags first: the probe takes seconds
    setup = replace(_setup(args, budget, chosen), executor=executor)
    if budget is not None:
        budget = replace(budget, flops=setup.found.flops_per_step)
    state = _open(args, session, setup)
    mx, cells = setup.mx, setup.cells
    on = setup.device + (f" {slots.label(setup.slots)}" if len(setup.slots) > 1 else "")
    print(f"ampbench run: {len(cells)} cells x {mx.repeats} repeat(s) of matrix '{mx.name}' "
          f"on {on} -> {state.run_dir}", file=sys.stderr)
    not_run: list[tuple[Cell, int, bool]] = []
    if args.find_max_batch:
        find_max_batch(state, cells, setup.slots)
    else:
        not_run = sweep(state, cells, mx.repeats, mx.calibration, budget, setup.slots,
                        setup.executor)
    store.write_csv(state.run_dir, state.records.values(), cell_noise=noise.results_columns)
    print(console.summarize(state.records.values()))
    return _finish(args, state, mx, budget, not_run)
