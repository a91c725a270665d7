"""StepTimer's device and host clocks, and the host-bound verdict, with CUDA events faked."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from bench.cell import timing


def _fake_clocks(monkeypatch, host_ms, device_ms):
    """Host perf_counter and CUDA event times (ms) replayed in the order StepTimer reads them:
    start, stop of each step. Stands in for the GPU only: streams are named by their device,
    events remember the stream they were recorded on, and synchronize is logged."""
    host = iter(host_ms)
    device = iter(device_ms)
    log = SimpleNamespace(streams=[], synchronized=[], recorded_on=set())

    class Event:
        def __init__(self, enable_timing: bool) -> None:
            self.t = math.nan

        def record(self, stream=None) -> None:
            log.recorded_on.add(stream)
            self.t = next(device)

        def elapsed_time(self, end: Event) -> float:
            return end.t - self.t

    def current_stream(device=None):
        log.streams.append(device)
        return f"stream of {device}"

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "synchronize", log.synchronized.append)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(host) / 1e3)
    return log


def _simulate(issue_ms, gpu_ms, num_steps, queue_ms=math.inf):
    """Host and device timestamps of a window: the host takes ``issue_ms`` to issue a step, the
    GPU ``gpu_ms`` to run it, starting when the host gives it work; the host blocks when more
    than ``queue_ms`` of work is queued (the launch queue's depth)."""
    host_t, gpu_free = 0.0, 0.0
    host, device = [], []
    for _ in range(num_steps):
        start_dev = max(host_t, gpu_free)
        end_dev = max(start_dev + gpu_ms, host_t + issue_ms)  # no kernel runs before its launch
        stop_host = max(host_t + issue_ms, end_dev - queue_ms)
        host += [host_t, stop_host]
        device += [start_dev, end_dev]
        host_t, gpu_free = stop_host, end_dev
    return host, device


def _time(monkeypatch, issue_ms, gpu_ms, queue_ms=math.inf, num_steps=8):
    host, device = _simulate(issue_ms, gpu_ms, num_steps, queue_ms)
    _fake_clocks(monkeypatch, host, device)
    timer = timing.StepTimer(torch.device("cuda", 0), num_steps)
    for i in range(num_steps):
        timer.start(i)
        timer.stop(i)
    return timer


def test_host_times_are_recorded_beside_the_device_times(monkeypatch):
    timer = _time(monkeypatch, issue_ms=2.0, gpu_ms=10.0)
    assert timer.times_ms() == pytest.approx([10.0] * 8)
    assert timer.host_times_ms() == pytest.approx([2.0] * 8)
    fields = timer.host_fields()
    assert fields["host_ms_median"] == pytest.approx(2.0)
    assert fields["host_bound"] is False


def test_a_gpu_waiting_for_the_host_is_host_bound(monkeypatch):
    timer = _time(monkeypatch, issue_ms=10.0, gpu_ms=4.0)
    assert timer.times_ms() == pytest.approx([10.0] * 8)  # the GPU's idle gaps are in its time
    fields = timer.host_fields()
    assert fields["host_ms_median"] == pytest.approx(10.0)
    assert fields["queued_ms_median"] == pytest.approx(0.0)
    assert fields["host_bound"] is True


def test_a_host_blocked_by_a_full_launch_queue_is_not_host_bound(monkeypatch):
    # The host takes as long per step as the GPU, but because it waits for queue slots: 6 ms of
    # work is still queued whenever it has issued a step.
    timer = _time(monkeypatch, issue_ms=2.0, gpu_ms=10.0, queue_ms=6.0)
    fields = timer.host_fields()
    assert fields["host_ms_median"] == pytest.approx(10.0)
    assert fields["queued_ms_median"] == pytest.approx(6.0)
    assert fields["host_bound"] is False


def test_on_cpu_the_host_time_is_the_step_time_and_no_verdict(monkeypatch):
    stamps = itertools.count(0.0, 5.0)  # every step 5 ms
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(stamps) / 1e3)
    timer = timing.StepTimer(torch.device("cpu"), 3)
    for i in range(3):
        timer.start(i)
        timer.stop(i)
    assert timer.times_ms() == timer.host_times_ms() == pytest.approx([5.0] * 3)
    assert timer.host_fields() == {"host_ms_median": pytest.approx(5.0),
                                   "queued_ms_median": None, "host_bound": None}


def test_the_timer_records_on_its_own_devices_stream_and_waits_for_that_device(monkeypatch):
    # cuda:1 while the current device is another: the events go on cuda:1's stream, named.
    host, device = _simulate(issue_ms=1.0, gpu_ms=3.0, num_steps=4)
    log = _fake_clocks(monkeypatch, host, device)
    gpu1 = torch.device("cuda", 1)
    timer = timing.StepTimer(gpu1, 4)
    assert log.streams == [gpu1]
    for i in range(4):
        timer.start(i)
        timer.stop(i)
    assert log.recorded_on == {f"stream of {gpu1}"}
    assert log.synchronized == []  # nothing waits inside the window
    assert timer.times_ms() == pytest.approx([3.0] * 4)
    timer.host_fields()
    assert log.synchronized == [gpu1]  # once, after the window, on the timed device


def test_use_device_makes_a_gpu_current_and_leaves_the_cpu_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    timing.use_device(torch.device("cpu"))
    assert calls == []
    timing.use_device(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]


@pytest.mark.gpu
def test_on_a_gpu_the_events_are_on_the_timed_device_without_making_it_current():
    # The last GPU: on a machine with several it is not the current one (cuda:0).
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    x = torch.randn(1024, 1024, device=device)
    torch.cuda.synchronize(device)
    timer = timing.StepTimer(device, 3)
    for i in range(3):
        timer.start(i)
        for _ in range(10):
            x = torch.tanh(x @ x)
        timer.stop(i)
    assert all(t > 0 for t in timer.times_ms())  # read without a synchronize of its own
    assert {e.device for pair in timer._events for e in pair} == {device}
