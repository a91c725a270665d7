"""NVML sampler and energy against a fake NVML: the real pynvml module, its functions scripted."""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable
from types import SimpleNamespace

import pynvml
import pytest

from bench import BadInput
from bench.telemetry import gpu, monitor
from bench.telemetry.gpu import Sample, decode_reasons, is_power_capped, is_throttled
from bench.telemetry.monitor import PowerMonitor, window_fields
from bench.telemetry.nvml import NvmlGpu


@functools.cache
def _hash_bytes_per_s() -> float:
    data = bytes(4 << 20)
    start = time.perf_counter()
    hashlib.sha256(data).digest()
    return len(data) / (time.perf_counter() - start)


def _burn_without_gil(seconds: float) -> None:
    # hashlib releases the GIL while it hashes a large buffer: CPU work off the GIL.
    hashlib.sha256(bytes(max(4096, int(seconds * _hash_bytes_per_s())))).digest()


class FakeNVML:
    """Scripted stand-ins for the pynvml calls ampbench makes, for one GPU.

    Attributes are the board's state and may be changed between phases of a test: ``power_w``
    (instantaneous), ``average_power_w`` (nvmlDeviceGetPowerUsage), ``counter_mj`` (a list of
    successive energy-counter readings, the last one repeating), ``counter_w`` (instead: the
    counter advances at this many watts of real time), ``reasons`` (clock-event bitmask).
    ``fail`` makes every sampling call raise an NVMLError, as a GPU that fell off the bus.
    ``mig_uuid`` names a MIG instance on this GPU ("MIG-..."), whose handle, as NVML's, answers
    no sampling call; ``mig_mode`` is the GPU's MIG mode.
    Each call can be made to cost ``wait_s`` of waiting and ``native_s`` of CPU, both with the
    GIL released (as the driver's ioctl behind pynvml's ctypes call), plus ``python_s`` of busy
    Python holding the GIL (as pynvml's wrappers).
    """

    API = (
        "nvmlInit", "nvmlShutdown", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetHandleByUUID",
        "nvmlDeviceGetFieldValues",
        "nvmlDeviceGetPowerUsage", "nvmlDeviceGetTotalEnergyConsumption",
        "nvmlDeviceGetClockInfo", "nvmlDeviceGetMaxClockInfo", "nvmlDeviceGetTemperature",
        "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetCurrentClocksThrottleReasons", "nvmlSystemGetDriverVersion",
        "nvmlSystemGetNVMLVersion", "nvmlSystemGetCudaDriverVersion", "nvmlDeviceGetCount",
        "nvmlDeviceGetName", "nvmlDeviceGetApplicationsClock",
        "nvmlDeviceGetDefaultApplicationsClock", "nvmlDeviceGetPersistenceMode",
        "nvmlDeviceGetPerformanceState", "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetPowerManagementDefaultLimit", "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetGraphicsRunningProcesses", "nvmlSystemGetProcessName",
        "nvmlDeviceIsMigDeviceHandle", "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
        "nvmlDeviceGetMigMode",
    )

    def __init__(self, **state: object) -> None:
        self.init_error: int | None = None
        self.instant = True
        self.power_w = 250.0
        self.average_power_w = 240.0
        self.counter_mj: list[int] | None = None
        self.counter_w: float | None = None
        self.sm_clock_mhz = 1980
        self.mem_clock_mhz = 2619
        self.temp_c = 61
        self.reasons = 0
        self.fail = False
        self.wait_s = 0.0
        self.native_s = 0.0
        self.python_s = 0.0
        # env state
        self.app_clocks = (1980, 2619)
        self.app_clocks_default = (1980, 2619)
        self.persistence = pynvml.NVML_FEATURE_ENABLED
        self.power_limit_mw = 700_000
        self.default_power_limit_mw = 700_000
        self.processes: list[SimpleNamespace] = []
        self.uuid = "GPU-8c9e0f6a-2b1d-4e57-9a3c-0d1e2f3a4b5c"
        self.mig_uuid: str | None = None
        self.mig_mode = pynvml.NVML_DEVICE_MIG_DISABLE
        self.calls: dict[str, int] = {}
        self._started = time.perf_counter()
        self._counter_reads = 0
        self.__dict__.update(state)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeNVML:
        for name in self.API:
            monkeypatch.setattr(pynvml, name, getattr(self, name))
        return self

    def _call(self, name: str, sampling: bool = True, handle: str | None = None) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if handle == "mig-instance":  # NVML: power, clocks and reasons are the GPU's
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if self.python_s:
            end = time.perf_counter() + self.python_s
            while time.perf_counter() < end:
                pass
        if self.native_s:
            _burn_without_gil(self.native_s)
        if self.wait_s:
            time.sleep(self.wait_s)
        if sampling and self.fail:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    # -- lifetime -----------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self._call("nvmlInit", sampling=False)
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown", sampling=False)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self._call("handle", sampling=False)
        return f"gpu{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self._call("handle", sampling=False)
        if uuid == self.mig_uuid:
            return "mig-instance"
        if uuid != self.uuid:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return "gpu-by-uuid"

    def nvmlDeviceIsMigDeviceHandle(self, handle: str) -> int:
        return int(handle == "mig-instance")

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: str) -> str:
        if handle != "mig-instance":
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return "gpu-by-uuid"

    def nvmlDeviceGetMigMode(self, handle: str) -> list[int]:
        return [self.mig_mode, self.mig_mode]

    # -- sampling -----------------------------------------------------------------------------
    def nvmlDeviceGetFieldValues(self, handle: str, field_ids: list[int]) -> object:
        self._call("nvmlDeviceGetFieldValues", handle=handle)
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        for value, field_id in zip(values, field_ids, strict=True):
            value.fieldId = field_id
            if field_id == pynvml.NVML_FI_DEV_POWER_INSTANT and self.instant:
                value.nvmlReturn = pynvml.NVML_SUCCESS
                value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                value.value.uiVal = round(self.power_w * 1e3)
            else:
                value.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return values

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        self._call("nvmlDeviceGetPowerUsage", handle=handle)
        return round(self.average_power_w * 1e3)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        self._call("nvmlDeviceGetTotalEnergyConsumption", handle=handle)
        if self.counter_w is not None:
            return 10**9 + round(self.counter_w * (time.perf_counter() - self._started) * 1e3)
        if self.counter_mj is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        reading = self.counter_mj[min(self._counter_reads, len(self.counter_mj) - 1)]
        self._counter_reads += 1
        return reading

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:
        self._call("nvmlDeviceGetClockInfo", handle=handle)
        return self.sm_clock_mhz if clock == pynvml.NVML_CLOCK_SM else self.mem_clock_mhz

    def nvmlDeviceGetMaxClockInfo(self, handle: str, clock: int) -> int:
        return 1980 if clock == pynvml.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        self._call("nvmlDeviceGetTemperature", handle=handle)
        return self.temp_c

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        self._call("nvmlDeviceGetUtilizationRates", handle=handle)
        return SimpleNamespace(gpu=97, memory=40)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: str) -> int:
        self._call("nvmlDeviceGetCurrentClocksEventReasons", handle=handle)
        return self.reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: str) -> int:
        self._call("nvmlDeviceGetCurrentClocksThrottleReasons", handle=handle)
        return self.reasons

    # -- environment (bench env) --------------------------------------------------------------
    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetNVMLVersion(self) -> str:
        return "12.550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetName(self, handle: str) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetApplicationsClock(self, handle: str, clock: int) -> int:
        return self.app_clocks[0 if clock == pynvml.NVML_CLOCK_SM else 1]

    def nvmlDeviceGetDefaultApplicationsClock(self, handle: str, clock: int) -> int:
        return self.app_clocks_default[0 if clock == pynvml.NVML_CLOCK_SM else 1]

    def nvmlDeviceGetPersistenceMode(self, handle: str) -> int:
        return self.persistence

    def nvmlDeviceGetPerformanceState(self, handle: str) -> int:
        return 0

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: str) -> int:
        return self.power_limit_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: str) -> int:
        return self.default_power_limit_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[SimpleNamespace]:
        return self.processes

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: str) -> list[SimpleNamespace]:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        return "python"


