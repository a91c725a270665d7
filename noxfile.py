"""Task runner: ``nox -s bench`` runs the benchmark, ``nox -s tests`` the tests.

Every session's virtualenv sees the system site-packages, so a preinstalled torch (the CPU
build on a laptop or CI, the CUDA build on a GPU box) is reused and never replaced.
Arguments after ``--`` pass through to the underlying command.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

VENV = ["--system-site-packages"]


def _install(session: nox.Session, extras: str = "") -> None:
    session.install("-e", f".[{extras}]" if extras else ".")


@nox.session(venv_params=VENV)
def tests(session: nox.Session) -> None:
    """Unit and integration tests on CPU (GPU tests skip without CUDA)."""
    _install(session, "test")
    session.run("python", "-m", "pytest", *session.posargs)  # pyproject deselects perf


@nox.session(venv_params=VENV)
def lint(session: nox.Session) -> None:
    """ruff check."""
    session.install("ruff")
    session.run("ruff", "check", "bench", "models", "tests", "noxfile.py", *session.posargs)


@nox.session(venv_params=VENV)
def bench(session: nox.Session) -> None:
    """The benchmark: gpu preset on a CUDA machine, cpu preset elsewhere; ends with the report."""
    _install(session)
    session.run("python", "-m", "bench", "run", *session.posargs)


@nox.session(venv_params=VENV)
def parity(session: nox.Session) -> None:
    """Accuracy parity of every reduced precision against FP32."""
    _install(session)
    session.run("python", "-m", "bench", "parity", *session.posargs)


@nox.session(venv_params=VENV)
def report(session: nox.Session) -> None:
    """Render report.md and plots for the latest run (or the run directory given)."""
    _install(session)
    session.run("python", "-m", "bench", "report", *session.posargs)


@nox.session(venv_params=VENV)
def gate(session: nox.Session) -> None:
    """Gate the latest run against this device's baseline."""
    _install(session)
    session.run("python", "-m", "bench", "gate", *session.posargs)


@nox.session(venv_params=VENV)
def perf(session: nox.Session) -> None:
    """pytest-benchmark training-step benchmarks (--benchmark-autosave, --benchmark-compare...)."""
    _install(session, "test")
    # pytest-benchmark disables itself under xdist; perf numbers need one process anyway.
    session.run("python", "-m", "pytest", "-p", "no:xdist", "-m", "perf", "--benchmark-only",
                *session.posargs)
