import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench import store
from bench.cli import main

NUMBER = (int, float)
EXPECTED_TYPES = {
    "schema": int, "run_id": type(None), "cell_id": type(None), "model": str, "precision": str,
    "batch_size": int, "seq_len": int, "image_size": type(None), "grad_accum": int,
    "compile": bool, "world_size": int, "repeat": int, "status": str, "error": type(None),
    "warmup_steps": int, "timed_steps": int, "step_ms_median": float, "step_ms_iqr": float,
    "step_ms_min": float, "samples_per_s": float, "tokens_per_s": float, "startup_s": float,
    "peak_mem_allocated_gib": type(None), "peak_mem_reserved_gib": type(None),
    "peak_rss_gib": float, "flops_per_step": int, "achieved_tflops": float,
    "energy_source": str, "loss_first": float, "loss_last": float, "nonfinite_steps": int,
    "scaler_scale_final": float, "scaler_skipped_steps": int, "device": str,
    "device_name": str, "device_count": int, "torch_version": str, "python_version": str,
    "machine_id": str, "timestamp": str, "host_ms_median": float, "memory_format": type(None),
    "mfu_flag": str,  # on this CPU: "no peak for '<its name>'"
    "step_times_ms": list,
}
# Filled on a GPU with NVML (or for a known device); empty on this CPU box.
EMPTY_ON_CPU = (
    "peak_tflops", "mfu_pct", "peak_fp8_tflops", "mfu_fp8_pct", "power_avg_w", "power_max_w",
    "idle_power_w", "energy_j", "energy_check_pct", "joules_per_sample", "sm_clock_mhz_avg",
    "temp_max_c", "throttle_reasons", "throttled", "driver_version", "cuda_version",
    "cudnn_version",
    "queued_ms_median", "host_bound",  # on CPU the host's time is the step time
)


def _cell(tmp_path, *extra):
    out = tmp_path / "record.json"
    code = main(["cell", "--model", "gpt2-tiny", "--precision", "fp16", "--batch-size", "2",
                 "--warmup", "1", "--steps", "3", "--device", "cpu", "--out", str(out), *extra])
    return code, json.loads(out.read_text())


def test_record_has_every_schema_field_with_the_right_type(tmp_path, capsys):
    code, record = _cell(tmp_path)
    assert code == 0
    assert list(record) == list(store.FIELDS)
    for field, expected in EXPECTED_TYPES.items():
        assert isinstance(record[field], expected), (field, record[field])
    for field in EMPTY_ON_CPU:
        assert record[field] is None, field
    assert record["status"] == "ok" and record["energy_source"] == "none"
    assert record["timed_steps"] == 3 and record["seq_len"] == 64
    assert record["step_ms_min"] <= record["step_ms_median"]
    assert record["samples_per_s"] == pytest.approx(2 / (record["step_ms_median"] / 1e3))
    assert record["tokens_per_s"] == pytest.approx(64 * record["samples_per_s"])
    assert record["flops_per_step"] > 0 and record["achieved_tflops"] > 0
    assert record["mfu_flag"] == f"no peak for '{record['device_name']}'"
    assert "gpt2-tiny fp16 b=2 T=64: ok" in capsys.readouterr().err

    # Schema 6: the raw times of the timed window, and the statistics are theirs.
    times = record["step_times_ms"]
    assert len(times) == record["timed_steps"] and all(t > 0 for t in times)
    q1, q3 = np.percentile(times, [25, 75])
    assert record["step_ms_median"] == pytest.approx(float(np.median(times)))
    assert record["step_ms_iqr"] == pytest.approx(q3 - q1)
    assert record["step_ms_min"] == min(times)
    assert record["schema"] == store.SCHEMA_VERSION == 8


