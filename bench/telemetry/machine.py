"""The machine's state that makes numbers noisy, and the one rule that turns it into warnings.

``sample`` reads the state: NVML's view of each NVIDIA GPU (clocks, power limit, persistence,
other processes), amdsmi's of each AMD GPU, the CPU frequency governors, and others' use of the
cores this process may use over a second (bench/run/contention.py). ``noise_warnings`` says what
in a state makes step times or power numbers noisy, one line each. `ampbench env` and
`ampbench run` (before its sweep) both sample and both warn through it, so the same machine
gets the same warnings from either. torch-free: nothing here touches a GPU context.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.run import contention
from bench.telemetry import amd
from bench.telemetry.gpu import decode_reasons
from bench.telemetry.nvml import open_nvml


@dataclass(frozen=True)
class MachineState:
    """What the noise warnings are decided from; every part may be unknown (empty)."""

    nvml: dict[str, Any]  # nvml_state()
    governors: dict[str, int] | None  # cpu_governors()
    amdsmi: dict[str, Any] | None = None  # bench/telemetry/amd.py's state()
    # contention.before_sweep(): the cores, the load average, others' share of the cores
    load: dict[str, Any] = field(default_factory=dict)


def sample(load_seconds: float | None = None) -> MachineState:
    """The machine now: GPUs first (before anything in this process touches one), then others'
    use of the cores over ``load_seconds`` (default: contention's one second)."""
    nvml = nvml_state()
    amdsmi = amd.state()
    governors = cpu_governors()
    load = contention.before_sweep() if load_seconds is None \
        else contention.before_sweep(load_seconds)
    return MachineState(nvml, governors, amdsmi, load)


def noise_warnings(state: MachineState, nvml_gpus: set[int] | None = None) -> list[str]:
    """What in ``state`` makes step times or power numbers noisy, one line each: the one rule
    behind `ampbench env`'s warnings and those `ampbench run` prints before its sweep.
    ``nvml_gpus``: the NVIDIA GPUs a run uses (--devices), each judged on its own; None: all."""
    warnings = []
    amd_gpus = (state.amdsmi or {}).get("gpus", [])
    nvidia = [g for g in state.nvml.get("gpus", [])
              if nvml_gpus is None or g.get("index") in nvml_gpus]
    for gpu in [*nvidia, *amd_gpus]:
        label = f"GPU {gpu['index']}"
        procs = gpu.get("processes") or []
        if procs:
            names = ", ".join(f"{p['pid']} {p['name'] or '?'}" for p in procs[:5])
            warnings.append(f"{label}: {len(procs)} other process(es) on the GPU ({names}): "
                            "they share its compute, memory and power")
        limit, default = gpu.get("power_limit_w"), gpu.get("power_limit_default_w")
        if limit is not None and default is not None and limit < default:
            warnings.append(f"{label}: power limit {limit:.0f} W is below the default "
                            f"{default:.0f} W: clocks drop sooner under load")
        hot = sorted(_HOT.intersection(gpu.get("clock_event_reasons") or []))
        if hot:
            warnings.append(f"{label}: clocks are held down right now ({', '.join(hot)}) at "
                            f"{gpu.get('temp_c')} C: let it cool or check its power and airflow")
        if gpu.get("persistence_mode") is False:
            warnings.append(f"{label}: persistence mode is off: the driver may unload between "
                            "runs, so each one starts cold (`nvidia-smi -pm 1`)")
    for gpu in amd_gpus:
        warnings += amd.noise_warnings(gpu)
    other = sorted(g for g in state.governors or {} if g != "performance")
    if other:
        warnings.append(f"CPU frequency governor is {', '.join(other)}, not performance: host "
                        "step overhead varies (`cpupower frequency-set -g performance`)")
    return warnings + contention.warnings(state.load)


# -- GPU state through NVML ------------------------------------------------------------------

# Clock-event reasons that mean heat or power is slowing the GPU down right now.
_HOT = frozenset({"sw_thermal_slowdown", "hw_thermal_slowdown", "hw_slowdown",
                  "hw_power_brake_slowdown", "sw_power_cap"})


def _query(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or None where this board or driver does not support the query."""
    try:
        return fn(*args)
    except Exception:  # NVMLError_NotSupported / NoPermission / FunctionNotFound: unknown
        return None


def _gpu_state(nvml: Any, index: int) -> dict[str, Any]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    sm, mem = nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM

    def mw_to_w(value: Any) -> float | None:
        return None if value is None else value / 1e3

    reasons_fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    mask = _query(reasons_fn, handle) if reasons_fn else None
    if mask is None:
        mask = _query(nvml.nvmlDeviceGetCurrentClocksThrottleReasons, handle)
    reasons = decode_reasons(int(mask)) if mask is not None else None
    app = (_query(nvml.nvmlDeviceGetApplicationsClock, handle, sm),
           _query(nvml.nvmlDeviceGetApplicationsClock, handle, mem))
    app_default = (_query(nvml.nvmlDeviceGetDefaultApplicationsClock, handle, sm),
                   _query(nvml.nvmlDeviceGetDefaultApplicationsClock, handle, mem))
    app_known = None not in app and None not in app_default
    # NVML can read back applications clocks but not `nvidia-smi --lock-gpu-clocks`; a clock
    # held by either shows as the "applications_clocks_setting" event reason.
    if app_known or reasons is not None:
        locked = (app_known and app != app_default) or (
            reasons is not None and "applications_clocks_setting" in reasons)
    else:
        locked = None
    persistence = _query(nvml.nvmlDeviceGetPersistenceMode, handle)
    pstate = _query(nvml.nvmlDeviceGetPerformanceState, handle)
    return {
        "index": index,
        "name": _text(nvml.nvmlDeviceGetName(handle)),
        "pstate": None if pstate is None else f"P{pstate}",
        "sm_clock_mhz": _query(nvml.nvmlDeviceGetClockInfo, handle, sm),
        "sm_clock_max_mhz": _query(nvml.nvmlDeviceGetMaxClockInfo, handle, sm),
        "mem_clock_mhz": _query(nvml.nvmlDeviceGetClockInfo, handle, mem),
        "mem_clock_max_mhz": _query(nvml.nvmlDeviceGetMaxClockInfo, handle, mem),
        "app_clocks_mhz": list(app) if app_known else None,
        "app_clocks_default_mhz": list(app_default) if app_known else None,
        "clocks_locked": locked,
        "clock_event_reasons": reasons,
        "power_w": mw_to_w(_query(nvml.nvmlDeviceGetPowerUsage, handle)),
        "power_limit_w": mw_to_w(_query(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)),
        "power_limit_default_w": mw_to_w(
            _query(nvml.nvmlDeviceGetPowerManagementDefaultLimit, handle)),
        "temp_c": _query(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
        "persistence_mode": None if persistence is None
        else persistence == nvml.NVML_FEATURE_ENABLED,
        "processes": _other_processes(nvml, handle),
    }


def _other_processes(nvml: Any, handle: Any) -> list[dict[str, Any]] | None:
    """Processes other than this one holding a context on the GPU; None if NVML cannot tell."""
    found: dict[int, dict[str, Any]] = {}
    answered = False
    for query in (nvml.nvmlDeviceGetComputeRunningProcesses,
                  nvml.nvmlDeviceGetGraphicsRunningProcesses):
        procs = _query(query, handle)
        if procs is None:
            continue
        answered = True
        for proc in procs:
            if proc.pid == os.getpid() or proc.pid in found:
                continue
            used = getattr(proc, "usedGpuMemory", None)
            name = _query(nvml.nvmlSystemGetProcessName, proc.pid)
            found[proc.pid] = {
                "pid": proc.pid,
                "name": _text(name) if name is not None else None,
                "used_gib": None if used is None else round(used / 1024**3, 2),
            }
    return list(found.values()) if answered else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_state() -> dict[str, Any]:
    """NVML's view of the driver and every GPU, or ``available: False`` with the reason."""
    try:
        nvml = open_nvml()
    except RuntimeError as exc:
        return {"available": False, "reason": str(exc)}
    try:
        cuda = _query(nvml.nvmlSystemGetCudaDriverVersion)
        return {
            "available": True,
            "reason": None,
            "driver_version": _text(nvml.nvmlSystemGetDriverVersion()),
            "nvml_version": _text(_query(nvml.nvmlSystemGetNVMLVersion)),
            "cuda_driver_version": None if cuda is None else f"{cuda // 1000}.{cuda % 1000 // 10}",
            "gpus": [_gpu_state(nvml, i) for i in range(nvml.nvmlDeviceGetCount())],
        }
    except Exception as exc:  # a driver that answers init but fails a basic query
        return {"available": False, "reason": f"NVML query failed ({_text(exc)})"}
    finally:
        nvml.nvmlShutdown()


def gpu_users(indices: set[int]) -> int | None:
    """How many processes (other than this one) hold a context on the NVIDIA GPUs ``indices``
    now; None when NVML cannot tell. `run --devices` asks it around each cell on its GPUs."""
    try:
        nvml = open_nvml()
    except RuntimeError:
        return None
    try:
        found: set[int] = set()
        for index in sorted(indices):
            procs = _other_processes(nvml, nvml.nvmlDeviceGetHandleByIndex(index))
            if procs is None:
                return None
            found.update(p["pid"] for p in procs)
        return len(found)
    except Exception:  # a GPU gone or a driver that fails the query: unknown
        return None
    finally:
        nvml.nvmlShutdown()


def cpu_governors(root: Path = Path("/sys/devices/system/cpu")) -> dict[str, int] | None:
    """CPU frequency governor -> number of cores using it; None where Linux does not say."""
    paths = sorted(root.glob("cpu[0-9]*/cpufreq/scaling_governor"))
    counts: Counter[str] = Counter()
    for path in paths:
        try:
            counts[path.read_text().strip()] += 1
        except OSError:
            continue
    return dict(counts) or None
