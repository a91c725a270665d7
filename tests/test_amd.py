"""AMD GPUs (bench/telemetry/amd.py): the power
monitor, `ampbench env` and the peak table, against a fake
amdsmi module installed under a ROCm build of torch (torch.version.hip set), as test_power.py
fakes NVML."""

from __future__ import annotations

import argparse
import json
import sys
import time
from enum import IntEnum

import pytest
from test_power import _warnings, _window

from bench.cell import flops
from bench.telemetry import amd, env, gpu, machine, monitor, peaks
from bench.telemetry.machine import MachineState
from bench.telemetry.monitor import PowerMonitor
from bench.telemetry.nvml import NVML

NOT_SUPPORTED, API_FAILED, DRIVER_NOT_LOADED = 2, 7, 34
RESOLUTION_UJ = 15.625  # energy counter resolution: exact in binary, so sums are exact


class FakeAmdSmi:
    """Scripted stand-ins for the amdsmi calls ampbench makes, for the GPUs in ``gpus`` with the
    shapes the real bindings return (dicts, "N/A" for what a board does not report).

    Board state, changeable between phases of a test: ``power_w`` (current_socket_power; None:
    "N/A" as on MI200), ``average_power_w``, ``counter`` (successive energy accumulator
    readings, the last one repeating; None: no counter), ``counter_w`` (instead: the counter
    advances at this many watts of real time), ``temps`` (sensor -> C; a missing sensor is not
    supported), ``violations`` (violation-status fields; None: not supported), ``partition``.
    ``fail`` makes every sampling call raise, as a GPU that fell off the bus. Per-GPU values
    come from ``gpus``: one dict of overrides per GPU.
    """

    class AmdSmiInitFlags(IntEnum):
        INIT_AMD_GPUS = 2

    class AmdSmiClkType(IntEnum):
        GFX = 1
        MEM = 5

    class AmdSmiTemperatureType(IntEnum):
        EDGE = 0
        HOTSPOT = 1

    class AmdSmiTemperatureMetric(IntEnum):
        CURRENT = 0

    class AmdSmiLibraryException(Exception):
        def __init__(self, err_code: int) -> None:
            super().__init__(f"Error code:\n\t{err_code} | AMDSMI_STATUS_{err_code}")
            self.err_code = err_code

    def __init__(self, **state: object) -> None:
        self.init_error: int | None = None
        self.power_w: float | None = 550.0
        self.average_power_w: float | None = None
        self.counter: list[int] | None = None
        self.counter_w: float | None = None
        self.gfx_mhz, self.mem_mhz = 2100, 1300
        self.temps = {"HOTSPOT": 71, "EDGE": 52}
        self.violations: dict[str, object] | None = {key: False for key in amd._VIOLATIONS}
        self.partition = "SPX"
        self.perf_level = "AMDSMI_DEV_PERF_LEVEL_AUTO"
        self.power_cap_uw, self.default_power_cap_uw = 750_000_000, 750_000_000
        self.processes: list[dict] = []
        self.fail = False
        self.gpus: list[dict] = [{"uuid": "d1ff74a1-0000-1000-80a4-6c2e76c9b8e7",
                                  "serial": "0x5EE8C3B1C9E7A4F2"}]
        self.calls: dict[str, int] = {}
        self._started = time.perf_counter()
        self._reads = 0
        self.__dict__.update(state)

    def install(self, monkeypatch: pytest.MonkeyPatch, hip: str | None = "6.3.42131") -> FakeAmdSmi:
        import torch

        monkeypatch.setitem(sys.modules, "amdsmi", self)
        monkeypatch.setattr(torch.version, "hip", hip)
        return self

    def _gpu(self, handle: str, name: str, sampling: bool = True) -> dict:
        self.calls[name] = self.calls.get(name, 0) + 1
        if sampling and self.fail:
            raise self.AmdSmiLibraryException(API_FAILED)
        return self.gpus[int(handle.removeprefix("gpu"))]

    def _value(self, handle: str, name: str, key: str) -> object:
        """This GPU's override of a board value, else the board's."""
        return self._gpu(handle, name).get(key, getattr(self, key))

    # -- lifetime and identity --------------------------------------------------------------
    def amdsmi_init(self, flags: int) -> None:
        if self.init_error is not None:
            raise self.AmdSmiLibraryException(self.init_error)

    def amdsmi_shut_down(self) -> None:
        self.calls["shut_down"] = self.calls.get("shut_down", 0) + 1

    def amdsmi_get_processor_handles(self) -> list[str]:
        return [f"gpu{i}" for i in range(len(self.gpus))]

    def amdsmi_get_gpu_device_uuid(self, handle: str) -> str:
        return self._gpu(handle, "uuid", sampling=False)["uuid"]

    def amdsmi_get_gpu_asic_info(self, handle: str) -> dict:
        gpu = self._gpu(handle, "asic", sampling=False)
        return {"market_name": "AMD Instinct MI300X", "asic_serial": gpu["serial"]}

    def amdsmi_get_gpu_compute_partition(self, handle: str) -> str:
        return self._value(handle, "partition", "partition")

    # -- sampling -----------------------------------------------------------------------------
    def amdsmi_get_power_info(self, handle: str) -> dict:
        current = self._value(handle, "power", "power_w")
        average = self.average_power_w
        return {"current_socket_power": "N/A" if current is None else round(current),
                "average_socket_power": "N/A" if average is None else round(average),
                "gfx_voltage": "N/A", "soc_voltage": "N/A", "mem_voltage": "N/A",
                "power_limit": 750}

    def amdsmi_get_energy_count(self, handle: str) -> dict:
        self._gpu(handle, "energy")
        if self.counter_w is not None:
            elapsed_s = time.perf_counter() - self._started
            accumulator = 10**9 + round(self.counter_w * elapsed_s * 1e6 / RESOLUTION_UJ)
        elif self.counter is None:
            raise self.AmdSmiLibraryException(NOT_SUPPORTED)
        else:
            accumulator = self.counter[min(self._reads, len(self.counter) - 1)]
            self._reads += 1
        return {"power": accumulator, "energy_accumulator": accumulator,
                "counter_resolution": RESOLUTION_UJ, "timestamp": 0}

    def amdsmi_get_clock_info(self, handle: str, clock: IntEnum) -> dict:
        self._gpu(handle, "clock")
        mhz = self.gfx_mhz if clock == self.AmdSmiClkType.GFX else self.mem_mhz
        top = 2100 if clock == self.AmdSmiClkType.GFX else 1300
        return {"clk": mhz, "min_clk": 500, "max_clk": top, "clk_locked": False,
                "clk_deep_sleep": False}

    def amdsmi_get_temp_metric(self, handle: str, sensor: IntEnum, metric: IntEnum) -> int:
        self._gpu(handle, "temp")
        if sensor.name not in self.temps:
            raise self.AmdSmiLibraryException(NOT_SUPPORTED)
        return self.temps[sensor.name]

    def amdsmi_get_gpu_activity(self, handle: str) -> dict:
        self._gpu(handle, "activity")
        return {"gfx_activity": 97, "umc_activity": 40, "mm_activity": "N/A"}

    def amdsmi_get_violation_status(self, handle: str) -> dict:
        self._gpu(handle, "violations")
        if self.violations is None:
            raise self.AmdSmiLibraryException(NOT_SUPPORTED)
        return {"acc_counter": 12, **self.violations}

    # -- environment (bench env) --------------------------------------------------------------
    def amdsmi_get_power_cap_info(self, handle: str) -> dict:
        return {"power_cap": self.power_cap_uw, "default_power_cap": self.default_power_cap_uw,
                "dpm_cap": 0, "min_power_cap": 0, "max_power_cap": 750_000_000}

    def amdsmi_get_gpu_perf_level(self, handle: str) -> str:
        return self.perf_level

    def amdsmi_get_gpu_process_list(self, handle: str) -> list[dict]:
        return self.processes

    def amdsmi_get_gpu_driver_info(self, handle: str) -> dict:
        return {"driver_name": "amdgpu", "driver_version": "6.10.5", "driver_date": ""}

    def amdsmi_get_lib_version(self) -> dict:
        return {"year": 24, "major": 7, "minor": 1, "release": 0, "build": ""}


