"""A sweep's processes as jobs of a cluster's scheduler, through submitit (`--executor slurm`).

``ClusterPool`` has the interface of the device-slot pool (bench/run/slots.py), so the sweep
runs the same loop either way: each pass of the loop stages the processes that may start,
``wait`` submits them as one job array (submitit's ``executor.batch()``: a Slurm job array,
throttled by ``--array-parallelism``) and returns the jobs that ended. A job runs ``run`` on
its node: the cell's child exactly as the local runner starts it (bench/run/launch.py, under
the cell's timeout; torchrun for several ranks, one job task per node meeting at the job's
first node), and returns the record, which the runner, the only writer, appends.

Every submitted job is written to ``jobs.jsonl`` in the run directory (this module owns that
file) before the runner waits for it. A runner restarted with ``--resume`` while jobs are
queued, running or finished finds them there and collects their records instead of
submitting them again; a job Slurm no longer knows and that left no result is a failure
record, and the next resume runs it again. Slurm's own view of a job is read with
``squeue --states=all`` (what every cluster has, accounting or not): a job it says ended
(cancelled, failed, timed out, its node gone) without a result is an ``error`` record naming
its state. Stopped with Ctrl-C, the runner leaves Slurm jobs queued (a resume collects them)
and cancels local ones, whose processes are its own.

``--executor local`` runs the same path through submitit's LocalExecutor (a process per job
on this machine, at most ``--array-parallelism`` at once): the path a test can run anywhere.
submitit is the ``cluster`` extra, imported only here. torch-free.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import BadInput
from bench.run.slots import Finished

EXECUTORS = ("inline", "local", "slurm")
JOBS = "jobs.jsonl"  # every job submitted for the run: which process, which job, where
FOLDER = "jobs"  # submitit's folder in the run directory: scripts, pickles, logs per job
_POLL_S = 1.0
# Slurm's job states in which a job may still write its result ("UNKNOWN": squeue did not
# answer, so nothing is known to have ended).
_ALIVE = {"UNKNOWN", "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
          "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


@dataclass(frozen=True)
class Options:
    """How jobs are asked for: ``ampbench run --executor ... --partition ...``."""

    executor: str = "inline"
    partition: str | None = None
    job_time: int | None = None  # minutes per job; default: the cell's timeout + 2
    gpus_per_task: int | None = None  # default: the cell's ranks per node on CUDA, else 0
    array_parallelism: int = 8  # jobs of one array running at once
    cpus_per_task: int | None = None

    def check(self) -> Options:
        """Itself, or BadInput naming the option that cannot work."""
        if self.executor not in EXECUTORS:
            raise BadInput(f"--executor '{self.executor}': valid: {', '.join(EXECUTORS)}")
        for flag, value in (("--job-time", self.job_time),
                            ("--gpus-per-task", self.gpus_per_task),
                            ("--array-parallelism", self.array_parallelism),
                            ("--cpus-per-task", self.cpus_per_task)):
            if value is not None and (value < 0 or (value == 0 and flag != "--gpus-per-task")):
                raise BadInput(f"{flag} {value}: must be a positive whole number")
        if self.executor != "slurm" and (self.partition or self.job_time or self.cpus_per_task):
            raise BadInput("--partition, --job-time and --cpus-per-task go with "
                           "--executor slurm")
        if self.executor != "inline":
            try:
                import submitit  # noqa: F401
            except ImportError:
                raise BadInput(f"--executor {self.executor} needs submitit: pip install -e "
                               "'.[cluster]'") from None
        if self.executor == "slurm" and not shutil.which("sbatch"):
            raise BadInput("--executor slurm: sbatch is not on this machine's PATH (run the "
                           "runner on a Slurm login node)")
        return self

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


INLINE = Options()  # this machine, as ever


def options(args: Any, meta: dict[str, Any]) -> Options:
    """The run's executor from the flags, checked; a flag left out keeps what the run
    directory's meta.json says it ran under (a resume finds its jobs again)."""
    kept = meta.get("executor") if isinstance(meta.get("executor"), dict) else {}
    fields = Options.__dataclass_fields__
    given = {name: getattr(args, name, None) for name in fields}
    chosen = {name: given[name] if given[name] is not None else kept.get(name)
              for name in fields}
    chosen_options = Options(**{k: v for k, v in chosen.items() if v is not None}).check()
    if getattr(args, "find_max_batch", False) and chosen_options.executor != "inline":
        raise BadInput("--find-max-batch probes one batch after another on this machine: "
                       "it goes with --executor inline")
    return chosen_options


# ------------------------------------------------------------------- in the job


