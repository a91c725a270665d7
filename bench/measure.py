"""Step timing and peak memory, measured the honest way.

CUDA: an event pair around each step, one synchronize after the whole window, so nothing in
the window waits on the host. CPU: ``time.perf_counter`` (the step is synchronous there).
Raw step times are kept; median, IQR and min are derived from them.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

GIB = 1024**3


class StepTimer:
    """Per-step timer for a window of ``num_steps`` steps on ``device``."""

    def __init__(self, device: Any, num_steps: int) -> None:
        import torch

        self._cuda = device.type == "cuda"
        if self._cuda:
            # Created before the window so that event creation is not timed.
            self._events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(num_steps)
            ]
        else:
            self._spans = [(0.0, 0.0)] * num_steps

    def start(self, i: int) -> None:
        if self._cuda:
            self._events[i][0].record()
        else:
            self._spans[i] = (time.perf_counter(), 0.0)

    def stop(self, i: int) -> None:
        if self._cuda:
            self._events[i][1].record()
        else:
            self._spans[i] = (self._spans[i][0], time.perf_counter())

    def times_ms(self) -> list[float]:
        """Raw step times in ms; on CUDA call only after the window's synchronize."""
        if self._cuda:
            return [start.elapsed_time(end) for start, end in self._events]
        return [(end - start) * 1e3 for start, end in self._spans]


def summarize(times_ms: list[float]) -> dict[str, float]:
    """Median, interquartile range and minimum of raw step times (ms)."""
    if len(times_ms) >= 2:
        q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    else:
        q1 = q3 = times_ms[0]
    return {
        "step_ms_median": statistics.median(times_ms),
        "step_ms_iqr": q3 - q1,
        "step_ms_min": min(times_ms),
    }


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