@pytest.fixture(autouse=True)
def _fresh_warning_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(monitor, "_warned", set())
    monkeypatch.setattr(peaks, "_warned", set())


@pytest.fixture
def amdsmi(monkeypatch: pytest.MonkeyPatch) -> FakeAmdSmi:
    return FakeAmdSmi().install(monkeypatch)


def _joules(j: float) -> int:
    return round(j * 1e6 / RESOLUTION_UJ)  # counter ticks


# -- backend choice ---------------------------------------------------------------------------

def test_the_torch_build_picks_the_library(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "hip", None)
    assert monitor.backend() is NVML
    monkeypatch.setattr(torch.version, "hip", "6.3.42131")
    assert monitor.backend() is amd.AMDSMI


# -- energy and power -------------------------------------------------------------------------

def test_energy_comes_from_the_counter_times_its_resolution(amdsmi):
    start = 7_000_000
    amdsmi.counter = [start, start, start + _joules(50.0)]  # probe, window start, window end
    fields = _window(PowerMonitor("GPU-5ee8c3b1c9e7a4f2", 10, min_counter_window_s=0.01))
    assert fields["energy_source"] == "counter" and fields["energy_j"] == pytest.approx(50.0)
    assert fields["joules_per_sample"] == pytest.approx(50.0 / 8)
    assert fields["power_source"] == "instant" and fields["power_scope"] == "gpu"
    assert fields["power_avg_w"] == pytest.approx(550.0) and fields["power_max_w"] == 550.0
    assert fields["sm_clock_mhz_avg"] == 2100 and fields["temp_max_c"] == 71  # hotspot
    assert fields["throttle_reasons"] == [] and fields["throttled"] is False
    assert fields["power_capped"] is False
    assert amdsmi.calls["shut_down"] == 1


