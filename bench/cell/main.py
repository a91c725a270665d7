"""One benchmark cell: build a model, train it under a precision policy, time it, write a record.

    python -m bench cell --model gpt2-tiny --precision bf16 --batch-size 8 --steps 20

This is the child side of the matrix runner (bench/run/sweep.py runs one of these per cell), and
a user's way to try a single configuration. The record (one flat JSON object with every schema
field of bench/store.py) goes to ``--out`` or stdout; a summary line goes to stderr. A failing
cell still writes its record (status oom | error | unsupported) and exits 1.

Under torchrun (``torchrun --nproc-per-node 2 -m bench cell ...``; the runner launches it so for
a cell with world_size > 1) every process trains a DistributedDataParallel replica on its own
micro-batch of ``--batch-size`` (NCCL on GPU, gloo on CPU). Rank 0 writes the record: global
throughput is the global batch over the slowest rank's median step time, power and energy are
summed over the GPUs, peak memory is the largest of any rank. The warmup runs at least 11
steps there (DDP waits for the GPU in its first ones); the record's ``warmup_steps`` is what
ran. A rank that fails writes its own record to ``--out`` unless another rank's failure got
there first, and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import models
from bench import BadInput, config, failures, paths, precision, store
from bench.cell.flops import count_training_flops, mfu_fields
from bench.cell.timing import StepTimer, peak_memory, reset_peak_memory, summarize, use_device
from bench.run import proctree
from bench.telemetry.env import fingerprint
from bench.telemetry.power import PowerMonitor, combine_power

_SPREAD_WARNING = 0.10  # IQR / median above this makes a number hard to trust
_COLLECTIVE_TIMEOUT_S = 600.0  # a rank's wait for its peers, without a runner's timeout
# DDP waits for the GPU in the forwards of its first 11 synced steps (runtime statistics
# that time the step before): with DDP, the warmup runs at least these.
_DDP_SYNCING_STEPS = 11


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
    memory_format: str | None = None  # image models: "channels_last" | "contiguous"
    conversion: dict[str, Any] = field(default_factory=dict)  # the policy's record fields

    def step(self) -> Any:
        """One optimizer step over ``grad_accum`` micro-batches; returns the loss, unsynced."""
        total = None
        for i in range(self.grad_accum):
            # Under DDP only the last micro-batch's backward all-reduces the gradients.
            last = i == self.grad_accum - 1
            sync = nullcontext() if last or not hasattr(self.model, "no_sync") \
                else self.model.no_sync()
            with sync:
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


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_env(cls) -> Ranks | None:
        """The ranks torchrun set in the environment, or None for a plain single process."""
        if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        return cls(int(os.environ.get("RANK", "0")), int(os.environ["LOCAL_RANK"]),
                   int(os.environ["WORLD_SIZE"]))


def resolve_device(name: str, ranks: Ranks | None = None) -> Any:
    """A torch.device for ``name`` (cpu, cuda, cuda:N, auto); bad or absent devices: BadInput.

    Under torchrun, ``cuda`` (and ``auto`` on a GPU machine) is the GPU of the local rank.
    """
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
        if ranks is not None:
            if device.index is not None:
                raise BadInput(f"device '{name}': under torchrun each rank takes the GPU of "
                               "its local rank; pass --device cuda")
            device = torch.device("cuda", ranks.local_rank)
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
    ddp: bool = False,
    data_seed: int | None = None,
    memory_format: str | None = None,
) -> Trainer:
    """Build model, AdamW (fused on CUDA), scaler and a resident batch for one cell.

    ``ddp`` wraps the model in DistributedDataParallel (the process group must be up);
    ``data_seed`` (default ``seed``) seeds the batch, so ranks can train on different data
    from the same initial weights. ``memory_format`` (image models: channels_last |
    contiguous; default channels_last on CUDA, contiguous on CPU) is the layout of the model
    and the batch.
    """
    import torch

    spec = models.get(model)
    pol = precision.get(policy)
    device = torch.device(device)
    size = size or spec.default_size
    pol.apply_backend_flags()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    torch.manual_seed(seed)
    net = pol.prepare_model(spec.build().to(device))
    conversion = pol.record_fields(net)  # before DDP and torch.compile wrap the model
    inputs, targets = spec.make_batch(batch_size, size, device=device,
                                      seed=seed if data_seed is None else data_seed)
    layout = None
    if inputs.dim() == 4:
        # NHWC lets cuDNN use tensor cores without layout transposes under autocast; whether
        # fp32 is faster in NCHW is for a GPU run to measure.
        layout = memory_format or ("channels_last" if device.type == "cuda" else "contiguous")
        if layout == "channels_last":
            net = net.to(memory_format=torch.channels_last)
            inputs = inputs.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        # Gradients live in the all-reduce buckets (no copy in or out). No buffer broadcast
        # before every forward: the transformers' buffers are constants, and ResNet's BatchNorm
        # running statistics are not used by a training step, so each rank keeping its own
        # costs the benchmark nothing.
        net = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                      gradient_as_bucket_view=True, broadcast_buffers=False)
    if compile:
        net = torch.compile(net)
    return Trainer(spec, pol, device, net, optimizer, pol.scaler(device.type), inputs, targets,
                   grad_accum, layout, conversion)


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
    if getattr(args, "memory_format", None) and spec.size_arg != "image_size":
        raise BadInput(f"--memory-format does not apply to {spec.name} (not an image model)")
    size = getattr(args, spec.size_arg) or spec.default_size
    problem = spec.check_size(size)
    if problem:
        raise BadInput(problem)
    if args.batch_size < 1:
        raise BadInput(f"batch size must be at least 1, got {args.batch_size}")
    return spec, pol, size


def is_oom(exc: BaseException) -> bool:
    import torch

    # The runner reads a child's stderr with the same words (bench/failures.py).
    return isinstance(exc, torch.cuda.OutOfMemoryError) or failures.is_oom(str(exc))


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
    record = store.empty_record(
        run_id=args.run_id or None, cell_id=args.cell_id or None, model=spec.name,
        precision=pol.name, batch_size=args.batch_size,
        seq_len=size if spec.size_arg == "seq_len" else None,
        image_size=size if spec.size_arg == "image_size" else None,
        grad_accum=args.grad_accum, compile=args.compile, world_size=world_size,
        repeat=args.repeat, warmup_steps=args.warmup, timed_steps=args.steps,
        **fingerprint(str(device)),
    )
    # Before any build or compile: a device without the policy's math, or under FP8 a model
    # with no convertible layer, is an unsupported record in seconds.
    reason = pol.unsupported_reason(device, spec)
    if reason:
        record.update(status="unsupported", error=reason)
        return record
    try:
        with _process_group(device, ranks):
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


@contextmanager
def _process_group(device: Any, ranks: Ranks | None) -> Iterator[None]:
    """torch.distributed's process group for a torchrun job (NCCL on GPU, gloo on CPU), gone
    on every way out, so that no peer waits for this rank."""
    if ranks is None:
        yield
        return
    from datetime import timedelta

    import torch.distributed as dist

    cuda = device.type == "cuda"  # run_cell made it the current device
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                            timeout=timedelta(seconds=_collective_timeout_s()))
    failed = True
    try:
        yield
        # Only when all went well: no rank tears down its connections while another still
        # uses them. After a failure the other ranks may be gone: no barrier then.
        dist.barrier()
        failed = False
    except BaseException as exc:
        # The failed step's frames hold the DDP replica: freed after the group is gone, it
        # can abort the process. What the record needs is the exception's text alone.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        _close_group(failed)


def _collective_timeout_s() -> float:
    """How long a rank waits for its peers: below the cell's own deadline (the runner's
    proctree.TIMEOUT_ENV), so that a wait for a dead peer ends in an error, not a kill; without
    a runner, 600 s, not NCCL's 10 minutes and gloo's 30."""
    try:
        cell_s = float(os.environ.get(proctree.TIMEOUT_ENV) or 0)
    except ValueError:
        cell_s = 0.0
    return 0.9 * cell_s if 0 < cell_s < float("inf") else _COLLECTIVE_TIMEOUT_S


def _close_group(failed: bool) -> None:
    """Destroy the process group; after a failure on NCCL, abort it: NCCL's destroy first
    waits for this rank's collectives in flight, which a failed peer may never join."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    abort = getattr(distributed_c10d, "_abort_process_group", None)  # NCCL only, experimental
    if failed and abort is not None and dist.get_backend() == "nccl":
        abort()
    else:
        dist.destroy_process_group()


