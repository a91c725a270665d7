"""One benchmark cell: build a model, train it under a precision policy, time it, write a record.

    python -m bench cell --model gpt2-tiny --precision bf16 --batch-size 8 --steps 20

This is the child side of the matrix runner (bench/runner.py runs one of these per cell), and
a user's way to try a single configuration. The record (one flat JSON object with every schema
field of bench/store.py) goes to ``--out`` or stdout; a summary line goes to stderr. A failing
cell still writes its record (status oom | error | unsupported) and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import models
from bench import BadInput, precision, store
from bench.env import fingerprint
from bench.flops import count_training_flops, mfu_fields
from bench.measure import StepTimer, peak_memory, reset_peak_memory, summarize
from bench.power import PowerMonitor

_SPREAD_WARNING = 0.10  # IQR / median above this makes a number hard to trust


@dataclass
class Trainer:
    """Model, optimizer, scaler and one resident synthetic batch: ``step()`` trains once."""

    spec: models.ModelSpec
    policy: precision.Policy
    device: Any
    model: Any
    optimizer: Any
    scaler: Any
    inputs: Any
    targets: Any
    grad_accum: int = 1

    def step(self) -> Any:
        """One optimizer step over ``grad_accum`` micro-batches; returns the loss, unsynced."""
        total = None
        for _ in range(self.grad_accum):
            with self.policy.autocast(self.device.type):
                loss = self.spec.loss(self.model, self.inputs, self.targets) / self.grad_accum
            self.scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        self.scaler.step(self.optimizer)  # skips the update when the scaler found inf/NaN
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def optimizer_steps(self) -> int:
        """Optimizer updates really applied (a scaler-skipped step does not count)."""
        for state in self.optimizer.state.values():
            step = state.get("step")
            return int(step.item() if hasattr(step, "item") else step)
        return 0


def resolve_device(name: str) -> Any:
    """A torch.device for ``name`` (cpu, cuda, cuda:N, auto); bad or absent devices: BadInput."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BadInput(f"device '{name}': CUDA is not available on this machine; use cpu")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise BadInput(f"unknown device '{name}'; valid: cpu, cuda, cuda:N, auto") from None
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise BadInput(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    raise BadInput(f"unknown device '{name}'; valid: cpu, cuda, cuda:N, auto")


def prepare(
    model: str,
    policy: str,
    batch_size: int,
    size: int | None = None,
    *,
    device: Any = "cpu",
    seed: int = 0,
    grad_accum: int = 1,
    compile: bool = False,
) -> Trainer:
    """Build model, AdamW (fused on CUDA), scaler and a resident batch for one cell."""
    import torch

    spec = models.get(model)
    pol = precision.get(policy)
    device = torch.device(device)
    size = size or spec.default_size
    pol.apply_backend_flags()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    torch.manual_seed(seed)
    net = spec.build().to(device)
    inputs, targets = spec.make_batch(batch_size, size, device=device, seed=seed)
    if device.type == "cuda" and inputs.dim() == 4:
        # NHWC lets cuDNN use tensor cores without layout transposes under autocast.
        net = net.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    if compile:
        net = torch.compile(net)
    return Trainer(spec, pol, device, net, optimizer, pol.scaler(device.type), inputs, targets,
                   grad_accum)


def _validate(args: argparse.Namespace) -> tuple[models.ModelSpec, precision.Policy, int]:
    """Check names and sizes before anything is built; return (spec, policy, input size)."""
    try:
        spec = models.get(args.model)
        pol = precision.get(args.precision)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    other = "image_size" if spec.size_arg == "seq_len" else "seq_len"
    if getattr(args, other) is not None:
        raise BadInput(f"--{other.replace('_', '-')} does not apply to {spec.name} "
                       f"(a {spec.unit} model takes --{spec.size_arg.replace('_', '-')})")
    size = getattr(args, spec.size_arg) or spec.default_size
    problem = spec.check_size(size)
    if problem:
        raise BadInput(problem)
    if args.batch_size < 1:
        raise BadInput(f"batch size must be at least 1, got {args.batch_size}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise BadInput(f"--peak-tflops must be above 0, got {args.peak_tflops}")
    if not args.power_interval_ms > 0:
        raise BadInput(f"--power-interval-ms must be above 0, got {args.power_interval_ms}")
    return spec, pol, size


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def run_cell(args: argparse.Namespace) -> dict[str, Any]:
    """Train one cell as ``args`` says and return its record (never raises for a failed cell)."""
    started = time.perf_counter()
    spec, pol, size = _validate(args)
    device = resolve_device(args.device)
    record = store.empty_record(
        run_id=args.run_id or None, cell_id=args.cell_id or None, model=spec.name,
        precision=pol.name, batch_size=args.batch_size,
        seq_len=size if spec.size_arg == "seq_len" else None,
        image_size=size if spec.size_arg == "image_size" else None,
        grad_accum=args.grad_accum, compile=args.compile, world_size=1, repeat=args.repeat,
        warmup_steps=args.warmup, timed_steps=args.steps, **fingerprint(str(device)),
    )
    reason = pol.unsupported_reason(device)
    if reason:
        record.update(status="unsupported", error=reason)
        return record
    try:
        record.update(_train_and_measure(args, spec, size, device, started))
        record.update(mfu_fields(record["flops_per_step"], record["step_ms_median"] / 1e3,
                                 record["device_name"], pol.name, args.peak_tflops))
        record["status"] = "ok"
    except Exception as exc:
        record["status"] = "oom" if _is_oom(exc) else "error"
        record["error"] = "".join(traceback.format_exception_only(exc)).strip()[-2000:]
    return record


def _train_and_measure(
    args: argparse.Namespace, spec: models.ModelSpec, size: int, device: Any, started: float
) -> dict[str, Any]:
    import torch

    trainer = prepare(spec.name, args.precision, args.batch_size, size, device=device,
                      seed=args.seed, grad_accum=args.grad_accum, compile=args.compile)
    flops_per_step = count_training_flops(spec, args.batch_size, size) * args.grad_accum

    losses = [trainer.step() for _ in range(args.warmup)]
    trainer.sync()
    reset_peak_memory(device)

    # By UUID: torch's cuda:N is not NVML's GPU N under CUDA_VISIBLE_DEVICES.
    gpu = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None
    monitor = PowerMonitor(gpu, args.power_interval_ms)
    monitor.measure_idle()
    timer = StepTimer(device, args.steps)
    startup_s = time.perf_counter() - started
    with monitor:
        for i in range(args.steps):  # the timed window: no host sync in here
            timer.start(i)
            losses.append(trainer.step())
            timer.stop(i)
        trainer.sync()

    times = summarize(timer.times_ms())
    step_s = times["step_ms_median"] / 1e3
    samples_per_step = args.batch_size * args.grad_accum
    samples_per_s = samples_per_step / step_s
    tokens = spec.tokens_per_sample(size)
    all_losses = torch.stack(losses).float().cpu()
    scaling = trainer.scaler.is_enabled()
    return {
        **times,
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * tokens if tokens else None,
        "startup_s": startup_s,
        **peak_memory(device),
        "flops_per_step": flops_per_step,
        "achieved_tflops": flops_per_step / step_s / 1e12,
        **monitor.fields(samples_per_step * args.steps),
        "loss_first": float(all_losses[0]),
        "loss_last": float(all_losses[-1]),
        "nonfinite_steps": int((~torch.isfinite(all_losses)).sum()),
        "scaler_scale_final": float(trainer.scaler.get_scale()) if scaling else None,
        "scaler_skipped_steps": (len(losses) - trainer.optimizer_steps()) if scaling else None,
    }


def summary_line(record: dict[str, Any]) -> str:
    """One human-readable line for a record (stderr of a cell, progress of a run)."""
    size = f"T={record['seq_len']}" if record.get("seq_len") else f"{record.get('image_size')}px"
    head = f"{record['model']} {record['precision']} b={record['batch_size']} {size}"
    if record["status"] != "ok":
        error = (record.get("error") or "").splitlines()
        return f"{head}: {record['status']}" + (f" ({error[-1][:160]})" if error else "")
    mem = record["peak_mem_reserved_gib"] or record["peak_rss_gib"]
    mem_kind = "reserved" if record["peak_mem_reserved_gib"] is not None else "rss"
    line = (f"{head}: ok {record['samples_per_s']:,.1f} samples/s, step "
            f"{record['step_ms_median']:.2f} ms (IQR {record['step_ms_iqr']:.2f}), "
            f"peak {mem:.2f} GiB {mem_kind}, {record['achieved_tflops']:.3f} TFLOP/s")
    if record["step_ms_iqr"] > _SPREAD_WARNING * record["step_ms_median"]:
        line += " [wide spread: IQR > 10% of median]"
    return line


def write_record(record: dict[str, Any], out: str | None) -> None:
    """The record as JSON to ``out`` (atomically) or to stdout."""
    text = json.dumps(record, indent=1)
    if out is None:
        print(text)
        return
    path = Path(out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _inject_fault(args: argparse.Namespace) -> None:
    """Test-only failures, so the runner's handling can be tested on CPU; unset in normal use.

    AMPBENCH_FAULT="model:precision:batch=raise|kill|hang|oom[,...]" makes that cell raise,
    SIGKILL itself, hang, or die of a CUDA OOM, all without writing a record;
    AMPBENCH_FAULT_MAX_BATCH=N makes every cell with a batch above N die of a CUDA OOM.
    """
    faults = os.environ.get("AMPBENCH_FAULT", "")
    ceiling = os.environ.get("AMPBENCH_FAULT_MAX_BATCH", "")
    if not faults and not ceiling:
        return
    here = f"{args.model}:{args.precision}:{args.batch_size}"
    actions = dict(item.strip().rpartition("=")[::2] for item in faults.split(",") if "=" in item)
    action = actions.get(here) or ("oom" if ceiling and args.batch_size > int(ceiling) else None)
    if action == "raise":
        raise RuntimeError(f"injected fault in {here}")
    if action == "kill":
        os.kill(os.getpid(), 9)
    if action == "hang":
        time.sleep(3600)
    if action == "oom":
        import torch

        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected fault in {here})")


def main(args: argparse.Namespace) -> int:
    """`ampbench cell`: exit 0 when the cell is ok, 1 when it failed (its record says why)."""
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise BadInput(f"--out {args.out}: directory does not exist")
    _inject_fault(args)
    record = run_cell(args)
    write_record(record, args.out)
    print(summary_line(record), file=sys.stderr)
    return 0 if record["status"] == "ok" else 1
