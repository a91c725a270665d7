"""One benchmark cell: build a model, train it under a precision policy, time it, write a record.

    python -m bench cell --model gpt2-tiny --precision bf16 --batch-size 8 --steps 20

This is the child side of the matrix runner (bench/run/sweep.py runs one of these per cell), and
a user's way to try a single configuration. The record (one flat JSON object with every schema
field of bench/store.py, the raw step times of the timed window included) goes to ``--out`` or
stdout; a summary line goes to stderr. A failing cell still writes its record (status oom |
error | unsupported) and exits 1. What it trains is bench/cell/train.py's; how it times,
bench/cell/timing.py.

Under torchrun (``torchrun --nproc-per-node 2 -m bench cell ...``; the runner launches it so for
a cell with world_size > 1) every process trains a DistributedDataParallel replica on its own
micro-batch of ``--batch-size`` (bench/cell/dist.py). Rank 0 writes the record: global
throughput is the global batch over the slowest rank's median step time, power and energy are
summed over the GPUs, peak memory is the largest of any rank. The warmup runs at least 11
steps there (DDP waits for the GPU in its first ones); the record's ``warmup_steps`` is what
ran. A rank that fails writes its own record to ``--out`` unless another rank's failure got
there first, and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import models
from bench import BadInput, config, paths, precision, store, strategy
from bench.cell import footprint
from bench.cell.dist import (
    Ranks,
    combine_ranks,
    gather,
    process_group,
    wait_for_peers,
    warmup_steps,
)
from bench.cell.flops import count_training_flops, mfu_fields
from bench.cell.timing import StepTimer, peak_memory, reset_peak_memory, summarize, use_device
from bench.cell.train import Trainer, is_oom, prepare, resolve_device
from bench.run import proctree
from bench.telemetry.env import fingerprint
from bench.telemetry.monitor import PowerMonitor


def _validate(args: argparse.Namespace,
              ) -> tuple[models.ModelSpec, precision.Policy, int | None]:
    """Check names and sizes before anything is built; return (spec, policy, input size)."""
    try:
        spec = models.get(args.model)
        pol = precision.get(args.precision)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    for other in ("seq_len", "image_size"):
        if other != spec.size_arg and getattr(args, other) is not None:
            takes = f"--{spec.size_arg.replace('_', '-')}" if spec.size_arg \
                else "a fixed-size input"
            raise BadInput(f"--{other.replace('_', '-')} does not apply to {spec.name} "
                           f"(a {spec.unit} model takes {takes})")
    if getattr(args, "memory_format", None) and spec.size_arg != "image_size":
        raise BadInput(f"--memory-format does not apply to {spec.name} (not an image model)")
    size = (getattr(args, spec.size_arg) or spec.default_size) if spec.size_arg \
        else spec.default_size
    problem = spec.check_size(size) if size is not None else None
    if problem:
        raise BadInput(problem)
    if args.batch_size < 1:
        raise BadInput(f"batch size must be at least 1, got {args.batch_size}")
    if spec.source is not None:
        # A user's module runs here first: one that breaks the contract is bad input (exit 2),
        # not a cell that failed (bench/cell/check.py; the runner's probe checked it already).
        from bench.cell.check import ModelProblem, check

        try:
            check(spec, size)
        except ModelProblem as exc:
            raise BadInput(str(exc)) from None
    return spec, pol, size


def run_cell(args: argparse.Namespace, ranks: Ranks | None = None) -> dict[str, Any]:
    """Train one cell as ``args`` says and return its record (never raises for a failed cell).

    Under torchrun (``ranks``) every rank returns a record; rank 0's is the cell's.
    """
    started = time.perf_counter()
    spec, pol, size = _validate(args)
    device = resolve_device(args.device, ranks)
    # Before anything touches CUDA: NCCL and the allocator work on the current device, and a
    # process that never sets it also opens a context on GPU 0.
    use_device(device)
    world_size = ranks.world_size if ranks else 1
    shared = strategy.parse(getattr(args, "strategy", strategy.DEFAULT))
    record = store.empty_record(
        run_id=args.run_id or None, cell_id=args.cell_id or None, model=spec.name,
        model_source=spec.source, model_sha256=spec.source_sha256,
        precision=pol.name, batch_size=args.batch_size,
        seq_len=size if spec.size_arg == "seq_len" else None,
        image_size=size if spec.size_arg == "image_size" else None,
        grad_accum=args.grad_accum, compile=args.compile, world_size=world_size,
        repeat=args.repeat, warmup_steps=args.warmup, timed_steps=args.steps,
        **fingerprint(str(device)), **shared.record_fields(world_size),
    )
    # Before any build or compile: a device without the policy's math, or under FP8 a model
    # with no convertible layer, is an unsupported record in seconds.
    reason = pol.unsupported_reason(device, spec)
    if not reason and ranks is not None:
        reason = strategy.check(shared, pol.name)
    if reason:
        record.update(status="unsupported", error=reason)
        return record
    try:
        with process_group(device, ranks):
            record.update(_train_and_measure(args, spec, size, device, ranks, started))
        # MFU is per device: each GPU's share of the FLOPs against its own peak.
        record.update(mfu_fields(record["flops_per_step"] / world_size,
                                 record["step_ms_median"] / 1e3, record["device_name"],
                                 pol.name, args.peak_tflops))
        record["status"] = "ok"
    except Exception as exc:
        record["status"] = "oom" if is_oom(exc) else "error"
        error = "".join(traceback.format_exception_only(exc)).strip()[-2000:]
        record["error"] = f"rank {ranks.rank}: {error}" if ranks else error
    return record


def _train_and_measure(
    args: argparse.Namespace, spec: models.ModelSpec, size: int | None, device: Any,
    ranks: Ranks | None, started: float,
) -> dict[str, Any]:
    """Build the cell, warm it up, time its window; the record's measured fields."""
    world_size = ranks.world_size if ranks else 1
    # Same initial weights on every rank (DDP would broadcast rank 0's anyway), its own data.
    trainer = prepare(spec.name, args.precision, args.batch_size, size, device=device,
                      seed=args.seed, grad_accum=args.grad_accum, compile=args.compile,
                      ddp=ranks is not None, data_seed=args.seed + (ranks.rank if ranks else 0),
                      memory_format=getattr(args, "memory_format", None),
                      strategy=getattr(args, "strategy", strategy.DEFAULT))
    samples_per_step = args.batch_size * args.grad_accum  # on this rank
    flops_per_step = count_training_flops(spec, args.batch_size, size) * args.grad_accum

    _overflowing(trainer)
    warmup = warmup_steps(args.warmup, ranks)
    losses = [trainer.step() for _ in range(warmup)]
    trainer.sync()
    step = _slowed(trainer, losses)
    measured, startup_s = _timed_window(trainer, step, losses, args, ranks, started)
    if ranks is not None:
        measured = combine_ranks(gather(measured), samples_per_step * args.steps * world_size)
    step_s = measured["step_ms_median"] / 1e3
    samples_per_s = samples_per_step * world_size / step_s
    tokens = spec.tokens_per_sample(size)
    return {
        **measured,
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * tokens if tokens else None,
        "startup_s": startup_s,
        "flops_per_step": flops_per_step * world_size,
        "achieved_tflops": flops_per_step * world_size / step_s / 1e12,
        **_numerics(trainer, losses),
        "memory_format": trainer.memory_format,
        **trainer.conversion,
        **footprint.fields(trainer.model, trainer.optimizer),  # this rank's: DDP replicates
        "warmup_steps": warmup,  # what ran: more than asked for under DDP
    }