@pytest.fixture(autouse=True)
def _fresh_warning_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(monitor, "_warned", set())


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNVML:
    return FakeNVML().install(monkeypatch)


def _window(monitor: PowerMonitor, seconds: float = 0.05, during=None) -> dict:
    monitor.measure_idle(0.01)
    with monitor:
        if during:
            during()
        time.sleep(seconds)
    return monitor.fields(num_samples=8)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# -- energy -----------------------------------------------------------------------------------

def test_energy_comes_from_the_counter_delta(nvml):
    nvml.counter_mj = [5_000_000, 5_000_000, 5_050_000]  # probe, window start, window end
    fields = _window(PowerMonitor(0, 10, min_counter_window_s=0.01))
    assert fields["energy_source"] == "counter"
    assert fields["energy_j"] == 50.0
    assert fields["joules_per_sample"] == 50.0 / 8
    assert fields["power_source"] == "instant"
    assert fields["power_avg_w"] == pytest.approx(250.0) and fields["power_max_w"] == 250.0
    assert fields["sm_clock_mhz_avg"] == 1980 and fields["temp_max_c"] == 61
    assert fields["throttle_reasons"] == [] and fields["throttle_shares"] == ""
    assert fields["throttled"] is False and fields["power_capped"] is False
    assert fields["power_scope"] == "gpu"


