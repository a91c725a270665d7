"""A cell polices itself: its tree dies with its runner or at its own deadline."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from bench.run import proctree

# A stand-in cell: starts the watchdog, then a grandchild, then hangs.
CELL = ("import subprocess, sys, time\nfrom bench.run import proctree\n"
        "proctree.watch(sys.argv[1] or None, float(sys.argv[2]) or None)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\ntime.sleep(60)\n")


def _start(cli_env, runner: str, timeout_s: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", CELL, runner, str(timeout_s)], env=cli_env,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    return proc, int(proc.stdout.readline())


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(map(proctree.alive, pids)):
            return True
        time.sleep(0.05)
    return False


def test_a_cell_and_its_children_die_at_its_own_deadline(cli_env):
    started = time.monotonic()
    proc, grandchild = _start(cli_env, "", 1.0)
    assert proc.wait(timeout=10) == -9
    assert time.monotonic() - started < 6
    assert _gone_within([grandchild], 2), "the cell's own child outlived the deadline"


def test_a_cell_and_its_children_die_when_the_runner_is_gone(cli_env):
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc, grandchild = _start(cli_env, f"{socket.gethostname()}:{runner.pid}", 0)
    time.sleep(0.5)
    assert proc.poll() is None and proctree.alive(grandchild)  # alive while the runner is
    runner.kill()
    runner.wait()
    assert proc.wait(timeout=5) == -9
    assert _gone_within([grandchild], 2)


def test_a_runner_on_another_host_or_nothing_to_watch_starts_no_watchdog():
    assert proctree.watch("elsewhere:1", None) is None
    assert proctree.watch(None, None) is None


@pytest.mark.parametrize(("timeout", "expected"), [("30", True), ("nan", False), ("-1", False),
                                                   ("inf", False), ("soon", False)])
def test_the_environment_gives_the_deadline(monkeypatch, timeout, expected):
    seen = []
    monkeypatch.setattr(proctree, "watch", lambda runner, timeout_s: seen.append(timeout_s))
    monkeypatch.setenv(proctree.TIMEOUT_ENV, timeout)
    proctree.watch_from_env()
    assert (seen[0] is not None) is expected
