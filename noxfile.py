"""Task runner: ``nox -s bench`` runs the benchmark, ``nox -s tests`` the tests.

torch is big, so every session shares one copy instead of installing its own:

1. ``AMPBENCH_TORCH`` set: pip arguments for the torch to install, e.g. ``torch==2.13.0`` or
   ``torch --index-url https://download.pytorch.org/whl/cu128``.
2. Otherwise a torch importable where nox runs (nox's own interpreter, or the ``python3`` on
   PATH, e.g. an activated venv, a GPU box's system Python, an NGC container) is reused as it is.
3. Otherwise torch is installed once into ``.nox/.cache/torch-pyX.Y``: PyPI's build on a machine
   with an NVIDIA GPU (or not Linux); without one, a CPU build from this machine's package index
   when it has one, else from PyTorch's CPU index. No CUDA wheels without a GPU.

Each session's virtualenv sees that torch through a ``.pth`` file, and the project is
installed with torch pinned to it, so pip never downloads or replaces torch. Arguments after
``--`` pass through to the underlying command.

``nox -s collect`` checks that every test module collects without the test extra, as on a bare
GPU box, and under Python 3.10, the oldest supported; CI runs it after the tests.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nox
from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH_KNOB = "AMPBENCH_TORCH"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
MIN_TORCH = "2.4"  # as in pyproject.toml
MIN_PYTHON = "3.10"  # as in pyproject.toml
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
SOURCES = ("bench", "models", "tests", "noxfile.py")
# Test-only or optional imports that collection must not need. Only hypothesis and torchao are
# checked absent: transformers and torchvision may come with a reused host torch's packages.
ABSENT = ("hypothesis", "torchao")
_PTH = "_ampbench_torch.pth"
_STAMP = "ampbench-torch.txt"


def _run_text(args: list[str], timeout: float = 120) -> str:
    """stdout of a helper command, or "" when it fails or is missing."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def _host_torch() -> Path | None:
    """The directory holding a torch importable where nox runs, for this Python version."""
    probe = ("import importlib.util as u, sys; s = u.find_spec('torch'); "
             "print('%d.%d' % sys.version_info[:2]); print(s.origin if s and s.origin else '')")
    candidates = [sys.executable, shutil.which("python3"), shutil.which("python")]
    for python in dict.fromkeys(c for c in candidates if c):
        lines = _run_text([python, "-c", probe], timeout=60).splitlines()
        if len(lines) == 2 and lines[0] == PYTHON and lines[1]:
            return Path(lines[1]).parent.parent  # .../site-packages/torch/__init__.py
    return None


def _has_nvidia_gpu() -> bool:
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    return "GPU " in _run_text(["nvidia-smi", "-L"], timeout=30)


def _default_torch(python: str) -> list[str]:
    """pip arguments for the torch to install when the user named none."""
    if _has_nvidia_gpu() or not sys.platform.startswith("linux"):
        return [f"torch>={MIN_TORCH}"]  # PyPI: CUDA on Linux, CPU (and MPS) elsewhere
    # No GPU: the newest CPU build this machine's configured index holds, else PyTorch's CPU
    # index. PyPI's Linux torch is a CUDA build with gigabytes of nvidia-* wheels.
    listing = _run_text([python, "-m", "pip", "index", "versions", "torch"])
    for line in listing.splitlines():
        if line.startswith("Available versions:"):
            for text in line.split(":", 1)[1].split(","):
                try:
                    version = Version(text.strip())
                except InvalidVersion:
                    continue
                if version.local == "cpu" and version >= Version(MIN_TORCH):
                    return [f"torch=={version}"]
    return [f"torch>={MIN_TORCH}", "--index-url", CPU_INDEX]


def _session_python(session: nox.Session) -> str:
    return str(Path(session.bin) / ("python.exe" if sys.platform == "win32" else "python"))


def _shared_torch(session: nox.Session, spec: str) -> Path:
    """``.nox/.cache/torch-pyX.Y``, holding torch (and its dependencies) installed once."""
    target = (session.cache_dir / f"torch-py{PYTHON}").resolve()
    stamp = target / _STAMP
    probe = f"import sys; sys.path.insert(0, {str(target)!r}); import torch"
    if stamp.exists() and stamp.read_text().strip() == spec and (
            subprocess.run([_session_python(session), "-c", probe],
                           capture_output=True).returncode == 0):
        return target
    args = shlex.split(spec) if spec else _default_torch(_session_python(session))
    session.log(f"installing {shlex.join(args)} once into {target} (shared by every session)")
    shutil.rmtree(target, ignore_errors=True)
    session.install("--target", str(target), *args)
    stamp.write_text(spec + "\n")
    return target


