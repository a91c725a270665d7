"""The record schema: every field of a record and of results.csv, grouped by what it measures,
with units in the names, and the schema version with what each version added. bench/store.py
reads and writes the files (and re-exports these names); bench/rows.py upgrades older rows.
torch-free."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SCHEMA_VERSION = 8  # 2: calibration and the per-cell noise columns; 3: host timing,
# memory_format, wall_s, throttle_shares/power_capped/power_scope, throttled = thermal/hw only;
# 4: emulated, fp8_converted, fp8_unconverted; 5: peak_fp8_tflops, mfu_fp8_pct, mfu_flag, and an
# FP8 row's mfu_pct is against the bf16 peak (it was against the FP8 peak: see bench/rows.py);
# 6: step_times_ms, the timed window's raw step times, from which every reader derives
# step_ms_median/iqr/min (records of 1-5 have none and keep their stored statistics);
# 7: torch_num_threads, torch_num_interop_threads, omp/mkl/openblas_num_threads and
# cuda_visible_devices (bench/telemetry/env.py, THREAD_FIELDS), and model_source and
# model_sha256 (a model of the user's own: models/external.py; empty for the reference models)
# 8: device_slot, started_unix_s, ended_unix_s, neighbours, num_others_on_gpu (`run
# --devices`: where a process ran, beside which others, bench/run/slots.py), and param_bytes,
# param_dtypes, optim_state_bytes and optim_state_dtypes (what the model holds:
# bench/cell/footprint.py);
# nonfinite_grad_steps, nonfinite_params, num_steps_counted, scaler_scale_min/max/changes and
# scaler_scales (numerics health; an older row's num_steps_counted is its warmup + timed steps);
# scheduler_job (`run --executor slurm|local`);
# strategy, fsdp_param_dtype, fsdp_reduce_dtype and peak_mem_rank_min_gib (how a multi-process
# cell shares its model, bench/strategy.py; strategy joins KEY, an older row's reads as ddp);
# fp8_num_unconverted, low_precision_format and low_precision_filter (the FP8 family's format
# and layer filter: bench/cell/low_precision.py)

IDENTITY = (
    "schema", "run_id", "cell_id", "model", "precision", "batch_size", "seq_len", "image_size",
    "grad_accum", "compile", "world_size", "repeat", "calibration",
)
# Where a model of the user's own came from (its file, module name or hf: reference) and the
# sha256 of its source (an hf: config's): a changed model is never compared with an old
# baseline silently (bench/analysis/gate.py). None for the reference models.
MODEL = ("model_source", "model_sha256")
# How the ranks of a multi-process cell share the model (bench/strategy.py): "ddp", "fsdp2"
# or "fsdp2:PARAM/REDUCE", and FSDP2's MixedPrecisionPolicy dtypes; all None for one process.
STRATEGY = ("strategy", "fsdp_param_dtype", "fsdp_reduce_dtype")
STATUS = ("status", "error")
TIMING = (
    "warmup_steps", "timed_steps", "step_ms_median", "step_ms_iqr", "step_ms_min",
    "samples_per_s", "tokens_per_s", "startup_s",
    "wall_s",  # the cell's process from start to exit, as the runner saw it (--time-budget)
    # The host's time issuing a step, the GPU work still queued when it had (bench/cell/timing.py),
    # whether the GPU waited for the host; the image layout used (None: not an image model).
    "host_ms_median", "queued_ms_median", "host_bound", "memory_format",
)
# Peak memory, then what the model holds between steps (bench/cell/footprint.py): the bytes of
# its parameters and of its optimizer state (schema 8), and in HELD_DTYPES their dtypes
# ("bfloat16", or "float32:0.98;bfloat16:0.02" by share of the bytes).
# Under torchrun each is the largest rank's; ``peak_mem_rank_min_gib`` is the smallest rank's
# peak (allocated on GPU, RSS on CPU): how evenly the ranks carry the cell.
PEAK_MEMORY = ("peak_mem_allocated_gib", "peak_mem_reserved_gib", "peak_rss_gib")
MEMORY = (*PEAK_MEMORY, "peak_mem_rank_min_gib", "param_bytes", "optim_state_bytes")
HELD_DTYPES = ("param_dtypes", "optim_state_dtypes")
# MFU (bench/cell/flops.py):
# ``mfu_pct`` against the policy's comparable dense peak (bf16's for every
# autocast policy, FP8 included), ``mfu_fp8_pct`` against the FP8 peak (FP8 policies only), and
# ``mfu_flag``: "" or why an MFU is empty (no peak for the device; above 100%, with the value).
COMPUTE = ("flops_per_step", "achieved_tflops", "peak_tflops", "mfu_pct", "peak_fp8_tflops",
           "mfu_fp8_pct", "mfu_flag")
MFU_ABOVE_100 = "above 100%"  # how mfu_flag starts for an MFU no run can reach
POWER = (
    "power_avg_w", "power_max_w", "power_source", "idle_power_w", "energy_j", "energy_source",
    "energy_check_pct", "joules_per_sample", "sm_clock_mhz_avg", "temp_max_c",
    "throttle_reasons", "throttled", "others_cpu_pct",
    # Each clock-event reason's share of the samples ("sw_power_cap:0.82;..."), whether the
    # power limit held the clocks (``throttled`` is heat and hardware slowdown only), and
    # whose power it is: "gpu", or "shared_gpu" for a MIG instance (bench/telemetry/monitor.py).
    "throttle_shares", "power_capped", "power_scope",
)
NUMERICS = (
    "loss_first", "loss_last", "nonfinite_steps", "scaler_scale_final", "scaler_skipped_steps",
    # Numerics health (schema 8; docs/run-directory.md says what each one measures): counts over
    # every training step, warmup included (num_steps_counted), and the loss scale's range.
    "nonfinite_grad_steps", "nonfinite_params", "num_steps_counted", "scaler_scale_min",
    "scaler_scale_max", "scaler_scale_changes",
)
# The scale each step's backward ran at, run-length encoded: [[scale, steps], ...] in
# records.jsonl, "scale:steps;..." in results.csv (None without a scaler).
SCALE_TRAJECTORY = "scaler_scales"
# What the policy did to the model (bench/precision.py): whether its low-precision math ran
# emulated in software (FP8 off CUDA: its speed says nothing about FP8), and for FP8 how many
# nn.Linear layers torchao converted and which it left in bf16 ("name (in x out[: why]), ..."),
# how many it left, the format ("float8 tensorwise", "float8 rowwise, wgrad bf16", "mxfp8",
# "nvfp4") and the rule that chose the layers (schema 8).
CONVERSION = ("emulated", "fp8_converted", "fp8_unconverted", "fp8_num_unconverted",
              "low_precision_format", "low_precision_filter")
ENVIRONMENT = (
    "device", "device_name", "device_count", "driver_version", "torch_version", "cuda_version",
    "torch_cuda_build", "cudnn_version", "python_version",
    # What a CPU number depends on: torch's thread pools, the thread variables (None: unset)
    # and the GPUs CUDA shows.
    "torch_num_threads", "torch_num_interop_threads", "omp_num_threads", "mkl_num_threads",
    "openblas_num_threads", "cuda_visible_devices",
    "machine_id", "git_sha", "git_dirty", "timestamp",
)
# Where and when the process ran (bench/run/slots.py; docs/node.md): its GPU(s) under --devices,
# start and end (unix s), the processes ("cell_id:repeat") beside it, and others on its GPU(s);
# under --executor slurm|local, the job that ran it and where ("slurm 4711_3 on node-12":
# bench/run/cluster.py, docs/cluster.md).
PLACEMENT = ("device_slot", "started_unix_s", "ended_unix_s", "neighbours",
             "num_others_on_gpu", "scheduler_job")
# The raw step times (ms) of the timed window, in order: the slowest rank's under torchrun.
# Last: a long list, kept in records.jsonl and as one ";"-joined column of results.csv.
STEP_TIMES = "step_times_ms"
FIELDS: tuple[str, ...] = (
    IDENTITY + MODEL + STRATEGY + STATUS + TIMING + MEMORY + HELD_DTYPES + COMPUTE + POWER
    + NUMERICS + (SCALE_TRAJECTORY,) + CONVERSION + PLACEMENT + ENVIRONMENT + (STEP_TIMES,)
)

# Derived into results.csv from all of a cell's processes (the same on each of its rows): the
# cell's throughput (median over its ok processes), that value's relative standard error, the
# spread between its processes and the per-process noise used, with where that came from
# (bench/analysis/noise.py).
CELL_NOISE = ("num_processes", "cell_samples_per_s", "cell_samples_per_s_err_pct",
              "process_spread_pct", "noise_pct", "noise_source")
# What computes them: results.csv's rows in, the same rows with CELL_NOISE out. The analysis
# side has it (bench.analysis.noise.results_columns); its writers and readers pass it in.
CellNoise = Callable[[Any], Any]

# What identifies a cell across runs: a cell's repeats share these, and the report and the
# gate match cells on them.
KEY = ("model", "precision", "batch_size", "seq_len", "image_size", "grad_accum", "compile",
       "world_size", "strategy")

STATUSES = ("ok", "oom", "timeout", "error", "unsupported", "skipped")
FAILED = ("error", "timeout", "oom", "unsupported", "skipped")  # worst first
