"""`ampbench env`: fingerprint, NVML state and noise warnings (fake NVML; real CLI on CPU).
The machine state and the warnings' rule are bench/telemetry/machine.py's (test_machine.py)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

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
    assert set(report) == {"fingerprint", "cpu", "load", "nvml", "warnings"}
    assert report["fingerprint"]["python_version"].count(".") == 2
    assert report["nvml"]["available"] is False and report["nvml"]["reason"]
    assert isinstance(report["warnings"], list)


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