def test_without_a_counter_energy_is_the_sampled_integral(amdsmi):
    amdsmi.power_w = 400.0  # counter None: amdsmi_get_energy_count is not supported
    fields = _window(PowerMonitor(0, 10))
    assert fields["energy_source"] == "sampled" and fields["energy_j"] > 0
    assert fields["energy_j"] == pytest.approx(400.0 * fields["energy_j"] / fields["power_avg_w"])
    assert fields["energy_check_pct"] is None


def test_a_board_with_only_average_power_says_so(amdsmi, caplog):
    # MI200 series: no current_socket_power, the firmware's average instead.
    amdsmi.power_w, amdsmi.average_power_w = None, 480.0
    amdsmi.counter = [1_000, 1_000, 1_000 + _joules(12.0)]
    fields = _window(PowerMonitor(0, 10, min_counter_window_s=0.01))
    assert fields["power_source"] == "average" and fields["power_avg_w"] == pytest.approx(480.0)
    assert fields["energy_source"] == "counter" and fields["energy_j"] == pytest.approx(12.0)
    amdsmi.counter = None  # a short window of averaged power alone: no energy, and why
    fields = _window(PowerMonitor(0, 10))
    assert fields["energy_source"] == "none" and fields["energy_j"] is None
    assert any("averaged power" in w for w in _warnings(caplog))


# -- throttling -------------------------------------------------------------------------------

