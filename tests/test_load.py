"""Machine load: others' CPU time on this process's cores, steal, and the warnings."""

from __future__ import annotations

import os

import pytest

from bench.run import contention

_STAT = """cpu  900 0 300 8000 0 0 0 100 0 0
cpu0 {user} 0 {system} 4000 0 0 0 {steal} 0 0
cpu1 {user} 0 {system} 4000 0 0 0 {steal} 0 0
intr 12345
"""


def _stat(tmp_path, name: str, user: int, system: int, steal: int) -> str:
    path = tmp_path / name
    path.write_text(_STAT.format(user=user, system=system, steal=steal))
    return str(path)


def test_others_share_is_busy_time_less_our_own(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    tick = os.sysconf("SC_CLK_TCK")
    start = contention.snapshot(_stat(tmp_path, "a", 100, 0, 0))
    end = contention.snapshot(_stat(tmp_path, "b", 100 + 3 * tick, 0, tick))
    assert start is not None and end is not None
    # 2 cores x 3 s user busy, 2 x 1 s steal, and 2 CPU-seconds idle: 10 in all.
    start = contention.Snapshot(0.0, start.busy_s, start.steal_s, start.total_s, own_s=0.0)
    end = contention.Snapshot(10.0, end.busy_s, end.steal_s, end.total_s + 2, own_s=2.0)
    during = contention.during(start, end)
    assert during["others_cpu_pct"] == pytest.approx((6 - 2) / 10 * 100, abs=0.1)
    assert during["steal_pct"] == pytest.approx(2 / 10 * 100, abs=0.1)
    assert len(contention.warnings(during)) == 2


def test_an_idle_machine_gets_no_warning_and_no_proc_means_no_claim(tmp_path):
    assert contention.warnings({"loadavg_before": 1.9, "cores": 2, "others_cpu_pct_before": 2.0,
                          "others_cpu_pct": 3.0, "steal_pct": 0.0}) == []
    busy = contention.warnings({"cores": 2, "others_cpu_pct_before": 80.0})
    assert busy and "other processes used 80% of the 2 cores ampbench may use" in busy[0]
    assert contention.snapshot(str(tmp_path / "missing")) is None
    assert contention.during(None, None) == {}
