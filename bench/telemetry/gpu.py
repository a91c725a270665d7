"""What every GPU monitoring library gives the monitor: a reader interface, one sample, the
clock-event (throttle) reasons and their shares of a window. torch-free, vendor-free.

A vendor module (bench/telemetry/nvml.py, bench/telemetry/amd.py) subclasses ``GpuReader`` and
wraps its library in a ``Backend``; bench/telemetry/monitor.py picks the backend and samples
through it. Both vendors report throttling as NVML's clock-event reason bits (``REASON_BITS``):
amdsmi's violation status is mapped onto them, so ``throttled`` and ``power_capped`` mean the
same on either.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

# Power, SM clock and clock-event reasons are read every sample; memory clock, temperature and
# utilization (itself NVML's average over 1/6-1 s) change slowly and are read every 4th:
# 3.75 NVML calls per sample instead of 6, each of which costs the sampler 0.1-1 ms.
SLOW_EVERY = 4

# Clock-event (throttle) reason bits, from nvml.h (nvmlClocksEventReason*, formerly
# nvmlClocksThrottleReason*): a stable ABI, so older bindings decode the same way.
REASON_BITS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
    0x8000000000000000: "unknown",
}
# Heat or a hardware signal (an external power brake, a power supply in trouble) slowed the GPU
# below what the board can do: the cell's numbers understate the device (``throttled``).
SLOWDOWN = frozenset({"hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown",
                      "sw_thermal_slowdown"})
# The driver holding the clocks to the power limit: routine under heavy matmul load on an H100
# SXM, the board working at its rated power, so it is recorded apart (``power_capped``).
POWER_CAP = frozenset({"sw_power_cap"})
SHARED_GPU = "shared_gpu"  # power_scope of a MIG instance's cell


def decode_reasons(mask: int) -> list[str]:
    """Names of the clock-event reason bits set in ``mask``, lowest bit first."""
    names = [name for bit, name in REASON_BITS.items() if mask & bit]
    rest = mask & ~sum(REASON_BITS)
    if rest:
        names.append(f"bits_{rest:#x}")
    return names


def is_throttled(reasons: Iterable[str]) -> bool:
    """True when heat or a hardware slowdown held the clocks down (the power cap is not)."""
    return not SLOWDOWN.isdisjoint(reasons)


def is_power_capped(reasons: Iterable[str]) -> bool:
    """True when the driver held the clocks to the power limit."""
    return not POWER_CAP.isdisjoint(reasons)


def bit_order(names: Iterable[str]) -> list[str]:
    """Reason names without repeats, in the order of their bits (unknown ones last)."""
    order = list(REASON_BITS.values())
    return sorted(set(names), key=lambda n: (order.index(n) if n in order else len(order), n))


def reason_shares(masks: Sequence[int]) -> dict[str, float]:
    """Each reason's share of the samples whose clock-event bitmasks are ``masks``."""
    counts = Counter(name for mask in masks for name in decode_reasons(mask))
    return {name: counts[name] / len(masks) for name in bit_order(counts)}


def format_shares(shares: dict[str, float]) -> str:
    """Shares as the record holds them: "sw_power_cap:0.82;hw_thermal_slowdown:0.05"."""
    return ";".join(f"{name}:{share:.2f}" for name, share in shares.items())


def parse_shares(text: str | None) -> dict[str, float]:
    """The inverse of ``format_shares``."""
    items = (item.rpartition(":") for item in (text or "").split(";") if item)
    return {name: float(share) for name, _, share in items}


def as_text(value: Any) -> str:
    """A library's message as text (NVML's bindings give bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Sample:
    """One reading of the GPU; a field is None where this board does not report it."""

    t_s: float
    power_w: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    temp_c: float | None = None
    gpu_util_pct: float | None = None
    reasons: int | None = None


class GpuReader:
    """One GPU's readers, chosen once for what its driver and board support; a vendor's
    subclass sets them and says which of its library's errors mean "not supported here"."""

    power_source: str | None = None  # "instant" or "average" (a ~1 s moving average)
    shared = False  # the readings are a whole GPU's, shared with other partitions of it
    has_counter = False  # an energy counter (energy_mj) is readable
    read_power: Callable[[], float] | None = None
    read_reasons: Callable[[], int] | None = None  # clock-event bits (REASON_BITS)
    fast: dict[str, Callable[[], float]]  # Sample fields read every sample
    slow: dict[str, Callable[[], float]]  # and every SLOW_EVERY-th

    def _not_supported(self, exc: Exception) -> bool:
        """Whether ``exc`` means this board, driver or user cannot have the reading."""
        raise NotImplementedError

    def energy_mj(self) -> float:
        """The energy counter: millijoules since some fixed point."""
        raise NotImplementedError

    def _works(self, fn: Callable[[], Any]) -> bool:
        """Whether a query is supported here; other errors (a lost GPU) propagate."""
        try:
            fn()
            return True
        except (AttributeError, KeyError):  # bindings too old to have the function or field
            return False
        except Exception as exc:
            if self._not_supported(exc):
                return False
            raise

    def _supported(self, readers: dict[str, Callable[[], float]]) -> dict[str, Callable[[], float]]:
        return {name: fn for name, fn in readers.items() if self._works(fn)}

    def sample(self, full: bool = True) -> Sample:
        """Read what this GPU supports (``full=False``: not the slow-changing readings).

        A library error here propagates: the window failed.
        """
        # Power first, right after its timestamp: the energy integral pairs the two.
        t_s = time.perf_counter()
        power_w = self.read_power() if self.read_power else None
        reasons = int(self.read_reasons()) if self.read_reasons else None
        readers = {**self.fast, **self.slow} if full else self.fast
        values = {name: float(fn()) for name, fn in readers.items()}
        return Sample(t_s, power_w=power_w, reasons=reasons, **values)


@dataclass(frozen=True)
class Backend:
    """A vendor's monitoring library: its name in messages, how to open and close it, and its
    reader of one GPU (by index or by the UUID torch prints)."""

    name: str
    open: Callable[[], ModuleType]  # raises RuntimeError saying why the library is absent
    close: Callable[[ModuleType], None]
    gpu: Callable[[ModuleType, int | str], GpuReader]
