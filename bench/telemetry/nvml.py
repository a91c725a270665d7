"""NVIDIA GPUs through NVML (nvidia-ml-py, imported lazily): the reader of one GPU and its
backend, ``NVML``. torch-free.

What is read: power (``NVML_FI_DEV_POWER_INSTANT`` through ``nvmlDeviceGetFieldValues`` where
the driver has it, ``power_source=instant``, else ``nvmlDeviceGetPowerUsage``, a ~1 s moving
average on Ampere and newer, ``power_source=average``), the energy counter
(``nvmlDeviceGetTotalEnergyConsumption``, mJ since the driver loaded), SM and memory clocks,
temperature, utilization and the clock-event (throttle) reasons. A query this board, driver or
user cannot have leaves its field empty; any other error (a lost GPU) propagates.

MIG. A MIG instance (UUID ``MIG-...``) answers none of NVML's power, energy, clock or throttle
queries: they are read from its parent GPU and are the whole GPU's, shared by every instance on
it (``shared``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

from bench.telemetry.gpu import Backend, GpuReader, as_text

# NVML answers that mean "this board, driver or user cannot have this reading": the field
# stays empty. Any other error (GPU lost, driver gone) fails the window instead.
_UNSUPPORTED = (
    "NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND", "NVML_ERROR_NO_PERMISSION",
    "NVML_ERROR_INVALID_ARGUMENT", "NVML_ERROR_NOT_FOUND",
)


def _handle_by_uuid(nvml: ModuleType, uuid: str) -> Any:
    """NVML's handle for a UUID as torch prints it: bare, where NVML wants "GPU-" or, for a MIG
    instance, "MIG-" before it."""
    uuid = uuid.strip()
    if uuid.startswith(("GPU-", "MIG-")):
        return nvml.nvmlDeviceGetHandleByUUID(uuid)
    try:
        return nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    except nvml.NVMLError as not_a_gpu:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(f"MIG-{uuid}")
        except nvml.NVMLError:
            raise not_a_gpu from None


def open_nvml() -> ModuleType:
    """``pynvml`` after ``nvmlInit()``; raises RuntimeError with the reason when NVML is absent."""
    try:
        import pynvml
    except ImportError as exc:
        raise RuntimeError(f"nvidia-ml-py is not installed ({exc})") from None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError, or OSError from a broken library: both mean "none"
        raise RuntimeError(as_text(exc) or type(exc).__name__) from None
    return pynvml


class NvmlGpu(GpuReader):
    """One GPU's NVML readers, chosen once for what this driver and board support."""

    def __init__(self, nvml: ModuleType, device: int | str) -> None:
        self.nvml = nvml
        self._unsupported = {
            getattr(nvml, name) for name in _UNSUPPORTED if hasattr(nvml, name)
        }
        if isinstance(device, str):
            handle = _handle_by_uuid(nvml, device)
        else:
            handle = nvml.nvmlDeviceGetHandleByIndex(device)
        # A MIG instance's handle answers no power, energy, clock or throttle query: those are
        # its parent GPU's, shared by every instance on it.
        is_mig = self._query("nvmlDeviceIsMigDeviceHandle", handle)
        is_mig = bool(getattr(is_mig, "value", is_mig))  # pynvml returns a c_uint
        if is_mig:
            handle = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        self.handle = handle
        mode = self._query("nvmlDeviceGetMigMode", handle)  # [current, pending]
        mig_mode = bool(mode) and mode[0] == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1)
        self.shared = is_mig or mig_mode
        self.power_source: str | None = None
        self.read_power = self._pick_power()
        self.read_reasons = self._pick_reasons()
        fast: dict[str, Callable[[], float]] = {
            "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(self.handle, nvml.NVML_CLOCK_SM),
        }
        slow: dict[str, Callable[[], float]] = {
            "mem_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(
                self.handle, nvml.NVML_CLOCK_MEM),
            "temp_c": lambda: nvml.nvmlDeviceGetTemperature(
                self.handle, nvml.NVML_TEMPERATURE_GPU),
            "gpu_util_pct": lambda: nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu,
        }
        self.fast = self._supported(fast)
        self.slow = self._supported(slow)
        self.has_counter = self._works(self.energy_mj)

    def _not_supported(self, exc: Exception) -> bool:
        return isinstance(exc, self.nvml.NVMLError) and exc.value in self._unsupported

    def _query(self, name: str, *args: Any) -> Any:
        """NVML function ``name``'s answer; None where the bindings or the board lack it."""
        fn = getattr(self.nvml, name, None)
        if fn is None:
            return None
        try:
            return fn(*args)
        except self.nvml.NVMLError as exc:
            if self._not_supported(exc):
                return None
            raise

    def _pick_power(self) -> Callable[[], float] | None:
        nvml = self.nvml

        def instant() -> float:
            value = nvml.nvmlDeviceGetFieldValues(self.handle, [nvml.NVML_FI_DEV_POWER_INSTANT])[0]
            if value.nvmlReturn != nvml.NVML_SUCCESS:  # e.g. a driver without this field
                raise nvml.NVMLError(nvml.NVML_ERROR_NOT_SUPPORTED)
            return _field_value(nvml, value) / 1e3  # mW

        def average() -> float:
            return nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3  # mW, ~1 s average

        if hasattr(nvml, "NVML_FI_DEV_POWER_INSTANT") and self._works(instant):
            self.power_source = "instant"
            return instant
        if self._works(average):
            self.power_source = "average"
            return average
        return None

    def _pick_reasons(self) -> Callable[[], int] | None:
        # The "clocks event" names replaced "throttle" in newer NVML; old bindings or drivers
        # only have the latter (AttributeError / NVML_ERROR_FUNCTION_NOT_FOUND).
        for name in ("nvmlDeviceGetCurrentClocksEventReasons",
                     "nvmlDeviceGetCurrentClocksThrottleReasons"):
            fn = getattr(self.nvml, name, None)
            if fn is not None and self._works(partial(fn, self.handle)):
                return partial(fn, self.handle)
        return None

    def energy_mj(self) -> int:
        return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))


NVML = Backend("NVML", open_nvml, lambda nvml: nvml.nvmlShutdown(), NvmlGpu)


def _field_value(nvml: ModuleType, value: Any) -> float:
    """The number in an nvmlFieldValue_t, whatever its value type."""
    attr = {
        nvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
        nvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
        nvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
        nvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
        nvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
        nvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
    }.get(value.valueType, "uiVal")
    return float(getattr(value.value, attr))
