"""AMD GPUs through amdsmi, AMD's own monitoring library (torch-free; amdsmi imported lazily).

Two users. Under a ROCm build of torch, bench/telemetry/monitor.py's PowerMonitor reads the GPU
through ``AmdGpu`` (backend ``AMDSMI``) instead of NVML, into the same record fields with the same
sources and fallbacks; and ``python -m bench env`` shows ``state()``: each AMD GPU and the
settings that make numbers noisy.

What is read, as its NVML counterpart:

- power: ``amdsmi_get_power_info``'s ``current_socket_power`` (W, instantaneous; MI300 series),
  ``power_source=instant``; else ``average_socket_power`` (the firmware's average; MI200
  series), ``power_source=average``.
- energy: ``amdsmi_get_energy_count``, the accumulator times its resolution in microjoules:
  ``energy_source=counter``, cross-checked against the sampled power as NVML's counter is;
  where the board has none, the sampled integral (bench/telemetry/monitor.py decides, as for
  NVML).
- clocks: ``amdsmi_get_clock_info`` GFX (``sm_clock_mhz``) and MEM; temperature:
  ``amdsmi_get_temp_metric``, the hotspot (junction) sensor the firmware throttles on, else the
  edge sensor; utilization: ``amdsmi_get_gpu_activity``'s gfx activity.
- throttling: ``amdsmi_get_violation_status`` (MI300 series, ROCm 6.3+) says which limit the
  firmware enforces right now. Each maps to the NVML clock-event reason with the same meaning
  (``_VIOLATIONS``), so ``throttled`` (heat or a hardware signal) and ``power_capped`` mean
  what they mean on NVIDIA. gpu_metrics' ``throttle_status`` is not used: the python bindings
  reduce it to one bool, which cannot tell the routine power cap from heat.
- compute partitions: a GPU split into partitions (CPX, DPX, ... rather than SPX) reports the
  whole GPU's power on each, so a partition's cell is ``power_scope=shared_gpu``, as a MIG
  instance's is.

Without the amdsmi package (``pip install amdsmi``, matching the installed ROCm, or the
``.[amd]`` extra) or without a driver, every field is empty and one warning names the package.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from functools import partial, reduce
from operator import or_
from types import ModuleType
from typing import Any

from bench.telemetry.gpu import REASON_BITS, Backend, GpuReader, decode_reasons

# amdsmi statuses (amdsmi.h, a stable ABI) meaning "this board, driver or user cannot have this
# reading": INVAL, NOT_SUPPORTED, NOT_YET_IMPLEMENTED, NO_PERM, NOT_FOUND, NO_DATA.
_UNSUPPORTED = frozenset({1, 2, 3, 10, 31, 40})

_BIT = {name: bit for bit, name in REASON_BITS.items()}
# Violation status -> the clock-event reason that means the same on NVIDIA:
#   PPT (package power tracking): the firmware holds the clocks to the power limit;
#   socket thermal: the firmware slows the GPU for its temperature;
#   PROCHOT: a hardware "processor hot" signal slows it;
#   voltage regulator or HBM thermal: a hot part of the board slows it.
_VIOLATIONS = {
    "active_ppt_pwr": "sw_power_cap",
    "active_socket_thrm": "sw_thermal_slowdown",
    "active_prochot_thrm": "hw_slowdown",
    "active_vr_thrm": "hw_thermal_slowdown",
    "active_hbm_thrm": "hw_thermal_slowdown",
}
# Performance levels that hold the clocks below what the GPU would run at under load.
_LOW_LEVELS = frozenset({"low", "stable_std", "stable_min_mclk", "stable_min_sclk"})


def _partitioned(partition: str | None) -> bool:
    """Whether a compute partition mode splits the GPU (SPX: one partition, the whole GPU)."""
    return partition not in (None, "", "N/A", "SPX")


class NotSupported(Exception):
    """amdsmi answered "N/A": the board does not report this value."""


def _number(value: Any) -> float:
    if value is None or value == "N/A":
        raise NotSupported
    return float(value)


def _flag(value: Any) -> bool:
    return value not in (None, "N/A") and bool(value)


def open_amdsmi() -> ModuleType:
    """``amdsmi`` after ``amdsmi_init`` for GPUs; raises RuntimeError saying why it is absent."""
    try:
        import amdsmi
    except (ImportError, OSError) as exc:  # OSError: the package without ROCm's libamd_smi
        raise RuntimeError(f"the amdsmi package is not installed or has no ROCm library "
                           f"({exc}): pip install amdsmi (matching your ROCm), or .[amd]") from None
    try:
        amdsmi.amdsmi_init(amdsmi.AmdSmiInitFlags.INIT_AMD_GPUS)
    except Exception as exc:  # AmdSmiLibraryException: no driver, no permission
        raise RuntimeError(str(exc) or type(exc).__name__) from None
    return amdsmi


def _uuid_forms(uuid: str) -> set[str]:
    """The ways a UUID torch prints may be written in amdsmi: as given, bare, without dashes,
    and decoded, since HIP's 16 UUID bytes are the ASCII digits of the GPU's unique id."""
    bare = uuid.strip().lower().removeprefix("gpu-")
    digits = bare.replace("-", "")
    forms = {bare, digits}
    with contextlib.suppress(ValueError):  # not hex, or bytes that are not text
        forms.add(bytes.fromhex(digits).decode("ascii").lower())
    return forms


def _identities(amdsmi: ModuleType, handle: Any) -> set[str]:
    """What amdsmi calls a GPU: its UUID (in each of ``_uuid_forms``) and its unique id (the
    ASIC serial, which HIP and torch's HIP_VISIBLE_DEVICES call the UUID)."""
    names = set()
    uuid = _ask(amdsmi.amdsmi_get_gpu_device_uuid, handle)
    if uuid:
        names |= _uuid_forms(uuid)
    asic = _ask(amdsmi.amdsmi_get_gpu_asic_info, handle) or {}
    serial = str(asic.get("asic_serial", "N/A")).lower()
    if serial != "n/a":
        names.add(serial.removeprefix("0x"))
    return names


def _handle(amdsmi: ModuleType, device: int | str) -> Any:
    """amdsmi's handle of a GPU given by index or by the UUID torch prints."""
    handles = amdsmi.amdsmi_get_processor_handles()
    if isinstance(device, int):
        return handles[device]
    wanted = _uuid_forms(device)
    found = [h for h in handles if wanted & _identities(amdsmi, h)]
    if len(found) == 1:
        return found[0]
    # One GPU on the machine is the one torch runs on, whatever either calls it.
    if len(handles) == 1:
        return handles[0]
    raise LookupError(f"no AMD GPU has the UUID {device}")


def _ask(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or None where the bindings, board or driver do not have the query."""
    try:
        return fn(*args)
    except Exception:  # AmdSmiLibraryException (not supported, no permission), old bindings
        return None


class AmdGpu(GpuReader):
    """One AMD GPU's amdsmi readers, chosen once for what this driver and board support."""

    def __init__(self, amdsmi: ModuleType, device: int | str) -> None:
        self.amdsmi = amdsmi
        self.handle = _handle(amdsmi, device)
        partition = _ask(amdsmi.amdsmi_get_gpu_compute_partition, self.handle)
        self.shared = _partitioned(partition)
        self.power_source, self.read_power = self._pick_power()
        self.read_reasons = self.reasons if self._works(self.reasons) else None
        self.fast = self._supported({"sm_clock_mhz": partial(self.clock_mhz, "GFX")})
        temps = self._supported({sensor: partial(self.temp_c, sensor)
                                 for sensor in ("HOTSPOT", "EDGE")})
        self.slow = self._supported({
            "mem_clock_mhz": partial(self.clock_mhz, "MEM"),
            "gpu_util_pct": lambda: _number(
                amdsmi.amdsmi_get_gpu_activity(self.handle)["gfx_activity"]),
        })
        if temps:
            self.slow["temp_c"] = next(iter(temps.values()))
        self.has_counter = self._works(self.energy_mj)

    def _not_supported(self, exc: Exception) -> bool:
        if isinstance(exc, NotSupported):
            return True
        code = getattr(exc, "err_code", None)
        return isinstance(exc, self.amdsmi.AmdSmiLibraryException) and code in _UNSUPPORTED

    def _pick_power(self) -> tuple[str | None, Callable[[], float] | None]:
        for source, key in (("instant", "current_socket_power"),
                            ("average", "average_socket_power")):
            read = partial(self.power_w, key)
            if self._works(read):
                return source, read
        return None, None

    def power_w(self, key: str) -> float:
        return _number(self.amdsmi.amdsmi_get_power_info(self.handle)[key])

    def clock_mhz(self, clock: str) -> float:
        info = self.amdsmi.amdsmi_get_clock_info(
            self.handle, getattr(self.amdsmi.AmdSmiClkType, clock))
        return _number(info["clk"] if "clk" in info else info["cur_clk"])  # cur_clk: ROCm < 6.2

    def temp_c(self, sensor: str) -> float:
        return _number(self.amdsmi.amdsmi_get_temp_metric(
            self.handle, getattr(self.amdsmi.AmdSmiTemperatureType, sensor),
            self.amdsmi.AmdSmiTemperatureMetric.CURRENT))

    def reasons(self) -> int:
        """The active violations as clock-event reason bits (``_VIOLATIONS``)."""
        status = self.amdsmi.amdsmi_get_violation_status(self.handle)
        if all(status.get(key) in (None, "N/A") for key in _VIOLATIONS):
            raise NotSupported
        active = (_BIT[name] for key, name in _VIOLATIONS.items() if _flag(status.get(key)))
        return reduce(or_, active, 0)

    def energy_mj(self) -> float:
        count = self.amdsmi.amdsmi_get_energy_count(self.handle)
        # "power" is the accumulator's name in bindings before "energy_accumulator".
        accumulated = count["energy_accumulator"] if "energy_accumulator" in count \
            else count["power"]
        return accumulated * count["counter_resolution"] / 1e3  # uJ -> mJ


AMDSMI = Backend("amdsmi", open_amdsmi, lambda amdsmi: amdsmi.amdsmi_shut_down(), AmdGpu)


# -- python -m bench env ----------------------------------------------------------------------

def driver_version() -> str | None:
    """The amdgpu driver's version, for the record's ``driver_version``; None without amdsmi."""
    try:
        amdsmi = open_amdsmi()
    except RuntimeError:
        return None
    try:
        handles = _ask(amdsmi.amdsmi_get_processor_handles) or []
        info = _ask(amdsmi.amdsmi_get_gpu_driver_info, handles[0]) if handles else None
        return info["driver_version"] if info else None
    finally:
        _ask(amdsmi.amdsmi_shut_down)


def _gpu_state(amdsmi: ModuleType, index: int) -> dict[str, Any]:
    gpu = AmdGpu(amdsmi, index)
    handle = gpu.handle

    def read(fn: Callable[[], float] | None) -> float | None:
        return _ask(fn) if fn is not None else None

    def mhz(fn: Callable[[], float] | None) -> int | None:
        value = read(fn)
        return None if value is None else round(value)

    def max_mhz(clock: str) -> int | None:
        return mhz(lambda: _number(amdsmi.amdsmi_get_clock_info(
            handle, getattr(amdsmi.AmdSmiClkType, clock))["max_clk"]))

    def watts(microwatts: Any) -> float | None:
        return None if microwatts in (None, "N/A", 0) else microwatts / 1e6

    asic = _ask(amdsmi.amdsmi_get_gpu_asic_info, handle) or {}
    cap = _ask(amdsmi.amdsmi_get_power_cap_info, handle) or {}
    level = _ask(amdsmi.amdsmi_get_gpu_perf_level, handle)
    mask = read(gpu.read_reasons)
    return {
        "index": index,
        "name": asic.get("market_name"),
        "compute_partition": _ask(amdsmi.amdsmi_get_gpu_compute_partition, handle),
        "perf_level": None if level is None
        else str(level).removeprefix("AMDSMI_DEV_PERF_LEVEL_").lower(),
        "sm_clock_mhz": mhz(gpu.fast.get("sm_clock_mhz")),
        "sm_clock_max_mhz": max_mhz("GFX"),
        "mem_clock_mhz": mhz(gpu.slow.get("mem_clock_mhz")),
        "mem_clock_max_mhz": max_mhz("MEM"),
        "power_w": read(gpu.read_power),
        "power_limit_w": watts(cap.get("power_cap")),
        "power_limit_default_w": watts(cap.get("default_power_cap")),
        "temp_c": read(gpu.slow.get("temp_c")),
        "clock_event_reasons": None if mask is None else decode_reasons(int(mask)),
        "processes": _other_processes(amdsmi, handle),
    }


def _other_processes(amdsmi: ModuleType, handle: Any) -> list[dict[str, Any]] | None:
    """Processes other than this one using the GPU; None if amdsmi cannot tell."""
    procs = _ask(amdsmi.amdsmi_get_gpu_process_list, handle)
    if procs is None:
        return None
    return [{"pid": p["pid"], "name": p.get("name"),
             "used_gib": round(p["mem"] / 1024**3, 2) if "mem" in p else None}
            for p in procs if isinstance(p, dict) and p.get("pid") != os.getpid()]


def state() -> dict[str, Any]:
    """amdsmi's view of the driver and every AMD GPU, or ``available: False`` with the reason."""
    try:
        amdsmi = open_amdsmi()
    except RuntimeError as exc:
        return {"available": False, "reason": str(exc), "gpus": []}
    try:
        handles = amdsmi.amdsmi_get_processor_handles()
        gpus = [_gpu_state(amdsmi, i) for i in range(len(handles))]
        version = _ask(amdsmi.amdsmi_get_lib_version) or {}
        driver = _ask(amdsmi.amdsmi_get_gpu_driver_info, handles[0]) if handles else None
        return {
            "available": True,
            "reason": None,
            "driver_version": driver["driver_version"] if driver else None,
            "amdsmi_version": ".".join(str(version[k]) for k in ("year", "major", "minor",
                                                                  "release") if k in version),
            "gpus": gpus,
        }
    except Exception as exc:  # a driver that answers init but fails a basic query
        return {"available": False, "reason": f"amdsmi query failed ({exc})", "gpus": []}
    finally:
        _ask(amdsmi.amdsmi_shut_down)


def noise_warnings(gpu: dict[str, Any]) -> list[str]:
    """What AMD-only settings of one GPU make numbers noisy or MFU wrong, one line each (the
    settings every GPU has, such as other processes and the power limit, are
    bench/telemetry/env.py's)."""
    warnings = []
    label = f"GPU {gpu['index']}"
    if gpu.get("perf_level") in _LOW_LEVELS:
        warnings.append(f"{label}: performance level is {gpu['perf_level']}: clocks are held "
                        "below what the GPU runs at under load (`amd-smi set --perf-level AUTO`)")
    if _partitioned(gpu.get("compute_partition")):
        warnings.append(f"{label}: compute partition {gpu['compute_partition']}: each "
                        "partition is a part of the GPU under the whole GPU's name, so MFU "
                        "against the whole GPU's peak is too low (pass --peak-tflops) and power "
                        "is the whole GPU's")
    return warnings
