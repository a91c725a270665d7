"""Numerics health of a benchmark cell, from results.csv's NUMERICS columns: the optimizer steps
GradScaler skipped, the non-finite losses and gradients, the weights left non-finite, the loss
scale's range; and the one rule that calls a cell unhealthy. The gate fails on it
(bench/analysis/gate.py), without a baseline: a current run alone shows it; the report shows it
next to parity (bench/report/numerics.py). torch-free.

A cell's processes (its repeats) are summed: ``skipped`` of ``steps`` is every skipped step of
every ok process over every step they counted (warmup included).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bench.precision import ABLATIONS

# GradScaler starts at a scale of 2^16 and halves it on every step whose gradients overflow, so
# a model whose gradients need a smaller scale skips steps at its start while the scale settles:
# one per halving, however long the run (2^16 -> 2^14 skips two). The reference models' fp16
# cells skip 0 to 2 of 35 steps (results/*/*/results.csv: resnet-tiny 2 at batch 4, 1 at batch
# 8; bert-tiny and gpt2-tiny none). Beyond a tenth of its steps a cell's scaler is no longer
# settling: the scale keeps backing off, and its throughput counts steps that updated nothing.
SKIPPED_SHARE_LIMIT = 0.10
# A short run's share says little: these many skips (2^16 -> 2^12) pass whatever the share.
CALIBRATION_SKIPS = 4


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _sum(values: Iterable[Any]) -> int | None:
    numbers = [n for n in map(_number, values) if n is not None]
    return int(sum(numbers)) if numbers else None


@dataclass(frozen=True)
class Health:
    """A cell's numerics, summed over its ok processes; None where nothing measured it."""

    policy: str
    steps: int | None  # training steps counted (warmup included)
    skipped: int | None  # optimizer steps GradScaler skipped (None: no scaler)
    nonfinite_losses: int | None
    nonfinite_grad_steps: int | None  # found by the scaler (None: not counted per step)
    nonfinite_params: int | None  # parameters non-finite after the last step, per process
    scale_final: tuple[float, ...] = ()  # each process's final loss scale
    scale_min: float | None = None
    scale_max: float | None = None
    scale_changes: int | None = None

    @property
    def share(self) -> float | None:
        """Skipped steps as a share of the steps counted; None when unknown."""
        if self.skipped is None or not self.steps:
            return None
        return self.skipped / self.steps

    def problems(self) -> list[str]:
        """Why this cell's numerics are unhealthy ([] when they are not, or not measured)."""
        found = []
        share = self.share
        if share is not None and self.skipped is not None and share > SKIPPED_SHARE_LIMIT \
                and self.skipped > CALIBRATION_SKIPS:
            found.append(f"the loss scaler skipped {self.skipped} of {self.steps} optimizer "
                         f"steps ({share:.0%}), above the {SKIPPED_SHARE_LIMIT:.0%} its "
                         "calibration explains: those steps updated nothing")
        if self.policy in ABLATIONS:
            return found  # its non-finite values are the finding it exists to show
        if self.nonfinite_losses:
            found.append(f"{self.nonfinite_losses} non-finite loss(es) in {self.steps} steps")
        if self.nonfinite_params:
            found.append(f"{self.nonfinite_params} parameter(s) non-finite after the last step")
        return found

    def skipped_text(self) -> str:
        """'2 of 35 (5.7%)', 'none of 35', or 'no scaler'."""
        if self.skipped is None:
            return "no scaler"
        of = f" of {self.steps}" if self.steps else ""
        if not self.skipped:
            return f"none{of}"
        share = self.share
        return f"{self.skipped}{of}" + (f" ({share:.1%})" if share is not None else "")

    def scale_text(self) -> str:
        """'16384 (range 16384-65536, 2 changes)', or '' without a scaler."""
        finals = sorted(set(self.scale_final))
        if not finals:
            return ""
        text = "/".join(f"{s:g}" for s in finals)
        if self.scale_min is not None and self.scale_max is not None:
            text += f" (range {self.scale_min:g}–{self.scale_max:g}"
            text += f", {self.scale_changes} change(s))" if self.scale_changes is not None \
                else ")"
        return text


def of_processes(policy: str, rows: Any) -> Health:
    """The Health of a cell from its ok processes (results.csv rows, a DataFrame)."""

    def column(name: str) -> list[Any]:
        return list(rows[name]) if name in rows else []

    mins = [n for n in map(_number, column("scaler_scale_min")) if n is not None]
    maxs = [n for n in map(_number, column("scaler_scale_max")) if n is not None]
    finals = tuple(n for n in map(_number, column("scaler_scale_final")) if n is not None)
    return Health(
        policy=policy,
        steps=_sum(column("num_steps_counted")),
        skipped=_sum(column("scaler_skipped_steps")),
        nonfinite_losses=_sum(column("nonfinite_steps")),
        nonfinite_grad_steps=_sum(column("nonfinite_grad_steps")),
        nonfinite_params=_sum(column("nonfinite_params")),
        scale_final=finals,
        scale_min=min(mins) if mins else None,
        scale_max=max(maxs) if maxs else None,
        scale_changes=_sum(column("scaler_scale_changes")),
    )
