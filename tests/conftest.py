"""Shared test setup: CPU only, few threads, so tests are quick and repeatable on small boxes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for `python -m bench` child processes run from the repository root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


@pytest.fixture
def run_python(cli_env: dict[str, str]) -> Callable[..., None]:
    """Runs Python code in a fresh interpreter (the repository importable) and fails the test,
    with the child's stderr, when it does not exit 0: checks of what a process imports."""
    def run(code: str, timeout: float = 60) -> None:
        proc = subprocess.run([sys.executable, "-c", code], env=cli_env, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr
    return run


@pytest.fixture
def processes_mentioning() -> Callable[[str], list[str]]:
    """Finds live processes whose command line contains a text (a test's own tmp path): what
    a killed sweep must not leave behind."""
    def find(text: str) -> list[str]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(pid)
            except OSError:
                continue
        return found

    return find


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip cleanly where CUDA is absent."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


PYTHON = sys.executable
