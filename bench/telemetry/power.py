"""GPU power, energy, clocks and throttling in a timed window: NVML, amdsmi on AMD (torch-free).

Used by the cell (bench/cell/main.py):

    monitor = PowerMonitor(device_index, interval_ms=50.0)
    monitor.measure_idle()          # just before the cell's timed window
    with monitor:                   # sampler thread runs for the timed window
        ...timed steps...
    fields = monitor.fields(num_samples)   # the POWER fields of the record schema

What is read. A daemon thread samples every ``interval_ms``: power (``NVML_FI_DEV_POWER_INSTANT``
through ``nvmlDeviceGetFieldValues`` where the driver has it, else ``nvmlDeviceGetPowerUsage``,
a ~1 s moving average on Ampere and newer; ``power_source`` records which), SM clock and
clock-event (throttle) reasons; every 4th sample also memory clock, temperature and
utilization. One full sample is also taken synchronously at each end of the window, so the
samples span the whole window.

Energy. ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver loaded) is read at both
ends; its delta is the energy (``energy_source=counter``), cross-checked against the
trapezoid integral of the sampled power (``energy_check_pct``, sampled vs counter). The
counter ticks every ~20-100 ms, so a short window would see a quantised or zero delta. We do
NOT extend the window to wait for a tick: by then the GPU has finished the window's work, and
the extension would add idle energy to the window's joules. Instead, a window shorter than
``min_counter_window_s`` (1 s: at most ~10% quantisation at the slowest tick) uses the sampled
integral (``energy_source=sampled``) when power is instantaneous; with only averaged power a
short window's energy is left empty (``energy_source=none``) with a warning saying why. A
counter that did not move is never reported as 0 J.

Clock-event reasons. ``throttle_reasons`` names every reason seen in the window and
``throttle_shares`` each one's share of the window's samples ("sw_power_cap:0.82;
hw_thermal_slowdown:0.05"). ``power_capped``: the driver held the clocks to the power limit
(``sw_power_cap``), routine for an H100 SXM under heavy matmul load, the board at its rated
power. ``throttled``: heat or a hardware signal slowed the GPU (thermal, hardware or power-brake
slowdown), which makes the cell's numbers understate the device.

MIG. A MIG instance (UUID ``MIG-...``) answers none of NVML's power, energy, clock or
throttle queries: they are read from its parent GPU and are the whole GPU's, shared by every
instance on it. Such a cell says so (``power_scope=shared_gpu``, else ``gpu``) and in one
warning, and leaves ``joules_per_sample`` empty: the GPU's energy cannot be split between the
instances.

AMD GPUs. Under a ROCm build of torch the same monitor reads the GPU through amdsmi, AMD's own
library (bench/telemetry/amd.py): same
fields, sources and fallbacks, its violation status decoded to the
clock-event reasons above.

Without NVML (no driver, no library) or when an NVML call fails inside the window, the cell
goes on: every field is empty, ``energy_source`` is ``none``, and one warning is logged per
process. A CPU cell (``device_index=None``) has nothing to sample and logs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial, reduce
from itertools import count, pairwise
from types import ModuleType, TracebackType
from typing import Any

from bench import BadInput
from bench.store import POWER

log = logging.getLogger(__name__)

MIN_COUNTER_WINDOW_S = 1.0
# nvmlDeviceGetPowerUsage averages over ~1 s: integrating it is fair only over windows much
# longer than that (the lag at each end is then a small part of the window).
MIN_AVERAGED_POWER_WINDOW_S = 5.0
# Counter and sampled integral of instantaneous power agree within a few percent on a healthy
# board; beyond this one of them is not measuring what we think.
CHECK_WARN_PCT = 10.0
IDLE_S = 0.25
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

# NVML answers that mean "this board, driver or user cannot have this reading": the field
# stays empty. Any other error (GPU lost, driver gone) fails the window instead.
_UNSUPPORTED = (
    "NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND", "NVML_ERROR_NO_PERMISSION",
    "NVML_ERROR_INVALID_ARGUMENT", "NVML_ERROR_NOT_FOUND",
)

_warned: set[str] = set()


def _warn_once(message: str, kind: str = "nvml") -> None:
    """Log ``message`` the first time this process has a warning of this ``kind``."""
    if kind not in _warned:
        _warned.add(kind)
        log.warning(message)


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


def _bit_order(names: Iterable[str]) -> list[str]:
    order = list(REASON_BITS.values())
    return sorted(set(names), key=lambda n: (order.index(n) if n in order else len(order), n))


def reason_shares(masks: Sequence[int]) -> dict[str, float]:
    """Each reason's share of the samples whose clock-event bitmasks are ``masks``."""
    counts = Counter(name for mask in masks for name in decode_reasons(mask))
    return {name: counts[name] / len(masks) for name in _bit_order(counts)}


