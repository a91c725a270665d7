"""GPU power, energy, clocks and throttling in a timed window: the sampling thread, the energy
window and the record's POWER fields, through NVML or, on AMD, amdsmi (torch-free).

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

Which library. NVML (bench/telemetry/nvml.py); under a ROCm build of torch, amdsmi, AMD's own
library (bench/telemetry/amd.py): same fields, sources and fallbacks, its violation status
decoded to the clock-event reasons above (bench/telemetry/gpu.py).

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
from collections.abc import Sequence
from functools import reduce
from itertools import count, pairwise
from types import ModuleType, TracebackType
from typing import Any

from bench import BadInput
from bench.store import POWER
from bench.telemetry.amd import AMDSMI
from bench.telemetry.gpu import (
    SHARED_GPU,
    SLOW_EVERY,
    Backend,
    GpuReader,
    Sample,
    as_text,
    bit_order,
    decode_reasons,
    format_shares,
    is_power_capped,
    is_throttled,
    parse_shares,
    reason_shares,
)
from bench.telemetry.nvml import NVML

log = logging.getLogger(__name__)

MIN_COUNTER_WINDOW_S = 1.0
# nvmlDeviceGetPowerUsage averages over ~1 s: integrating it is fair only over windows much
# longer than that (the lag at each end is then a small part of the window).
MIN_AVERAGED_POWER_WINDOW_S = 5.0
# Counter and sampled integral of instantaneous power agree within a few percent on a healthy
# board; beyond this one of them is not measuring what we think.
CHECK_WARN_PCT = 10.0
IDLE_S = 0.25

_warned: set[str] = set()


def _warn_once(message: str, kind: str = "nvml") -> None:
    """Log ``message`` the first time this process has a warning of this ``kind``."""
    if kind not in _warned:
        _warned.add(kind)
        log.warning(message)


def backend() -> Backend:
    """amdsmi (bench/telemetry/amd.py) under a ROCm build of torch, else NVML.

    torch is not imported for this (the module stays torch-free): a cell has imported it
    before it measures anything, and a process without torch has no GPU of its own to read.
    """
    torch = sys.modules.get("torch")
    if getattr(getattr(torch, "version", None), "hip", None):
        return AMDSMI
    return NVML


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
    power, sampled_j = _sampled_power(samples)
    fields.update(power)
    fields.update(_energy(sampled_j, counter_j, window_s=window_s, power_source=power_source,
                          min_counter_window_s=min_counter_window_s))
    if fields["energy_j"] is not None and num_samples > 0 and not shared:
        fields["joules_per_sample"] = fields["energy_j"] / num_samples
    fields.update(_clocks_and_reasons(samples))
    return fields


def _sampled_power(samples: Sequence[Sample]) -> tuple[dict[str, float], float | None]:
    """``power_avg_w`` and ``power_max_w`` of the samples, and the trapezoid integral of their
    power in joules (None without two samples apart in time)."""
    power = [(s.t_s, s.power_w) for s in samples if s.power_w is not None]
    if not power:
        return {}, None
    span = power[-1][0] - power[0][0]
    sampled_j = _trapezoid_j(power) if span > 0 else None
    # Time-weighted: the boundary samples are closer together than the thread's period.
    average = sampled_j / span if sampled_j is not None else statistics.fmean(p for _, p in power)
    return {"power_avg_w": average, "power_max_w": max(p for _, p in power)}, sampled_j


def _energy(
    sampled_j: float | None,
    counter_j: float | None,
    *,
    window_s: float,
    power_source: str | None,
    min_counter_window_s: float,
) -> dict[str, Any]:
    """``energy_j``, ``energy_source`` and ``energy_check_pct``: the counter where it can be
    trusted, else the sampled integral where that can; empty (with a warning) otherwise."""
    counter_ok = counter_j is not None and counter_j > 0 and window_s >= min_counter_window_s
    sampled_ok = bool(sampled_j) and (
        power_source == "instant" or window_s >= MIN_AVERAGED_POWER_WINDOW_S
    )
    if counter_ok:
        fields: dict[str, Any] = {"energy_j": counter_j, "energy_source": "counter"}
        if sampled_ok:
            check = 100.0 * (sampled_j - counter_j) / counter_j
            fields["energy_check_pct"] = check
            if abs(check) > CHECK_WARN_PCT:
                log.warning("energy: sampled power integrates to %.1f J but the energy counter "
                            "says %.1f J (%+.1f%%); keeping the counter", sampled_j, counter_j,
                            check)
        return fields
    if sampled_ok:
        return {"energy_j": sampled_j, "energy_source": "sampled"}
    why = []
    if counter_j is None:
        why.append("no energy counter")
    elif window_s < min_counter_window_s:
        why.append(f"the energy counter needs a window of {min_counter_window_s:g} s")
    else:
        why.append("the energy counter did not advance")
    if sampled_j is None:
        why.append("no power samples")
    else:
        why.append(f"~1 s averaged power is too coarse under {MIN_AVERAGED_POWER_WINDOW_S:g} s")
    log.warning("energy: left empty for this %.2f s window (%s); run more --steps",
                window_s, "; ".join(why))
    return {}


def _clocks_and_reasons(samples: Sequence[Sample]) -> dict[str, Any]:
    """The SM clock's average, the highest temperature and the clock-event reasons seen."""
    clocks = [s.sm_clock_mhz for s in samples if s.sm_clock_mhz is not None]
    temps = [s.temp_c for s in samples if s.temp_c is not None]
    masks = [s.reasons for s in samples if s.reasons is not None]
    fields: dict[str, Any] = {
        "sm_clock_mhz_avg": statistics.fmean(clocks) if clocks else None,
        "temp_max_c": max(temps) if temps else None,
    }
    if masks:
        reasons = decode_reasons(reduce(operator.or_, masks))
        fields["throttle_reasons"] = reasons
        fields["throttle_shares"] = format_shares(reason_shares(masks))
        fields["throttled"] = is_throttled(reasons)
        fields["power_capped"] = is_power_capped(reasons)
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
        fields["throttle_reasons"] = bit_order(name for names in reasons for name in names)
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
            self._fail(f"{lib.name} cannot open GPU {self.device_index} ({as_text(exc)})")
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
            self._fail(f"{self._backend.name} failed while reading idle power ({as_text(exc)})")
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
            self._fail(f"{self._backend.name} failed at the start of the window ({as_text(exc)})")
            self._close()
            return self
        self._thread = threading.Thread(target=self._run, args=(gpu,), name="ampbench-nvml",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self, gpu: GpuReader) -> None:
        started = time.thread_time()
        try:
            self._sample_until_stopped(gpu)
        finally:
            self.sampler_cpu_s = time.thread_time() - started

    def _sample_until_stopped(self, gpu: GpuReader) -> None:
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
                self._problem = f"{self._backend.name} failed inside the window ({as_text(exc)})"
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
                                 f"({as_text(exc)})")
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
