"""``--time-budget``: when the run must be over, and how long a cell's process will take.

A process that the time left cannot finish is not started (bench/run/sweep.py asks
``estimate_s`` before each). The estimate comes from the processes finished so far, in this
run directory, other matrices' included (`ampbench validate` sweeps several into one): the
same group's slowest, scaled up to the batch; else a cost model (``_modelled_s``) from start-up
times and step times scaled by analytic FLOPs per step, which the device probe computed
(bench/run/device.py: the runner imports no model, so no torch); else the timeout. torch-free.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bench import strategy
from bench.config import Cell

# What --time-budget keeps back for the report after the last cell or parity run (plots
# included; a few seconds on a GPU box, more on a busy 2-core one).
REPORT_RESERVE_S = 30.0
_clock = time.monotonic  # the budget's clock (tests replace it)

# The cost model's margin on an unseen cell's training time: its step time comes from another
# cell's, scaled by FLOPs per step, and the FLOP rate a step achieves differs between models
# and policies by up to 2-3x (config.gpu_quick: tf32 at ~60 TFLOP/s for ResNet-50 and ~130 for
# the transformers).
STEP_MARGIN = 2.0


def now() -> float:
    """Seconds on the budget's clock (monotonic): what wall times and deadlines are read on."""
    return _clock()


@dataclass(frozen=True)
class Budget:
    """``--time-budget``: when the run must be over, what it keeps back for the report, and
    the FLOPs per step (cell_id -> FLOPs, from the device probe) its estimates scale by."""

    text: str  # as given: 25m, 540s ...
    deadline: float  # on now()
    reserve_s: float = 0.0
    flops: Mapping[str, float] = field(default_factory=dict)

    def left(self) -> float:
        """Seconds still free for cells and parity runs."""
        return self.deadline - self.reserve_s - now()


def estimate_s(cell: Cell, records: Iterable[dict[str, Any]], cells: dict[str, Cell],
               timeout_s: float, num_steps: int | None = None,
               flops: Mapping[str, float] | None = None) -> float:
    """How long ``cell``'s process will take, never more than the timeout (which bounds every
    process). A group that has run (all but the batch): its slowest ok process, scaled up to
    this batch. Else the cost model of _modelled_s from the ok processes finished so far,
    ``num_steps`` (warmup + timed) steps long, with ``flops`` (cell_id -> analytic FLOPs per
    step); the timeout when it has nothing to go on."""
    finished = [(cells.get(r["cell_id"]) or cell_of(r), r) for r in records
                if r.get("status") == "ok" and _number(r.get("wall_s")) is not None]
    finished = [(other, r) for other, r in finished if other is not None]
    known = [r["wall_s"] * max(1.0, cell.batch_size / other.batch_size)
             for other, r in finished if other.group == cell.group]
    if known:
        return min(max(known), timeout_s)
    guess = _modelled_s(cell, finished, num_steps, flops or {})
    return timeout_s if guess is None else min(guess, timeout_s)


def _modelled_s(cell: Cell, finished: list[tuple[Cell, dict[str, Any]]],
                num_steps: int | None, flops: Mapping[str, float]) -> float | None:
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
    the same policy, else the same model, else any), the slowest of them, times STEP_MARGIN.
    """
    own_flops = flops.get(cell.cell_id)
    if own_flops is None:
        return None
    kind = (cell.compile, cell.num_processes > 1)
    start_s: list[float] = []
    by_closeness: dict[int, list[tuple[float, int]]] = {}  # (step time at cell's FLOPs, steps)
    for other, record in finished:
        step_ms = _number(record.get("step_ms_median"))
        warmup, timed = (_number(record.get(k)) for k in ("warmup_steps", "timed_steps"))
        other_flops = flops.get(other.cell_id)
        if step_ms is None or warmup is None or timed is None or not other_flops:
            continue
        ran = int(warmup + timed)
        if (other.compile, other.num_processes > 1) == kind:
            start_s.append(max(0.0, record["wall_s"] - ran * step_ms / 1e3))
        closeness = _closeness(cell, other)
        by_closeness.setdefault(closeness, []).append(
            (step_ms / 1e3 * own_flops / other_flops, ran))
    if not start_s or not by_closeness:
        return None
    step_s, ran = max(by_closeness[min(by_closeness)])
    return max(start_s) + (num_steps or ran) * step_s * STEP_MARGIN


def cell_of(record: dict[str, Any]) -> Cell | None:
    """The cell a record of another matrix measured (a run directory that several sweeps
    wrote into, as `ampbench validate`'s steps do), from its key fields; None if they are
    damaged."""
    try:
        return Cell(model=str(record["model"]), precision=str(record["precision"]),
                    batch_size=int(record["batch_size"]), seq_len=record.get("seq_len"),
                    image_size=record.get("image_size"),
                    grad_accum=int(record.get("grad_accum") or 1),
                    compile=bool(record.get("compile")),
                    world_size=int(record.get("world_size") or 1),
                    strategy=strategy.of_record(record))
    except (KeyError, TypeError, ValueError):
        return None


def cells_to_price(cells: Iterable[Cell], records: Iterable[dict[str, Any]]) -> list[Cell]:
    """The cells whose FLOPs per step the estimates may need: ``cells`` and those the ok
    ``records`` already in the run directory measured (other matrices' included)."""
    measured = (cell_of(r) for r in records if r.get("status") == "ok")
    return list(dict.fromkeys([*cells, *(c for c in measured if c is not None)]))


def _closeness(cell: Cell, other: Cell) -> int:
    """0 the same model and policy, 1 the same policy, 2 the same model, 3 neither."""
    if other.precision == cell.precision:
        return 0 if other.model == cell.model else 1
    return 2 if other.model == cell.model else 3


def _number(value: Any) -> float | None:
    """``value`` when it is a finite real number (not a bool), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
