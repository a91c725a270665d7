"""Step timing and peak memory, measured the honest way.

CUDA: an event pair around each step, one synchronize after the whole window, so nothing in
the window waits on the host. CPU: ``time.perf_counter`` (the step is synchronous there).
Raw step times are kept (the record's ``step_times_ms``); median, IQR and min are derived
from them by bench/store.py's ``step_stats``, here and wherever a record is read.

Every process that times on a GPU calls ``use_device`` first (a cell, peers, parity), and
StepTimer records on its device's stream by name, so ``--device cuda:1`` times GPU 1's work.

The host's clock brackets every step on CUDA too: the time the Python thread spent issuing it.
A step is host-bound when the GPU waits for those launches (small batches, many small kernels),
which understates what the GPU and a precision policy could do.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

from bench import store

GIB = 1024**3

# Host-bound: issuing a step takes the host at least this share of the GPU's step time (a
# starved GPU's event time includes its idle gaps, so the two meet)...
HOST_BOUND_SHARE = 0.9
# ... and when the host has issued a step, the GPU has less than this share of a step left to
# run. Both are needed: once about 1,000 launches are queued, a launch blocks until the GPU
# frees a slot, so in a GPU-bound step of thousands of kernels the host also takes as long as
# the GPU, but then a queue's worth of work is still pending. Calibrate on a GPU run from the
# recorded host_ms_median and queued_ms_median.
QUEUED_SHARE = 0.1


def use_device(device: Any) -> None:
    """Make ``device`` this process's current GPU (nothing on CPU): call it before anything
    touches CUDA in a process that trains or times on ``device``."""
    if device.type == "cuda":
        import torch

        # The current device, not the tensors', is where every call that names no device goes
        # (an event recorded without a stream, synchronize(), a new Stream) and where CUDA
        # opens its first context: a process that never sets it times GPU 0's stream and
        # takes memory on GPU 0 as well.
        torch.cuda.set_device(device)


class StepTimer:
    """Per-step timer for a window of ``num_steps`` steps on ``device``: device time (CUDA
    events on the device's current stream) and the host's time issuing each step."""

    def __init__(self, device: Any, num_steps: int) -> None:
        import torch

        self._device = device
        self._cuda = device.type == "cuda"
        self._spans = [(0.0, 0.0)] * num_steps  # host perf_counter at each step's start, stop
        self._synced = False
        if self._cuda:
            # The stream the steps run on: the device's, named, not whatever device is current.
            self._stream = torch.cuda.current_stream(device)
            # Made before the window; torch creates each CUDA event at its first record, on the
            # recording stream's device (a microsecond of host time, not of the device's).
            self._events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(num_steps)
            ]

    def start(self, i: int) -> None:
        self._spans[i] = (time.perf_counter(), 0.0)
        if self._cuda:
            self._events[i][0].record(self._stream)

    def stop(self, i: int) -> None:
        if self._cuda:
            self._events[i][1].record(self._stream)
        self._spans[i] = (self._spans[i][0], time.perf_counter())

    def _wait(self) -> None:
        """After the window: wait once for the device, so that every event has happened."""
        import torch

        if self._cuda and not self._synced:
            torch.cuda.synchronize(self._device)
            self._synced = True

    def times_ms(self) -> list[float]:
        """Raw step times in ms; on CUDA, read only after the window (this waits for the
        device)."""
        if self._cuda:
            self._wait()
            return [start.elapsed_time(end) for start, end in self._events]
        return self.host_times_ms()

    def host_times_ms(self) -> list[float]:
        """Raw host times per step in ms: on CUDA the time spent issuing the step's work."""
        return [(stop - start) * 1e3 for start, stop in self._spans]

    def queued_ms(self) -> list[float] | None:
        """Per step, how long the GPU still ran it after the host had issued it (ms); None on
        CPU. Both clocks count from the window's first event, which the GPU runs as soon as it
        is recorded when the window starts after a synchronize (the warmup's)."""
        if not self._cuda:
            return None
        self._wait()
        first, host_first = self._events[0][0], self._spans[0][0]
        return [first.elapsed_time(end) - (stop - host_first) * 1e3
                for (_, end), (_, stop) in zip(self._events, self._spans, strict=True)]

    def host_fields(self) -> dict[str, Any]:
        """``host_ms_median``, ``queued_ms_median`` and ``host_bound`` (None on CPU, where the
        host's time is the step time); on CUDA, read only after the window."""
        host_ms = statistics.median(self.host_times_ms())
        queued = self.queued_ms()
        if queued is None:
            return {"host_ms_median": host_ms, "queued_ms_median": None, "host_bound": None}
        step_ms = statistics.median(self.times_ms())
        queued_ms = statistics.median(queued)
        return {"host_ms_median": host_ms, "queued_ms_median": queued_ms,
                "host_bound": bool(host_ms >= HOST_BOUND_SHARE * step_ms
                                   and queued_ms < QUEUED_SHARE * step_ms)}


# Median, IQR and minimum of raw step times (ms): the store's one rule, which every reader of a
# record applies again to its raw times.
summarize = store.step_stats


def reset_peak_memory(device: Any) -> None:
    """Start the measured phase: forget earlier CUDA allocation peaks."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: Any) -> dict[str, float | None]:
    """Peak CUDA allocated/reserved since the reset (GiB) and this process's peak RSS (GiB)."""
    import torch

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss_kib if sys.platform == "darwin" else rss_kib * 1024  # macOS reports bytes
    fields: dict[str, float | None] = {
        "peak_mem_allocated_gib": None,
        "peak_mem_reserved_gib": None,
        "peak_rss_gib": rss_bytes / GIB,
    }
    if device.type == "cuda":
        fields["peak_mem_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        fields["peak_mem_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return fields