def format_shares(shares: dict[str, float]) -> str:
    """Shares as the record holds them: "sw_power_cap:0.82;hw_thermal_slowdown:0.05"."""
    return ";".join(f"{name}:{share:.2f}" for name, share in shares.items())


def parse_shares(text: str | None) -> dict[str, float]:
    """The inverse of ``format_shares``."""
    items = (item.rpartition(":") for item in (text or "").split(";") if item)
    return {name: float(share) for name, _, share in items}


def _handle_by_uuid(nvml: ModuleType, uuid: str) -> Any:
    """NVML's handle for a UUID as torch prints it: bare, where NVML wants "GPU-" or, for a MIG
    instance, "MIG-" before it."""
    uuid = uuid.strip()
    if uuid.startswith(("GPU-", "MIG-")):
        return nvml.nvmlDeviceGetHandleByUUID(uuid)
    try:
        return nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    except nvml.NVMLError as not_a_gpu:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(f"MIG-{uuid}")
        except nvml.NVMLError:
            raise not_a_gpu from None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_nvml() -> ModuleType:
    """``pynvml`` after ``nvmlInit()``; raises RuntimeError with the reason when NVML is absent."""
    try:
        import pynvml
    except ImportError as exc:
        raise RuntimeError(f"nvidia-ml-py is not installed ({exc})") from None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError, or OSError from a broken library: both mean "none"
        raise RuntimeError(_text(exc) or type(exc).__name__) from None
    return pynvml


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