@pytest.mark.parametrize(("violation", "reason", "throttled", "capped"), [
    ("active_ppt_pwr", "sw_power_cap", False, True),
    ("active_socket_thrm", "sw_thermal_slowdown", True, False),
    ("active_prochot_thrm", "hw_slowdown", True, False),
    ("active_vr_thrm", "hw_thermal_slowdown", True, False),
    ("active_hbm_thrm", "hw_thermal_slowdown", True, False),
])
def test_violations_are_decoded_to_clock_event_reasons(amdsmi, violation, reason, throttled,
                                                       capped):
    amdsmi.violations[violation] = True
    fields = _window(PowerMonitor(0, 10))
    assert fields["throttle_reasons"] == [reason]
    assert fields["throttled"] is throttled and fields["power_capped"] is capped
    assert gpu.parse_shares(fields["throttle_shares"]) == {reason: 1.0}


def test_the_power_cap_arriving_mid_window_gets_its_share(amdsmi):
    def power_cap_kicks_in():
        amdsmi.violations["active_ppt_pwr"] = True

    fields = _window(PowerMonitor(0, 10), during=power_cap_kicks_in)
    shares = gpu.parse_shares(fields["throttle_shares"])
    assert fields["throttle_reasons"] == ["sw_power_cap"] and 0 < shares["sw_power_cap"] < 1


@pytest.mark.parametrize("violations", [None, dict.fromkeys(amd._VIOLATIONS, "N/A")])
def test_unsupported_readings_leave_only_their_fields_empty(amdsmi, violations):
    # No violation status (the call is not supported, or every field "N/A"), no hotspot
    # sensor: the edge temperature.
    amdsmi.violations = violations
    amdsmi.temps = {"EDGE": 48}
    fields = _window(PowerMonitor(0, 10))
    assert fields["throttle_reasons"] is None and fields["throttled"] is None
    assert fields["power_capped"] is None and fields["temp_max_c"] == 48
    assert fields["power_avg_w"] == pytest.approx(550.0) and fields["sm_clock_mhz_avg"] == 2100


# -- finding the GPU, partitions, failures ------------------------------------------------------

def test_the_gpu_is_found_by_the_uuid_torch_prints(monkeypatch, caplog):
    # torch prints HIP's 16 UUID bytes, which are the ASCII digits of the GPU's unique id.
    fake = FakeAmdSmi(gpus=[
        {"uuid": "aaaa74a1-0000-1000-80a4-6c2e76c9b8e7", "serial": "0x1111111111111111",
         "power_w": 100.0},
        {"uuid": "d1ff74a1-0000-1000-80a4-6c2e76c9b8e7", "serial": "0x5EE8C3B1C9E7A4F2"},
    ]).install(monkeypatch)
    torch_uuid = b"5ee8c3b1c9e7a4f2".hex()
    torch_uuid = "-".join((torch_uuid[:8], torch_uuid[8:12], torch_uuid[12:16],
                           torch_uuid[16:20], torch_uuid[20:]))
    assert _window(PowerMonitor(torch_uuid, 10))["power_avg_w"] == pytest.approx(550.0)
    by_amdsmi_uuid = PowerMonitor("GPU-aaaa74a1-0000-1000-80a4-6c2e76c9b8e7", 10)
    assert _window(by_amdsmi_uuid)["power_avg_w"] == pytest.approx(100.0)
    assert _window(PowerMonitor("ffffffff-0000-0000-0000-000000000000")) == monitor.empty_fields()
    (message,) = _warnings(caplog)
    assert message.startswith("amdsmi cannot open GPU ffffffff")
    assert fake.calls["shut_down"] == 3  # closed after every window, and after the failure


def test_the_only_gpu_is_measured_whatever_torch_calls_it(amdsmi, caplog):
    # ROCm versions disagree on what a UUID is; one GPU on the machine is the one torch runs on.
    fields = _window(PowerMonitor("ffffffff-0000-0000-0000-000000000000", 10))
    assert fields["power_avg_w"] == pytest.approx(550.0) and not _warnings(caplog)