def test_counter_and_sampled_power_agree_when_both_see_the_same_watts(nvml, caplog):
    nvml.counter_w = 250.0
    fields = _window(PowerMonitor(0, 10, min_counter_window_s=0.01), seconds=0.3)
    assert fields["energy_source"] == "counter"
    assert fields["energy_j"] == pytest.approx(250.0 * 0.3, rel=0.3)
    assert abs(fields["energy_check_pct"]) < 5
    assert not _warnings(caplog)


def test_counter_sampled_disagreement_keeps_the_counter_and_warns(nvml, caplog):
    nvml.counter_w, nvml.power_w = 300.0, 200.0
    fields = _window(PowerMonitor(0, 10, min_counter_window_s=0.01), seconds=0.3)
    assert fields["energy_source"] == "counter"
    assert fields["energy_check_pct"] == pytest.approx(100 * (200 - 300) / 300, abs=5)
    assert fields["power_avg_w"] == pytest.approx(200.0)
    assert any("energy counter says" in w for w in _warnings(caplog))


def test_without_a_counter_energy_is_the_sampled_integral(nvml):
    nvml.power_w = 200.0  # counter_mj None: the board has no energy counter
    fields = _window(PowerMonitor(0, 10))
    assert fields["energy_source"] == "sampled"
    # Constant power: the trapezoid integral is power x the sampled span, whatever the spacing.
    assert fields["energy_j"] > 0
    assert fields["energy_j"] == pytest.approx(200.0 * fields["energy_j"] / fields["power_avg_w"])
    assert fields["energy_check_pct"] is None


def test_a_window_too_short_for_the_counter_is_never_zero_joules(nvml):
    nvml.counter_mj = [7_000_000]  # the counter does not tick inside a short window
    fields = _window(PowerMonitor(0, 10))  # default: the counter needs a 1 s window
    assert fields["energy_source"] == "sampled" and fields["energy_j"] > 0


def test_short_window_with_only_averaged_power_leaves_energy_empty_and_says_why(nvml, caplog):
    nvml.instant = False
    nvml.counter_mj = [7_000_000, 7_000_000, 7_000_100]
    fields = _window(PowerMonitor(0, 10))
    assert fields["energy_source"] == "none" and fields["energy_j"] is None
    assert fields["joules_per_sample"] is None
    assert fields["power_source"] == "average" and fields["power_avg_w"] == pytest.approx(240.0)
    (message,) = _warnings(caplog)
    assert "left empty" in message and "averaged power" in message


