"""The machine's state (NVML's GPUs, CPU governors, others' use of the cores) and the one rule
that turns it into noise warnings, which `ampbench env` and `ampbench run` both print."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pynvml
from test_power import FakeNVML

from bench.run import contention, sweep
from bench.telemetry import env, machine
from bench.telemetry.machine import MachineState


def _warnings(nvml, governors, load=None):
    return machine.noise_warnings(MachineState(nvml, governors, load=load or {}))


def test_nvml_state_of_a_quiet_well_set_gpu(monkeypatch):
    FakeNVML().install(monkeypatch)
    state = machine.nvml_state()
    assert state["available"] and state["driver_version"] == "550.54.15"
    assert state["cuda_driver_version"] == "12.4"
    (gpu,) = state["gpus"]
    assert gpu["name"] == "NVIDIA H100 80GB HBM3" and gpu["pstate"] == "P0"
    assert gpu["clocks_locked"] is False and gpu["clock_event_reasons"] == []
    assert gpu["power_limit_w"] == gpu["power_limit_default_w"] == 700.0
    assert gpu["persistence_mode"] is True and gpu["processes"] == []
    assert _warnings(state, {"performance": 16}) == []


def test_noisy_gpu_gets_one_warning_per_problem(monkeypatch):
    FakeNVML(
        processes=[SimpleNamespace(pid=4242, usedGpuMemory=3 * 1024**3)],
        power_limit_mw=300_000,
        reasons=pynvml.nvmlClocksEventReasonHwThermalSlowdown,
        temp_c=91,
        persistence=pynvml.NVML_FEATURE_DISABLED,
    ).install(monkeypatch)
    state = machine.nvml_state()
    assert state["gpus"][0]["processes"] == [{"pid": 4242, "name": "python", "used_gib": 3.0}]
    warnings = _warnings(state, {"powersave": 2})
    assert len(warnings) == 5, warnings
    text = "\n".join(warnings)
    assert "1 other process(es)" in text and "4242 python" in text
    assert "power limit 300 W is below the default 700 W" in text
    assert "hw_thermal_slowdown" in text and "91 C" in text
    assert "persistence mode is off" in text
    assert "governor is powersave" in text


def test_applications_clocks_set_count_as_locked(monkeypatch):
    FakeNVML(app_clocks=(1410, 2619)).install(monkeypatch)
    assert machine.nvml_state()["gpus"][0]["clocks_locked"] is True


def test_nvml_missing_is_a_state_not_an_error(monkeypatch):
    FakeNVML(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED).install(monkeypatch)
    state = machine.nvml_state()
    assert state == {"available": False, "reason": "Driver Not Loaded"}
    assert _warnings(state, None) == []


def test_cpu_governors_are_counted(tmp_path):
    for cpu, governor in enumerate(("performance", "powersave", "powersave")):
        path = tmp_path / f"cpu{cpu}" / "cpufreq"
        path.mkdir(parents=True)
        (path / "scaling_governor").write_text(governor + "\n")
    assert machine.cpu_governors(tmp_path) == {"performance": 1, "powersave": 2}
    assert machine.cpu_governors(tmp_path / "absent") is None


def test_a_sample_measures_others_use_of_the_cores(monkeypatch):
    # What `ampbench env` lacked: it judged the GPUs and the governors, never the cores.
    FakeNVML(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    state = machine.sample(load_seconds=0.05)
    assert state.nvml["available"] is False
    assert state.load["cores"] >= 1
    if Path("/proc/stat").exists():
        assert 0 <= state.load["others_cpu_pct_before"] <= 100


def test_env_and_run_give_the_same_warnings_for_the_same_machine(monkeypatch, capsys, tmp_path):
    # Once `env` said "No noise warnings." while `run` a second later warned that others used
    # 97% of the cores. Both now warn from the machine's state by one rule.
    FakeNVML(power_limit_mw=300_000).install(monkeypatch)
    state = MachineState(machine.nvml_state(), {"powersave": 2}, None,
                         {"cores": 2, "loadavg_before": 1.9, "others_cpu_pct_before": 97.0})
    monkeypatch.setattr(machine, "sample", lambda *args, **kwargs: state)
    monkeypatch.setattr(contention, "snapshot", lambda *args: None)  # no during-the-sweep share

    assert env.main(argparse.Namespace(json=True)) == 0
    from_env = json.loads(capsys.readouterr().out)["warnings"]
    assert sweep.sweep(sweep.Sweep(tmp_path, None, {}), [], repeats=1) == []
    from_run = [line.removeprefix("warning: ") for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning: ")]

    assert from_run == from_env == machine.noise_warnings(state)
    text = "\n".join(from_env)
    assert len(from_env) == 3, from_env
    assert "power limit 300 W" in text and "governor is powersave" in text
    assert "other processes used 97% of the 2 cores" in text