class _Gpu(GpuReader):
    """One GPU's NVML readers, chosen once for what this driver and board support."""

    def __init__(self, nvml: ModuleType, device: int | str) -> None:
        self.nvml = nvml
        self._unsupported = {
            getattr(nvml, name) for name in _UNSUPPORTED if hasattr(nvml, name)
        }
        if isinstance(device, str):
            handle = _handle_by_uuid(nvml, device)
        else:
            handle = nvml.nvmlDeviceGetHandleByIndex(device)
        # A MIG instance's handle answers no power, energy, clock or throttle query: those are
        # its parent GPU's, shared by every instance on it.
        is_mig = self._query("nvmlDeviceIsMigDeviceHandle", handle)
        is_mig = bool(getattr(is_mig, "value", is_mig))  # pynvml returns a c_uint
        if is_mig:
            handle = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        self.handle = handle
        mode = self._query("nvmlDeviceGetMigMode", handle)  # [current, pending]
        mig_mode = bool(mode) and mode[0] == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1)
        self.shared = is_mig or mig_mode
        self.power_source: str | None = None
        self.read_power = self._pick_power()
        self.read_reasons = self._pick_reasons()
        fast: dict[str, Callable[[], float]] = {
            "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(self.handle, nvml.NVML_CLOCK_SM),
        }
        slow: dict[str, Callable[[], float]] = {
            "mem_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(
                self.handle, nvml.NVML_CLOCK_MEM),
            "temp_c": lambda: nvml.nvmlDeviceGetTemperature(
                self.handle, nvml.NVML_TEMPERATURE_GPU),
            "gpu_util_pct": lambda: nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu,
        }
        self.fast = self._supported(fast)
        self.slow = self._supported(slow)
        self.has_counter = self._works(self.energy_mj)

    def _not_supported(self, exc: Exception) -> bool:
        return isinstance(exc, self.nvml.NVMLError) and exc.value in self._unsupported

    def _query(self, name: str, *args: Any) -> Any:
        """NVML function ``name``'s answer; None where the bindings or the board lack it."""
        fn = getattr(self.nvml, name, None)
        if fn is None:
            return None
        try:
            return fn(*args)
        except self.nvml.NVMLError as exc:
            if self._not_supported(exc):
                return None
            raise

    def _pick_power(self) -> Callable[[], float] | None:
        nvml = self.nvml

        def instant() -> float:
            value = nvml.nvmlDeviceGetFieldValues(self.handle, [nvml.NVML_FI_DEV_POWER_INSTANT])[0]
            if value.nvmlReturn != nvml.NVML_SUCCESS:  # e.g. a driver without this field
                raise nvml.NVMLError(nvml.NVML_ERROR_NOT_SUPPORTED)
            return _field_value(nvml, value) / 1e3  # mW

        def average() -> float:
            return nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3  # mW, ~1 s average

        if hasattr(nvml, "NVML_FI_DEV_POWER_INSTANT") and self._works(instant):
            self.power_source = "instant"
            return instant
        if self._works(average):
            self.power_source = "average"
            return average
        return None

    def _pick_reasons(self) -> Callable[[], int] | None:
        # The "clocks event" names replaced "throttle" in newer NVML; old bindings or drivers
        # only have the latter (AttributeError / NVML_ERROR_FUNCTION_NOT_FOUND).
        for name in ("nvmlDeviceGetCurrentClocksEventReasons",
                     "nvmlDeviceGetCurrentClocksThrottleReasons"):
            fn = getattr(self.nvml, name, None)
            if fn is not None and self._works(partial(fn, self.handle)):
                return partial(fn, self.handle)
        return None

    def energy_mj(self) -> int:
        return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))


@dataclass(frozen=True)
class Backend:
    """A vendor's monitoring library: its name in messages, how to open and close it, and its
    reader of one GPU (by index or by the UUID torch prints)."""

    name: str
    open: Callable[[], ModuleType]  # raises RuntimeError saying why the library is absent
    close: Callable[[ModuleType], None]
    gpu: Callable[[ModuleType, int | str], GpuReader]


NVML = Backend("NVML", open_nvml, lambda nvml: nvml.nvmlShutdown(), _Gpu)


def backend() -> Backend:
    """amdsmi (bench/telemetry/amd.py) under a ROCm build of torch, else NVML.

    torch is not imported for this (the module stays torch-free): a cell has imported it
    before it measures anything, and a process without torch has no GPU of its own to read.
    """
    torch = sys.modules.get("torch")
    if getattr(getattr(torch, "version", None), "hip", None):
        from bench.telemetry.amd import AMDSMI

        return AMDSMI
    return NVML


def _field_value(nvml: ModuleType, value: Any) -> float:
    """The number in an nvmlFieldValue_t, whatever its value type."""
    attr = {
        nvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
        nvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
        nvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
        nvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
        nvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
        nvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
    }.get(value.valueType, "uiVal")
    return float(getattr(value.value, attr))


def _trapezoid_j(points: Sequence[tuple[float, float]]) -> float:
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in pairwise(points))


def empty_fields() -> dict[str, Any]:
    """The power fields of a cell that had nothing to measure."""
    fields: dict[str, Any] = dict.fromkeys(POWER)
    fields["energy_source"] = "none"
    return fields


