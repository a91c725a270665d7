"""Which updates reach the weights: the share of an optimizer step's updates that left their
weight unchanged (``lost_frac`` in parity_curves.csv).

An element counts when AdamW's update for it was non-zero (its first moment is non-zero:
parity trains without weight decay) and the step left its weight exactly as it was. Under
FP32 weights almost none does. Under bf16 weights rounded to nearest, every update below half a
bf16 spacing of its weight (2^-9 |w| and less) is lost for good: the reason bf16-pure stalls
at a small learning rate. Stochastic rounding leaves many weights unchanged too, but moves
each with a probability in proportion to its update, so none is lost on average; Kahan
summation keeps the unapplied part in its compensation buffer until it moves the weight.

``snapshot`` before the step and ``lost_share`` after it, both outside the step's clock.
torch, in a parity child.
"""

from __future__ import annotations

from typing import Any


def _local(tensor: Any) -> Any:
    """This rank's elements: a DTensor's (FSDP2's shard) local tensor, any other as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def snapshot(optimizer: Any) -> list[tuple[Any, Any]]:
    """(parameter, a copy of its values: this rank's shard under FSDP2) for every parameter
    ``optimizer`` updates."""
    return [(p, _local(p.detach()).clone())
            for group in optimizer.param_groups for p in group["params"]]


def lost_share(optimizer: Any, before: list[tuple[Any, Any]]) -> float | None:
    """Of the elements whose update was non-zero in the step since ``before``, the share whose
    weight did not change; None when the optimizer keeps no first moment (not AdamW) or no
    update was non-zero. Under FSDP2 counted over every rank's shard (a collective)."""
    import torch

    updated = unchanged = 0
    sharded = False
    for p, old in before:
        moment = optimizer.state.get(p, {}).get("exp_avg")
        if moment is None:
            continue
        sharded = sharded or hasattr(p, "to_local")
        moved = _local(moment) != 0
        updated += int(moved.sum())
        unchanged += int((moved & (_local(p.detach()) == old)).sum())
    if sharded and torch.distributed.is_initialized():
        counts = torch.tensor([updated, unchanged], dtype=torch.float64,
                              device=_local(before[0][0]).device)
        torch.distributed.all_reduce(counts)
        updated, unchanged = (int(c) for c in counts.tolist())
    return unchanged / updated if updated else None