def _timed_window(
    trainer: Trainer, step: Any, losses: list[Any], args: argparse.Namespace,
    ranks: Ranks | None, started: float,
) -> tuple[dict[str, Any], float]:
    """Time ``args.steps`` steps with power sampled; (this rank's measurement, start-up s)."""
    import torch

    device = trainer.device
    reset_peak_memory(device)
    # By UUID: torch's cuda:N is not NVML's GPU N under CUDA_VISIBLE_DEVICES.
    gpu = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None
    monitor = PowerMonitor(gpu, args.power_interval_ms)
    wait_for_peers(ranks)  # every rank measures idle power, then starts its window, together
    monitor.measure_idle()
    timer = StepTimer(device, args.steps)
    startup_s = time.perf_counter() - started
    with monitor:
        for i in range(args.steps):  # the timed window: no host sync in here
            timer.start(i)
            losses.append(step())
            timer.stop(i)
        trainer.sync()
    times = timer.times_ms()
    num_samples = args.batch_size * args.grad_accum * args.steps
    return {**summarize(times), store.STEP_TIMES: times, **timer.host_fields(),
            **peak_memory(device), **monitor.fields(num_samples)}, startup_s


def _numerics(trainer: Trainer, losses: list[Any]) -> dict[str, Any]:
    """The NUMERICS fields, from every step's loss (warmup included), the scaler's per-step
    found-inf and scale, and one look at the weights, all read here, after the timed window."""
    import torch

    all_losses = torch.stack(losses).float().cpu()
    fields: dict[str, Any] = {
        "loss_first": float(all_losses[0]),
        "loss_last": float(all_losses[-1]),
        "nonfinite_steps": int((~torch.isfinite(all_losses)).sum()),
        "num_steps_counted": len(losses),
        "nonfinite_params": _nonfinite_params(trainer.model),
    }
    if not trainer.scaler.is_enabled():
        return fields
    found_inf, scales = trainer.numerics()
    final = float(trainer.scaler.get_scale())
    seen = [*scales, final]
    skipped = sum(found_inf)  # GradScaler skips a step's update exactly when it found inf/NaN
    return {**fields, "scaler_skipped_steps": skipped, "nonfinite_grad_steps": skipped,
            "scaler_scale_final": final, "scaler_scale_min": min(seen),
            "scaler_scale_max": max(seen),
            "scaler_scale_changes": sum(a != b for a, b in itertools.pairwise(seen)),
            store.SCALE_TRAJECTORY: _run_lengths(scales)}