def window_fields(
    samples: Sequence[Sample],
    *,
    window_s: float,
    counter_j: float | None,
    power_source: str | None,
    idle_power_w: float | None,
    num_samples: int,
    min_counter_window_s: float = MIN_COUNTER_WINDOW_S,
    shared: bool = False,
) -> dict[str, Any]:
    """The record's power fields from a window's samples and its energy-counter delta;
    ``shared``: the GPU's power is shared by MIG instances (no joules per sample)."""
    fields = empty_fields()
    fields["power_scope"] = SHARED_GPU if shared else "gpu"
    fields["power_source"] = power_source
    fields["idle_power_w"] = idle_power_w
    power = [(s.t_s, s.power_w) for s in samples if s.power_w is not None]
    sampled_j = None
    if power:
        span = power[-1][0] - power[0][0]
        sampled_j = _trapezoid_j(power) if span > 0 else None
        # Time-weighted: the boundary samples are closer together than the thread's period.
        fields["power_avg_w"] = (
            sampled_j / span if sampled_j is not None else statistics.fmean(p for _, p in power)
        )
        fields["power_max_w"] = max(p for _, p in power)

    counter_ok = counter_j is not None and counter_j > 0 and window_s >= min_counter_window_s
    sampled_ok = bool(sampled_j) and (
        power_source == "instant" or window_s >= MIN_AVERAGED_POWER_WINDOW_S
    )
    if counter_ok:
        fields["energy_j"], fields["energy_source"] = counter_j, "counter"
        if sampled_ok:
            check = 100.0 * (sampled_j - counter_j) / counter_j
            fields["energy_check_pct"] = check
            if abs(check) > CHECK_WARN_PCT:
                log.warning("energy: sampled power integrates to %.1f J but the energy counter "
                            "says %.1f J (%+.1f%%); keeping the counter", sampled_j, counter_j,
                            check)
    elif sampled_ok:
        fields["energy_j"], fields["energy_source"] = sampled_j, "sampled"
    else:
        why = []
        if counter_j is None:
            why.append("no energy counter")
        elif window_s < min_counter_window_s:
            why.append(f"the energy counter needs a window of {min_counter_window_s:g} s")
        else:
            why.append("the energy counter did not advance")
        if sampled_j is None:
            why.append("no power samples")
        elif not sampled_ok:
            why.append(f"~1 s averaged power is too coarse under {MIN_AVERAGED_POWER_WINDOW_S:g} s")
        log.warning("energy: left empty for this %.2f s window (%s); run more --steps",
                    window_s, "; ".join(why))
    if fields["energy_j"] is not None and num_samples > 0 and not shared:
        fields["joules_per_sample"] = fields["energy_j"] / num_samples

    clocks = [s.sm_clock_mhz for s in samples if s.sm_clock_mhz is not None]
    temps = [s.temp_c for s in samples if s.temp_c is not None]
    masks = [s.reasons for s in samples if s.reasons is not None]
    fields["sm_clock_mhz_avg"] = statistics.fmean(clocks) if clocks else None
    fields["temp_max_c"] = max(temps) if temps else None
    if masks:
        fields["throttle_reasons"] = decode_reasons(reduce(operator.or_, masks))
        fields["throttle_shares"] = format_shares(reason_shares(masks))
        fields["throttled"] = is_throttled(fields["throttle_reasons"])
        fields["power_capped"] = is_power_capped(fields["throttle_reasons"])
    return fields


_SOURCE_ORDER = ("none", "sampled", "counter")  # weakest first