def run(cell: Any, settings: Any, repeat: int, workdir: str, place: int) -> dict[str, Any]:
    """A job's work, on its node: the cell's child as the local runner starts it; its record,
    with where and when it ran. Every job task (one per node) runs this; the record that
    counts is task 0's (submitit's ``result()``)."""
    from dataclasses import replace

    from bench.run.launch import run_child

    env: dict[str, str] = {}
    if cell.nnodes > 1:  # one torchrun per node, meeting at the job's first node
        import submitit

        dist = submitit.helpers.TorchDistributedEnvironment()
        settings = replace(settings, launcher=(),
                           rdzv_endpoint=f"{dist.master_addr}:{dist.master_port}")
    started = time.time()
    record = run_child(cell, settings, repeat, Path(workdir), place, env)
    record["wall_s"] = round(time.time() - started, 3)
    return {"record": record, "started_unix_s": started, "ended_unix_s": time.time(),
            "host": socket.gethostname()}


# ------------------------------------------------------------------- the runner's side


@dataclass
class _Job:
    task: Any
    job: Any  # a submitit Job
    label: str  # "slurm 12_3" / "local 4077"
    state: str | None = None  # the scheduler's word for how it ended without a result


class ClusterPool:
    """The device-slot pool's interface (bench/run/slots.py, Pool) over submitit jobs, for the
    sweep's tasks ``(cell, repeat, calibration, place)``.

    ``start`` stages a task for submission, or reattaches the job an earlier runner submitted
    for it (jobs.jsonl); ``wait`` submits what is staged and returns the jobs that ended, each
    with its record: the job's, or a failure record saying how the job ended without one.
    """

    def __init__(self, options: Options, run_dir: Path, settings: Any) -> None:
        import submitit

        self.options = options
        self.run_dir = run_dir
        self.settings = settings
        self.folder = run_dir / FOLDER
        self.workdir = self.folder / "cells"  # the children's results: on the shared filesystem
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.slots = ()  # no device slots: the scheduler places each job
        self._submitit = submitit
        self._staged: list[Any] = []
        self._jobs: list[_Job] = []
        self._earlier = {(row["cell_id"], row["repeat"]): row for row in read_jobs(run_dir)
                         if row.get("executor") == options.executor}

    def __enter__(self) -> ClusterPool:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is None or not self._jobs:
            return
        if self.options.executor == "local":  # its processes are this runner's: they go too
            for job in self._jobs:
                with contextlib.suppress(Exception):
                    job.job.cancel(check=False)
        else:
            print(f"{len(self._jobs)} Slurm job(s) stay queued or running; `ampbench run "
                  f"--resume {self.run_dir}` collects their records", file=sys.stderr)

    @property
    def running(self) -> list[Any]:
        return [j.task for j in self._jobs] + list(self._staged)

    def fits(self, num_slots: int) -> bool:
        if self.options.executor == "slurm":
            return True  # Slurm queues them; the array's parallelism throttles
        return len(self.running) < self.options.array_parallelism

    def start(self, task: Any, num_slots: int, fn: Any = None) -> tuple[()]:
        """Stage ``task`` (``fn``, the local pool's, is not used: a job runs ``run``)."""
        cell, repeat = task[0], task[1]
        earlier = self._earlier.pop((cell.cell_id, repeat), None)
        job = self._reattach(earlier) if earlier else None
        if job is not None:
            self._jobs.append(_Job(task, job, f"{self.options.executor} {job.job_id}"))
        else:
            self._staged.append(task)
        return ()

    def _reattach(self, row: dict[str, Any]) -> Any:
        """The job an earlier runner submitted, when it can still give a result; else None
        (the task is submitted again)."""
        kind = self._submitit.SlurmJob if self.options.executor == "slurm" else \
            self._submitit.LocalJob
        job = kind(folder=row["folder"], job_id=row["job_id"])
        if job.paths.result_pickle.exists():
            return job
        if self.options.executor == "slurm" and _slurm_states([row["job_id"]]).get(
                row["job_id"]) in _ALIVE:
            return job
        return None

    def _submit(self) -> None:
        by_shape: dict[tuple[tuple[str, Any], ...], list[Any]] = {}
        for task in self._staged:
            shape = resources(task[0], self.settings.device, self.settings.timeout_s)
            by_shape.setdefault(tuple(sorted(shape.items())), []).append(task)
        self._staged.clear()
        for shape, tasks in by_shape.items():
            executor = self._executor(dict(shape))
            with executor.batch():  # one job array
                jobs = [executor.submit(run, cell, self.settings, repeat, str(self.workdir),
                                        place) for cell, repeat, _, place in tasks]
            rows = []
            for task, job in zip(tasks, jobs, strict=True):
                self._jobs.append(_Job(task, job, f"{self.options.executor} {job.job_id}"))
                rows.append({"cell_id": task[0].cell_id, "cell": task[0].label(),
                             "repeat": task[1],
                             "executor": self.options.executor, "job_id": str(job.job_id),
                             "folder": str(self.folder)})
            append_jobs(self.run_dir, rows)

    def _executor(self, shape: dict[str, Any]) -> Any:
        o = self.options
        executor = self._submitit.AutoExecutor(folder=self.folder, cluster=o.executor)
        params: dict[str, Any] = {
            "name": "ampbench", "nodes": shape["nodes"], "tasks_per_node": 1,
            "timeout_min": o.job_time or shape["time_min"],
            "gpus_per_node": shape["gpus"] if o.gpus_per_task is None else o.gpus_per_task,
        }
        if o.executor == "slurm":
            params.update(slurm_array_parallelism=o.array_parallelism)
            if o.partition:
                params["slurm_partition"] = o.partition
            if o.cpus_per_task:
                params["cpus_per_task"] = o.cpus_per_task
        executor.update_parameters(**params)
        return executor

    def wait(self) -> list[Finished]:
        """Submit what is staged; block until at least one job has ended; those that did."""
        if self._staged:
            self._submit()
        while True:
            ended = self._ended()
            if ended:
                break
            time.sleep(_POLL_S)
        finished = []
        for job in ended:
            self._jobs.remove(job)
            finished.append(self._collect(job))
        return finished

    def _ended(self) -> list[_Job]:
        """The jobs that have ended. A Slurm job's end is Slurm's word (a result file can
        come before the job's state settles: scancel's SIGTERM may leave the child's failure
        record behind), a local job's its process."""
        ids = [str(j.job.job_id) for j in self._jobs]
        if self.options.executor == "slurm":
            states = _slurm_states(ids)
        else:
            states = {str(j.job.job_id): "COMPLETED" if j.job.paths.result_pickle.exists()
                      else "RUNNING" if not j.job.done() else j.job.state for j in self._jobs}
        ended = [j for j in self._jobs if states[str(j.job.job_id)] not in _ALIVE]
        for job in ended:
            job.state = states[str(job.job.job_id)]
        return ended

    def _collect(self, job: _Job) -> Finished:
        from bench.run.launch import failure_record

        cell, repeat = job.task[0], job.task[1]
        try:
            # No result file: the job ended without one (submitit's result() would wait on
            # sacct, which a cluster without accounting never answers).
            if not job.job.paths.result_pickle.exists():
                raise RuntimeError("")
            out = job.job.result()
        except Exception as exc:  # the job failed, was cancelled or left no result
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            error = f"{job.label} {job.state or 'ended'} without a record" + (
                f": {lines[-1][:300]}" if lines else "")
            record = failure_record(cell, self.settings, repeat, "error", error)
            record["scheduler_job"] = job.label
            return Finished(job.task, record, (), 0.0, 0.0)
        record = out["record"]
        record["scheduler_job"] = f"{job.label} on {out['host']}"
        if record.get("status") != "ok" and job.state not in ("COMPLETED", "GONE"):
            # The child died of the scheduler's signal (scancel, the time limit): say so.
            record["error"] = f"{job.label} {job.state}: {record.get('error') or ''}".rstrip()
        return Finished(job.task, record, (), out["started_unix_s"], out["ended_unix_s"])


