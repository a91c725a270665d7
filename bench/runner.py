"""The matrix runner: one child process per cell, failures as data, resumable at any moment.

    python -m bench run                       # auto preset: gpu with CUDA, cpu otherwise
    python -m bench run --preset quick --out results/runs/smoke
    python -m bench run --resume results/runs/20261122-224500-nvidia-h100

Each cell runs as ``python -m bench cell ... --out <tmp json>`` in its own session (process
group) under a timeout; its record is appended to records.jsonl (flush + fsync) and
results.csv is derived after every cell. A child that dies without a record becomes a record
too (oom | timeout | error). Running again into the same directory runs only the cells that
are missing or failed. After the sweep: accuracy parity (bench.parity) and the report
(bench.report), when those modules provide them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import BadInput, config, matrix, store
from bench.config import Cell, Matrix

DONE = ("ok", "unsupported", "skipped")  # statuses a resumed run does not repeat
_KILL_GRACE_S = 5.0
_STDERR_LINES = 6
_OOM = re.compile(r"OutOfMemoryError|CUDA out of memory|out of memory|CUBLAS_STATUS_ALLOC_FAILED")
_PROBE_WARMUP, _PROBE_STEPS = 1, 2
_PROBE_CAP = 1 << 16  # the doubling stops here even when everything fits


@dataclass(frozen=True)
class Settings:
    """What every child of a run shares (beyond its cell)."""

    run_id: str
    device: str
    warmup: int
    steps: int
    timeout_s: float
    env: dict[str, Any]  # the parent's fingerprint: environment fields of parent-made records


# ---------------------------------------------------------------- one child


def cell_argv(cell: Cell, settings: Settings, repeat: int, out: Path) -> list[str]:
    """The child's command line for ``cell``."""
    argv = [sys.executable, "-m", "bench", "cell", "--model", cell.model,
            "--precision", cell.precision, "--batch-size", str(cell.batch_size),
            "--grad-accum", str(cell.grad_accum), "--warmup", str(settings.warmup),
            "--steps", str(settings.steps), "--device", settings.device, "--out", str(out),
            "--run-id", settings.run_id, "--cell-id", cell.cell_id, "--repeat", str(repeat)]
    if cell.seq_len is not None:
        argv += ["--seq-len", str(cell.seq_len)]
    if cell.image_size is not None:
        argv += ["--image-size", str(cell.image_size)]
    if cell.compile:
        argv.append("--compile")
    return argv