def test_record_carries_the_threads_a_cpu_number_depends_on(tmp_path, monkeypatch):
    # Schema 7: torch's thread pools as the cell ran them, the thread variables as set (None:
    # unset) and the GPUs CUDA was shown.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    code, record = _cell(tmp_path)
    assert code == 0
    assert record["torch_num_threads"] == torch.get_num_threads() >= 1
    assert record["torch_num_interop_threads"] == torch.get_num_interop_threads() >= 1
    assert (record["omp_num_threads"], record["mkl_num_threads"]) == ("2", "1")
    assert record["openblas_num_threads"] is None and record["cuda_visible_devices"] is None


def test_failed_cell_still_writes_its_record(tmp_path, monkeypatch):
    def explode(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("bench.cell.train.Trainer.step", explode)
    code, record = _cell(tmp_path)
    assert code == 1
    assert record["status"] == "oom" and "out of memory" in record["error"]
    assert record["samples_per_s"] is None and record["model"] == "gpt2-tiny"


def test_unsupported_policy_is_a_status_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.precision.Policy.unsupported_reason",
                        lambda self, device, model=None: "no fp16 here")
    code, record = _cell(tmp_path)
    assert code == 1
    assert (record["status"], record["error"]) == ("unsupported", "no fp16 here")


def test_error_keeps_the_exception_message(tmp_path, monkeypatch):
    def broken(self):
        raise ValueError("shapes do not match")

    monkeypatch.setattr("bench.cell.train.Trainer.step", broken)
    _, record = _cell(tmp_path)
    assert record["status"] == "error" and "ValueError: shapes do not match" in record["error"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gpt3"], "unknown model 'gpt3'; valid: resnet50"),
        (["--precision", "fp4"], "unknown precision 'fp4'; valid: fp32"),
        (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["--seq-len", "4096"], "seq_len 4096 is longer than gpt2-tiny's context of 128"),
        (["--device", "tpu9"], "unknown device 'tpu9'; valid: cpu, cuda"),
        (["--image-size", "64"], "--image-size does not apply to gpt2-tiny"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, cli_env, args, message):
    base = {"--model": "gpt2-tiny", "--precision": "bf16", "--batch-size": "2"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    out = tmp_path / "record.json"
    argv = [x for pair in base.items() for x in pair] + ["--steps", "1", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "bench", "cell", *argv], env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize(("out", "message"), [
    ("{tmp}", "a directory, not a file"),
    ("{tmp}/missing/r.json", "does not exist"),
    ("{tmp}/file/r.json", "is a file, not a directory"),
    ("{tmp}/" + "r" * 300 + ".json", "too long"),
])
def test_a_bad_out_path_is_one_line_before_the_cell_trains(tmp_path, capsys, monkeypatch, out,
                                                           message):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr("bench.cell.main.run_cell", lambda *a: pytest.fail("the cell trained"))
    with pytest.raises(SystemExit) as stopped:
        main(["cell", "--model", "gpt2-tiny", "--precision", "bf16", "--batch-size", "2",
              "--out", out.format(tmp=tmp_path)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["file"]  # no stray temporary file


def test_a_record_that_cannot_be_written_leaves_no_temporary_file(tmp_path, monkeypatch):
    from bench.cell.main import write_record

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", refuse)
    with pytest.raises(OSError, match="No space"):
        write_record({"status": "ok"}, str(tmp_path / "r.json"))
    assert os.listdir(tmp_path) == []


def test_a_cell_over_the_limits_is_bad_input(capsys):
    assert main(["cell", "--model", "gpt2-tiny", "--precision", "bf16", "--batch-size", "2",
                 "--steps", "99999999", "--device", "cpu"]) == 2
    assert "'steps' must be at most 1e+06, got 99999999" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_bad_input(tmp_path, capsys):
    code = main(["cell", "--model", "gpt2-tiny", "--precision", "bf16", "--batch-size", "2",
                 "--device", "cuda", "--out", str(tmp_path / "r.json")])
    assert code == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_a_cell_on_cuda_1_makes_it_current_and_checks_support_there(tmp_path, monkeypatch):
    calls = []

    def seen(name, result):
        return lambda device=None: calls.append((name, str(device))) or result

    # A box with two GPUs; GPU 1 is a V100 (no native bfloat16).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", seen("set_device", None))
    monkeypatch.setattr(torch.cuda, "get_device_capability", seen("capability", (7, 0)))
    monkeypatch.setattr(torch.cuda, "get_device_name", seen("name", "Tesla V100-SXM2-16GB"))
    code, record = _cell(tmp_path, "--device", "cuda:1", "--precision", "bf16")
    assert code == 1
    assert (record["status"], record["device"]) == ("unsupported", "cuda:1")
    assert record["error"] == "Tesla V100-SXM2-16GB has no native bfloat16"
    assert calls[0] == ("set_device", "cuda:1")  # before anything else asks CUDA
    assert ("capability", "cuda:1") in calls
    assert all(device in ("1", "cuda:1") for _, device in calls), calls  # never GPU 0


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["fp32", "tf32", "fp16", "bf16"])
def test_cuda_record_has_memory_and_timing(tmp_path, policy):
    out = tmp_path / "r.json"
    code = main(["cell", "--model", "gpt2-tiny", "--precision", policy, "--batch-size", "4",
                 "--device", "cuda", "--steps", "5", "--out", str(out)])
    record = json.loads(out.read_text())
    assert code == 0
    assert record["peak_mem_allocated_gib"] > 0
    assert record["peak_mem_reserved_gib"] >= record["peak_mem_allocated_gib"]
    assert record["cuda_version"] and record["device_name"]


def test_ranks_combine_into_the_slowest_step_and_the_largest_memory():
    from bench.cell.dist import combine_ranks
    from bench.telemetry.monitor import empty_fields

    def rank(median, iqr, rss, host_bound):
        return {"step_ms_median": median, "step_ms_iqr": iqr, "step_ms_min": median - 1,
                "host_ms_median": median - 2, "queued_ms_median": 0.5, "host_bound": host_bound,
                "peak_mem_allocated_gib": None, "peak_mem_reserved_gib": None,
                "peak_rss_gib": rss, **empty_fields()}

    fast, slow = rank(10.0, 0.5, 2.0, False), rank(12.0, 0.1, 1.5, True)
    fast["step_times_ms"], slow["step_times_ms"] = [9.0, 10.0, 11.0], [11.0, 12.0, 12.1]
    combined = combine_ranks([fast, slow], num_samples=8)
    assert (combined["step_ms_median"], combined["step_ms_iqr"], combined["step_ms_min"]) == (
        12.0, 0.1, 11.0)
    assert combined["step_times_ms"] == [11.0, 12.0, 12.1]  # the slowest rank's raw times
    assert (combined["host_ms_median"], combined["host_bound"]) == (10.0, True)
    assert combined["peak_rss_gib"] == 2.0 and combined["peak_mem_reserved_gib"] is None
    assert combined["energy_source"] == "none"


def test_an_image_cell_records_the_memory_format_it_used(tmp_path):
    from bench.cell.train import prepare

    default = prepare("resnet-tiny", "fp32", batch_size=2)
    assert default.memory_format == "contiguous" and default.inputs.is_contiguous()
    nhwc = prepare("resnet-tiny", "fp32", batch_size=2, memory_format="channels_last")
    assert nhwc.inputs.is_contiguous(memory_format=torch.channels_last)
    assert not nhwc.inputs.is_contiguous()
    out = tmp_path / "r.json"
    assert main(["cell", "--model", "resnet-tiny", "--precision", "fp32", "--batch-size", "2",
                 "--warmup", "0", "--steps", "1", "--device", "cpu",
                 "--memory-format", "channels_last", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["memory_format"] == "channels_last"


def test_memory_format_of_a_language_model_is_bad_input(capsys):
    assert main(["cell", "--model", "gpt2-tiny", "--precision", "fp32", "--batch-size", "2",
                 "--device", "cpu", "--memory-format", "contiguous"]) == 2
    assert "--memory-format does not apply to gpt2-tiny" in capsys.readouterr().err
