"""What a cell trains: the model, optimizer, scaler and batch on their device, and one step.

``prepare`` builds them for a (model, policy, batch size) and ``Trainer.step`` trains once:
the one training-step code path, the policy switching its parts (autocast, loss scaling) on or
off. The benchmark cell (bench/cell/main.py), accuracy parity and ``ampbench peers`` all train
through it. ``resolve_device`` turns ``--device`` into a torch.device (BadInput for a bad or
absent one) and ``is_oom`` says whether an exception is running out of memory.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import models
from bench import BadInput, failures, precision
from bench.cell.dist import Ranks
from bench.strategy import parse as parse_strategy


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
    # Per step under a scaler: whether GradScaler found inf/NaN gradients (and so skipped the
    # update), and the scale the step's backward ran at. Device scalars, read after the timed
    # window (``numerics``): no host sync per step. Empty without a scaler.
    found_inf: list[Any] = field(default_factory=list)
    scales: list[Any] = field(default_factory=list)

    def step(self) -> Any:
        """One optimizer step over ``grad_accum`` micro-batches; returns the loss, unsynced."""
        total = None
        for i in range(self.grad_accum):
            # Under DDP only the last micro-batch's backward all-reduces the gradients, under
            # FSDP2 only its backward reduce-scatters them.
            last = i == self.grad_accum - 1
            if self.grad_accum > 1 and hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(last)
            sync = nullcontext() if last or not hasattr(self.model, "no_sync") \
                else self.model.no_sync()
            with sync:
                with self.policy.autocast(self.device.type):
                    loss = self.spec.loss(self.model, self.inputs, self.targets) / self.grad_accum
                self.scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        self.scaler.step(self.optimizer)  # skips the update when the scaler found inf/NaN
        if self.scaler.is_enabled():
            self._log_scaler()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _log_scaler(self) -> None:
        """Keep this step's found-inf and scale, as device scalars (between the scaler's step
        and update: update clears the one and changes the other in place)."""
        scale = self.scaler._scale  # what get_scale() reads, without its host sync
        found = self.scaler._found_inf_per_device(self.optimizer).values()
        self.found_inf.append(sum(f.to(scale.device, non_blocking=True) for f in found) > 0)
        self.scales.append(scale.detach().clone())

    def numerics(self) -> tuple[list[bool], list[float]]:
        """Per step so far (a host sync: after the timed window only): whether the scaler found
        inf/NaN gradients, and the scale the step ran at; ([], []) without a scaler."""
        import torch

        if not self.scales:
            return [], []
        return (torch.stack(self.found_inf).cpu().tolist(),
                torch.stack(self.scales).float().cpu().tolist())

    def sync(self) -> None:
        """Wait for the device's work (nothing to wait for on CPU)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def optimizer_steps(self) -> int:
        """Optimizer updates really applied (a scaler-skipped step does not count)."""
        for state in self.optimizer.state.values():
            step = state.get("step")
            return int(step.item() if hasattr(step, "item") else step)
        return 0


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
    strategy: str = "ddp",
) -> Trainer:
    """Build model, AdamW (the policy's; torch's fused on CUDA), scaler and a resident batch.

    ``ddp`` shares the model between the ranks as ``strategy`` says (bench/strategy.py; the
    process group must be up): a DistributedDataParallel replica, or FSDP2 shards;
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
    net, inputs, layout = _layout(spec, net, inputs, device, memory_format)
    shared = parse_strategy(strategy)
    sharding = ddp and shared.kind == "fsdp2"
    scaler = pol.scaler(device.type)
    if sharding:  # before the optimizer: fully_shard replaces the parameters with shards
        from bench.cell import fsdp
        net = fsdp.shard(net, shared)
        scaler = fsdp.scaler(device.type, pol.loss_scaling)
    optimizer = pol.optimizer(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    if ddp and not sharding:
        from torch.nn.parallel import DistributedDataParallel

        # Gradients live in the all-reduce buckets (no copy in or out). No buffer broadcast
        # before every forward: the transformers' buffers are constants, and ResNet's BatchNorm
        # running statistics are not used by a training step, so each rank keeping its own
        # costs the benchmark nothing.
        net = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                      gradient_as_bucket_view=True, broadcast_buffers=False)
    if compile:
        net = torch.compile(net)
    return Trainer(spec, pol, device, net, optimizer, scaler, inputs, targets,
                   grad_accum, layout, conversion)


def _layout(spec: models.ModelSpec, net: Any, inputs: Any, device: Any,
            memory_format: str | None) -> tuple[Any, Any, str | None]:
    """(model, batch, layout): an image model's in its memory format, anything else as it is
    (a user's tuple or dict of tensors keeps its layout)."""
    import torch

    if spec.size_arg != "image_size" or getattr(inputs, "dim", lambda: 0)() != 4:
        return net, inputs, None
    # NHWC lets cuDNN use tensor cores without layout transposes under autocast; whether
    # fp32 is faster in NCHW is for a GPU run to measure.
    layout = memory_format or ("channels_last" if device.type == "cuda" else "contiguous")
    if layout == "channels_last":
        net = net.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return net, inputs, layout


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is running out of memory (CUDA's OutOfMemoryError, or its words)."""
    import torch

    # The runner reads a child's stderr with the same words (bench/failures.py).
    return isinstance(exc, torch.cuda.OutOfMemoryError) or failures.is_oom(str(exc))