def combine_power(per_gpu: Sequence[dict[str, Any]], num_samples: int) -> dict[str, Any]:
    """The power fields of a multi-GPU job from each GPU's: power and energy summed, the
    weakest energy source, the worst counter check, clocks averaged, every throttle reason
    with its largest share on any GPU (a data-parallel step waits for the slowest).

    ``power_max_w`` is the sum of each GPU's maximum, an upper bound of the job's peak.
    A sum is empty when any GPU's part is (a partial sum would understate the job), or when a
    part is a MIG instance's (instances can share one GPU, which would be counted twice).
    """
    def total(field: str) -> float | None:
        values = [f[field] for f in per_gpu]
        return None if None in values else sum(values)

    fields = empty_fields()
    scopes = {f["power_scope"] for f in per_gpu}
    shared = SHARED_GPU in scopes
    fields["power_scope"] = SHARED_GPU if shared else "gpu" if "gpu" in scopes else None
    for field in ("power_avg_w", "power_max_w", "idle_power_w", "energy_j"):
        fields[field] = None if shared else total(field)
    sources = {"none" if shared else f["energy_source"] or "none" for f in per_gpu}
    fields["energy_source"] = min(sources, key=_SOURCE_ORDER.index)
    if fields["energy_source"] == "none":
        fields["energy_j"] = None
    power_sources = {f["power_source"] for f in per_gpu}
    fields["power_source"] = power_sources.pop() if len(power_sources) == 1 else "mixed"
    checks = [f["energy_check_pct"] for f in per_gpu if f["energy_check_pct"] is not None]
    fields["energy_check_pct"] = max(checks, key=abs) if checks else None
    if fields["energy_j"] is not None and num_samples > 0:
        fields["joules_per_sample"] = fields["energy_j"] / num_samples
    clocks = [f["sm_clock_mhz_avg"] for f in per_gpu if f["sm_clock_mhz_avg"] is not None]
    fields["sm_clock_mhz_avg"] = statistics.fmean(clocks) if clocks else None
    temps = [f["temp_max_c"] for f in per_gpu if f["temp_max_c"] is not None]
    fields["temp_max_c"] = max(temps) if temps else None
    reasons = [f["throttle_reasons"] for f in per_gpu if f["throttle_reasons"] is not None]
    if reasons:
        fields["throttle_reasons"] = _bit_order(name for names in reasons for name in names)
        shares = [parse_shares(f["throttle_shares"]) for f in per_gpu]
        fields["throttle_shares"] = format_shares({
            name: max(s.get(name, 0.0) for s in shares) for name in fields["throttle_reasons"]})
        fields["throttled"] = is_throttled(fields["throttle_reasons"])
        fields["power_capped"] = is_power_capped(fields["throttle_reasons"])
    return fields


