"""Carrying out the plan: each step a child process in a session of its own, its output to a
log (and to stderr), stopped at its time limit, recorded in validate.json as it ends; signals
stop the step in flight and leave the state readable."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import config, store
from bench.run.signals import Stopped
from bench.validate.plan import ROOT, Step, Target, allotted_s
from bench.validate.state import LOGS, MATRICES, RUN, SUMMARY, load_state, now, write_atomic
from bench.validate.summary import save

BUDGET_EXIT = 3
_GRACE_S = 15.0  # after SIGTERM, what a step gets to clean up (kill its cells, write files)
_clock = time.monotonic  # tests replace it


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when validate dies, however it dies (Linux), so a
    step never outlives the command and its run directory's lock is freed."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the step's session (the runner kills its cells and exits), SIGKILL after the
    grace period."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_step(step: Step, argv: Sequence[str], out: Path, log: Path,
             limit_s: float) -> tuple[int, bool]:
    """Run one step's child, its output to ``log`` (and to stderr, line by line), for at most
    ``limit_s``; returns (exit code, killed at the limit)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # `python -m bench` from any directory
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    stdout_file = open(out / step.stdout, "wb") if step.stdout else None  # noqa: SIM115
    with open(log, "ab") as sink:
        sink.write(f"$ {shlex.join(argv)}\n".encode())
        sink.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=stdout_file or subprocess.PIPE,
                                stderr=subprocess.PIPE if stdout_file else subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent, env=env)
        stream = proc.stderr if stdout_file else proc.stdout
        tee = threading.Thread(target=_tee, args=(stream, sink), daemon=True)
        tee.start()
        killed = False
        try:
            proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            killed = True
            _stop(proc)
        except BaseException:
            _stop(proc)
            raise
        finally:
            tee.join(timeout=5)
            if stdout_file is not None:
                stdout_file.close()
    return proc.returncode, killed


def _tee(stream: Any, sink: Any) -> None:
    for line in iter(stream.readline, b""):
        sink.write(line)
        sink.flush()
        sys.stderr.buffer.write(line)
        sys.stderr.flush()


@dataclass
class _Call:
    """One call of the command: the plan, the state it updates, and when it started."""

    steps: Sequence[Step]
    target: Target
    out: Path
    state: dict[str, Any]
    started: float = field(default_factory=lambda: _clock())

    def __post_init__(self) -> None:
        self.call = {"started": now(), "budget_s": 0.0, "device": self.target.name,
                     "wall_s": 0.0}
        self.state["calls"].append(self.call)
        self.done = {n for n, e in self.state["steps"].items() if e.get("status") == "done"}

    def save(self) -> None:
        self.call["wall_s"] = round(_clock() - self.started, 1)
        save(self.out, self.state, self.steps, self.target)

    def mark(self, step: Step, **entry: Any) -> None:
        self.state["steps"][step.name] = {**self.state["steps"].get(step.name, {}), **entry}
        self.save()

    def run(self, index: int, step: Step, allot: float, label: str) -> None:
        """Run one step for at most ``allot`` seconds and record how it ended."""
        argv = list(step.argv)
        if step.matrix is not None:
            write_atomic(self.out / MATRICES / f"{step.name}.toml", config.to_toml(step.matrix))
        if step.budgeted:
            argv += ["--time-budget", f"{max(1, int(allot))}s"]
        log = self.out / LOGS / f"{index + 1:02d}-{step.name}.log"
        print(f"{label}: {step.what} (estimate {step.estimate_s:.0f} s, at most {allot:.0f} s)"
              f" -> {log.relative_to(self.out)}", file=sys.stderr)
        self.state["steps"][step.name] = {}
        self.mark(step, status="running", started=now(), log=str(log.relative_to(self.out)))
        started = _clock()
        try:
            # A budgeted step stops itself at its budget; the limit is only the net.
            code, killed = run_step(step, argv, self.out, log,
                                    allot + _GRACE_S if step.budgeted else allot)
        except Stopped as stop:
            self.mark(step, status=f"stopped by {stop}", wall_s=round(_clock() - started, 1))
            raise
        if killed:
            status = "stopped at its time limit"
        elif code in step.done_codes:
            status = "done"
            self.done.add(step.name)
        elif code == BUDGET_EXIT and step.budgeted:
            status = "stopped by the budget: the next call goes on"
        else:
            status = "failed"
        wall = round(_clock() - started, 1)
        self.mark(step, status=status, exit_code=code, wall_s=wall,
                  estimate_s=round(step.estimate_s, 1))
        print(f"{label}: {status} (exit {code}) in {wall:.0f} s", file=sys.stderr)

    def exit_code(self, command: str) -> int:
        """0 all planned steps done, 3 some left for another call, 1 one failed."""
        planned = [s.name for s in self.steps if s.skip is None]
        failed = [n for n in planned if self.state["steps"].get(n, {}).get("status") == "failed"]
        unfinished = [n for n in planned if n not in self.done and n not in failed]
        print(f"\nvalidate: {self.out / SUMMARY}", file=sys.stderr)
        if failed:
            print(f"validate: failed: {', '.join(failed)} (see their logs)", file=sys.stderr)
        if unfinished:
            print(f"validate: not done yet: {', '.join(unfinished)}\nresume with: {command}",
                  file=sys.stderr)
            return BUDGET_EXIT
        return 1 if failed else 0


def execute(steps: Sequence[Step], target: Target, out: Path, budget_s: float,
            command: str) -> int:
    """Carry out the plan into ``out`` within ``budget_s``; the exit code of the command."""
    (out / LOGS).mkdir(exist_ok=True)
    (out / MATRICES).mkdir(exist_ok=True)
    this = _Call(steps, target, out, load_state(out))
    this.call["budget_s"] = budget_s
    ran_any = False
    for i, step in enumerate(steps):
        label = f"validate [{i + 1}/{len(steps)}] {step.name}"
        if step.skip is not None:
            this.state["steps"][step.name] = {"status": "not planned", "why": step.skip}
        # The report is written again whenever anything new ran in this call.
        elif step.name in this.done and not (step.name == "report" and ran_any):
            print(f"{label}: done in an earlier call", file=sys.stderr)
        elif step.name == "report" and not (out / RUN / store.RECORDS).exists():
            print(f"{label}: nothing to report yet (no records)", file=sys.stderr)
        else:
            left = budget_s - (_clock() - this.started)
            allot = allotted_s(steps, i, left, this.done)
            if allot is None:
                why = "no time left" if step.essential else "no time to spare"
                this.mark(step, status=f"not started: {why}")
                print(f"{label}: {why} (estimate {step.estimate_s:.0f} s, {left:.0f} s left); "
                      "the next call runs it", file=sys.stderr)
            else:
                this.run(i, step, allot, label)
                ran_any = True
    this.save()
    return this.exit_code(command)
