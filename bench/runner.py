"""The matrix runner: one child process per cell, failures as data, resumable at any moment.

    python -m bench run                       # auto preset: gpu with CUDA, cpu otherwise
    python -m bench run --preset quick --out results/runs/smoke
    python -m bench run --resume results/runs/20261122-224500-nvidia-h100

Each cell runs as ``python -m bench cell ... --out <tmp json>`` in its own session (process
group) under a timeout; a cell with world_size > 1 runs under torchrun
(``python -m torch.distributed.run``), standalone on one node. Its record is appended to
records.jsonl (flush + fsync) and results.csv is derived after every cell. A child that dies
without a record becomes a record too (oom | timeout | error); a timeout or Ctrl-C kills the
child's whole process tree. Running again into the same directory runs only the cells that
are missing or failed. After the sweep: accuracy parity (bench.parity) and the report
(bench.report); a failure there is reported and the sweep's records stay.

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
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
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
# A multi-node cell's rendezvous port is the endpoint's + (its place in the sweep % this):
# consecutive cells never share a port, so no node can meet the previous cell's rendezvous
# while it is still being torn down.
_PORT_SLOTS = 32
_RDZV_PORT = 29500
# torchrun's failure summary names the rank that failed first (and its exit code).
_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)"
                         r".*?exitcode\s*:\s*(-?\d+)", re.DOTALL)


@dataclass(frozen=True)
class Settings:
    """What every child of a run shares (beyond its cell)."""

    run_id: str
    device: str
    warmup: int
    steps: int
    timeout_s: float
    env: dict[str, Any]  # the parent's fingerprint: environment fields of parent-made records
    launcher: tuple[str, ...] = ()  # multi-node: starts one torchrun per node (srun ...)
    rdzv_endpoint: str = ""  # multi-node: HOST:PORT where the torchruns meet


# ---------------------------------------------------------------- one child


def cell_argv(cell: Cell, settings: Settings, repeat: int, out: Path,
              logs: Path | None = None, slot: int = 0) -> list[str]:
    """The child's command line for ``cell``: torchrun for more than one process.

    ``logs``: where torchrun keeps each rank's stderr (``--log-dir``); ``slot``: the cell's
    place in the sweep, which picks a multi-node cell's rendezvous port.
    """
    argv = ["-m", "bench", "cell", "--model", cell.model,
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
    if cell.num_processes == 1:
        return [sys.executable, *argv]
    torchrun = [sys.executable, "-m", "torch.distributed.run",
                "--nproc-per-node", str(cell.world_size)]
    if cell.nnodes == 1:
        torchrun.append("--standalone")  # a free port of its own on this machine
    else:
        host, _, port = settings.rdzv_endpoint.rpartition(":")
        torchrun = [*settings.launcher, *torchrun, "--nnodes", str(cell.nnodes),
                    "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"{host}:{int(port) + slot % _PORT_SLOTS}",
                    "--rdzv-id", f"{settings.run_id}-{cell.cell_id}-{repeat}"]
    if logs is not None:
        torchrun += ["--log-dir", str(logs), "--redirects", "2"]
    return torchrun + argv


def failure_record(cell: Cell, settings: Settings, repeat: int, status: str,
                   error: str | None) -> dict[str, Any]:
    """A record the parent writes for a cell whose child left none (or that never ran)."""
    env = dict(settings.env)
    env["timestamp"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return store.empty_record(
        run_id=settings.run_id, cell_id=cell.cell_id, model=cell.model,
        precision=cell.precision, batch_size=cell.batch_size, seq_len=cell.seq_len,
        image_size=cell.image_size, grad_accum=cell.grad_accum, compile=cell.compile,
        world_size=cell.num_processes, repeat=repeat, status=status, error=error,
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


def classify_torchrun(stderr: str, logs: Path) -> tuple[str, str]:
    """(status, error) for a torchrun job that left no record: from the rank that failed first,
    its exit code and its own stderr (torchrun's --log-dir), not the launcher's summary."""
    match = _ROOT_CAUSE.search(stderr)
    if match is None:  # torchrun itself failed (bad rendezvous, ...): its own words
        return classify(1, stderr)
    rank, local_rank, code = (int(g) for g in match.groups())
    # Several nodes each keep a directory of their own: the failed rank's log is the last
    # one written among those of its local rank that say anything.
    rank_logs = sorted((p for p in logs.glob(f"**/attempt_*/{local_rank}/stderr.log")
                        if p.stat().st_size), key=lambda p: p.stat().st_mtime)
    rank_stderr = rank_logs[-1].read_text(encoding="utf-8", errors="replace") if rank_logs \
        else ""
    status, error = classify(code, rank_stderr)
    return status, f"rank {rank}: {error}"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", encoding="utf-8") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group and every descendant, then SIGKILL what is left.

    Descendants too, not only the group: torchrun starts each rank in a session of its own,
    so a group kill alone would leave the ranks (and the GPU memory they hold) behind.
    """
    pids = _descendants(proc.pid)  # before any dies: an orphan no longer shows its lineage

    def signal_all(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + _KILL_GRACE_S
    while time.monotonic() < deadline and (proc.poll() is None or any(map(_alive, pids))):
        time.sleep(0.05)
    signal_all(signal.SIGKILL)
    proc.wait()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    except (OSError, IndexError):
        return False


@dataclass
class Child:
    """How one child ended: timed out or its exit code, its stderr, and its record if any."""

    timed_out: bool
    returncode: int
    stderr: str
    record: dict[str, Any] | None
    logs: Path  # torchrun's per-rank logs


def launch(cell: Cell, settings: Settings, repeat: int, workdir: Path, slot: int = 0) -> Child:
    """Run one cell's child in its own process group under the timeout; never raises for a
    failed cell. KeyboardInterrupt kills the child's tree and propagates."""
    name = f"{cell.cell_id}-{repeat}"
    out, err_path, logs = (workdir / f"{name}.json", workdir / f"{name}.stderr",
                           workdir / f"{name}-logs")
    out.unlink(missing_ok=True)
    timed_out = False
    with open(err_path, "wb") as err:
        # stderr to a file, not a pipe: a chatty child can never block on a full pipe.
        proc = subprocess.Popen(cell_argv(cell, settings, repeat, out, logs, slot),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            proc.wait(timeout=settings.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_tree(proc)
        except BaseException:
            _kill_tree(proc)
            raise
    record = None
    # A record means the measurement finished, even when the launcher then hung on its way
    # out and the timeout had to kill it.
    if out.exists():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(out.read_text(encoding="utf-8"))
    stderr = err_path.read_text(encoding="utf-8", errors="replace")
    return Child(timed_out, proc.returncode, stderr, record, logs)


def run_child(cell: Cell, settings: Settings, repeat: int, workdir: Path,
              slot: int = 0) -> dict[str, Any]:
    """Run one cell and return its record, made by the parent when the child left none."""
    child = launch(cell, settings, repeat, workdir, slot)
    if child.record is not None:
        return child.record
    if child.timed_out:
        return failure_record(cell, settings, repeat, "timeout",
                              f"no result after {settings.timeout_s:g} s; killed")
    if cell.num_processes > 1:
        status, error = classify_torchrun(child.stderr, child.logs)
    else:
        status, error = classify(child.returncode, child.stderr)
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


def _workdir(state: Sweep, cells: list[Cell]) -> Any:
    """Where children leave their records: the run directory when a cell spans several nodes
    (rank 0 may be on any of them: the run directory is the shared filesystem), else /tmp."""
    shared = state.run_dir if any(c.nnodes > 1 for c in cells) else None
    return tempfile.TemporaryDirectory(prefix=".cells-" if shared else "ampbench-cells-",
                                       dir=shared)


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
        with _workdir(state, cells) as tmp:
            for slot, (cell, repeat) in enumerate(todo):
                bar.set_postfix_str(cell.label() + (f" #{repeat}" if repeats > 1 else ""))
                limit = limits.get(cell.group)
                if limit is not None and cell.batch_size > limit:
                    record = failure_record(cell, state.settings, repeat, "skipped",
                                            f"batch {limit} already ran out of memory")
                else:
                    record = run_child(cell, state.settings, repeat, Path(tmp), slot)
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
    repeats with the speedup over fp32 in the same column."""
    from tabulate import tabulate

    records = list(records)
    cells = [r for r in records if not r.get("max_batch_search")]
    searched = [r for r in records if r.get("max_batch_search")]
    blocks = []
    for model in dict.fromkeys(r["model"] for r in cells):
        rows = [r for r in cells if r["model"] == model]
        columns = sorted({_column(r) for r in rows}, key=lambda c: (c[4], c[2], c[3], c[1], c[0]))
        show_size = len({c[1] for c in columns}) > 1
        speeds: dict[tuple[str, tuple[Any, ...]], float] = {}
        statuses: dict[tuple[str, tuple[Any, ...]], str] = {}
        for policy in dict.fromkeys(r["precision"] for r in rows):
            for column in columns:
                group = [r for r in rows if r["precision"] == policy and _column(r) == column]
                ok = [r["samples_per_s"] for r in group if r["status"] == "ok"]
                if ok:
                    speeds[policy, column] = statistics.median(ok)
                elif group:
                    statuses[policy, column] = group[-1]["status"]
        body = []
        for policy in dict.fromkeys(r["precision"] for r in rows):
            line = [policy]
            for column in columns:
                value, base = speeds.get((policy, column)), speeds.get(("fp32", column))
                text = statuses.get((policy, column), "")
                if value is not None:
                    text = f"{value:,.1f}" + (f" ({value / base:.2f}x)" if base else "")
                line.append(text)
            body.append(line)
        headers = ["policy", *(_column_label(c, show_size) for c in columns)]
        blocks.append(f"{model}: samples/s (speedup over fp32)\n"
                      + tabulate(body, headers=headers, tablefmt="github"))
    if searched:
        body = [[r["model"], r["precision"], r["max_batch"]] for r in searched]
        blocks.append("largest batch that fits\n" + tabulate(
            body, headers=["model", "policy", "max batch"], tablefmt="github"))
    return "\n\n".join(blocks) or "no records"


# ---------------------------------------------------------------- the command


def _resolve_device(name: str) -> str:
    """The device every child gets, checked here: a bad one is one line, not a failed sweep."""
    from bench.cell import resolve_device

    device = resolve_device(name)  # BadInput for a name it does not know or a missing GPU
    return "cuda" if device.type == "cuda" and name in ("auto", "cuda") else str(device)


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
    launcher, rdzv_endpoint = _multi_node(args, mx)
    device = _resolve_device(mx.device)
    if ":" in device and any(c.num_processes > 1 for c in cells):
        raise BadInput(f"device '{device}': a cell on several processes gives each rank the GPU "
                       "of its local rank; use --device cuda")

    from bench.env import cpu_model, fingerprint

    env = fingerprint(device)
    stamp = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}"
    slug = store.device_slug(env["device_name"])[:24].rstrip("-")
    run_id = meta.get("run_id") or f"{stamp}-{slug}"
    run_dir = run_dir or store.RUNS / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    store.write_meta(run_dir, {
        "run_id": run_id, "created": meta.get("created") or env["timestamp"],
        "updated": env["timestamp"], **env, "cpu_model": cpu_model(),
        "find_max_batch": bool(args.find_max_batch), "matrix": mx.to_dict(),
    })
    settings = Settings(run_id, device, mx.warmup, mx.steps, mx.timeout_s, env, launcher,
                        rdzv_endpoint)
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
        from bench import parity

        print("ampbench run: accuracy parity ...", file=sys.stderr)
        _after_sweep("parity", lambda: parity.run_parity(
            run_dir, models=[a.name for a in mx.models], precisions=list(mx.precisions),
            device=device))
    if not args.no_report:
        from bench import report

        _after_sweep("report", lambda: print(f"report: {report.write_report(run_dir)}",
                                             file=sys.stderr))
    failed = sum(1 for r in state.records.values() if r.get("status") not in DONE)
    print(f"\nresults: {run_dir / store.RESULTS} ({len(state.records)} records, {failed} failed)"
          f"\nrecords: {run_dir / store.RECORDS}", file=sys.stderr)
    return 0
