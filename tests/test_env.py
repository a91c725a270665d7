"""`ampbench env`: fingerprint, NVML state and noise warnings (fake NVML; real CLI on CPU)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from types import SimpleNamespace

import pynvml
import pytest
from test_power import FakeNVML

from bench.telemetry import env


def test_env_runs_on_this_cpu_machine(cli_env):
    proc = subprocess.run([sys.executable, "-m", "bench", "env"], env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torch_version" in proc.stdout
    assert "NVML: not available (" in proc.stdout


def test_env_json_is_machine_readable(cli_env):
    proc = subprocess.run([sys.executable, "-m", "bench", "env", "--json"], env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == {"fingerprint", "cpu", "nvml", "warnings"}
    assert report["fingerprint"]["python_version"].count(".") == 2
    assert report["nvml"]["available"] is False and report["nvml"]["reason"]
    assert isinstance(report["warnings"], list)


def test_nvml_state_of_a_quiet_well_set_gpu(monkeypatch):
    FakeNVML().install(monkeypatch)
    state = env.nvml_state()
    assert state["available"] and state["driver_version"] == "550.54.15"
    assert state["cuda_driver_version"] == "12.4"
    (gpu,) = state["gpus"]
    assert gpu["name"] == "NVIDIA H100 80GB HBM3" and gpu["pstate"] == "P0"
    assert gpu["clocks_locked"] is False and gpu["clock_event_reasons"] == []
    assert gpu["power_limit_w"] == gpu["power_limit_default_w"] == 700.0
    assert gpu["persistence_mode"] is True and gpu["processes"] == []
    assert env.noise_warnings(state, {"performance": 16}) == []


def test_noisy_gpu_gets_one_warning_per_problem(monkeypatch):
    FakeNVML(
        processes=[SimpleNamespace(pid=4242, usedGpuMemory=3 * 1024**3)],
        power_limit_mw=300_000,
        reasons=pynvml.nvmlClocksEventReasonHwThermalSlowdown,
        temp_c=91,
        persistence=pynvml.NVML_FEATURE_DISABLED,
    ).install(monkeypatch)
    state = env.nvml_state()
    assert state["gpus"][0]["processes"] == [{"pid": 4242, "name": "python", "used_gib": 3.0}]
    warnings = env.noise_warnings(state, {"powersave": 2})
    assert len(warnings) == 5, warnings
    text = "\n".join(warnings)
    assert "1 other process(es)" in text and "4242 python" in text
    assert "power limit 300 W is below the default 700 W" in text
    assert "hw_thermal_slowdown" in text and "91 C" in text
    assert "persistence mode is off" in text
    assert "governor is powersave" in text


def test_applications_clocks_set_count_as_locked(monkeypatch):
    FakeNVML(app_clocks=(1410, 2619)).install(monkeypatch)
    assert env.nvml_state()["gpus"][0]["clocks_locked"] is True


def test_nvml_missing_is_a_state_not_an_error(monkeypatch):
    FakeNVML(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED).install(monkeypatch)
    state = env.nvml_state()
    assert state == {"available": False, "reason": "Driver Not Loaded"}
    assert env.noise_warnings(state, None) == []


def test_cpu_governors_are_counted(tmp_path):
    for cpu, governor in enumerate(("performance", "powersave", "powersave")):
        path = tmp_path / f"cpu{cpu}" / "cpufreq"
        path.mkdir(parents=True)
        (path / "scaling_governor").write_text(governor + "\n")
    assert env.cpu_governors(tmp_path) == {"performance": 1, "powersave": 2}
    assert env.cpu_governors(tmp_path / "absent") is None


def test_env_main_prints_gpu_state_and_warnings(monkeypatch, capsys):
    FakeNVML(power_limit_mw=350_000).install(monkeypatch)
    assert env.main(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert "NVML: driver 550.54.15, CUDA driver 12.4" in out
    assert "GPU 0: NVIDIA H100 80GB HBM3" in out
    assert "power limit 350 W is below the default 700 W" in out


@pytest.mark.parametrize("flag", [True, False])
def test_env_main_exits_zero_without_nvml(monkeypatch, capsys, flag):
    FakeNVML(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    assert env.main(argparse.Namespace(json=flag)) == 0
    out = capsys.readouterr().out
    if flag:
        assert json.loads(out)["nvml"]["reason"] == "NVML Shared Library Not Found"
    else:
        assert "NVML: not available (NVML Shared Library Not Found)" in out


def test_a_cuda_build_of_torch_without_a_gpu_is_not_the_devices_cuda(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fingerprint = env.fingerprint("cpu")
    assert fingerprint["cuda_version"] is None and fingerprint["torch_cuda_build"] == "13.0"
    FakeNVML(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    assert env.main(argparse.Namespace(json=False)) == 0
    assert "torch built for CUDA 13.0; no GPU" in capsys.readouterr().out
