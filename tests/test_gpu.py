"""What only a CUDA GPU can show: every policy on every full-size model, NVML energy, OOM as
data, NCCL under torchrun, a cell on a second GPU. Skipped cleanly without CUDA; ``-m gpu``
selects them (docs/gpu-runbook.md)."""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import time

import pytest

import models
from bench import precision, store
from bench.cli import main

pytestmark = pytest.mark.gpu

# Small batches at the full sizes: a few steps each, seconds per cell.
FULL_SIZE = {"resnet50": 8, "bert-base": 8, "gpt2-small": 2}


def _cell(out, model, policy, batch, *extra):
    code = main(["cell", "--model", model, "--precision", policy, "--batch-size", str(batch),
                 "--device", "cuda", "--warmup", "2", "--steps", "3", "--out", str(out),
                 *extra])
    return code, json.loads(out.read_text())


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    import torch

    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("policy", precision.NAMES)
@pytest.mark.parametrize("model", list(FULL_SIZE))
def test_each_policy_trains_each_full_size_model(tmp_path, model, policy):
    import torch

    code, record = _cell(tmp_path / "r.json", model, policy, FULL_SIZE[model])
    if policy == "bf16" and not torch.cuda.is_bf16_supported():
        assert record["status"] == "unsupported"
        return
    fp8 = precision.get(policy).fp8_recipe is not None
    if fp8 and model == "resnet50":  # its only Linear (2048x1000) is no multiple of 16
        assert code == 1 and record["status"] == "unsupported", record["error"]
        assert record["flops_per_step"] is None  # decided before anything was built
        if precision.get(policy).unsupported_reason(torch.device("cuda")) is None:
            assert record["error"].startswith("no Linear layer of resnet50 is convertible")
        return
    if fp8 and record["status"] == "unsupported":  # no torchao, or a GPU before Ada
        pytest.skip(record["error"])
    assert code == 0 and record["status"] == "ok", record["error"]
    if fp8:  # real FP8 matmuls
        assert record["emulated"] is False and record["fp8_converted"] > 0, \
            record["fp8_unconverted"]
        assert record["mfu_flag"] or record["mfu_fp8_pct"] < record["mfu_pct"]
    assert math.isfinite(record["loss_first"]) and record["samples_per_s"] > 0
    assert record["peak_mem_reserved_gib"] >= record["peak_mem_allocated_gib"] > 0
    spec = models.get(model)
    analytic = spec.flops_per_sample(spec.default_size) * FULL_SIZE[model]
    assert record["flops_per_step"] == pytest.approx(analytic, rel=0.10)
    if record["peak_tflops"] is not None:  # a GPU in the peak table
        assert 0 < record["mfu_pct"] < 100


def test_energy_counter_agrees_with_the_sampled_integral(tmp_path):
    import torch

    from bench.telemetry.monitor import PowerMonitor

    device = torch.device("cuda")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    monitor = PowerMonitor(str(torch.cuda.get_device_properties(device).uuid), 50.0)
    monitor.measure_idle()
    with monitor:  # a window of 3 s (at least 2 s) of steady matmul load
        started = time.perf_counter()
        while time.perf_counter() - started < 3.0:
            for _ in range(10):
                a @ a
            torch.cuda.synchronize()
    fields = monitor.fields(1)
    if fields["energy_source"] == "none" and fields["power_source"] is None:
        pytest.skip("NVML reads nothing on this GPU (no driver library, or a MIG slice)")
    if fields["power_source"] != "instant":
        pytest.skip("the driver has only ~1 s averaged power: no 5% check over a few seconds")
    assert fields["energy_source"] == "counter"
    assert abs(fields["energy_check_pct"]) <= 5.0, fields


def test_an_absurd_batch_is_oom_and_the_next_cell_gets_the_memory(tmp_path):
    matrix = tmp_path / "oom.toml"
    matrix.write_text('name = "oom"\nprecisions = ["bf16"]\nwarmup = 1\nsteps = 2\n'
                      'device = "cuda"\ncalibration = 0\nparity = false\ntimeout_s = 300\n\n'
                      "[models.gpt2-small]\nbatch_sizes = [4096]\n\n"
                      "[models.bert-base]\nbatch_sizes = [8]\n")
    out = tmp_path / "run"
    assert main(["run", "--matrix", str(matrix), "--no-report", "--out", str(out)]) == 0
    status = {r["model"]: r["status"] for r in store.load_records(out)}
    assert status == {"gpt2-small": "oom", "bert-base": "ok"}


def test_an_oom_in_process_gives_its_memory_back(tmp_path):
    import torch

    def allocated() -> int:
        gc.collect()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated()

    # A cell first, so what stays allocated on purpose (cuBLAS workspaces: 32 MiB each on an
    # H100) is there before the failed cell too and only what the failed cell left is counted.
    code, record = _cell(tmp_path / "warm.json", "gpt2-small", "bf16", 2)
    assert code == 0 and record["status"] == "ok"
    before = allocated()
    code, record = _cell(tmp_path / "big.json", "gpt2-small", "bf16", 4096)
    assert code == 1 and record["status"] == "oom"
    # 16 MiB of slack: GPT-2 small's weights alone are 475 MiB, so any tensor of the failed
    # model, its gradients or its optimizer state that survived is far above it.
    assert allocated() - before < 16 * 2**20
    code, record = _cell(tmp_path / "small.json", "gpt2-small", "bf16", 2)
    assert code == 0 and record["status"] == "ok"


def test_a_torchrun_cell_of_world_size_1_runs_on_nccl(tmp_path, cli_env):
    out = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
         "-m", "bench", "cell", "--model", "gpt2-small", "--precision", "bf16", "--batch-size",
         "2", "--warmup", "10", "--steps", "3", "--device", "cuda", "--out", str(out)],
        env={**cli_env, "NCCL_DEBUG": "INFO"}, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    record = json.loads(out.read_text())
    assert record["status"] == "ok" and record["world_size"] == 1
    assert "NCCL INFO" in output  # the process group, DDP and the barrier ran on NCCL


def test_a_cell_on_a_second_gpu_runs_there(tmp_path, cli_env):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second GPU")
    out = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "cell", "--model", "gpt2-small", "--precision", "bf16",
         "--batch-size", "2", "--warmup", "2", "--steps", "3", "--device", "cuda:1", "--out",
         str(out)], env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["status"] == "ok" and record["device"] == "cuda:1"
    assert record["device_name"] == torch.cuda.get_device_name(1)
