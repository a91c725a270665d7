"""Cells on several processes: DDP under torchrun, gloo on CPU, NCCL on a GPU box."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report, store
from bench.cli import main
from bench.config import Cell
from bench.run import launch

# Two processes of gpt2-tiny, one timed step more than the warmup: mostly torchrun start-up.
FAST = ["--preset", "quick", "--models", "gpt2-tiny", "--batch-sizes", "2", "--steps", "3",
        "--warmup", "1", "--no-parity", "--no-report"]

SYNC_CHECK = """
import json, sys
import torch
import torch.distributed as dist
from bench import precision
from bench.cell.train import prepare

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
found = {}
for ddp in (True, False):
    for policy in precision.NAMES:
        if precision.get(policy).unsupported_reason(torch.device("cpu")):
            continue  # FP8 without torchao (the fp8 extra)
        # Same initial weights, different data on each rank, as a benchmark cell trains.
        trainer = prepare("gpt2-tiny", policy, 2, ddp=ddp, seed=0, data_seed=rank)
        for _ in range(3):
            trainer.step()
        flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        every = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(every, flat)
        found[f"{'ddp' if ddp else 'alone'} {policy}"] = {
            "in_sync": all(torch.equal(every[0], other) for other in every[1:]),
            "updates": trainer.optimizer_steps(),
        }
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(found, f)
# No DDP replica may outlive the process group: one freed at exit, after the group is gone,
# can abort the process (seen once as SIGABRT, "terminate called without an active exception").
del trainer
dist.barrier()
dist.destroy_process_group()
"""


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", *args]



def test_ddp_keeps_replicas_identical_under_every_policy(tmp_path, cli_env):
    script, out = tmp_path / "sync_check.py", tmp_path / "found.json"
    script.write_text(SYNC_CHECK)
    proc = subprocess.run(_torchrun(str(script), str(out)), env=cli_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())
    for policy in ("fp32", "tf32", "fp16", "bf16", "fp16-noscale"):
        assert found[f"ddp {policy}"]["in_sync"], policy  # GradScaler with DDP included
        assert found[f"ddp {policy}"]["updates"] >= 1, policy
    # Without DDP the same ranks drift apart: the check above can fail.
    assert not found["alone fp32"]["in_sync"]


def test_two_process_cell_reports_global_throughput(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *FAST, "--precisions", "fp16", "--world-size", "1,2",
                 "--out", str(out)]) == 0
    by_size = {r["world_size"]: r for r in store.load_records(out)}
    assert set(by_size) == {1, 2} and all(r["status"] == "ok" for r in by_size.values())
    two = by_size[2]
    # The global batch (2 ranks x 2 samples) over the slowest rank's median step.
    assert two["samples_per_s"] == pytest.approx(4 / (two["step_ms_median"] / 1e3))
    assert two["flops_per_step"] == 2 * by_size[1]["flops_per_step"]
    assert two["scaler_scale_final"] is not None and two["energy_source"] == "none"
    assert "b=2 ws=2" in capsys.readouterr().out
    text = report.render(report.load(out))
    assert "**Scaling efficiency vs world size 1**" in text


def test_a_crash_in_rank_1_is_an_error_record_and_nothing_keeps_running(
        tmp_path, monkeypatch, processes_mentioning):
    monkeypatch.setenv("AMPBENCH_FAULT", "gpt2-tiny:fp32:2@1=raise")
    out = tmp_path / "run"
    assert main(["run", *FAST, "--precisions", "fp32", "--world-size", "2",
                 "--out", str(out)]) == 0
    [record] = store.load_records(out)
    assert record["status"] == "error" and record["world_size"] == 2
    # The failed rank's own stderr, not torchrun's summary of it.
    assert record["error"].startswith("rank 1: exit code 1")
    assert "RuntimeError: injected fault in gpt2-tiny:fp32:2 rank 1" in record["error"]
    assert not processes_mentioning(str(out))


def test_a_hang_in_rank_1_times_out_and_every_rank_is_killed(
        tmp_path, monkeypatch, processes_mentioning):
    monkeypatch.setenv("AMPBENCH_FAULT", "gpt2-tiny:fp32:2@1=hang")
    out = tmp_path / "run"
    assert main(["run", *FAST, "--precisions", "fp32", "--world-size", "2", "--timeout", "15",
                 "--out", str(out)]) == 0
    [record] = store.load_records(out)
    assert record["status"] == "timeout"
    # torchrun starts every rank in a session of its own: a group kill alone would miss them.
    assert not processes_mentioning(str(out))


FAKE_SRUN = """#!/usr/bin/env bash
# Two "nodes" on this machine: the command twice, at once, as srun --nodes=2 would run it.
pids=()
for _ in 1 2; do "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