def _nonfinite_params(model: Any) -> int:
    """Parameters with any inf/NaN; under FSDP2 over every rank's shard (a collective: every
    rank calls this, in the same place)."""
    import torch

    sharded = False
    flags = []
    for p in model.parameters():
        local = p.detach()
        if hasattr(local, "to_local"):  # a DTensor: this rank's shard, maybe empty
            local, sharded = local.to_local(), True
        flags.append(~torch.isfinite(local).all())
    count = torch.stack(flags).to(torch.int64)
    if sharded:
        import torch.distributed as dist

        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.sum())


def _run_lengths(values: list[float]) -> list[list[Any]]:
    """[[value, how many in a row], ...]: a loss scale changes rarely, so this stays short."""
    runs: list[list[Any]] = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return runs


def _overflowing(trainer: Trainer) -> None:
    """With AMPBENCH_OVERFLOW=N (test-only): the first N backward passes leave the first
    parameter's gradient infinite, as an FP16 overflow does, so that a scaler's skipped steps
    and a policy without one going non-finite can be tested on CPU; unset in normal use."""
    count = int(os.environ.get("AMPBENCH_OVERFLOW") or 0)
    if count <= 0:
        return
    import torch

    seen = [0]

    def overflow(grad: Any) -> Any:
        seen[0] += 1
        return torch.full_like(grad, float("inf")) if seen[0] <= count else grad

    next(p for p in trainer.model.parameters() if p.requires_grad).register_hook(overflow)


def _slowed(trainer: Trainer, losses: list[Any]) -> Any:
    """``trainer.step``, or with AMPBENCH_SLOWDOWN=F (test-only, CPU) that step followed by
    busy work of F times its own time, measured on three more untimed steps (their losses go
    to ``losses``, as the warmup's do): a regression of a known size, real work on the core
    rather than an edited number, for measuring what the gate detects."""
    factor = float(os.environ.get("AMPBENCH_SLOWDOWN") or 0)
    if factor <= 0:
        return trainer.step
    started = time.perf_counter()
    losses.extend(trainer.step() for _ in range(3))
    trainer.sync()
    extra_s = factor * (time.perf_counter() - started) / 3

    def step() -> Any:
        loss = trainer.step()
        trainer.sync()  # the step's own work first, then the injected work
        until = time.perf_counter() + extra_s
        while time.perf_counter() < until:
            pass
        return loss

    return step


