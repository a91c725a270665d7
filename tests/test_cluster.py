"""Cells as jobs of a scheduler (bench/run/cluster.py): submitit's local executor anywhere, and a
real single-node Slurm (tests/slurm_cluster.py) where one can start here (`nox -s slurm`
installs Debian's slurm-wlm and munge and requires it; elsewhere those tests skip, saying why).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("submitit", reason="the cluster extra (pip install -e '.[cluster]')")

from bench import store
from bench.cli import main
from bench.run import cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import Cluster, Unavailable

# The cpu preset's models, a few cells: two models x two policies, one process each.
CELLS = ["--models", "resnet-tiny,gpt2-tiny", "--precisions", "fp32,bf16", "--batch-sizes",
         "2", "--steps", "2", "--warmup", "1", "--repeats", "1", "--calibration", "0",
         "--device", "cpu", "--no-parity", "--no-report"]
HANG = "gpt2-tiny:bf16:2=hang"  # bench/cell/main.py's fault injection: this cell never ends


def _records(out: Path) -> list[dict]:
    return store.load_records(out)


def _once(out: Path, num_cells: int) -> list[dict]:
    records = _records(out)
    counts = Counter((r["cell_id"], r["repeat"]) for r in records)
    assert len(counts) == num_cells and set(counts.values()) == {1}, counts
    return records


def test_the_local_executor_runs_every_cell_once_through_submitit(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *CELLS, "--executor", "local", "--array-parallelism", "2",
                 "--out", str(out)]) == 0
    records = _once(out, 4)
    assert {r["status"] for r in records} == {"ok"}
    assert all(r["scheduler_job"].startswith("local ") for r in records)
    rows = cluster.read_jobs(out)
    assert sorted((r["cell_id"], r["repeat"]) for r in rows) == sorted(
        (r["cell_id"], r["repeat"]) for r in records)
    # Running again submits nothing: every cell is done.
    assert main(["run", *CELLS, "--executor", "local", "--out", str(out)]) == 0
    assert len(cluster.read_jobs(out)) == 4 and len(_records(out)) == 4


@pytest.mark.parametrize(("argv", "words"), [
    (["--executor", "pbs"], "argument --executor: invalid choice: 'pbs'"),
    (["--executor", "local", "--partition", "gpu"], "go with --executor slurm"),
    (["--executor", "local", "--array-parallelism", "0"], "--array-parallelism 0"),
])
def test_bad_executor_options_are_one_line(argv, words, tmp_path, capsys):
    try:
        code = main(["run", *CELLS, *argv, "--out", str(tmp_path / "run")])
    except SystemExit as exit:  # argparse's own check of a choice: the same one line
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------- a real Slurm


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        with Cluster(tmp_path_factory.mktemp("slurm")) as running:
            yield running
    except Unavailable as exc:
        if os.environ.get("AMPBENCH_REQUIRE_SLURM"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def _runner(out: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bench", "run", *CELLS, "--executor",
                             "slurm", "--out", str(out), *extra], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _wait_for(check, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def slurm_env(slurm, cli_env, monkeypatch):
    """The runner's environment, and this process's: squeue here asks the same cluster."""
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    return {**cli_env, "SLURM_CONF": slurm.env["SLURM_CONF"]}


@pytest.mark.slurm
def test_a_sweep_runs_as_a_slurm_job_array_every_cell_once(slurm, slurm_env, tmp_path):
    out = tmp_path / "run"
    runner = _runner(out, slurm_env)
    _, err = runner.communicate(timeout=300)
    assert runner.returncode == 0, err[-3000:]
    records = _once(out, 4)
    assert {r["status"] for r in records} == {"ok"}
    jobs = {r["scheduler_job"].split()[1] for r in records}
    assert all(r["scheduler_job"].startswith("slurm ") for r in records)
    # One array: every job id is ARRAY_TASK of the same array.
    assert len({j.split("_")[0] for j in jobs}) == 1 and all("_" in j for j in jobs)


@pytest.mark.slurm
def test_a_job_killed_with_scancel_is_a_failure_and_the_others_finish(slurm, slurm_env,
                                                                      tmp_path):
    out = tmp_path / "run"
    runner = _runner(out, {**slurm_env, "AMPBENCH_FAULT": HANG})
    try:
        hung = {}

        def submitted() -> bool:
            assert runner.poll() is None, runner.stderr.read()[-3000:]
            rows = [r for r in cluster.read_jobs(out) if r["cell"].startswith("gpt2-tiny bf16")]
            hung.update(rows[0] if rows else {})
            return bool(rows)

        _wait_for(submitted, what="the hanging cell's job")
        job_id = hung["job_id"]
        _wait_for(lambda: cluster._slurm_states([job_id])[job_id] == "RUNNING",
                  what="the job to run")
        subprocess.run(["scancel", job_id], env=slurm_env, check=True)
        _, err = runner.communicate(timeout=300)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    assert runner.returncode == 0, err[-3000:]  # a failed cell is a record: the sweep finished
    records = _once(out, 4)
    [killed] = [r for r in records if r["status"] != "ok"]
    assert killed["cell_id"] == hung["cell_id"] and killed["status"] == "error"
    assert f"slurm {job_id} CANCELLED" in killed["error"], killed["error"]


@pytest.mark.slurm
def test_a_resumed_runner_collects_jobs_that_finished_while_it_was_gone(slurm, slurm_env,
                                                                        tmp_path):
    out = tmp_path / "run"
    runner = _runner(out, slurm_env)
    _wait_for(lambda: len(cluster.read_jobs(out)) == 4, what="four jobs submitted")
    os.killpg(runner.pid, signal.SIGKILL)  # the runner dies; its jobs run on
    runner.wait()
    ids = [r["job_id"] for r in cluster.read_jobs(out)]
    _wait_for(lambda: all(s not in cluster._ALIVE
                          for s in cluster._slurm_states(ids).values()),
              what="the jobs to finish")
    resumed = subprocess.run([sys.executable, "-m", "bench", "run", "--resume", str(out)],
                             env=slurm_env, text=True, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = _once(out, 4)
    assert {r["status"] for r in records} == {"ok"}
    # Nothing was submitted again: the records are those jobs'.
    assert len(cluster.read_jobs(out)) == 4
    assert {r["scheduler_job"].split()[1] for r in records} == set(ids)
    assert json.loads((out / store.META).read_text())["executor"]["executor"] == "slurm"


@pytest.mark.slurm
def test_a_two_rank_cell_runs_torchrun_inside_its_job(slurm, slurm_env, tmp_path):
    out = tmp_path / "run"
    runner = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--models", "gpt2-tiny", "--precisions", "fp32",
         "--batch-sizes", "2", "--world-size", "2", "--steps", "2", "--warmup", "1",
         "--repeats", "1", "--calibration", "0", "--device", "cpu", "--no-parity",
         "--no-report", "--executor", "slurm", "--out", str(out)],
        env=slurm_env, text=True, capture_output=True, timeout=300)
    assert runner.returncode == 0, runner.stderr[-3000:]
    [record] = _once(out, 1)
    assert record["status"] == "ok", record["error"]
    assert record["world_size"] == 2 and record["scheduler_job"].startswith("slurm ")


@pytest.mark.slurm
def test_a_resumed_runner_waits_for_jobs_still_queued_or_running(slurm, slurm_env, tmp_path):
    out = tmp_path / "run"
    runner = _runner(out, slurm_env)
    _wait_for(lambda: len(cluster.read_jobs(out)) == 4, what="four jobs submitted")
    os.killpg(runner.pid, signal.SIGKILL)
    runner.wait()
    ids = [r["job_id"] for r in cluster.read_jobs(out)]
    # At once: Slurm still has (some of) them queued or running.
    assert any(s in cluster._ALIVE for s in cluster._slurm_states(ids).values())
    resumed = subprocess.run([sys.executable, "-m", "bench", "run", "--resume", str(out)],
                             env=slurm_env, text=True, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = _once(out, 4)
    assert {r["status"] for r in records} == {"ok"}
    assert len(cluster.read_jobs(out)) == 4  # reattached, not submitted again
    assert {r["scheduler_job"].split()[1] for r in records} == set(ids)