def test_cells_on_two_nodes_run_through_the_launcher(tmp_path, monkeypatch):
    launcher = tmp_path / "fake-srun"
    launcher.write_text(FAKE_SRUN)
    launcher.chmod(0o755)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    out = tmp_path / "run"
    assert main(["run", *FAST, "--precisions", "fp32", "--world-size", "1", "--nnodes", "2",
                 "--launcher", str(launcher), "--rdzv-endpoint", "127.0.0.1:29731",
                 "--out", str(out)]) == 0
    [record] = store.load_records(out)
    assert (record["status"], record["world_size"]) == ("ok", 2), record["error"]
    assert not [p for p in out.iterdir() if p.name.startswith(".cells")]


def test_cells_on_several_nodes_need_a_launcher(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["run", *FAST, "--nnodes", "2", "--out", str(tmp_path / "run")]) == 2
    assert "need --launcher" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_torchrun_command_lines():
    settings = launch.Settings("r1", "cpu", 1, 3, 60.0, {}, ("srun", "--nodes=2"),
                               "node0:29500")
    single = launch.cell_argv(Cell("gpt2-tiny", "fp32", 2, seq_len=64), settings, 0,
                              Path("o.json"))
    assert single[1:4] == ["-m", "bench", "cell"]
    local = launch.cell_argv(Cell("gpt2-tiny", "fp32", 2, seq_len=64, world_size=8), settings,
                             0, Path("o.json"))
    assert local[1:6] == ["-m", "torch.distributed.run", "--nproc-per-node", "8", "--standalone"]
    two_nodes = Cell("gpt2-tiny", "fp32", 2, seq_len=64, world_size=8, nnodes=2)
    multi = launch.cell_argv(two_nodes, settings, 1, Path("o.json"), slot=33)
    assert multi[:2] == ["srun", "--nodes=2"]
    joined = " ".join(multi)
    # A port of its own (the sweep's slot 33 wraps to +1), a rendezvous id of its own.
    assert "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint node0:29501" in joined
    assert f"--rdzv-id r1-{two_nodes.cell_id}-1" in joined


def test_torchrun_failure_is_read_from_the_root_cause_rank(tmp_path):
    logs = tmp_path / "logs"
    for local_rank, text in ((0, ""), (1, "Traceback...\ntorch.OutOfMemoryError: CUDA out of "
                                          "memory. Tried to allocate 2.00 GiB\n")):
        path = logs / "abc_1" / "attempt_0" / str(local_rank) / "stderr.log"
        path.parent.mkdir(parents=True)
        path.write_text(text)
    summary = ("Failures:\n[1]:\n  rank      : 0 (local_rank: 0)\n  exitcode  : -15\n"
               "Root Cause (first observed failure):\n[0]:\n  time      : now\n"
               "  rank      : 1 (local_rank: 1)\n  exitcode  : 1 (pid: 42)\n")
    status, error = launch.classify_torchrun(summary, logs)
    assert status == "oom" and error.startswith("rank 1: exit code 1")
    assert launch.classify_torchrun("torchrun: error: bad rendezvous", logs)[0] == "error"


def _one_rank_group(monkeypatch, timeout_s):
    """What torchrun gives a rank of a one-process job, and the runner's cell timeout."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("AMPBENCH_CELL_TIMEOUT_S", timeout_s)):
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("fails", [False, True])
def test_the_process_group_is_gone_on_every_way_out(monkeypatch, fails):
    import datetime

    import torch
    import torch.distributed as dist

    from bench.cell.dist import Ranks, process_group

    _one_rank_group(monkeypatch, "100")
    init, seen = dist.init_process_group, {}
    monkeypatch.setattr(dist, "init_process_group",
                        lambda *a, **kw: seen.update(kw) or init(*a, **kw))
    barrier = dist.barrier
    # After a failure the other ranks may be gone: a barrier would wait for them.
    monkeypatch.setattr(dist, "barrier", lambda: pytest.fail("barrier after a failure")
                        if fails else barrier())
    with pytest.raises(RuntimeError, match="boom") if fails else contextlib.nullcontext(), \
            process_group(torch.device("cpu"), Ranks(0, 0, 1)):
        assert dist.is_initialized()
        if fails:
            raise RuntimeError("boom")
    assert not dist.is_initialized()
    # Below the cell's own deadline, not NCCL's 10 minutes or gloo's 30.
    assert seen["timeout"] == datetime.timedelta(seconds=90)


def test_a_ddp_cell_warms_up_past_the_steps_where_ddp_waits_for_the_gpu(tmp_path, cli_env):
    out = tmp_path / "r.json"
    proc = subprocess.run(_torchrun("-m", "bench", "cell", "--model", "gpt2-tiny", "--precision",
                                    "fp32", "--batch-size", "2", "--warmup", "1", "--steps", "2",
                                    "--device", "cpu", "--out", str(out)),
                          env=cli_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert (record["world_size"], record["warmup_steps"]) == (2, 11)
    # The slowest rank's raw times, and the record's statistics are theirs.
    assert len(record["step_times_ms"]) == record["timed_steps"] == 2
    assert record["step_ms_median"] == store.step_stats(record["step_times_ms"])["step_ms_median"]