def test_missing_instant_field_falls_back_to_power_usage(nvml):
    nvml.instant = False
    nvml.counter_mj = [1_000_000, 1_000_000, 1_012_000]
    fields = _window(PowerMonitor(0, 10, min_counter_window_s=0.01))
    assert fields["power_source"] == "average"
    assert fields["power_avg_w"] == pytest.approx(240.0)
    assert fields["energy_source"] == "counter" and fields["energy_j"] == 12.0
    assert nvml.calls["nvmlDeviceGetPowerUsage"] >= 3


def test_window_fields_integrates_with_the_trapezoid_rule():
    samples = [Sample(0.0, 100.0), Sample(0.5, 200.0), Sample(1.0, 100.0)]
    fields = window_fields(samples, window_s=1.0, counter_j=None, power_source="instant",
                           idle_power_w=55.0, num_samples=10)
    assert fields["energy_j"] == pytest.approx(150.0)
    assert fields["power_avg_w"] == pytest.approx(150.0) and fields["power_max_w"] == 200.0
    assert fields["joules_per_sample"] == pytest.approx(15.0)
    assert fields["idle_power_w"] == 55.0 and fields["energy_source"] == "sampled"


def test_window_fields_check_is_signed_sampled_minus_counter():
    samples = [Sample(0.0, 100.0), Sample(2.0, 100.0)]  # 200 J sampled
    fields = window_fields(samples, window_s=2.0, counter_j=250.0, power_source="instant",
                           idle_power_w=None, num_samples=1)
    assert fields["energy_j"] == 250.0 and fields["energy_source"] == "counter"
    assert fields["energy_check_pct"] == pytest.approx(-20.0)


# -- failures ---------------------------------------------------------------------------------

def test_nvml_error_inside_the_window_empties_the_fields_with_one_warning(nvml, caplog):
    def gpu_falls_off_the_bus():
        nvml.fail = True

    nvml.counter_mj = [1, 1, 2]
    fields = _window(PowerMonitor(0, 10, min_counter_window_s=0.01), during=gpu_falls_off_the_bus)
    assert fields == monitor.empty_fields()
    assert fields["energy_source"] == "none"
    nvml.fail = False
    _window(PowerMonitor(0, 10))
    nvml.fail = True
    again = PowerMonitor(0, 10)
    with again:
        pass
    assert again.fields(8)["energy_source"] == "none"
    (message,) = _warnings(caplog)  # once per process, however many cells fail
    assert "NVML failed" in message and "GPU is lost" in message


