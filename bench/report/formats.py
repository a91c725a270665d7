"""How report.md writes numbers: rates, GiB, three significant digits, percentages, counts,
prices, and changes and ratios with their noise intervals (bold beyond the noise). torch-free."""

from __future__ import annotations

import math
from typing import Any

from bench.analysis import noise

EXACT = "(exact)"  # every process measured the same: shown instead of an interval


def is_num(value: Any) -> bool:
    """Whether ``value`` is a finite number (a number in a string counts)."""
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def fmt_rate(value: float) -> str:
    """A throughput: '1,234', '12.3', '1.23'."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def fmt_gib(value: float) -> str:
    """A memory size in GiB: '12.3', '1.23'."""
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def fmt_sig(value: float) -> str:
    """Three significant digits, trailing zeros kept so a column reads evenly (0.300, 12.0)."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:#.3g}"


def fmt_change(ratio: noise.Ratio) -> str:
    """'-12% [-15% to -9%]': a change with its interval, bold when beyond noise; to the digits
    that show the interval (a memory change a hundredth of a percent wide reads '-5.91%
    [-5.93% to -5.89%]', not '±0%'); ``EXACT`` where every repeated process measured the same;
    never '-0%', and a change that rounds to 0% is never bold."""
    digits = _digits((ratio.high - ratio.low) * 100) if ratio.known and ratio.error else 0
    percent = round((ratio.value - 1) * 100, digits)
    text = f"{percent:+.{digits}f}%" if percent else "0%"
    bold = ratio.beyond_noise and percent != 0
    text = f"**{text}**" if bold else text
    if not ratio.known:
        return text + " (noise unknown)"
    if ratio.error == 0:
        return text + f" {_no_spread(ratio)}"
    low, high = ((end - 1) * 100 for end in (ratio.low, ratio.high))
    return text + f" [{low:+.{digits}f}% to {high:+.{digits}f}%]"


def fmt_ratio(ratio: noise.Ratio) -> str:
    """'1.13x [0.71–1.80]': a ratio with its log-scale interval (never below zero), bold when
    beyond noise (and not 1.00x)."""
    text = f"{ratio.value:.2f}x"
    bold = ratio.beyond_noise and text != "1.00x"
    return (f"**{text}**" if bold else text) + fmt_range(ratio)


def fmt_range(ratio: noise.Ratio) -> str:
    """' [0.71–1.80]' (the ratio's interval), ``EXACT`` with no spread, or ' (noise unknown)'
    where none was measured."""
    if not ratio.known:
        return " (noise unknown)"
    if ratio.error == 0:
        return f" {_no_spread(ratio)}"
    digits = max(2, _digits(ratio.high - ratio.low))
    return f" [{ratio.low:.{digits}f}–{ratio.high:.{digits}f}]"


def _no_spread(ratio: noise.Ratio) -> str:
    """Why a ratio has no interval: its processes agreed exactly, or (one process) its steps
    did and nothing else was measured."""
    return EXACT if ratio.source in (noise.REPEATS, noise.CALIBRATION) else "(no spread measured)"


def _digits(width: float) -> int:
    """Decimals that show an interval ``width`` wide: 0 from 2 units, 1 from 0.2, else 2."""
    return 0 if width >= 2 else 1 if width >= 0.2 else 2


def fmt_pct(value: Any) -> str:
    """'12.3%', or 'n/a' for no number."""
    return f"{float(value):.1f}%" if is_num(value) else "n/a"


def fmt_int(value: Any) -> str:
    """A whole number, or '' for no number."""
    return f"{int(value)}" if is_num(value) else ""


def fmt_usd(value: float, error: Any) -> str | None:
    """'$0.123 [0.119–0.127]': a price with its noise interval (``error``: its relative
    standard error; the interval on the log scale, as every interval of the report),
    to the digits the value shows; None where there is no value."""
    if not is_num(value):
        return None
    digits = max(2, 2 - math.floor(math.log10(abs(value)))) if value else 2
    text = f"${value:,.{digits}f}"
    if not is_num(error):
        return text + " (noise unknown)"
    price = noise.Ratio(float(value), float(error), noise.NONE)
    return text + f" [{price.low:,.{digits}f}–{price.high:,.{digits}f}]"