class PowerMonitor:
    """Samples one GPU through NVML (amdsmi under a ROCm build of torch) while the timed
    window runs.

    ``device_index`` is the library's index of the GPU, or its UUID (what
    ``torch.cuda.get_device_properties(d).uuid`` prints), which stays right under
    CUDA_VISIBLE_DEVICES and CUDA's own device order; None for a CPU cell.
    """

    def __init__(
        self,
        device_index: int | str | None,
        interval_ms: float = 50.0,
        *,
        min_counter_window_s: float = MIN_COUNTER_WINDOW_S,
    ) -> None:
        if not interval_ms > 0:
            raise BadInput(f"power sampling interval must be above 0 ms, got {interval_ms}")
        self.device_index = device_index
        self.interval_ms = interval_ms
        self.min_counter_window_s = min_counter_window_s
        self.idle_power_w: float | None = None
        self.samples: list[Sample] = []
        self._gpu: GpuReader | None = None
        self._backend = NVML
        self._library: ModuleType | None = None
        self._power_source: str | None = None
        self._shared = False  # a MIG instance: the power is its whole GPU's
        self._problem: str | None = None  # why this monitor has nothing to report
        self._window_s = 0.0
        self._counter_j: float | None = None
        self._e0_mj: float | None = None
        self._t0 = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # CPU seconds the sampler thread itself used in the last window: its cost to the
        # process, which shares the GIL and the cores with the training loop.
        self.sampler_cpu_s: float | None = None

    # -- library lifetime ---------------------------------------------------------------------
    def _open(self) -> GpuReader | None:
        if self._gpu is not None or self._problem is not None:
            return self._gpu
        if self.device_index is None:
            self._problem = "no GPU in this cell"  # a CPU cell: nothing to say
            return None
        self._backend = lib = backend()
        try:
            self._library = lib.open()
        except RuntimeError as exc:
            self._fail(f"{lib.name} not available ({exc})")
            return None
        try:
            self._gpu = lib.gpu(self._library, self.device_index)
        except Exception as exc:
            self._fail(f"{lib.name} cannot open GPU {self.device_index} ({_text(exc)})")
            self._close()
            return None
        self._power_source = self._gpu.power_source
        self._shared = self._gpu.shared
        if self._shared:
            _warn_once(f"GPU {self.device_index} is a MIG instance or in MIG mode (an AMD "
                       "GPU: in a compute partition mode): power, energy, clocks and throttle "
                       "reasons are the whole GPU's, shared by all its MIG instances "
                       "(partitions) (power_scope=shared_gpu); joules_per_sample stays empty",
                       kind="mig")
        return self._gpu

    def _close(self) -> None:
        if self._library is not None:
            # Shutting down a broken library must not fail the cell.
            with contextlib.suppress(Exception):
                self._backend.close(self._library)
            self._library = self._gpu = None

    def _fail(self, reason: str) -> None:
        self._problem = reason
        _warn_once(f"{reason}: power, energy and clock fields stay empty")

    # -- measurement --------------------------------------------------------------------------
    def measure_idle(self, duration_s: float = IDLE_S) -> None:
        """Median power over ``duration_s`` just before the window (idle_power_w).

        The cell calls this right after its warmup, so it is the power of a GPU that waits for
        work, clocks still up, not of a cold idle board.
        """
        gpu = self._open()
        if gpu is None or gpu.read_power is None:
            return
        readings = []
        deadline = time.perf_counter() + duration_s
        try:
            while True:
                readings.append(gpu.read_power())
                if time.perf_counter() >= deadline:
                    break
                time.sleep(min(self.interval_ms / 1e3, duration_s / 5))
        except Exception as exc:
            self._fail(f"{self._backend.name} failed while reading idle power ({_text(exc)})")
            self._close()
            return
        self.idle_power_w = statistics.median(readings)

    def __enter__(self) -> PowerMonitor:
        gpu = self._open()
        if gpu is None:
            return self
        self.samples = []
        self._stop.clear()
        try:
            self._e0_mj = gpu.energy_mj() if gpu.has_counter else None
            self._t0 = time.perf_counter()
            self.samples.append(gpu.sample())
        except Exception as exc:
            self._fail(f"{self._backend.name} failed at the start of the window ({_text(exc)})")
            self._close()
            return self
        self._thread = threading.Thread(target=self._run, args=(gpu,), name="ampbench-nvml",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self, gpu: _Gpu) -> None:
        started = time.thread_time()
        try:
            self._sample_until_stopped(gpu)
        finally:
            self.sampler_cpu_s = time.thread_time() - started

    def _sample_until_stopped(self, gpu: _Gpu) -> None:
        period = self.interval_ms / 1e3
        due = time.perf_counter()
        for i in count(1):
            # A fixed schedule, not sleep(period) after each read, so read time does not stretch
            # the period; after a read slower than the period, skip the missed slots.
            due += period
            now = time.perf_counter()
            if due < now:
                due = now + period
            if self._stop.wait(max(0.0, due - time.perf_counter())):
                return
            try:
                self.samples.append(gpu.sample(full=i % SLOW_EVERY == 0))
            except Exception as exc:
                self._problem = f"{self._backend.name} failed inside the window ({_text(exc)})"
                return

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        gpu = self._gpu
        if self._thread is None or gpu is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._problem is None:
            try:
                self.samples.append(gpu.sample())
                t1 = time.perf_counter()
                if self._e0_mj is not None:
                    self._counter_j = (gpu.energy_mj() - self._e0_mj) / 1e3
                self._window_s = t1 - self._t0
            except Exception as exc:
                self._problem = (f"{self._backend.name} failed at the end of the window "
                                 f"({_text(exc)})")
        if self._problem is not None:
            self._fail(self._problem)
        self._close()
        return None

    def fields(self, num_samples: int) -> dict[str, Any]:
        """The record's power fields for a window that processed ``num_samples`` samples."""
        if self._problem is not None or not self.samples:
            return empty_fields()
        return window_fields(
            self.samples, window_s=self._window_s, counter_j=self._counter_j,
            power_source=self._power_source, idle_power_w=self.idle_power_w,
            num_samples=num_samples, min_counter_window_s=self.min_counter_window_s,
            shared=self._shared,
        )
