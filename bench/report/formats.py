"""How report.md writes numbers: rates, GiB, three significant digits, percentages, counts,
prices, and changes and ratios with their noise intervals (bold beyond the noise). torch-free."""

from __future__ import annotations

import math
from typing import Any

from bench.analysis import noise


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
    """'-12% ±3%', bold when beyond noise; never '-0%', and a change that rounds to 0% is
    never bold."""
    percent = round((ratio.value - 1) * 100)
    text = f"{percent:+d}%" if percent else "0%"
    bold = ratio.beyond_noise and percent != 0
    return (f"**{text}**" if bold else text) + fmt_width(ratio, 100, "%", 0)


def fmt_ratio(ratio: noise.Ratio) -> str:
    """'1.52x ±0.04', bold when beyond noise (and not 1.00x)."""
    text = f"{ratio.value:.2f}x"
    bold = ratio.beyond_noise and text != "1.00x"
    return (f"**{text}**" if bold else text) + fmt_width(ratio, 1, "", 2)


def fmt_width(ratio: noise.Ratio, scale: float, unit: str, digits: int) -> str:
    """' ±0.04' (the noise interval), or ' (noise unknown)' where none was measured."""
    if not math.isfinite(ratio.half_width):
        return " (noise unknown)"
    return f" ±{ratio.half_width * scale:.{digits}f}{unit}"


def fmt_pct(value: Any) -> str:
    """'12.3%', or 'n/a' for no number."""
    return f"{float(value):.1f}%" if is_num(value) else "n/a"


def fmt_int(value: Any) -> str:
    """A whole number, or '' for no number."""
    return f"{int(value)}" if is_num(value) else ""


def fmt_usd(value: float, error: Any) -> str | None:
    """'$0.123 ±0.004': a price with its noise interval (``error``: relative standard error),
    to the digits the value shows; None where there is no value."""
    if not is_num(value):
        return None
    digits = max(2, 2 - math.floor(math.log10(abs(value)))) if value else 2
    text = f"${value:,.{digits}f}"
    if not is_num(error):
        return text + " (noise unknown)"
    return text + f" ±{noise.Z * float(error) * abs(value):.{digits}f}"
