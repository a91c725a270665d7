"""Measurement noise: how far the same cell moves between processes, and what a run can resolve.

The step-time spread inside one process says little about how much the same cell varies from
one process to the next (where memory lands, which core, clocks, neighbours), and a speedup or
a regression is always a comparison of two processes. So, as pyperf and asv do, a cell's value
is the median over its processes (``repeats``, run interleaved across cells) and its noise is
the spread between them:

- ``own``: the cell's per-process spread, estimated so that one process cannot set it: from
  ``TRIM_FROM`` (five) processes on, the standard deviation of all but the one farthest from
  the median, times the factor that makes it unbiased for normal noise (``TRIMMED_SD``, 1.601
  for five processes, measured by simulation and rechecked in tests/test_noise.py); below
  five, the plain standard deviation (with four or fewer, dropping one leaves too little; a
  cell's own spread is then guarded by the run's band, the median over cells). The process
  left out is an *outlier* when it lies more than ``OUTLIER_Z`` of those spreads from the
  median (on a scale never finer than the cell's step-to-step spread): the report names it by
  cell and process. Under normal noise that flags a cell of five processes 2.5% of the time,
  of eight 0.5%. Measured effect on results/amd-epyc/2026-12-06, whose calibration cell ran
  five processes at 485, 388, 481, 553 and 836 samples/s: their standard deviation read 35.2%
  per process and set every interval of that run; the trimmed one reads 22.4% (836 is 3.2 of
  them out: wide noise on a shared machine rather than a lone outlier, so it is not flagged);
- ``band``: the run's typical between-process spread, the median of ``own`` over every cell
  with several processes. With ``--repeats 1`` the runner measures it on a calibration cell
  run in a few extra processes at the start and end of the sweep;
- ``floor``: the cell's step-to-step spread, ``IQR / 1.349 / median`` (time-derived metrics
  only), and the run's typical one (the median over its cells). Measured on the 2-core CI
  machine, cells moved between runs by a median 2.3% while their step spread read 2.2% and the
  calibration cell 0.3-1.6%: a few processes can agree by luck, and a cell whose steps scatter
  scatters between processes too.

A cell's per-process noise is the largest of those it has (an estimate from three processes
can be small by luck; the run's band guards it), and the uncertainty of its value is that over
the square root of its number of processes. Where neither repeats nor calibration exist, the
within-process floor is all there is and the source says ``within-run``: a lower bound. With
nothing at all (``none``) the noise is unbounded: no claim can be made.

Claims use one threshold, ``Z`` standard errors. Values and ratios are positive, and their
noise is relative, so intervals are taken on the log scale: ``value * exp(±Z * error)``, shown
as a range (``1.13x [0.71–1.80]``) that never reaches below zero. A change is "beyond noise"
when its interval excludes no change (1x), and the gate judges a
check only when a change of its threshold's size would be beyond noise. results.csv's per-cell
noise columns come from ``results_columns``, which store.write_csv is given. torch-free.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from bench import store
from bench.analysis.cells import group_frame

if TYPE_CHECKING:
    import pandas as pd

K = TypeVar("K", bound=Hashable)

Z = 3.0  # standard errors for an interval or a "beyond noise" claim (~99.7% two-sided)
# Cells need this many processes of their own before their own spread is trusted alone.
MIN_OWN = 3
TRIM_FROM = 5  # processes from which the one farthest from the median is left out
OUTLIER_Z = 5.0  # spreads from the median beyond which the process left out is an outlier
# E[trimmed standard deviation] = sigma / TRIMMED_SD[n] for n normal values (simulated, 4e5
# draws each); beyond the table 1 + 2.9 / n is within 1%.
TRIMMED_SD = {5: 1.601, 6: 1.475, 7: 1.390, 8: 1.340, 9: 1.297, 10: 1.271, 11: 1.245,
              12: 1.226}
CALIBRATION_PROCESSES = 4  # extra processes of the calibration cell (half first, half last)
# Metrics that scale with (or inversely to) the step time: the step-spread floor applies.
TIME_DERIVED = frozenset({"step_ms_median", "step_ms_min", "samples_per_s", "tokens_per_s",
                          "achieved_tflops", "mfu_pct", "joules_per_sample"})

REPEATS, CALIBRATION, WITHIN, NONE = "repeats", "calibration", "within-run", "none"


@dataclass(frozen=True)
class Band:
    """A run's typical between-process spread of one metric, and where it came from."""

    spread: float | None  # relative standard deviation of one process's value
    source: str  # repeats | calibration | none
    num_cells: int = 0  # cells with several processes behind it
    # Time-derived metrics: the run's typical step-to-step spread (``step_spread`` over all its
    # processes), a floor for the between-process spread (see the module's docstring).
    step_floor: float | None = None

    @property
    def per_process(self) -> float | None:
        """The noise one process of any cell of the run is taken to have."""
        known = [s for s in (self.spread, self.step_floor) if s is not None]
        return max(known) if known else None