def failure_record(cell: Cell, settings: Settings, repeat: int, status: str,
                   error: str | None) -> dict[str, Any]:
    """A record the parent writes for a cell whose child left none (or that never ran)."""
    env = dict(settings.env)
    env["timestamp"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return store.empty_record(
        run_id=settings.run_id, cell_id=cell.cell_id, model=cell.model,
        precision=cell.precision, batch_size=cell.batch_size, seq_len=cell.seq_len,
        image_size=cell.image_size, grad_accum=cell.grad_accum, compile=cell.compile,
        world_size=cell.world_size, repeat=repeat, status=status, error=error,
        warmup_steps=settings.warmup, timed_steps=settings.steps, **env,
    )


def classify(returncode: int, stderr: str) -> tuple[str, str]:
    """(status, error) for a child that exited without a record: oom or error."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    tail = "\n".join(lines[-_STDERR_LINES:])
    if returncode < 0:
        how = f"killed by signal {signal.Signals(-returncode).name}"
    else:
        how = f"exit code {returncode}"
    if _OOM.search(stderr):
        return "oom", f"{how}: {tail}" if tail else how
    return "error", f"{how}" + (f"\n{tail}" if tail else " (no output)")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, then SIGKILL: nothing of it keeps the GPU."""
    for sig, wait_s in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            if sig == signal.SIGTERM:
                # The leader is gone; SIGKILL stragglers it may have left in its group.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(cell: Cell, settings: Settings, repeat: int, workdir: Path) -> dict[str, Any]:
    """Run one cell in its own process group and return its record (never raises on failure).

    KeyboardInterrupt kills the child's group and propagates.
    """
    import json

    out = workdir / f"{cell.cell_id}-{repeat}.json"
    err_path = workdir / f"{cell.cell_id}-{repeat}.stderr"
    out.unlink(missing_ok=True)
    with open(err_path, "wb") as err:
        # stderr to a file, not a pipe: a chatty child can never block on a full pipe.
        proc = subprocess.Popen(cell_argv(cell, settings, repeat, out), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=settings.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return failure_record(cell, settings, repeat, "timeout",
                                  f"no result after {settings.timeout_s:g} s; killed")
        except BaseException:
            _kill_group(proc)
            raise
    stderr = err_path.read_text(encoding="utf-8", errors="replace")
    if out.exists():
        try:
            return json.loads(out.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            pass
    status, error = classify(proc.returncode, stderr)
    return failure_record(cell, settings, repeat, status, error)


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


def _oom_limits(records: Iterable[dict[str, Any]], cells: dict[str, Cell]) -> dict[Any, int]:
    """Smallest OOM batch per cell group, from earlier records (so a resume skips alike)."""
    limits: dict[Any, int] = {}
    for record in records:
        cell = cells.get(record.get("cell_id"))
        if cell is not None and record.get("status") == "oom":
            limits[cell.group] = min(limits.get(cell.group, cell.batch_size), cell.batch_size)
    return limits


def _progress(total: int, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, file=sys.stderr, unit="cell", dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")


def sweep(state: Sweep, cells: list[Cell], repeats: int) -> None:
    """Run every cell and repeat that is not done yet; OOM at b skips larger batches."""
    from tqdm import tqdm

    from bench.cell import summary_line

    tasks = [(cell, r) for cell in cells for r in range(repeats)]
    todo = [(c, r) for c, r in tasks if not state.done(c.cell_id, r)]
    by_id = matrix.index(cells)
    limits = _oom_limits(state.records.values(), by_id)
    bar = _progress(len(tasks), len(tasks) - len(todo))
    try:
        with tempfile.TemporaryDirectory(prefix="ampbench-cells-") as tmp:
            for cell, repeat in todo:
                bar.set_postfix_str(cell.label() + (f" #{repeat}" if repeats > 1 else ""))
                limit = limits.get(cell.group)
                if limit is not None and cell.batch_size > limit:
                    record = failure_record(cell, state.settings, repeat, "skipped",
                                            f"batch {limit} already ran out of memory")
                else:
                    record = run_child(cell, state.settings, repeat, Path(tmp))
                state.save(record)
                if record["status"] == "oom":
                    limits[cell.group] = min(limits.get(cell.group, cell.batch_size),
                                             cell.batch_size)
                tqdm.write(summary_line(record), file=sys.stderr)
                bar.update(1)
    finally:
        bar.close()


def find_max_batch(state: Sweep, cells: list[Cell]) -> None:
    """Per cell group, the largest batch that fits: doubling, then bisection; one record each.

    Each probe is a child cell with few steps; the recorded row is the largest probe that ran,
    with ``max_batch_search=True`` and ``max_batch``. Mixed precision's memory saving shows as
    a larger max_batch than fp32's.
    """
    from tqdm import tqdm

    from bench.cell import summary_line

    starts: dict[Any, Cell] = {}
    for cell in cells:  # ascending batches: the first cell of a group is its smallest
        starts.setdefault(cell.group, cell)
    probe_settings = replace(state.settings, warmup=min(state.settings.warmup, _PROBE_WARMUP),
                             steps=min(state.settings.steps, _PROBE_STEPS))
    bar = _progress(len(starts), 0)
    try:
        with tempfile.TemporaryDirectory(prefix="ampbench-probes-") as tmp:
            for first in starts.values():
                search = replace(first, batch_size=0)  # the search's own id: batch 0
                bar.set_postfix_str(f"max batch of {search.label()}")
                if not state.done(search.cell_id, 0):
                    record = _search(first, probe_settings, Path(tmp), bar)
                    record.update(cell_id=search.cell_id, repeat=0)
                    state.save(record)
                    tqdm.write(f"max batch {record['max_batch']}: {summary_line(record)}",
                               file=sys.stderr)
                bar.update(1)
    finally:
        bar.close()


def _search(first: Cell, settings: Settings, workdir: Path, bar: Any) -> dict[str, Any]:
    def probe(batch: int) -> dict[str, Any]:
        bar.set_postfix_str(f"probe {replace(first, batch_size=batch).label()}")
        return run_child(replace(first, batch_size=batch), settings, 0, workdir)

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


def summarize(records: Iterable[dict[str, Any]]) -> str:
    """Per model: policies x batch sizes, samples/s with the speedup over fp32 at that batch."""
    import pandas as pd
    from tabulate import tabulate

    frame = pd.DataFrame(list(records))
    if frame.empty:
        return "no records"
    if "max_batch_search" in frame.columns:
        searched = frame[frame["max_batch_search"].fillna(False).astype(bool)]
        frame = frame[~frame["max_batch_search"].fillna(False).astype(bool)]
    else:
        searched = frame.iloc[0:0]
    blocks = []
    for model, rows in frame.groupby("model", sort=False):
        ok = rows[rows["status"] == "ok"]
        speed = ok.groupby(["precision", "batch_size"])["samples_per_s"].median()
        base = speed.xs("fp32", level="precision") if "fp32" in speed.index.get_level_values(0) \
            else None
        table: dict[str, dict[Any, str]] = {}
        for (policy, batch), group in rows.groupby(["precision", "batch_size"], sort=False):
            if (policy, batch) in speed.index:
                value = speed[(policy, batch)]
                cell = f"{value:,.1f}"
                if base is not None and batch in base.index and base[batch]:
                    cell += f" ({value / base[batch]:.2f}x)"
            else:
                cell = str(group["status"].iloc[-1])
            table.setdefault(policy, {})[batch] = cell
        batches = sorted({b for row in table.values() for b in row})
        body = [[p, *(row.get(b, "") for b in batches)] for p, row in table.items()]
        blocks.append(f"{model}: samples/s (speedup over fp32)\n" + tabulate(
            body, headers=["policy", *(f"b={b}" for b in batches)], tablefmt="github"))
    if not searched.empty:
        body = [[r["model"], r["precision"], r["max_batch"]] for _, r in searched.iterrows()]
        blocks.append("largest batch that fits\n" + tabulate(
            body, headers=["model", "policy", "max batch"], tablefmt="github"))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------- the command


def _resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:24].strip("-") or "device"


def _choose_matrix(args: argparse.Namespace) -> tuple[Matrix, Path | None, dict[str, Any]]:
    """(matrix before overrides, run directory if known, its meta) from the flags."""
    run_dir = Path(args.resume or args.out) if (args.resume or args.out) else None
    meta: dict[str, Any] = {}
    if args.resume and not (run_dir / store.META).is_file():
        raise BadInput(f"--resume {args.resume}: not a run directory (no {store.META})")
    if run_dir is not None and (run_dir / store.META).is_file():
        meta = store.read_meta(run_dir)
    if args.matrix:
        return config.load(args.matrix), run_dir, meta
    if args.preset:
        return config.preset(args.preset), run_dir, meta
    if meta.get("matrix"):
        return config.from_dict(meta["matrix"], str(run_dir / store.META)), run_dir, meta
    return config.preset("auto"), run_dir, meta


def _optional_stage(module: str, function: str, *call: Any, **kwargs: Any) -> None:
    """Call module.function when it exists; a failure is reported, never fatal to the sweep."""
    try:
        target = getattr(importlib.import_module(module), function, None)
    except ImportError:
        return
    if target is None:
        return
    try:
        target(*call, **kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # BadInput and SystemExit included: the results stay
        print(f"ampbench run: {module}.{function} failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    """`ampbench run`: sweep the matrix into a run directory; exit 0 when the sweep finished."""
    base, run_dir, meta = _choose_matrix(args)
    mx = config.override(
        base, models_=args.models, precisions=args.precisions, batch_sizes=args.batch_sizes,
        steps=args.steps, warmup=args.warmup, repeats=args.repeats, device=args.device,
        timeout_s=args.timeout, world_size=args.world_size, nnodes=args.nnodes,
    )
    cells = matrix.expand(mx)
    matrix.index(cells)
    device = _resolve_device(mx.device)

    from bench.env import cpu_model, fingerprint

    env = fingerprint(device)
    run_id = meta.get("run_id") or (
        f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}-{_slug(env['device_name'] or device)}"
    )
    run_dir = run_dir or Path("results") / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    store.write_meta(run_dir, {
        "run_id": run_id, "created": meta.get("created") or env["timestamp"],
        "updated": env["timestamp"], **env, "cpu_model": cpu_model(),
        "find_max_batch": bool(args.find_max_batch), "matrix": mx.to_dict(),
    })
    settings = Settings(run_id, device, mx.warmup, mx.steps, mx.timeout_s, env)
    state = Sweep(run_dir, settings, {(r.get("cell_id"), r.get("repeat")): r
                                      for r in store.load_records(run_dir)})
    print(f"ampbench run: {len(cells)} cells x {mx.repeats} repeat(s) of matrix '{mx.name}' "
          f"on {device} -> {run_dir}", file=sys.stderr)
    try:
        if args.find_max_batch:
            find_max_batch(state, cells)
        else:
            sweep(state, cells, mx.repeats)
    except KeyboardInterrupt:
        done = sum(1 for r in state.records.values() if r.get("status") in DONE)
        print(f"\nampbench run: interrupted; {done} finished cell(s) kept in {run_dir}\n"
              f"resume with: python -m bench run --resume {run_dir}", file=sys.stderr)
        return 130
    store.write_csv(run_dir, state.records.values())
    print(summarize(state.records.values()))

    if mx.parity and not args.no_parity:
        print("ampbench run: accuracy parity ...", file=sys.stderr)
        _optional_stage("bench.parity", "run_parity", run_dir,
                        models=[a.name for a in mx.models], precisions=list(mx.precisions),
                        device=device)
    if not args.no_report:
        _optional_stage("bench.report", "write_report", run_dir)
    failed = sum(1 for r in state.records.values() if r.get("status") not in DONE)
    print(f"\nresults: {run_dir / store.RESULTS} ({len(state.records)} records, {failed} failed)"
          f"\nrecords: {run_dir / store.RECORDS}", file=sys.stderr)
    return 0