def _slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's state of each job it still knows (array tasks as JOB_TASK), by ``squeue``."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i %T", "-j",
                              ",".join(sorted({j.split("_")[0] for j in job_ids}))],
                             capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {j: "UNKNOWN" for j in job_ids}  # not known: still alive as far as we can tell
    states = dict(line.split(None, 1) for line in out.splitlines() if " " in line)
    # An array still pending shows as one line "12_[3-7]": each of its tasks is pending.
    for line_id, state in list(states.items()):
        if "_[" in line_id:
            states[line_id.split("_")[0] + "_*"] = state
    result = {}
    for job_id in job_ids:
        state = states.get(job_id) or states.get(job_id.split("_")[0] + "_*")
        result[job_id] = state.strip() if state else "GONE"
    return result


def resources(cell: Any, device: str, timeout_s: float) -> dict[str, Any]:
    """One job's shape for ``cell``: nodes, GPUs per node, minutes (its timeout + start-up)."""
    return {"nodes": cell.nnodes, "gpus": cell.world_size if device == "cuda" else 0,
            "time_min": max(1, math.ceil((timeout_s + 120) / 60))}


def read_jobs(run_dir: Path) -> list[dict[str, Any]]:
    """jobs.jsonl's rows; a damaged line (a cut-off write) is skipped."""
    path = run_dir / JOBS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict) and {"cell_id", "repeat", "job_id"} <= row.keys():
                rows.append(row)
    return rows


def append_jobs(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to jobs.jsonl, flushed and fsynced before the runner waits on them."""
    with open(run_dir / JOBS, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
