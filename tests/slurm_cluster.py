"""A real single-node Slurm cluster on this machine, for the scale-out tests (test_cluster.py).

    python tests/slurm_cluster.py      # start one, run a job through sbatch, stop: exit 0 or
                                       # one line saying why Slurm cannot run here (exit 1)

Debian's slurm-wlm (22.05) and munge (``nox -s slurm`` installs them, as root): a munged with a
key, socket and log of its own, slurmctld and slurmd in the foreground on free ports with a
slurm.conf written here (``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``,
``SelectType=select/cons_tres``, one node: this machine as ``slurmd -C`` sees it), state in a
directory of the caller's. Nothing under /etc is read or written; clients find the cluster
through ``SLURM_CONF`` (``Cluster.env``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
_START_S = 60.0


class Unavailable(RuntimeError):
    """Slurm cannot run here; the message is one line saying why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str:
    for folder in (*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/sbin"):
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise Unavailable(f"slurm: {name} is not installed (nox -s slurm installs slurm-wlm and "
                      "munge from Debian's packages)")


class Cluster:
    """slurmctld + slurmd (+ munged) started in ``root``; a context manager that stops them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.munged_pid: Path = root / "munged.pid"

    @property
    def env(self) -> dict[str, str]:
        """The environment of a client of this cluster (sbatch, submitit)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> Cluster:
        if os.geteuid() != 0:
            raise Unavailable("slurm: the test cluster's daemons start as root, and this is "
                              f"uid {os.geteuid()}")
        binaries = {name: _which(name) for name in DAEMONS}
        try:
            self._start(binaries)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self, binaries: dict[str, str]) -> None:
        root = self.root
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        key, sock = root / "munge.key", root / "munge.socket"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        subprocess.run([binaries["munged"], "--force", f"--key-file={key}", f"--socket={sock}",
                        f"--log-file={root / 'log' / 'munged.log'}",
                        f"--pid-file={self.munged_pid}", f"--seed-file={root / 'munged.seed'}"],
                       check=False, capture_output=True, timeout=30)
        if not sock.exists():
            raise Unavailable(f"slurm: munged did not start (see {root / 'log' / 'munged.log'})")
        node = subprocess.run([binaries["slurmd"], "-C"], capture_output=True, text=True,
                              check=False, timeout=30).stdout.splitlines()
        if not node or not node[0].startswith("NodeName="):
            raise Unavailable("slurm: `slurmd -C` did not describe this machine")
        self.conf.write_text("\n".join([
            "ClusterName=ampbench-test",
            f"SlurmctldHost={socket.gethostname()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={sock}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill", "ReturnToService=2", "MpiDefault=none",
            "JobCompType=jobcomp/none", "KillWait=5", "InactiveLimit=0", "MinJobAge=300",
            f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"{node[0]} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        for daemon in ("slurmctld", "slurmd"):
            log = open(root / "log" / f"{daemon}.out", "wb")  # noqa: SIM115 (kept by the process)
            self.procs.append(subprocess.Popen([binaries[daemon], "-D", "-f", str(self.conf)],
                                               stdout=log, stderr=log, env=self.env,
                                               start_new_session=True))
        deadline = time.monotonic() + _START_S
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise Unavailable(f"slurm: a daemon exited at start (see {root / 'log'})")
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env,
                                   capture_output=True, text=True, check=False).stdout.strip()
            if state.rstrip("*") in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise Unavailable(f"slurm: the node did not come up in {_START_S:g} s (see {root / 'log'})")

    def stop(self) -> None:
        """Stop the daemons; jobs still running die with slurmd's process group."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs.clear()
        if self.munged_pid.exists():
            with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
                os.kill(int(self.munged_pid.read_text().split()[0]), signal.SIGTERM)

    def squeue(self) -> list[str]:
        """The job ids Slurm still has queued or running (array tasks as JOB_TASK)."""
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True,
                             text=True, check=True).stdout
        return out.split()


def main() -> int:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="ampbench-slurm-"))
    try:
        with Cluster(root) as cluster:
            out = root / "hello.out"
            subprocess.run(["sbatch", "--wait", "-o", str(out), "--wrap", "echo hello"],
                           env=cluster.env, check=True, capture_output=True, timeout=120)
            if out.read_text().strip() != "hello":
                raise Unavailable("slurm: a job ran but did not print what it was given")
    except (Unavailable, subprocess.SubprocessError, OSError) as exc:
        print(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("slurm: a single-node cluster started here and ran a job")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
