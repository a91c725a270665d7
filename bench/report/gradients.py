"""Where gradients fall in FP16's range: grad_hist.csv's log2 histograms of the FP32
reference's gradient magnitudes, and the shares that FP16 would flush to zero or overflow,
before and after the loss scale the fp16 runs settled on. torch-free.

grad_hist.csv (bench/parity/) has, per model, kind ("activation": gradients with respect to
module outputs; "weight": parameter gradients) and sampled step, one row per non-empty bin:
``count`` non-zero elements with ``floor(log2|g|) == log2_bin``, and ``zeros``, the exact zeros
of that group (the same on each of its rows). The magnitudes are the unscaled FP32 gradients.

Multiplying by a loss scale of 2^s moves every element s bins up. A bin b holds [2^b, 2^(b+1)):
it is below FP16's smallest subnormal 2^-24 when b < -24, and at or above 2^16 (past FP16's
largest finite value, 65504) when b >= 16; the sliver (65504, 65536) of bin 15 is counted as
fitting. Shares are of the non-zero elements, as ``underflow_frac`` in parity.csv: an exact zero
is zero in every format and loses nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from bench.report.loading import Run

FP16_TINY_LOG2 = -24  # smallest subnormal, 2^-24: smaller magnitudes flush to zero
FP16_NORMAL_LOG2 = -14  # smallest normal, 2^-14: below it, subnormals with fewer digits
FP16_MAX = 65504.0  # largest finite FP16 value; log2 of it is 15.9999
FP16_OVERFLOW_LOG2 = 16  # the first bin wholly past FP16_MAX
KINDS = ("activation", "weight")


@dataclass(frozen=True)
class Shares:
    """One model's gradients of one kind over the sampled steps, against FP16's range."""

    kind: str
    steps: tuple[int, ...]
    nonzero: int  # non-zero elements over the sampled steps
    zeros: int  # exact zeros over the sampled steps
    histogram: pd.Series  # log2 bin -> share of the non-zero elements
    scale: float | None  # the fp16 runs' loss scale (median final scale); None without one

    @property
    def log2_scale(self) -> int | None:
        """The bins a scaled element moves up (GradScaler's scales are powers of two)."""
        return None if self.scale is None else round(math.log2(self.scale))

    @property
    def zero_share(self) -> float:
        total = self.nonzero + self.zeros
        return self.zeros / total if total else math.nan

    def below(self, shift: int = 0) -> float:
        """Share of non-zero elements under 2^-24 after multiplying by 2^shift."""
        return float(self.histogram[self.histogram.index + shift < FP16_TINY_LOG2].sum())

    def above(self, shift: int = 0) -> float:
        """Share of non-zero elements at or above 2^16 (past 65504) after 2^shift."""
        return float(self.histogram[self.histogram.index + shift >= FP16_OVERFLOW_LOG2].sum())


def fp16_scale(run: Run, model: str) -> float | None:
    """The loss scale the fp16 runs of ``model`` settled on: the median over seeds of
    ``scaler_scale_final``; None without fp16 runs or a recorded scale."""
    runs = run.parity_runs
    if runs is None:
        return None
    values = runs.loc[(runs["model"] == model) & (runs["precision"] == "fp16"),
                      "scaler_scale_final"].dropna()
    values = values[values > 0]
    return float(values.median()) if len(values) else None


def models(run: Run) -> list[str]:
    """The models grad_hist.csv has histograms of, in file order."""
    return [] if run.grad_hist is None else list(run.grad_hist["model"].drop_duplicates())


def shares(run: Run, model: str) -> list[Shares]:
    """Per kind (activation first), the model's histogram over all its sampled steps."""
    if run.grad_hist is None:
        return []
    rows = run.grad_hist[run.grad_hist["model"] == model]
    scale = fp16_scale(run, model)
    kinds = [k for k in KINDS if k in set(rows["kind"])]
    kinds += [k for k in rows["kind"].drop_duplicates() if k not in kinds]
    out = []
    for kind in kinds:
        group = rows[rows["kind"] == kind]
        counts = group.dropna(subset=["log2_bin"]).groupby("log2_bin")["count"].sum()
        counts = counts[counts > 0].sort_index()
        nonzero = int(counts.sum())
        # ``zeros`` repeats on every row of a (kind, step) group: once per step.
        zeros = int(group.groupby("step")["zeros"].first().fillna(0).sum())
        histogram = counts / nonzero if nonzero else counts.astype(float)
        histogram.index = histogram.index.astype(int)
        steps = tuple(sorted(int(s) for s in group["step"].dropna().unique()))
        out.append(Shares(kind, steps, nonzero, zeros, histogram, scale))
    return out


def pct(share: float) -> str:
    """A share as a percentage that never rounds a few elements away to 0%."""
    if share == 0:
        return "0%"
    if share < 0.0005:
        return "<0.1%"
    return f"{share:.1%}"


def describe(item: Shares) -> str:
    """One line: what FP16 would lose of these gradients unscaled, and after the loss scale."""
    text = f"{item.kind} gradients: {pct(item.below())} below 2^-24 unscaled"
    shift = item.log2_scale
    if shift is None:
        text += " (no fp16 loss scale recorded)"
    else:
        text += (f", {pct(item.below(shift))} after scaling by 2^{shift}, "
                 f"{pct(item.above(shift))} above 65504 after scaling")
    return text + f"; {pct(item.zero_share)} exactly zero"