def test_a_partitioned_gpu_is_measured_whole_and_says_so(monkeypatch, caplog):
    FakeAmdSmi(partition="CPX", counter_w=550.0).install(monkeypatch)
    fields = _window(PowerMonitor(0, 10, min_counter_window_s=0.01), seconds=0.2)
    assert fields["power_scope"] == "shared_gpu" and fields["energy_source"] == "counter"
    assert fields["energy_j"] > 0 and fields["joules_per_sample"] is None
    assert any("whole GPU's" in w for w in _warnings(caplog))


def test_an_error_inside_the_window_empties_the_fields_with_one_warning(amdsmi, caplog):
    def gpu_falls_off_the_bus():
        amdsmi.fail = True

    amdsmi.counter = [1, 1, 2]
    fields = _window(PowerMonitor(0, 10), during=gpu_falls_off_the_bus)
    assert fields == monitor.empty_fields()
    (message,) = _warnings(caplog)
    assert "amdsmi failed" in message and "7" in message


def test_missing_amdsmi_leaves_fields_empty_with_one_warning_naming_the_package(monkeypatch,
                                                                                caplog):
    FakeAmdSmi().install(monkeypatch)
    monkeypatch.setitem(sys.modules, "amdsmi", None)  # `import amdsmi` raises ImportError
    for _ in range(3):
        assert _window(PowerMonitor(0)) == monitor.empty_fields()
    (message,) = _warnings(caplog)
    assert message.startswith("amdsmi not available") and "pip install amdsmi" in message


def test_amdsmi_without_a_driver_leaves_fields_empty(monkeypatch, caplog):
    FakeAmdSmi(init_error=DRIVER_NOT_LOADED).install(monkeypatch)
    assert _window(PowerMonitor(0)) == monitor.empty_fields()
    (message,) = _warnings(caplog)
    assert message.startswith("amdsmi not available") and "34" in message


# -- ampbench env -----------------------------------------------------------------------------

def test_amd_state_of_a_quiet_well_set_gpu(amdsmi):
    state = amd.state()
    assert state["available"] and state["driver_version"] == "6.10.5"
    (gpu,) = state["gpus"]
    assert gpu["name"] == "AMD Instinct MI300X" and gpu["perf_level"] == "auto"
    assert gpu["compute_partition"] == "SPX" and gpu["clock_event_reasons"] == []
    assert (gpu["sm_clock_mhz"], gpu["sm_clock_max_mhz"]) == (2100, 2100)
    assert gpu["power_w"] == 550.0 and gpu["temp_c"] == 71
    assert gpu["power_limit_w"] == gpu["power_limit_default_w"] == 750.0
    assert gpu["processes"] == []
    assert machine.noise_warnings(MachineState({"available": False}, {"performance": 16},
                                               state)) == []
    assert amd.driver_version() == "6.10.5"


def test_a_noisy_amd_gpu_gets_one_warning_per_problem(monkeypatch):
    FakeAmdSmi(
        processes=[{"name": "python3", "pid": 4242, "mem": 3 * 1024**3}],
        power_cap_uw=500_000_000,
        violations={**dict.fromkeys(amd._VIOLATIONS, False), "active_socket_thrm": True},
        temps={"HOTSPOT": 104},
        perf_level="AMDSMI_DEV_PERF_LEVEL_LOW",
        partition="CPX",
    ).install(monkeypatch)
    state = amd.state()
    assert state["gpus"][0]["processes"] == [{"pid": 4242, "name": "python3", "used_gib": 3.0}]
    warnings = machine.noise_warnings(MachineState({"available": False}, None, state))
    assert len(warnings) == 5, warnings
    text = "\n".join(warnings)
    assert "1 other process(es)" in text and "4242 python3" in text
    assert "power limit 500 W is below the default 750 W" in text
    assert "sw_thermal_slowdown" in text and "104" in text
    assert "performance level is low" in text
    assert "compute partition CPX" in text and "--peak-tflops" in text


