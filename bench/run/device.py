"""Device discovery for the runner: one child process at start (bench/cell/probe.py) answers
everything the runner would otherwise import torch for: the device every cell gets (a bad or
missing one is BadInput), the environment fingerprint, whether CUDA is there (the ``auto``
preset, the GPU presets' check) and the analytic FLOPs per step of the cells that
--time-budget estimates; and it runs the check of every model of the user's own in the matrix
(bench/cell/check.py), so a module that breaks the contract is one line, exit 2, before any
cell starts. torch-free: the runner starts fast, never holds a GPU context and runs no user
code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bench import BadInput
from bench.config import Cell

# Importing torch and initialising CUDA take seconds; a broken driver can hang instead.
_TIMEOUT_S = 300.0
_STDERR_LINES = 3


@dataclass(frozen=True)
class Probe:
    """The probe's answer."""

    cuda: bool  # torch sees a CUDA device
    device: str | None  # what every child gets (cpu, cuda, cuda:N); None when ``error``
    error: str | None  # why the device named is bad or missing: one line
    env: dict[str, Any] = field(default_factory=dict)  # the fingerprint: every record's fields
    cpu_model: str = ""
    flops_per_step: dict[str, float] = field(default_factory=dict)  # cell_id -> FLOPs
    # cell_id -> why its policy leaves the model as it is (an `unsupported` record in seconds)
    unchanged: dict[str, str] = field(default_factory=dict)
    # reference -> how a user's module breaks the contract (one line naming its file)
    model_problems: dict[str, str] = field(default_factory=dict)

    def checked_models(self) -> None:
        """BadInput (the first problem's line) when a user's module broke the contract."""
        for problem in self.model_problems.values():
            raise BadInput(problem)

    def checked_device(self) -> str:
        """The device; BadInput (the probe's line) when the one named is bad or missing."""
        if self.device is None:
            raise BadInput(self.error or "no device")
        return self.device


def _failed(what: str, stderr: str) -> BadInput:
    tail = [line for line in stderr.strip().splitlines() if line.strip()][-_STDERR_LINES:]
    detail = f": {' | '.join(tail)}" if tail else ""
    return BadInput(f"the device probe (python -m bench.cell.probe) {what}{detail}")


def probe(device: str, cells: Iterable[Cell] = (),
          references: Iterable[tuple[str, int | None]] = ()) -> Probe:
    """Ask a child process about ``device`` (cpu, cuda, cuda:N, auto), the FLOPs of ``cells``
    and the user's models ``references`` (name, input size); BadInput when it cannot answer
    (torch missing or broken, a hung driver)."""
    request = json.dumps({"cells": [cell.key() for cell in dict.fromkeys(cells)],
                          "models": [list(ref) for ref in dict.fromkeys(references)]})
    try:
        done = subprocess.run([sys.executable, "-m", "bench.cell.probe", "--device", device],
                              input=request, capture_output=True, text=True,
                              timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise _failed(f"gave no answer in {_TIMEOUT_S:g} s", stderr) from None
    if done.returncode != 0:
        raise _failed(f"failed (exit code {done.returncode})", done.stderr)
    lines = done.stdout.strip().splitlines()
    try:
        found = json.loads(lines[-1])
        return Probe(bool(found["cuda"]), found["device"], found["error"], found["env"] or {},
                     found["cpu_model"], found["flops_per_step"], found["unchanged"],
                     found.get("model_problems") or {})
    except (IndexError, ValueError, KeyError, TypeError):
        raise _failed("answered no JSON", done.stderr) from None
