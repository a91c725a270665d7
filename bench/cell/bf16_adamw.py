"""AdamW for bfloat16 parameters with no FP32 master copy: the optimizer of the pure-bf16
policies (bf16-pure, bf16-pure-sr, bf16-pure-kahan in bench/precision.py).

Parameters, gradients and both moment estimates are held in bf16 (half the bytes of FP32
masters and states). Each step reads them into FP32, computes torch's AdamW update there
(decoupled weight decay, bias-corrected moments), stores the moments back to the nearest bf16
and writes the update into the weight by the policy's rounding (bench/cell/rounding.py):
``nearest`` (updates below half a bf16 spacing of the weight are lost), ``stochastic``
(unbiased) or ``kahan`` (a bf16 compensation buffer per weight, which the optimizer state
holds as ``compensation``). The three differ in that last write only.

Under FSDP2 (``fully_shard``) the parameters and their gradients are DTensors, each rank holding
a shard (Shard(0)). AdamW is elementwise, so each rank updates its own shard: the step works on
the local tensors (``to_local()``, views of the shards' storage, which FSDP2 all-gathers from),
and the state is plain tensors of the local shard's shape, 1/world of it per rank. A rank whose
shard of a parameter is empty updates nothing. Stochastic rounding draws each shard's noise
from a stream of its own (the seed offset by the shard's index), so the shards are not rounded
with the same noise; replicas (DDP, plain tensors) share one stream and stay identical. Its
state_dict under FSDP2 holds this rank's shards as plain tensors: it loads back into the same
sharding only.

A subclass of ``torch.optim.AdamW`` for its hyper-parameters, validation and state_dict; the
step loops over parameters one at a time, so on a GPU it launches more kernels than torch's
fused AdamW: its time is part of what a bf16-pure cell measures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from bench.cell import rounding

ROUNDINGS = ("nearest", "stochastic", "kahan")


class BF16AdamW(torch.optim.AdamW):
    """torch's AdamW update, computed in FP32, for parameters held in bf16; ``rounding`` says
    how the update is written into them."""

    def __init__(self, params: Iterable[Any], *, rounding: str = "nearest", lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, seed: int | None = None) -> None:
        if rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding '{rounding}'; valid: {', '.join(ROUNDINGS)}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         foreach=False)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise ValueError(f"BF16AdamW holds bf16 parameters, got one in {p.dtype}")
        self.rounding = rounding
        # Its own random stream (stochastic rounding), so the update's rounding does not shift
        # the global one (dropout, data): seeded from it once, reproducible with it.
        self._seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed
        self._generators: dict[tuple[torch.device, int], torch.Generator] = {}

    def _generator(self, device: torch.device, shard: int = 0) -> torch.Generator:
        """The stochastic rounding's stream on ``device`` for the ``shard``-th shard (0: a
        whole tensor), seeded ``seed + shard``."""
        key = (device, shard)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._seed + shard)
        return self._generators[key]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One AdamW update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Any, group: dict[str, Any]) -> None:
        weight, grad = _local(p), _local(p.grad)
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)  # on the CPU, as torch's AdamW: no device sync
            # Plain tensors of the local shard's shape: what this rank updates, not DTensors.
            state["exp_avg"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
            if self.rounding == "kahan":
                state["compensation"] = torch.zeros_like(weight,
                                                         memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]

        grad = grad.float()
        exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        state["exp_avg"].copy_(exp_avg)
        state["exp_avg_sq"].copy_(exp_avg_sq)
        denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
        update = (exp_avg / (1 - beta1**step)).div_(denom).mul_(-lr)
        if decay:
            # Decoupled: on the weight before the step.
            update.add_(weight.float(), alpha=-lr * decay)

        if self.rounding == "nearest":
            rounding.add_nearest_(weight, update)
        elif self.rounding == "stochastic":
            generator = self._generator(weight.device, _shard_index(p))
            rounding.add_stochastic_(weight, update, generator)
        else:
            rounding.kahan_add_(weight, state["compensation"], update)


def _local(t: Any) -> Any:
    """What this rank holds of ``t``: an FSDP2 DTensor's local shard (a view of its storage, so
    writing it updates the parameter), a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _shard_index(p: Any) -> int:
    """Which shard of ``p`` this rank holds, counted over the mesh dimensions ``p`` is sharded
    on (0 for a plain tensor): ranks that hold the same data (a Replicate dimension) share an
    index and so a rounding stream, ranks that hold different shards do not."""
    if not hasattr(p, "device_mesh"):
        return 0
    mesh, coordinate = p.device_mesh, p.device_mesh.get_coordinate()
    index = 0
    for dim, placement in enumerate(p.placements):
        if placement.is_shard():
            index = index * mesh.size(dim) + coordinate[dim]
    return index
