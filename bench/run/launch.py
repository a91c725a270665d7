"""One cell's child process, seen from the runner: its command line, its launch under a
timeout in a session of its own, the kill of its whole tree, and a record either way.
``run_child_process`` and ``read_result`` are the part that is not about cells: the parity
stage launches its training children with them too (bench/parity/stage.py).

A cell runs as ``python -m bench cell ... --out <tmp json>`` (torchrun for more than one
process; through a launcher on several nodes). A child that leaves no record still gets one
from the parent: ``timeout``, or ``oom`` / ``error`` classified from its stderr (a torchrun
job's from the rank that failed first). The child polices itself too (bench/run/proctree.py).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import failures, store, strategy
from bench.config import Cell
from bench.run import proctree

_KILL_GRACE_S = 5.0
_CANCEL_POLL_S = 0.2  # how soon a child's thread sees that the runner is stopping
_STDERR_LINES = 6
# A multi-node cell's rendezvous port is the endpoint's + (its place in the sweep % this):
# consecutive cells never share a port, so no node can meet the previous cell's rendezvous
# while it is still being torn down.
_PORT_SLOTS = 32
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
    if cell.strategy != strategy.DEFAULT:
        argv += ["--strategy", cell.strategy]
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
        **strategy.parse(cell.strategy).record_fields(cell.num_processes),
    )


def classify(returncode: int, stderr: str) -> tuple[str, str]:
    """(status, error) for a child that exited without a record: oom or error."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    tail = "\n".join(lines[-_STDERR_LINES:])
    how = exit_text(returncode)
    if failures.is_oom(stderr):
        return "oom", f"{how}: {tail}" if tail else how
    return "error", f"{how}" + (f"\n{tail}" if tail else " (no output)")


def exit_text(returncode: int) -> str:
    """How a child exited, in words: ``exit code N`` or ``killed by signal SIGKILL``."""
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


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


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group and every descendant, then SIGKILL what is left.

    Descendants too, not only the group: torchrun starts each rank in a session of its own,
    so a group kill alone would leave the ranks (and the GPU memory they hold) behind.
    """
    pids = proctree.descendants(proc.pid)  # before any dies: an orphan no longer shows its lineage
    proctree.signal_tree(pids, signal.SIGTERM, group=proc.pid)
    deadline = time.monotonic() + _KILL_GRACE_S
    while time.monotonic() < deadline and (proc.poll() is None or any(map(proctree.alive, pids))):
        time.sleep(0.05)
    # Late children too: a rank that torchrun started while it was being told to stop.
    proctree.signal_tree(pids + proctree.descendants(proc.pid), signal.SIGKILL, group=proc.pid)
    proc.wait()


@dataclass
class Ended:
    """How a child process ended: timed out (and killed) or its exit code, and its stderr."""

    timed_out: bool
    returncode: int
    stderr: str
    wall_s: float


class Cancelled(Exception):
    """The runner told a child's thread to stop (bench/run/slots.py): its tree is dead."""


def run_child_process(argv: list[str], timeout_s: float, stderr_path: Path,
                      env: dict[str, str] | None = None,
                      cancel: threading.Event | None = None) -> Ended:
    """Run ``argv`` in a session of its own under ``timeout_s``, its stderr to ``stderr_path``;
    kill its whole tree at the timeout. Never raises for a failed child; KeyboardInterrupt
    (any BaseException) kills the child's tree and propagates, and so does ``cancel`` set
    (``Cancelled``): how a runner stops a child that another thread waits on. ``env``: what
    the child's environment adds (its GPUs).

    The child's result is a file it writes where its argv says (read it with
    ``read_result``); the watchdog's settings are in its environment (bench/run/proctree.py).
    """
    timed_out = False
    started = time.monotonic()
    with open(stderr_path, "wb") as err:
        # stderr to a file, not a pipe: a chatty child can never block on a full pipe.
        # The child polices itself too (bench/run/proctree.py): it dies with this process, and at
        # its own deadline, a little after this one, should this process be gone by then.
        full = {**os.environ, **(env or {}), **proctree.runner_env(timeout_s + _KILL_GRACE_S)}
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True, env=full)
        try:
            timed_out = not _wait(proc, started + timeout_s, cancel)
            if timed_out:
                _kill_tree(proc)
        except BaseException:
            _kill_tree(proc)
            raise
    wall_s = time.monotonic() - started
    stderr = stderr_path.read_text(encoding="utf-8", errors="replace")
    return Ended(timed_out, proc.returncode, stderr, wall_s)


def _wait(proc: subprocess.Popen[bytes], deadline: float,
          cancel: threading.Event | None) -> bool:
    """Whether ``proc`` ended before ``deadline`` (monotonic); Cancelled once ``cancel`` is set."""
    while True:
        left = deadline - time.monotonic()
        try:
            proc.wait(timeout=max(0.0, left if cancel is None else min(left, _CANCEL_POLL_S)))
            return True
        except subprocess.TimeoutExpired:
            if cancel is not None and cancel.is_set():
                raise Cancelled from None
            if time.monotonic() >= deadline:
                return False


def read_result(path: Path) -> dict[str, Any] | None:
    """The JSON object a child left at ``path``; None when absent, damaged or not an object."""
    if not path.exists():
        return None
    result = None
    with contextlib.suppress(ValueError):  # bad JSON or not UTF-8: no result
        result = json.loads(path.read_text(encoding="utf-8"))
    return result if isinstance(result, dict) else None


@dataclass
class Child:
    """How one child ended: timed out or its exit code, its stderr, and its record if any."""

    timed_out: bool
    returncode: int
    stderr: str
    record: dict[str, Any] | None
    logs: Path  # torchrun's per-rank logs


def launch(cell: Cell, settings: Settings, repeat: int, workdir: Path, slot: int = 0,
           env: dict[str, str] | None = None, cancel: threading.Event | None = None) -> Child:
    """Run one cell's child in its own process group under the timeout; never raises for a
    failed cell. KeyboardInterrupt (or ``cancel`` set) kills the child's tree and propagates;
    ``env``: what the child's environment adds (its GPUs, bench/run/slots.py)."""
    name = f"{cell.cell_id}-{repeat}"
    out, err_path, logs = (workdir / f"{name}.json", workdir / f"{name}.stderr",
                           workdir / f"{name}-logs")
    out.unlink(missing_ok=True)
    ended = run_child_process(cell_argv(cell, settings, repeat, out, logs, slot),
                              settings.timeout_s, err_path, env, cancel)
    # A record means the measurement finished, even when the launcher then hung on its way
    # out and the timeout had to kill it.
    return Child(ended.timed_out, ended.returncode, ended.stderr, read_result(out), logs)


def run_child(cell: Cell, settings: Settings, repeat: int, workdir: Path,
              slot: int = 0, env: dict[str, str] | None = None,
              cancel: threading.Event | None = None) -> dict[str, Any]:
    """Run one cell and return its record, made by the parent when the child left none."""
    child = launch(cell, settings, repeat, workdir, slot, env, cancel)
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
