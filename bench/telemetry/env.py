"""Environment fingerprint and GPU state: what a number was measured on (torch imported lazily).

Every record carries the fingerprint fields, and a run's meta.json carries them once more with
the CPU model and the matrix, so a result can always be traced to its device, software and
commit. ``python -m bench env`` prints the fingerprint plus NVML's view of each GPU (driver,
clocks and whether they are held by a user setting, power limit, persistence mode, other
processes) and warns about what makes numbers noisy; ``--json`` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import subprocess
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from tabulate import tabulate

from bench.telemetry import amd
from bench.telemetry.gpu import decode_reasons
from bench.telemetry.nvml import open_nvml

_REPO = Path(__file__).resolve().parent.parent


def machine_id() -> str:
    """A stable, anonymous id for this host (hashed hostname)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]


@cache
def git_state() -> tuple[str | None, bool | None]:
    """(sha, dirty) of the checkout ampbench runs from; (None, None) outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_REPO, capture_output=True, text=True, timeout=10,
        )
        return sha.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_model() -> str:
    """The CPU's marketing name where Linux tells it, else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(device: str = "cpu") -> dict[str, Any]:
    """The ENVIRONMENT fields of the record schema for ``device`` ("cpu", "cuda", "cuda:N")."""
    import torch

    sha, dirty = git_state()
    info: dict[str, Any] = {
        "device": device,
        "device_name": cpu_model(),
        "device_count": 1,
        "driver_version": None,
        "torch_version": torch.__version__,
        # cuda_version is the CUDA the device runs, so only a CUDA device has one; a CUDA build
        # of torch on a machine without a GPU says so in torch_cuda_build alone.
        "cuda_version": None,
        "torch_cuda_build": torch.version.cuda,
        "cudnn_version": None,
        "python_version": platform.python_version(),
        "machine_id": machine_id(),
        "git_sha": sha,
        "git_dirty": dirty,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        info["device_name"] = torch.cuda.get_device_name(index)
        info["device_count"] = torch.cuda.device_count()
        info["cuda_version"] = torch.version.cuda
        info["cudnn_version"] = torch.backends.cudnn.version()
        info["driver_version"] = amd.driver_version() if torch.version.hip else _driver_version()
    return info


def no_gpu_text(torch_cuda_build: Any) -> str | None:
    """What a CUDA build of torch that ran without a GPU is called, where a device's CUDA would
    be named; None for a CPU build."""
    return f"torch built for CUDA {torch_cuda_build}; no GPU" if torch_cuda_build else None


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else version
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML missing or broken: the field stays empty
        return None


# -- GPU state through NVML (python -m bench env) ---------------------------------------------

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


def noise_warnings(nvml: dict[str, Any], governors: dict[str, int] | None,
                   amdsmi: dict[str, Any] | None = None) -> list[str]:
    """What in this environment makes step times or power numbers noisy, one line each
    (``amdsmi``: amdsmi's view of AMD GPUs, bench/telemetry/amd.py's ``state()``)."""
    warnings = []
    amd_gpus = (amdsmi or {}).get("gpus", [])
    for gpu in [*nvml.get("gpus", []), *amd_gpus]:
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
    other = sorted(g for g in governors or {} if g != "performance")
    if other:
        warnings.append(f"CPU frequency governor is {', '.join(other)}, not performance: host "
                        "step overhead varies (`cpupower frequency-set -g performance`)")
    return warnings


def environment() -> dict[str, Any]:
    """Everything `ampbench env` reports: fingerprint, CPU, NVML state (and amdsmi's, under a
    ROCm build of torch or where amdsmi finds AMD GPUs) and noise warnings."""
    # NVML and amdsmi first: they must list the GPU's processes before torch touches the GPU
    # in this one.
    nvml = nvml_state()
    amdsmi = amd.state()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    governors = cpu_governors()
    report: dict[str, Any] = {
        "fingerprint": fingerprint(device),
        "cpu": {"model": cpu_model(), "cores": os.cpu_count(), "governors": governors},
        "nvml": nvml,
    }
    shows_amd = bool(torch.version.hip or amdsmi["gpus"])
    if shows_amd:
        report["amdsmi"] = {**amdsmi, "hip_version": torch.version.hip}
    report["warnings"] = noise_warnings(nvml, governors, amdsmi if shows_amd else None)
    return report


def _mhz(now: Any, top: Any) -> str:
    return f"{now if now is not None else '?'}/{top if top is not None else '?'} MHz"


def _power_rows(gpu: dict[str, Any]) -> list[tuple[str, Any]]:
    """The rows of a GPU's table that NVML and amdsmi both fill."""
    limit, default_w = gpu["power_limit_w"], gpu["power_limit_default_w"]
    procs = gpu["processes"]
    return [
        ("power", "?" if gpu["power_w"] is None else f"{gpu['power_w']:.0f} W"),
        ("power limit", "?" if limit is None else f"{limit:.0f} W (default "
         + ("?" if default_w is None else f"{default_w:.0f} W") + ")"),
        ("temperature", "?" if gpu["temp_c"] is None else f"{gpu['temp_c']:g} C"),
        ("clock event reasons", ", ".join(gpu["clock_event_reasons"] or []) or "none"),
        ("other processes", "?" if procs is None else len(procs)),
    ]


def _render_amd(amdsmi: dict[str, Any]) -> list[str]:
    if not amdsmi["available"]:
        return [f"amdsmi: not available ({amdsmi['reason']})"]
    hip = amdsmi.get("hip_version")
    lines = [f"amdsmi: driver {amdsmi['driver_version']}, amdsmi {amdsmi['amdsmi_version']}"
             + (f", torch built for ROCm {hip}" if hip else "")]
    for gpu in amdsmi["gpus"]:
        rows = [
            ("performance level", gpu["perf_level"] or "?"),
            ("compute partition", gpu["compute_partition"] or "?"),
            ("GFX clock", _mhz(gpu["sm_clock_mhz"], gpu["sm_clock_max_mhz"]) + " (now/max)"),
            ("memory clock", _mhz(gpu["mem_clock_mhz"], gpu["mem_clock_max_mhz"])),
            *_power_rows(gpu),
        ]
        lines += ["", f"GPU {gpu['index']}: {gpu['name']}", tabulate(rows, tablefmt="plain")]
    return lines


def _render(report: dict[str, Any]) -> str:
    fp, cpu, nvml = report["fingerprint"], report["cpu"], report["nvml"]
    governors = cpu["governors"]
    shown = dict(fp, cuda_version=fp["cuda_version"] or no_gpu_text(fp["torch_cuda_build"]))
    rows = [(k, "" if v is None else v) for k, v in shown.items()]
    rows += [("cpu", f"{cpu['model']} ({cpu['cores']} logical cores)"),
             ("cpu governor", ", ".join(f"{g} ({n} cores)" for g, n in governors.items())
              if governors else "not readable")]
    lines = ["Environment", tabulate(rows, tablefmt="plain"), ""]
    if not nvml["available"]:
        lines.append(f"NVML: not available ({nvml['reason']})")
    else:
        lines.append(f"NVML: driver {nvml['driver_version']}, CUDA driver "
                     f"{nvml['cuda_driver_version']}, NVML {nvml['nvml_version']}")
        for gpu in nvml["gpus"]:
            app, default = gpu["app_clocks_mhz"], gpu["app_clocks_default_mhz"]
            app_text = ("unknown" if app is None else "default" if app == default
                        else f"SM {app[0]} / memory {app[1]} MHz (default {default[0]} / "
                             f"{default[1]})")
            locked = {True: "yes", False: "no", None: "unknown"}[gpu["clocks_locked"]]
            rows = [
                ("state", gpu["pstate"] or "?"),
                ("SM clock", _mhz(gpu["sm_clock_mhz"], gpu["sm_clock_max_mhz"]) + " (now/max)"),
                ("memory clock", _mhz(gpu["mem_clock_mhz"], gpu["mem_clock_max_mhz"])),
                ("applications clocks", app_text),
                ("clocks held by a user setting", locked),
                ("persistence mode", {True: "on", False: "off", None: "?"}[
                    gpu["persistence_mode"]]),
                *_power_rows(gpu),
            ]
            lines += ["", f"GPU {gpu['index']}: {gpu['name']}", tabulate(rows, tablefmt="plain")]
    if "amdsmi" in report:
        lines += ["", *_render_amd(report["amdsmi"])]
    lines.append("")
    if report["warnings"]:
        lines.append("Warnings (these make numbers noisy):")
        lines += [f"  - {w}" for w in report["warnings"]]
    else:
        lines.append("No noise warnings.")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """`ampbench env`: print the environment and GPU state (``--json``: as JSON); exit 0."""
    report = environment()
    print(json.dumps(report, indent=2, default=str) if args.json else _render(report))
    return 0