def write_record(record: dict[str, Any], out: str | None, *, exclusive: bool = False) -> None:
    """The record as JSON to ``out`` (atomically) or to stdout.

    ``exclusive``: only if ``out`` does not exist yet, so that of several failing ranks the
    first one's record (the root cause) stays.
    """
    text = json.dumps(record, indent=1)
    if out is None:
        print(text)
        return
    path = Path(out)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text + "\n", encoding="utf-8")
        if not exclusive:
            os.replace(tmp, path)
            return
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # atomic, and fails if the file exists
    finally:
        tmp.unlink(missing_ok=True)  # never left behind, whatever failed


def _inject_fault(args: argparse.Namespace, ranks: Ranks | None) -> None:
    """Test-only failures, so the runner's handling can be tested on CPU; unset in normal use.

    AMPBENCH_FAULT="model:precision:batch[@rank]=raise|kill|hang|oom[,...]" makes that cell
    (only on that torchrun rank, with @rank) raise, SIGKILL itself, hang, or die of a CUDA OOM,
    all without writing a record; AMPBENCH_FAULT_MAX_BATCH=N makes every cell with a batch
    above N die of a CUDA OOM.
    """
    faults = os.environ.get("AMPBENCH_FAULT", "")
    ceiling = os.environ.get("AMPBENCH_FAULT_MAX_BATCH", "")
    if not faults and not ceiling:
        return
    here = f"{args.model}:{args.precision}:{args.batch_size}"
    actions = dict(item.strip().rpartition("=")[::2] for item in faults.split(",") if "=" in item)
    action = (actions.get(f"{here}@{ranks.rank}") if ranks else None) or actions.get(here) or (
        "oom" if ceiling and args.batch_size > int(ceiling) else None)
    if ranks is not None:
        here += f" rank {ranks.rank}"
    if action == "raise":
        raise RuntimeError(f"injected fault in {here}")
    if action == "kill":
        os.kill(os.getpid(), 9)
    if action == "hang":
        time.sleep(3600)
    if action == "oom":
        import torch

        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected fault in {here})")


def _check_limits(args: argparse.Namespace) -> None:
    """Counts past config.LIMITS (a billion steps) are bad input, before anything is built."""
    for key in ("steps", "warmup", "batch_size", "grad_accum", "seq_len", "image_size"):
        value = getattr(args, key, None)
        if value is not None:
            config.check_limit(key, value, "command line")
    if not -(2**63) <= args.seed < 2**63:
        raise BadInput(f"--seed {args.seed}: must fit in 64 bits")


def main(args: argparse.Namespace) -> int:
    """`ampbench cell`: exit 0 when the cell is ok, 1 when it failed (its record says why)."""
    # First: a cell never outlives its runner or its timeout, even a hung one.
    proctree.watch_from_env()
    if args.out:
        paths.output_file(args.out)  # before the cell trains, not after
    _check_limits(args)
    ranks = Ranks.from_env()
    if getattr(args, "strategy", strategy.DEFAULT) != strategy.DEFAULT and ranks is None:
        raise BadInput(f"--strategy {args.strategy} shares the model between torchrun's "
                       "ranks; run the cell under torchrun (ampbench run --world-size 2 does)")
    _inject_fault(args, ranks)
    record = run_cell(args, ranks)
    ok = record["status"] == "ok"
    if ranks is None:
        write_record(record, args.out)
    elif not ok:
        write_record(record, args.out, exclusive=True)
    elif ranks.rank == 0:
        write_record(record, args.out)
    if ranks is None or ranks.rank == 0 or not ok:
        print(store.record_line(record), file=sys.stderr)
    code = 0 if ok else 1
    if ranks is not None:
        # A rank leaves without Python's finalization: its process group is destroyed and its
        # record written, but gloo's worker threads may still hold tensors, and finalizing
        # them then aborts the process (SIGABRT, "terminate called without an active
        # exception"), failing a cell that succeeded: seen in 1 of 130 two-rank CPU cells here
        # and once in CI before; too rare for 100 clean runs since to prove it gone.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