def test_no_nvml_library_leaves_fields_empty_with_one_warning(monkeypatch, caplog):
    FakeNVML(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    for _ in range(3):
        assert _window(PowerMonitor(0)) == monitor.empty_fields()
    (message,) = _warnings(caplog)
    assert message.startswith("NVML not available")


def test_cpu_cell_has_nothing_to_sample_and_says_nothing(nvml, caplog):
    fields = _window(PowerMonitor(None))
    assert fields == monitor.empty_fields() and fields["energy_source"] == "none"
    assert not _warnings(caplog) and "nvmlInit" not in nvml.calls


def test_gpu_is_found_by_the_uuid_torch_prints(nvml, caplog):
    # Under CUDA_VISIBLE_DEVICES, torch's cuda:0 need not be NVML's GPU 0; the UUID is exact.
    fields = _window(PowerMonitor("8c9e0f6a-2b1d-4e57-9a3c-0d1e2f3a4b5c", 10))
    assert fields["power_avg_w"] == pytest.approx(250.0)
    assert _window(PowerMonitor("GPU-00000000-0000-0000-0000-000000000000")) == (
        monitor.empty_fields())
    (message,) = _warnings(caplog)
    assert "NVML cannot open GPU GPU-00000000" in message


def test_a_mig_instance_is_measured_on_its_whole_gpu_and_says_so(monkeypatch, caplog):
    # torch prints a MIG instance's UUID bare, as a GPU's; NVML knows it as "MIG-..." and
    # answers power, energy, clock and throttle queries only for the parent GPU.
    nvml = FakeNVML(mig_uuid="MIG-2f6b1c0e-7d4a-5b3c-8e9f-0a1b2c3d4e5f",
                    mig_mode=pynvml.NVML_DEVICE_MIG_ENABLE, counter_w=250.0).install(monkeypatch)
    fields = _window(PowerMonitor("2f6b1c0e-7d4a-5b3c-8e9f-0a1b2c3d4e5f", 10,
                                  min_counter_window_s=0.01), seconds=0.3)
    assert fields["power_scope"] == "shared_gpu"
    assert fields["power_avg_w"] == pytest.approx(250.0)
    assert fields["energy_source"] == "counter" and fields["energy_j"] > 0
    assert fields["sm_clock_mhz_avg"] == 1980 and fields["throttle_reasons"] == []
    # The GPU's energy includes every instance's work: not this cell's per sample.
    assert fields["joules_per_sample"] is None
    # A GPU in MIG mode found by its own UUID (older CUDA prints that) is shared as well.
    nvml.counter_w = None
    assert _window(PowerMonitor(0, 10))["power_scope"] == "shared_gpu"
    (message,) = _warnings(caplog)  # once per process
    assert "MIG" in message and "whole GPU's" in message and "joules_per_sample" in message


def test_bad_sampling_interval_is_bad_input():
    with pytest.raises(BadInput, match="interval"):
        PowerMonitor(0, 0)


# -- idle, clocks, throttling -----------------------------------------------------------------

def test_idle_power_is_measured_before_the_window(nvml):
    nvml.power_w = 62.0
    monitor = PowerMonitor(0, 10)
    monitor.measure_idle(0.02)
    nvml.power_w = 310.0
    with monitor:
        time.sleep(0.03)
    fields = monitor.fields(4)
    assert fields["idle_power_w"] == pytest.approx(62.0)
    assert fields["power_avg_w"] == pytest.approx(310.0)


def test_slow_readings_are_skipped_between_full_samples(nvml):
    gpu = NvmlGpu(pynvml, 0)
    light, full = gpu.sample(full=False), gpu.sample()
    assert light.power_w == 250.0 and light.sm_clock_mhz == 1980 and light.reasons == 0
    assert light.temp_c is None and light.mem_clock_mhz is None and light.gpu_util_pct is None
    assert (full.temp_c, full.mem_clock_mhz, full.gpu_util_pct) == (61, 2619, 97)


def test_reason_bits_match_nvml_h():
    for bit, name in gpu.REASON_BITS.items():
        if name == "unknown":
            continue  # only in very old nvml.h
        camel = "".join(part.capitalize() for part in name.split("_"))
        constant = getattr(pynvml, f"nvmlClocksEventReason{camel}", None)
        if constant is None:  # board_limit, reliability: only under the older "throttle" name
            constant = getattr(pynvml, f"nvmlClocksThrottleReason{camel}")
        assert constant == bit, name


def test_throttle_reasons_decode_to_names():
    assert decode_reasons(0) == []
    assert decode_reasons(0x4 | 0x8) == ["sw_power_cap", "hw_slowdown"]
    assert decode_reasons(0x1 | 0x40) == ["gpu_idle", "hw_thermal_slowdown"]
    assert decode_reasons(0x10000) == ["bits_0x10000"]
    assert not is_throttled(["gpu_idle", "applications_clocks_setting"])
    # The power cap is routine under load: power-capped, not throttled.
    assert not is_throttled(["gpu_idle", "sw_power_cap"])
    assert is_power_capped(["gpu_idle", "sw_power_cap"])
    for slowdown in ("hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown",
                     "sw_thermal_slowdown"):
        assert is_throttled(["sw_power_cap", slowdown])
        assert not is_power_capped([slowdown])


def test_window_records_throttling_seen_in_any_sample(nvml):
    def power_cap_kicks_in():
        nvml.reasons = 0x4

    nvml.reasons = 0x1
    fields = _window(PowerMonitor(0, 10), during=power_cap_kicks_in)
    assert fields["throttle_reasons"] == ["gpu_idle", "sw_power_cap"]
    assert fields["throttled"] is False and fields["power_capped"] is True
    shares = gpu.parse_shares(fields["throttle_shares"])
    assert list(shares) == ["gpu_idle", "sw_power_cap"]
    assert 0 < shares["gpu_idle"] < shares["sw_power_cap"] < 1  # idle in the first sample


def test_each_reason_gets_its_share_of_the_samples():
    # 20 samples: the power cap in 18 of them, heat in 3 (2 of those capped too), none in 1.
    masks = [0x4] * 16 + [0x4 | 0x40] * 2 + [0x40] + [0]
    samples = [Sample(t / 10, 300.0, reasons=mask) for t, mask in enumerate(masks)]
    fields = window_fields(samples, window_s=2.0, counter_j=None, power_source="instant",
                           idle_power_w=None, num_samples=20)
    assert fields["throttle_shares"] == "sw_power_cap:0.90;hw_thermal_slowdown:0.15"
    assert fields["throttle_reasons"] == ["sw_power_cap", "hw_thermal_slowdown"]
    assert fields["throttled"] is True and fields["power_capped"] is True
    assert gpu.parse_shares(fields["throttle_shares"]) == {
        "sw_power_cap": 0.9, "hw_thermal_slowdown": 0.15}


def test_idle_and_applications_clocks_are_not_throttling(nvml):
    nvml.reasons = 0x1 | 0x2
    fields = _window(PowerMonitor(0, 10))
    assert fields["throttle_reasons"] == ["gpu_idle", "applications_clocks_setting"]
    assert fields["throttled"] is False and fields["power_capped"] is False


def test_old_bindings_fall_back_to_throttle_reasons(nvml, monkeypatch):
    monkeypatch.delattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons")
    nvml.reasons = 0x20
    fields = _window(PowerMonitor(0, 10))
    assert fields["throttle_reasons"] == ["sw_thermal_slowdown"] and fields["throttled"]
    assert nvml.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] >= 2