def _use_torch(session: nox.Session) -> str:
    """Make one shared torch importable in this session's virtualenv; return its version."""
    spec = os.environ.get(TORCH_KNOB, "").strip()
    where = None if spec else _host_torch()
    if where is None:
        where = _shared_torch(session, spec)
    # run_install: part of setting the session up, so it runs under --install-only too.
    site = session.run_install("python", "-c",
                               "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                               silent=True, log=False, stderr=subprocess.DEVNULL)
    (Path(str(site).strip()) / _PTH).write_text(f"{where}\n")
    # The pin needs the distribution's version: PyPI's CUDA wheels say 2.x.y in their metadata
    # but 2.x.y+cu130 in torch.__version__.
    info = session.run_install("python", "-c", "import importlib.metadata as m, torch; "
                               "print(m.version('torch'), torch.__version__, "
                               "torch.version.cuda)",
                               silent=True, log=False, stderr=subprocess.DEVNULL)
    version, shown, cuda = str(info).split()[-3:]
    build = "CPU" if cuda == "None" else f"CUDA {cuda}"
    session.log(f"torch {shown} ({build} build) from {where}")
    return version


def _install(session: nox.Session, extras: str = "") -> None:
    """The project (editable) over the shared torch, which pip may neither replace nor upgrade."""
    version = _use_torch(session)
    pin = Path(session.create_tmp()) / "torch-pin.txt"
    pin.write_text(f"torch=={version}\n")
    session.install("-c", str(pin), "-e", f".[{extras}]" if extras else ".")


def _requirements(extra: str = "", names: tuple[str, ...] = ()) -> list[str]:
    """pyproject.toml's dependencies (or an extra's), only ``names`` when given."""
    project = nox.project.load_toml("pyproject.toml")["project"]
    specs = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return [s for s in specs if not names or Requirement(s).name in names]


def _has_python(version: str) -> bool:
    """Whether ``pythonX.Y`` on PATH runs and is that version, as nox finds an interpreter (a
    pyenv shim for a version that is not selected is on PATH but fails)."""
    python = shutil.which(f"python{version}")
    probe = "import sys; print('%d.%d' % sys.version_info[:2])"
    return bool(python) and _run_text([python, "-c", probe], timeout=60).strip() == version


# Every file parses as the oldest supported Python (no except*, no PEP 695 generics): run by
# that Python, with its own parser; by a newer one, with ast's best-effort feature_version.
_PARSES = """
import ast, sys
from pathlib import Path
version, *places = sys.argv[1:]
paths = [f for p in map(Path, places) for f in (sorted(p.rglob("*.py")) if p.is_dir() else [p])]
for path in paths:
    ast.parse(path.read_text("utf-8"), path, feature_version=tuple(map(int, version.split("."))))
print(f"{len(paths)} files of {', '.join(places)} parse as Python {version}")
"""

# pytest's collection in a virtualenv without torch: a module that stops at `import torch`
# reports as skipped, naming why; any other collection error fails.
_COLLECT_WITHOUT_TORCH = """
import sys
import pytest

class NoTorch:
    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector):
        report = yield
        if report.failed and str(report.longrepr).rstrip().endswith(
                "ModuleNotFoundError: No module named 'torch'"):
            report.outcome = "skipped"
            why = "imports torch, which this collection runs without"
            report.longrepr = (str(collector.path), None, why)
        return report

sys.exit(pytest.main(["--collect-only", "-q", "-m", "", *sys.argv[1:]], plugins=[NoTorch()]))
"""

# Fails, naming them, where any of the modules given is importable.
_CHECK_ABSENT = """
import importlib.util, sys
found = [name for name in sys.argv[1:] if importlib.util.find_spec(name)]
sys.exit(f"{', '.join(found)} importable here, beside the torch nox reuses? This check needs "
         "them absent; with AMPBENCH_TORCH set nox installs a torch of its own" if found else 0)
"""


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and integration tests on CPU (GPU tests skip without CUDA)."""
    _install(session, "test")
    session.run("python", "-m", "pytest", *session.posargs)  # pyproject deselects perf


@nox.session
def slurm(session: nox.Session) -> None:
    """The scale-out tests against a real Slurm (tests/test_cluster.py): installs Debian's
    slurm-wlm and munge as root where they are missing (``apt-get update`` first), checks that
    a single-node cluster starts here and runs a job (tests/slurm_cluster.py), then runs the
    tests with that cluster required. Where apt or Slurm cannot, one line says why and the
    session skips; it never passes without having run them."""
    if not shutil.which("slurmctld") and not Path("/usr/sbin/slurmctld").exists():
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            session.skip("slurm: not installed, and installing it needs root and apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-qq"],
                     ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                session.skip(f"slurm: `{' '.join(argv)}` failed: {last}")
    check = subprocess.run([sys.executable, "tests/slurm_cluster.py"], capture_output=True,
                           text=True, check=False)
    if check.returncode:
        session.skip((check.stderr.strip().splitlines() or ["slurm: cannot start"])[-1])
    session.log(check.stdout.strip())
    _install(session, "test,cluster")
    session.run("python", "-m", "pytest", "tests/test_cluster.py", "-p", "no:cacheprovider",
                *session.posargs, env={"AMPBENCH_REQUIRE_SLURM": "1"})


@nox.session
def collect(session: nox.Session) -> None:
    """Every test module collects without the test extra, as on a bare GPU box, and under 3.10.

    Of the test extra only pytest and pytest-benchmark are installed; every marker is collected.
    Then collect_py310 where a python3.10 runs, else every file is parsed as Python 3.10."""
    _install(session)
    session.install(*_requirements("test", ("pytest", "pytest-benchmark")))
    session.log(f"checking that {' and '.join(ABSENT)} are not importable here")
    session.run("python", "-c", _CHECK_ABSENT, *ABSENT, log=False)
    session.run("python", "-m", "pytest", "--collect-only", "-q", "-m", "", *session.posargs)
    if PYTHON == MIN_PYTHON:
        return  # that was Python 3.10 already
    if _has_python(MIN_PYTHON):
        session.notify("collect_py310", session.posargs)
    else:
        session.log(f"no python{MIN_PYTHON} here: checking instead that every file parses as "
                    f"Python {MIN_PYTHON} (ast's feature_version)")
        session.run("python", "-c", _PARSES, MIN_PYTHON, *SOURCES, log=False)


@nox.session(python=MIN_PYTHON)
def collect_py310(session: nox.Session) -> None:
    """Every file parses as Python 3.10 and every test module without torch collects there.

    collect runs it where a python3.10 runs. No torch: a CPU build for 3.10 is on PyTorch's own
    index only, and PyPI's Linux torch is a CUDA build of gigabytes. The modules that import
    torch report as skipped, naming why."""
    project = [s for s in _requirements() if Requirement(s).name != "torch"]
    session.install("--no-deps", "-e", ".")
    session.install(*project, *_requirements("test", ("pytest", "pytest-benchmark")))
    session.run("python", "-c", _PARSES, MIN_PYTHON, *SOURCES, log=False)
    session.log("pytest --collect-only without torch")
    session.run("python", "-c", _COLLECT_WITHOUT_TORCH, *session.posargs, log=False)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check."""
    session.install("ruff")
    session.run("ruff", "check", *SOURCES, *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark: gpu preset on a CUDA machine, cpu preset elsewhere; ends with the report."""
    _install(session)
    session.run("python", "-m", "bench", "run", *session.posargs)


@nox.session
def ampbench(session: nox.Session) -> None:
    """Any ampbench command: nox -s ampbench -- COMMAND [FLAGS] (no arguments: --help)."""
    _install(session)
    session.run("python", "-m", "bench", *(session.posargs or ["--help"]))


@nox.session
def parity(session: nox.Session) -> None:
    """Accuracy parity of every reduced precision against FP32."""
    _install(session)
    session.run("python", "-m", "bench", "parity", *session.posargs)


@nox.session
def report(session: nox.Session) -> None:
    """Render report.md and plots for the latest run (or the run directory given)."""
    _install(session)
    session.run("python", "-m", "bench", "report", *session.posargs)


@nox.session
def gate(session: nox.Session) -> None:
    """Gate the latest run against this device's baseline."""
    _install(session)
    session.run("python", "-m", "bench", "gate", *session.posargs)


@nox.session
def gate_rates(session: nox.Session) -> None:
    """The gate's false-positive and detection rates here: same-code reruns, a known slowdown."""
    _install(session)
    session.run("python", "-m", "bench.analysis.gate_rates", *session.posargs)


@nox.session
def perf(session: nox.Session) -> None:
    """pytest-benchmark training-step benchmarks (--benchmark-autosave, --benchmark-compare...)."""
    _install(session, "test")
    # pytest-benchmark disables itself under xdist; perf numbers need one process anyway.
    session.run("python", "-m", "pytest", "-p", "no:xdist", "-m", "perf", "--benchmark-only",
                *session.posargs)
