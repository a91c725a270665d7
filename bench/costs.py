"""What a run's measurements cost: its prices, and the cost columns derived into results.csv.

A run may be given ``--price-per-hour`` (USD per device-hour) and ``--price-per-kwh``; they are
kept in meta.json, so that results.csv (bench/store.py) and a later report price the run the
same way. torch-free.
"""

from __future__ import annotations

import math
from typing import Any

from bench import BadInput
from bench.readers import parse_number

PRICES = ("price_per_hour", "price_per_kwh")  # as meta.json keeps them
# Derived into results.csv only when the run has a price: an empty column would read as "cost
# not measured", and a run without one keeps the columns it always had. ``usd_per_1m_samples``
# is the cell's (from ``cell_samples_per_s``, the same on each of its rows) with that value's
# relative standard error; ``energy_usd_per_1m_samples`` is the row's own measured energy.
COST = ("usd_per_1m_samples", "usd_per_1m_samples_err_pct", "energy_usd_per_1m_samples")


def check_price(value: Any, name: str) -> float:
    """``value`` as a price in USD (a finite number above 0), or BadInput naming ``name``."""
    number = parse_number(value) if not isinstance(value, str) or value.strip() else None
    if number is None or not math.isfinite(number) or number <= 0:
        raise BadInput(f"{name}: expected a price in USD above 0, got '{value}'")
    return number


def prices(meta: dict[str, Any], given: dict[str, Any] | None = None,
           source: str = "meta.json") -> dict[str, float]:
    """The PRICES that ``meta`` (a run's meta.json, named ``source`` in messages) records, each
    replaced by the one in ``given`` (a flag's value, None where not given), all checked:
    BadInput naming the damaged one."""
    given = {key: value for key, value in (given or {}).items() if value is not None}
    found = {key: check_price(meta[key], f"{source} {key}") for key in PRICES
             if key not in given and meta.get(key) is not None}
    found.update({key: check_price(value, f"--{key.replace('_', '-')}")
                  for key, value in given.items()})
    return found


def usd_per_1m_samples(price_per_hour: float, world_size: Any, samples_per_s: Any) -> float:
    """What a million samples cost on ``world_size`` devices at ``price_per_hour`` each."""
    rate, devices = parse_number(samples_per_s), parse_number(world_size)
    devices = devices if devices is not None and math.isfinite(devices) else 1.0
    if rate is None or not rate > 0 or not math.isfinite(rate):
        return math.nan
    return price_per_hour * devices / 3600.0 / rate * 1e6


def energy_usd_per_1m_samples(price_per_kwh: float, joules_per_sample: Any) -> float:
    """The measured energy of a million samples at ``price_per_kwh`` (NaN where unmeasured)."""
    joules = parse_number(joules_per_sample)
    if joules is None or not math.isfinite(joules) or joules < 0:
        return math.nan
    return price_per_kwh * joules * 1e6 / 3.6e6


def with_costs(frame: Any, meta: dict[str, Any]) -> Any:
    """``frame`` (results.csv's rows, with the cell columns) with the COST columns the run's
    prices allow (none without a price)."""
    given = prices(meta)
    frame = frame.copy()
    if "price_per_hour" in given:
        frame["usd_per_1m_samples"] = [
            _finite_or_none(usd_per_1m_samples(given["price_per_hour"], ws, sps))
            for ws, sps in zip(frame["world_size"], frame["cell_samples_per_s"], strict=True)]
        # Cost is inversely proportional to throughput: the same relative error.
        frame["usd_per_1m_samples_err_pct"] = frame["cell_samples_per_s_err_pct"].where(
            frame["usd_per_1m_samples"].notna(), None)
    if "price_per_kwh" in given:
        frame["energy_usd_per_1m_samples"] = [
            _finite_or_none(energy_usd_per_1m_samples(given["price_per_kwh"], j))
            for j in frame["joules_per_sample"]]
    return frame


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # unmeasured: an empty cell, not NaN