def test_unsupported_queries_leave_only_their_fields_empty(nvml, monkeypatch):
    def not_supported(*args):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperature", not_supported)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", not_supported)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", not_supported)
    fields = _window(PowerMonitor(0, 10))
    assert fields["temp_max_c"] is None and fields["throttle_reasons"] is None
    assert fields["throttled"] is None and fields["throttle_shares"] is None
    assert fields["power_capped"] is None
    assert fields["power_avg_w"] == pytest.approx(250.0) and fields["sm_clock_mhz_avg"] == 1980


# -- sampler overhead: nox -s perf -- tests/test_power.py -k overhead ----------------------------
#
# The fake NVML's every call costs 0.5 ms with the GIL released, either waiting ("wait", as a
# driver call that blocks on the GPU) or burning CPU ("burn", pessimistic), plus 20 us of Python
# holding the GIL (pynvml's wrappers measure 0.3-2 us per call against a stub C function, so
# this is ~10x too much on purpose). Sampling at the default 50 ms period, against two
# training-like loops: pure Python (one thread holding the GIL, like the launch thread of a GPU
# training loop) and a CPU torch MLP step on every core (the sampler's CPU competes with it).
# Step times come from pytest-benchmark; extra_info adds the sampler thread's own CPU time in
# percent of the window, the cost that stays measurable on a noisy shared machine.

def _python_step() -> Callable[[], object]:
    def step() -> int:
        total = 0
        for i in range(400_000):
            total += i * i % 7
        return total

    return step


def _torch_step() -> Callable[[], object]:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(),
                                torch.nn.Linear(2048, 512))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(256, 512), torch.randn(256, 512)

    def step() -> object:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


@pytest.mark.perf
@pytest.mark.parametrize("sampler", ["off", "on-wait", "on-burn"])
@pytest.mark.parametrize("workload", ["python", "torch"])
def test_sampler_overhead(benchmark, monkeypatch, workload, sampler):
    call_cost = {"wait_s": 0.5e-3} if sampler == "on-wait" else {"native_s": 0.5e-3}
    fake = FakeNVML(python_s=20e-6, counter_w=300.0, **call_cost).install(monkeypatch)
    step = {"python": _python_step, "torch": _torch_step}[workload]()
    benchmark.group = f"sampler overhead, {workload} step"
    monitor = PowerMonitor(None if sampler == "off" else 0)  # the default 50 ms period
    with monitor:
        benchmark.pedantic(step, rounds=40, warmup_rounds=3, iterations=1)
    if monitor.samples:
        window_s = monitor.samples[-1].t_s - monitor.samples[0].t_s
        benchmark.extra_info["samples_per_s"] = len(monitor.samples) / window_s
        benchmark.extra_info["nvml_calls_per_s"] = sum(fake.calls.values()) / window_s
        benchmark.extra_info["sampler_cpu_pct"] = 100 * monitor.sampler_cpu_s / window_s