def _gather(value: Any) -> list[Any]:
    """``value`` of every rank, on every rank."""
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _train_and_measure(
    args: argparse.Namespace, spec: models.ModelSpec, size: int, device: Any,
    ranks: Ranks | None, started: float,
) -> dict[str, Any]:
    import torch

    world_size = ranks.world_size if ranks else 1
    # Same initial weights on every rank (DDP would broadcast rank 0's anyway), its own data.
    trainer = prepare(spec.name, args.precision, args.batch_size, size, device=device,
                      seed=args.seed, grad_accum=args.grad_accum, compile=args.compile,
                      ddp=ranks is not None, data_seed=args.seed + (ranks.rank if ranks else 0),
                      memory_format=getattr(args, "memory_format", None))
    samples_per_step = args.batch_size * args.grad_accum  # on this rank
    flops_per_step = count_training_flops(spec, args.batch_size, size) * args.grad_accum

    warmup = max(args.warmup, _DDP_SYNCING_STEPS) if ranks is not None else args.warmup
    losses = [trainer.step() for _ in range(warmup)]
    trainer.sync()
    step = _slowed(trainer, losses)
    reset_peak_memory(device)

    # By UUID: torch's cuda:N is not NVML's GPU N under CUDA_VISIBLE_DEVICES.
    gpu = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None
    monitor = PowerMonitor(gpu, args.power_interval_ms)
    if ranks is not None:
        import torch.distributed as dist

        dist.barrier()  # every rank measures idle power, then starts its window, together
    monitor.measure_idle()
    timer = StepTimer(device, args.steps)
    startup_s = time.perf_counter() - started
    with monitor:
        for i in range(args.steps):  # the timed window: no host sync in here
            timer.start(i)
            losses.append(step())
            timer.stop(i)
        trainer.sync()

    measured = {**summarize(timer.times_ms()), **timer.host_fields(), **peak_memory(device),
                **monitor.fields(samples_per_step * args.steps)}
    if ranks is not None:
        measured = _combine_ranks(_gather(measured), samples_per_step * args.steps * world_size)
    step_s = measured["step_ms_median"] / 1e3
    samples_per_s = samples_per_step * world_size / step_s
    tokens = spec.tokens_per_sample(size)
    all_losses = torch.stack(losses).float().cpu()
    scaling = trainer.scaler.is_enabled()
    return {
        **measured,
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * tokens if tokens else None,
        "startup_s": startup_s,
        "flops_per_step": flops_per_step * world_size,
        "achieved_tflops": flops_per_step * world_size / step_s / 1e12,
        "loss_first": float(all_losses[0]),
        "loss_last": float(all_losses[-1]),
        "nonfinite_steps": int((~torch.isfinite(all_losses)).sum()),
        "scaler_scale_final": float(trainer.scaler.get_scale()) if scaling else None,
        "scaler_skipped_steps": (len(losses) - trainer.optimizer_steps()) if scaling else None,
        "memory_format": trainer.memory_format,
        **trainer.conversion,
        "warmup_steps": warmup,  # what ran: more than asked for under DDP
    }


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