def test_env_shows_amd_gpus_under_rocm(amdsmi, capsys):
    assert env.main(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert "amdsmi: driver 6.10.5, amdsmi 24.7.1.0, torch built for ROCm 6.3.42131" in out
    assert "GPU 0: AMD Instinct MI300X" in out and "performance level" in out
    assert "power limit" in out and "750 W (default 750 W)" in out
    assert env.main(argparse.Namespace(json=True)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["amdsmi"]["gpus"][0]["name"] == "AMD Instinct MI300X"


def test_env_under_rocm_without_amdsmi_says_what_to_install(monkeypatch, capsys):
    FakeAmdSmi().install(monkeypatch)
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    assert env.main(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert "amdsmi: not available (the amdsmi package is not installed" in out
    assert "pip install amdsmi" in out


def test_env_on_a_cuda_build_without_amd_gpus_has_no_amd_section(monkeypatch, capsys):
    FakeAmdSmi(gpus=[]).install(monkeypatch, hip=None)
    assert env.main(argparse.Namespace(json=True)) == 0
    assert "amdsmi" not in json.loads(capsys.readouterr().out)


# -- peak table and MFU -----------------------------------------------------------------------

@pytest.mark.parametrize(("name", "key"), [  # as torch prints them on ROCm
    ("AMD Instinct MI300X", "MI300X"),
    ("AMD Instinct MI300X VF", "MI300X"),
    ("AMD Instinct MI300X OAM", "MI300X"),
    ("AMD Instinct MI325X", "MI325X"),
    ("AMD Instinct MI250X", "MI250X GCD"),
    ("AMD Instinct MI210", "MI210"),
    ("amd-instinct-mi300x", "MI300X"),
])
def test_amd_device_names_match_their_row(name, key):
    assert peaks.device_key(name) == key


@pytest.mark.parametrize("name", [
    "AMD Instinct MI300A",  # the APU: other peaks
    "AMD Instinct MI308X",  # an export part with fewer CUs
    "AMD Instinct MI250X/MI250",  # either part's GCD: 110 or 104 CUs
    "AMD Instinct MI250",
    "AMD Instinct MI300X HF",
    "AMD Radeon PRO W7900",
])
def test_other_amd_names_get_no_peak(name):
    assert peaks.device_key(name) is None


def test_mi300x_mfu_is_against_its_dense_peak():
    fields = flops.mfu_fields(0.4 * 1307.4e12, 1.0, "AMD Instinct MI300X", "bf16")
    assert fields == {"peak_tflops": 1307.4, "mfu_pct": pytest.approx(40.0),
                      "peak_fp8_tflops": None, "mfu_fp8_pct": None, "mfu_flag": ""}
    assert peaks.device_peak_tflops("AMD Instinct MI300X", "tf32") == 653.7
    assert peaks.device_peak_tflops("AMD Instinct MI300X", "fp8") == 2614.9
    # FP32 is the matrix figure, equal to the vector one on MI300X; MI210's is twice its vector.
    assert peaks.device_peak_tflops("AMD Instinct MI300X", "fp32") == 163.4
    assert peaks.device_peak_tflops("AMD Instinct MI210", "fp32") == 45.3


def test_cdna2_has_no_tf32_or_fp8_peak(caplog):
    assert peaks.device_peak_tflops("AMD Instinct MI210", "tf32") is None
    assert peaks.device_peak_tflops("AMD Instinct MI250X", "fp8") is None
    assert flops.mfu_fields(1e12, 1.0, "AMD Instinct MI210", "tf32") == {
        "peak_tflops": None, "mfu_pct": None, "peak_fp8_tflops": None, "mfu_fp8_pct": None,
        "mfu_flag": "no peak for tf32 on MI210"}
    assert any("tf32 on MI210" in w for w in _warnings(caplog))
