"""The gate's checks: ``METRIC:[+|-]THRESHOLD[%]`` parsed, the metrics' directions, a verdict.

``--check METRIC:[+|-]THRESHOLD[%]`` (repeatable; replaces the defaults): ``-`` means a drop is
the regression, ``+`` a rise; without a sign the metric's usual direction is used; ``%`` makes
the threshold relative to the baseline, without it the threshold is in the metric's unit.
Defaults: ``samples_per_s:-5% step_ms_median:+5% peak_mem_reserved_gib:+5% joules_per_sample:+5%``.

A check fails only when the change is beyond its threshold in the bad direction AND its
``noise.Z``-sigma interval excludes no change (a relative change's interval is the ratio's, on
the log scale, as everywhere in ampbench); when a change of the threshold's size would not be
beyond that noise, it could not have been seen: the check is ``too noisy``. Unknown noise is
unbounded: such a check is too noisy. torch-free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from bench import BadInput
from bench.analysis import noise

DEFAULT_CHECKS = ("samples_per_s:-5%", "step_ms_median:+5%", "peak_mem_reserved_gib:+5%",
                  "joules_per_sample:+5%")

# Metrics a check may name: numeric measurements of results.csv.
CHECKABLE = (
    "step_ms_median", "step_ms_iqr", "step_ms_min", "samples_per_s", "tokens_per_s", "startup_s",
    "peak_mem_allocated_gib", "peak_mem_reserved_gib", "peak_rss_gib",
    "flops_per_step", "achieved_tflops", "mfu_pct",
    "power_avg_w", "power_max_w", "energy_j", "joules_per_sample", "sm_clock_mhz_avg",
    "temp_max_c", "loss_last", "nonfinite_steps", "scaler_skipped_steps",
)
HIGHER_IS_BETTER = frozenset({"samples_per_s", "tokens_per_s", "achieved_tflops", "mfu_pct",
                              "sm_clock_mhz_avg"})
# Every ok cell measures these: a baseline without them is damaged, a current run lost them.
ALWAYS = ("step_ms_median", "step_ms_iqr", "samples_per_s")
# CUDA memory columns are empty on CPU, where the child's peak RSS is the measure.
FALLBACK = {"peak_mem_reserved_gib": "peak_rss_gib", "peak_mem_allocated_gib": "peak_rss_gib"}

PASS, FAIL, WARN, NOISY = "pass", "FAIL", "warn", "too noisy"

_CHECK_RE = re.compile(r"^\s*([a-z_]+)\s*:\s*([+-]?)\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*$")


@dataclass(frozen=True)
class Check:
    """A regression check such as ``samples_per_s:-5%`` (a drop of more than 5% fails)."""

    metric: str
    threshold: float
    worse: int  # +1: a rise is a regression; -1: a drop is
    percent: bool = True

    @classmethod
    def parse(cls, text: str) -> Check:
        """Parse ``METRIC:[+|-]THRESHOLD[%]``; a bad expression raises BadInput."""
        match = _CHECK_RE.match(text)
        if not match:
            raise BadInput(f"check '{text}' is not METRIC:[+|-]THRESHOLD[%] "
                           f"(e.g. samples_per_s:-5% or peak_rss_gib:+0.5)")
        metric, sign, number, percent = match.groups()
        if metric not in CHECKABLE:
            raise BadInput(f"check '{text}': unknown metric '{metric}'; "
                           f"valid: {', '.join(CHECKABLE)}")
        usual = -1 if metric in HIGHER_IS_BETTER else 1
        worse = {"+": 1, "-": -1}.get(sign, usual)
        return cls(metric, float(number), worse, bool(percent))

    def __str__(self) -> str:
        sign = "+" if self.worse > 0 else "-"
        return f"{self.metric}:{sign}{self.threshold:g}{'%' if self.percent else ''}"

    def change(self, baseline: float, current: float) -> float:
        """Current minus baseline: in percent of the baseline, or in the metric's unit."""
        if not self.percent:
            return current - baseline
        if baseline == 0:
            return 0.0 if current == 0 else math.copysign(math.inf, current)
        return (current - baseline) / abs(baseline) * 100.0

    def judge(self, baseline: noise.Estimate, current: noise.Estimate) -> str:
        """PASS, FAIL (beyond the threshold and beyond the noise of both sides) or NOISY (no
        regression seen, but the noise is too wide to have seen one of the threshold's size)."""
        change = self.change(baseline.value, current.value)
        low, high = self.interval(baseline, current)
        beyond = low > 0 if self.worse > 0 else high < 0  # the interval excludes no change
        if change * self.worse > self.threshold and beyond:
            return FAIL
        if not self.resolves(baseline, current):
            return NOISY
        return PASS

    def interval(self, baseline: noise.Estimate, current: noise.Estimate) -> tuple[float, float]:
        """The ``noise.Z``-sigma interval of ``change``: for a relative check the ratio's, on
        the log scale (a drop is never shown below -100%), else ``change`` ± Z sigma."""
        change = self.change(baseline.value, current.value)
        error = math.hypot(baseline.error, current.error)
        if self.percent and baseline.value and current.value / baseline.value > 0:
            ratio = noise.Ratio(current.value / baseline.value, error, noise.NONE)
            return (ratio.low - 1) * 100.0, (ratio.high - 1) * 100.0
        width = noise.Z * self.sigma(baseline, current)
        return change - width, change + width

    def resolves(self, baseline: noise.Estimate, current: noise.Estimate) -> bool:
        """Whether a change of the threshold's size would be beyond the noise."""
        if not self.percent:
            return noise.Z * self.sigma(baseline, current) <= self.threshold
        error = math.hypot(baseline.error, current.error)
        step = 1 + self.worse * self.threshold / 100.0  # the ratio at the threshold
        return step <= 0 or noise.Z * error <= abs(math.log(step))

    def sigma(self, baseline: noise.Estimate, current: noise.Estimate) -> float:
        """The standard error of ``change``, in its unit (percent or the metric's)."""
        if self.percent:
            return math.hypot(baseline.error, current.error) * 100.0
        return math.hypot(baseline.error * baseline.value, current.error * current.value)

    def fails(self, baseline: noise.Estimate, current: noise.Estimate) -> bool:
        """A regression: beyond the threshold and beyond the noise of both sides."""
        return self.judge(baseline, current) == FAIL


def parse_checks(texts: Iterable[str] | None) -> list[Check]:
    """The checks given on the command line, or the defaults when none were."""
    return [Check.parse(text) for text in (texts or DEFAULT_CHECKS)]