def _combine_ranks(per_rank: list[dict[str, Any]], num_samples: int) -> dict[str, Any]:
    """One measurement from every rank's: the slowest rank's step times (it sets the pace of
    the job), the largest peak memory, power and energy summed over the GPUs."""
    slowest = max(per_rank, key=lambda m: m["step_ms_median"])
    memory = {field: max((m[field] for m in per_rank if m[field] is not None), default=None)
              for field in store.MEMORY}
    timing = ("step_ms_median", "step_ms_iqr", "step_ms_min", "host_ms_median",
              "queued_ms_median", "host_bound")
    return {**{f: slowest[f] for f in timing},
            **memory, **combine_power(per_rank, num_samples)}


def summary_line(record: dict[str, Any]) -> str:
    """One human-readable line for a record (stderr of a cell, progress of a run)."""
    size = f"T={record['seq_len']}" if record.get("seq_len") else f"{record.get('image_size')}px"
    head = f"{record['model']} {record['precision']} b={record['batch_size']} {size}"
    if (record.get("world_size") or 1) > 1:
        head += f" ws={record['world_size']}"
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
    if record.get("host_bound"):
        line += " [host-bound: the GPU waits for the host's kernel launches]"
    if record.get("emulated"):
        line += " [emulated: software FP8, its speed is not FP8's]"
    return line


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
        print(summary_line(record), file=sys.stderr)
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