@dataclass(frozen=True)
class Estimate:
    """A cell's value (median over its processes) with its noise."""

    value: float
    spread: float  # relative standard deviation of ONE process's value
    n: int  # processes behind the value
    source: str  # repeats | calibration | within-run | none

    @property
    def error(self) -> float:
        """Relative standard error of ``value``."""
        return self.spread / math.sqrt(max(self.n, 1))

    @property
    def low(self) -> float:
        """The ``Z``-sigma interval's lower end, on the log scale (never below zero)."""
        return _scaled(self.value, -Z * self.error)

    @property
    def high(self) -> float:
        """The ``Z``-sigma interval's upper end, on the log scale."""
        return _scaled(self.value, Z * self.error)

    def ratio(self, other: Estimate) -> Ratio:
        """``self / other`` with both errors combined (relative errors add in quadrature)."""
        return Ratio(self.value / other.value, math.hypot(self.error, other.error),
                     _weakest(self.source, other.source))


@dataclass(frozen=True)
class Ratio:
    """A ratio of two estimates (a speedup, a memory ratio) with its relative standard error."""

    value: float
    error: float  # relative standard error
    source: str

    @property
    def low(self) -> float:
        """The ``Z``-sigma interval's lower end, ``value * exp(-Z * error)``: the log scale,
        where a ratio's noise is symmetric, so the interval never reaches zero."""
        return _scaled(self.value, -Z * self.error)

    @property
    def high(self) -> float:
        """The ``Z``-sigma interval's upper end, ``value * exp(Z * error)``."""
        return _scaled(self.value, Z * self.error)

    @property
    def known(self) -> bool:
        """Whether the noise was measured (a finite error)."""
        return math.isfinite(self.error)

    @property
    def beyond_noise(self) -> bool:
        """True when the interval excludes 1 (no change); never with unknown noise."""
        return self.known and (self.low > 1.0 or self.high < 1.0)


def _scaled(value: float, log_step: float) -> float:
    """``value * exp(log_step)``: inf or 0 for an unbounded step, NaN for no value."""
    if not math.isfinite(log_step):
        return math.inf if log_step > 0 else 0.0
    return value * math.exp(log_step)


_SOURCE_RANK = {REPEATS: 0, CALIBRATION: 1, WITHIN: 2, NONE: 3}


def _weakest(*sources: str) -> str:
    return max(sources, key=lambda s: _SOURCE_RANK.get(s, 3))


def finite(values: Iterable[object]) -> list[float]:
    """The finite numbers among ``values`` (None, NaN, inf and text dropped)."""
    out = []
    for value in values:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out.append(number)
    return out


def _farthest(values: Sequence[float]) -> int:
    """The position of the value farthest from the median (the first of equals)."""
    centre = statistics.median(values)
    return max(range(len(values)), key=lambda i: abs(values[i] - centre))


def robust_sigma(values: Sequence[float]) -> float | None:
    """The standard deviation of ``values``' noise, in their unit, estimated so that one value
    cannot set it: from ``TRIM_FROM`` values on, that of all but the farthest from the median,
    made unbiased by ``TRIMMED_SD``; below, the sample standard deviation; None below two."""
    n = len(values)
    if n < 2:
        return None
    if n < TRIM_FROM:
        return statistics.stdev(values)
    far = _farthest(values)
    rest = [v for i, v in enumerate(values) if i != far]
    return statistics.stdev(rest) * TRIMMED_SD.get(n, 1 + 2.9 / n)


def own_spread(values: Sequence[float]) -> float | None:
    """One cell's per-process spread, relative to its median (``robust_sigma``); None below
    two values."""
    sigma = robust_sigma(values)
    if sigma is None:
        return None
    centre = statistics.median(values)
    return sigma / abs(centre) if centre else None


def outliers(values: Sequence[float], floor: float | None = None) -> list[int]:
    """Positions of the outlier processes among one cell's values: the one farthest from the
    median when it lies more than ``OUTLIER_Z`` robust sigmas from it, on a scale never finer
    than ``floor`` (the cell's relative step-to-step spread). Needs ``TRIM_FROM`` values."""
    if len(values) < TRIM_FROM:
        return []
    centre = statistics.median(values)
    scale = max(robust_sigma(values) or 0.0, (floor or 0.0) * abs(centre))
    far = _farthest(values)
    return [far] if scale > 0 and abs(values[far] - centre) > OUTLIER_Z * scale else []


def pooled(spreads: Iterable[float | None], calibration_only: bool = False) -> Band:
    """The run's band: the median of the cells' own spreads (cells with several processes)."""
    found = [s for s in spreads if s is not None]
    if not found:
        return Band(None, NONE, 0)
    return Band(statistics.median(found), CALIBRATION if calibration_only else REPEATS,
                len(found))


def step_spread(iqr_ms: Iterable[object], median_ms: Iterable[object]) -> float | None:
    """The relative step-to-step spread of processes, IQR / 1.349 / median (sigma for a normal
    sample), as the median over them; empty or non-finite entries are skipped."""
    spreads = []
    for iqr, median in zip(iqr_ms, median_ms, strict=False):
        iqr_, median_ = finite([iqr]), finite([median])
        if iqr_ and median_ and median_[0] > 0 and iqr_[0] >= 0:
            spreads.append(iqr_[0] / 1.349 / median_[0])
    return statistics.median(spreads) if spreads else None


