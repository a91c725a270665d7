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


def snapshot(optimizer: Any) -> list[tuple[Any, Any]]:
    """(parameter, a copy of its values) for every parameter ``optimizer`` updates."""
    return [(p, p.detach().clone()) for group in optimizer.param_groups for p in group["params"]]


def lost_share(optimizer: Any, before: list[tuple[Any, Any]]) -> float | None:
    """Of the elements whose update was non-zero in the step since ``before``, the share whose
    weight did not change; None when the optimizer keeps no first moment (not AdamW) or no
    update was non-zero."""
    updated = unchanged = 0
    for p, old in before:
        moment = optimizer.state.get(p, {}).get("exp_avg")
        if moment is None:
            continue
        moved = moment != 0
        updated += int(moved.sum())
        unchanged += int((moved & (p.detach() == old)).sum())
    return unchanged / updated if updated else None
