"""Environment fingerprint and GPU state: what a number was measured on (torch imported lazily).

Every record carries the fingerprint fields, and a run's meta.json carries them once more with
the CPU model and the matrix, so a result can always be traced to its device, software and
commit. ``python -m bench env`` prints the fingerprint plus NVML's view of each GPU (driver,
clocks and whether they are held by a user setting, power limit, persistence mode, other
processes), the CPU governors and others' use of the cores, and warns about what makes numbers
noisy by the same rule as `ampbench run` (bench/telemetry/machine.py); ``--json`` prints the
same as JSON.

A CPU number also depends on how many threads torch uses and on the thread variables of the
BLAS and OpenMP libraries under it, and a GPU number on which GPUs CUDA_VISIBLE_DEVICES shows:
the fingerprint carries them (``THREAD_FIELDS``), None where a variable is unset.
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
from functools import cache
from pathlib import Path
from typing import Any

from tabulate import tabulate

from bench.telemetry import amd, machine

_REPO = Path(__file__).resolve().parent.parent
# What a CPU number depends on beyond the CPU: the environment variables that set the thread
# pools of OpenMP, MKL and OpenBLAS, and which GPUs CUDA shows; each a fingerprint field named
# in lower case (None: unset).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "CUDA_VISIBLE_DEVICES")
THREAD_FIELDS = ("torch_num_threads", "torch_num_interop_threads",
                 *(name.lower() for name in THREAD_VARIABLES))


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
        # torch's intra-op and inter-op thread pools, as this process runs them
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        **{name.lower(): os.environ.get(name) for name in THREAD_VARIABLES},
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


def environment() -> dict[str, Any]:
    """Everything `ampbench env` reports: fingerprint, CPU, NVML state (and amdsmi's, under a
    ROCm build of torch or where amdsmi finds AMD GPUs), others' use of the cores and the noise
    warnings, decided from the machine's state as `ampbench run` decides them."""
    # The machine first: NVML and amdsmi must list the GPU's processes before torch touches
    # the GPU in this one.
    state = machine.sample()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict[str, Any] = {
        "fingerprint": fingerprint(device),
        "cpu": {"model": cpu_model(), "cores": os.cpu_count(), "governors": state.governors},
        "load": state.load,
        "nvml": state.nvml,
    }
    if torch.version.hip or (state.amdsmi or {}).get("gpus"):
        report["amdsmi"] = {**(state.amdsmi or {}), "hip_version": torch.version.hip}
    report["warnings"] = machine.noise_warnings(state)
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


def _load_text(load: dict[str, Any]) -> str:
    """Others' share of the cores this process may use, as sampled; "not measured" off Linux."""
    share = load.get("others_cpu_pct_before")
    if share is None:
        return "not measured"
    average = load.get("loadavg_before")
    return (f"{share:g}% of {load.get('cores', '?')} cores over a second"
            + (f" (1-minute load average {average:g})" if average is not None else ""))


def _render(report: dict[str, Any]) -> str:
    fp, cpu, nvml = report["fingerprint"], report["cpu"], report["nvml"]
    governors = cpu["governors"]
    shown = dict(fp, cuda_version=fp["cuda_version"] or no_gpu_text(fp["torch_cuda_build"]))
    unset = {name.lower() for name in THREAD_VARIABLES}
    rows = [(k, ("unset" if k in unset else "") if v is None else v) for k, v in shown.items()]
    rows += [("cpu", f"{cpu['model']} ({cpu['cores']} logical cores)"),
             ("cpu governor", ", ".join(f"{g} ({n} cores)" for g, n in governors.items())
              if governors else "not readable"),
             ("others' cpu use", _load_text(report.get("load") or {}))]
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
