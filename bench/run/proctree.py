"""Process trees: find and kill a child's descendants, and let a cell police itself.

The runner kills a cell's whole tree on a timeout or when it is stopped (``kill_tree``). A cell
must not outlive its runner or its timeout even when the runner dies without cleaning up
(SIGKILL): ``watch`` starts a watchdog in the cell that kills the cell's own tree when the
runner is gone or the deadline has passed. The runner hands both to its children through the
environment (``RUNNER_ENV``, ``TIMEOUT_ENV``), so torchrun passes them on to every rank.
Linux-first (/proc, prctl); elsewhere the same checks fall back to ``os.kill(pid, 0)``.
torch-free.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import time

RUNNER_ENV = "AMPBENCH_RUNNER"  # HOST:PID of the runner that started the cell
TIMEOUT_ENV = "AMPBENCH_CELL_TIMEOUT_S"  # seconds the cell may live, from its own start
_POLL_S = 0.2
_PR_SET_PDEATHSIG = 1


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, ...], or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_ticks(pid: int) -> int | None:
    """CPU clock ticks of ``pid`` and of the children it reaped (utime, stime, cutime, cstime);
    None when it is gone or there is no /proc (a zombie keeps them until it is reaped)."""
    stat = _stat(pid)
    if stat is None or len(stat) < 15:
        return None
    return sum(int(v) for v in stat[11:15])


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is gone)."""
    if os.path.isdir("/proc"):
        stat = _stat(pid)
        return stat is not None and stat[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_tree(pids: list[int], sig: signal.Signals, group: int | None = None) -> None:
    """Send ``sig`` to the process group ``group`` (when given) and to every pid in ``pids``."""
    if group is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: tells a pid from its reuse."""
    stat = _stat(pid)
    return stat[19] if stat is not None and len(stat) > 19 else None


def _die() -> None:
    """Kill this process's whole tree, itself last: what a watchdog does when it fires."""
    me = os.getpid()
    tree = descendants(me)
    signal_tree(tree, signal.SIGKILL, group=me if os.getpgid(0) == me else None)
    os.kill(me, signal.SIGKILL)


def _runner_pid(value: str) -> int | None:
    """The runner's pid from ``HOST:PID`` when it runs on this host (else it cannot be seen)."""
    host, _, pid = value.rpartition(":")
    if not pid.isdigit() or host != socket.gethostname():
        return None
    return int(pid)


def _set_parent_death_signal(parent: int) -> None:
    """Linux: the kernel SIGKILLs this process the moment its parent dies (no GIL needed)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took hold
            _die()


def watch(runner: str | None, timeout_s: float | None) -> threading.Thread | None:
    """Start the watchdog of a cell: its tree dies when the runner ``HOST:PID`` is gone or
    ``timeout_s`` has passed since now. None when there is nothing to watch."""
    pid = _runner_pid(runner) if runner else None
    deadline = time.monotonic() + timeout_s if timeout_s else None
    if pid is None and deadline is None:
        return None
    started = _started(pid) if pid is not None else None
    if pid is not None and not alive(pid):
        _die()
    if pid is not None and os.getppid() == pid:  # a plain cell, not a torchrun rank
        _set_parent_death_signal(pid)
    if deadline is not None and hasattr(signal, "alarm"):
        # A backstop that needs no Python: SIGALRM's default action ends the process even
        # when the watchdog thread cannot run. Well after the thread's own deadline.
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(timeout_s or 0) + 10)

    def gone() -> bool:
        return pid is not None and (not alive(pid) or _started(pid) != started)

    def run() -> None:
        while True:
            if gone() or (deadline is not None and time.monotonic() > deadline):
                _die()
            time.sleep(_POLL_S)

    thread = threading.Thread(target=run, name="ampbench-watchdog", daemon=True)
    thread.start()
    return thread


def watch_from_env() -> threading.Thread | None:
    """``watch`` with what the runner put in the environment; a cell run by hand has none."""
    runner = os.environ.get(RUNNER_ENV) or None
    try:
        timeout_s = float(os.environ.get(TIMEOUT_ENV) or 0) or None
    except ValueError:
        timeout_s = None
    if timeout_s is not None and not 0 < timeout_s < float("inf"):
        timeout_s = None
    return watch(runner, timeout_s)


def runner_env(timeout_s: float) -> dict[str, str]:
    """What a runner adds to a cell's environment so that the cell can police itself."""
    return {RUNNER_ENV: f"{socket.gethostname()}:{os.getpid()}", TIMEOUT_ENV: f"{timeout_s:g}"}