# -- several GPUs -----------------------------------------------------------------------------

def _gpu_fields(**fields: object) -> dict:
    return {**monitor.empty_fields(), "power_source": "instant", "power_scope": "gpu", **fields}


def test_power_of_several_gpus_is_summed_and_the_weakest_source_wins():
    a = _gpu_fields(power_avg_w=300.0, power_max_w=350.0, idle_power_w=90.0, energy_j=30.0,
                    energy_source="counter", energy_check_pct=2.0, sm_clock_mhz_avg=1900.0,
                    temp_max_c=60, throttle_reasons=["gpu_idle", "sw_power_cap"],
                    throttle_shares="gpu_idle:0.10;sw_power_cap:0.70", throttled=False,
                    power_capped=True)
    b = _gpu_fields(power_avg_w=320.0, power_max_w=400.0, idle_power_w=95.0, energy_j=32.0,
                    energy_source="sampled", energy_check_pct=None, sm_clock_mhz_avg=1700.0,
                    temp_max_c=71, throttle_reasons=["sw_power_cap", "bits_0x10000"],
                    throttle_shares="sw_power_cap:0.90;bits_0x10000:0.05", throttled=False,
                    power_capped=True)
    fields = monitor.combine_power([a, b], num_samples=62)
    assert (fields["power_avg_w"], fields["power_max_w"], fields["idle_power_w"]) == (
        620.0, 750.0, 185.0)
    assert fields["energy_j"] == 62.0 and fields["joules_per_sample"] == 1.0
    assert fields["energy_source"] == "sampled" and fields["energy_check_pct"] == 2.0
    assert fields["sm_clock_mhz_avg"] == 1800.0 and fields["temp_max_c"] == 71
    assert fields["throttle_reasons"] == ["gpu_idle", "sw_power_cap", "bits_0x10000"]
    assert fields["throttle_shares"] == "gpu_idle:0.10;sw_power_cap:0.90;bits_0x10000:0.05"
    assert fields["throttled"] is False and fields["power_capped"] is True
    assert fields["power_source"] == "instant" and fields["power_scope"] == "gpu"
    hot = _gpu_fields(throttle_reasons=["hw_thermal_slowdown"],
                      throttle_shares="hw_thermal_slowdown:0.20")
    assert monitor.combine_power([a, hot], 2)["throttled"] is True


def test_mig_instances_power_is_not_summed():
    # Two MIG instances may be slices of one GPU: a sum would count its power twice.
    parts = [_gpu_fields(power_avg_w=300.0, energy_j=30.0, energy_source="counter",
                         power_scope="shared_gpu", sm_clock_mhz_avg=1900.0)] * 2
    fields = monitor.combine_power(parts, num_samples=10)
    assert fields["power_scope"] == "shared_gpu" and fields["power_avg_w"] is None
    assert fields["energy_j"] is None and fields["energy_source"] == "none"
    assert fields["sm_clock_mhz_avg"] == 1900.0


def test_one_gpu_without_energy_leaves_the_sum_empty():
    a = _gpu_fields(power_avg_w=300.0, energy_j=30.0, energy_source="counter")
    b = _gpu_fields(power_avg_w=None, energy_j=None, energy_source="none", power_source=None)
    fields = monitor.combine_power([a, b], num_samples=10)
    assert fields["energy_j"] is None and fields["joules_per_sample"] is None
    assert fields["energy_source"] == "none" and fields["power_avg_w"] is None
    assert fields["power_source"] == "mixed"
    assert monitor.combine_power([monitor.empty_fields()] * 2, 4) == monitor.empty_fields()