def estimate(values: Sequence[float], band: Band, floor: float | None = None) -> Estimate | None:
    """A cell's estimate from its per-process values, the run's band and its step spread."""
    values = finite(values)
    if not values:
        return None
    value = statistics.median(values)
    own = own_spread(values)
    candidates = [s for s in (own, band.per_process, floor) if s is not None]
    if own is not None and len(values) >= MIN_OWN:
        source = REPEATS
    elif band.spread is not None:
        source = band.source
    elif own is not None:
        source = REPEATS  # two processes: their spread, weakly
    elif floor is not None or band.step_floor is not None:
        source = WITHIN
    else:
        source = NONE  # unknown noise is unbounded noise: nothing can be claimed from it
    return Estimate(value, max(candidates, default=math.inf), len(values), source)


def cell_estimates(cells: Mapping[K, Sequence[Mapping[str, Any]]], metric: str,
                   ) -> tuple[dict[K, Estimate], Band]:
    """Every cell's estimate of ``metric`` and the run's band, from each cell's ok processes
    (rows with ``metric`` and, where known, ``step_ms_iqr``, ``step_ms_median``,
    ``timed_steps`` and ``calibration``). A cell without a finite value gets no estimate."""
    values = {key: finite(row.get(metric) for row in rows) for key, rows in cells.items()}
    spreads = {key: own_spread(v) for key, v in values.items()}
    band = pooled(spreads.values(), calibration_only=all(
        any(store.truthy(row.get("calibration")) for row in cells[key])
        for key, spread in spreads.items() if spread is not None))
    if metric in TIME_DERIVED:
        rows_ = [row for rows in cells.values() for row in rows]
        band = replace(band, step_floor=step_spread([r.get("step_ms_iqr") for r in rows_],
                                                    [r.get("step_ms_median") for r in rows_]))
    out = {}
    for key, rows in cells.items():
        floor = None
        if metric in TIME_DERIVED:
            floor = step_spread([r.get("step_ms_iqr") for r in rows],
                                [r.get("step_ms_median") for r in rows])
        est = estimate(values[key], band, floor)
        if est is not None:
            out[key] = est
    return out, band


def results_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (results.csv's rows) with store.CELL_NOISE: each cell's samples/s over all its
    ok processes, the same on each of its rows. store.write_csv receives this function (store
    imports nothing from analysis)."""
    import pandas as pd

    frame = frame.copy()
    for column in store.CELL_NOISE:
        frame[column] = None
    if frame.empty:
        return frame
    ok = frame[frame["status"] == "ok"]
    # Search rows too: each is a cell of its own run, and results.csv has always described them.
    cells = {tuple(rows.index): rows.to_dict("records")
             for rows in group_frame(ok, searches=True).values()}
    estimates, _ = cell_estimates(cells, "samples_per_s")
    for index, est in estimates.items():
        spread = own_spread(finite(r["samples_per_s"] for r in cells[index]))
        frame.loc[list(index), list(store.CELL_NOISE)] = [
            est.n, est.value, _finite_or_none(est.error * 100),
            None if spread is None else spread * 100, _finite_or_none(est.spread * 100),
            est.source]
    return frame.astype({c: "object" for c in store.CELL_NOISE}).where(pd.notna(frame), None)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # unknown noise: an empty cell, not inf


def shared(a: Estimate, b: Estimate) -> tuple[Estimate, Estimate]:
    """Two estimates of the same cell on the same machine, one per-process noise between them:
    the larger known spread, so a run of one process inherits the spread that the other side
    (a baseline run with repeats) measured for that very cell."""
    known = [e for e in (a, b) if math.isfinite(e.spread)]
    if not known:
        return a, b
    spread = max(e.spread for e in known)
    source = min((e.source for e in known), key=lambda s: _SOURCE_RANK.get(s, 3))
    return (Estimate(a.value, spread, a.n, source), Estimate(b.value, spread, b.n, source))


def describe(band: Band) -> str:
    """One sentence naming the band a report or the gate used."""
    floor = (f"the run's typical step-to-step spread, {band.step_floor * 100:.1f}%"
             if band.step_floor is not None else "")
    if band.source == NONE or band.spread is None:
        return ("between-process noise not measured (one process per cell, no calibration): "
                + (f"taken as {floor}" if floor else "unknown, so nothing is claimed"))
    what = ("a calibration cell run in several processes" if band.source == CALIBRATION
            else f"the spread across repeats of {band.num_cells} cell(s)")
    per_process = band.per_process or 0.0
    text = f"between-process noise {per_process * 100:.1f}% per process"
    if band.step_floor is not None and band.step_floor > band.spread:
        text += f" ({floor}; {band.spread * 100:.1f}% measured on {what})"
    else:
        text += f", from {what}"
    return text + f"; intervals are {Z:g} standard errors, on the log scale"
