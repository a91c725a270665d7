"""Writing an FP32 value into a bfloat16 tensor: to nearest, stochastically, or Kahan-compensated.

A bf16 weight keeps 8 significant bits, so an update smaller than half its spacing (``2^-9 |w|``
and less) rounds away under round-to-nearest: long training at a small learning rate then stops
moving the weights. Two remedies keep the weights in bf16 (Zamirai et al., 2020, "Revisiting
BFloat16 Training"):

- stochastic rounding (``round_stochastic``): round up with probability equal to the distance
  from the lower neighbour over the gap, so the rounded value is the exact one on average. On
  the FP32 bit pattern: add a uniform random integer in [0, 2^16) and drop the low 16 bits
  (the bits bf16 does not keep).
- Kahan summation (``kahan_add_``): a bf16 compensation buffer per weight keeps what the last
  rounding lost; the next update is added to it first, so small updates add up until they
  move the weight.

torch only; used by the optimizer of the pure-bf16 policies (bench/cell/bf16_adamw.py).
"""

from __future__ import annotations

from typing import Any

import torch

_LOW_BITS = 16  # FP32 keeps 23 mantissa bits, bf16 7: the low 16 bits of FP32 are dropped
_HIGH_MASK = -(1 << _LOW_BITS)  # 0xFFFF0000 as an int32


def round_stochastic(x: Any, generator: Any = None) -> Any:
    """``x`` (float32) rounded to bfloat16 stochastically: each element to one of its two bf16
    neighbours, the upper with probability (x - lower) / (upper - lower); unbiased."""
    x = x.float().contiguous()
    noise = torch.randint(0, 1 << _LOW_BITS, x.shape, dtype=torch.int32, device=x.device,
                          generator=generator)
    # Sign and magnitude: adding to the bits moves the magnitude up, for either sign. A carry
    # out of the low 16 bits is the round-up; dropping them is the round-down.
    rounded = ((x.view(torch.int32) + noise) & _HIGH_MASK).view(torch.float32)
    # A NaN whose payload sits in the low bits would truncate to inf: keep it NaN.
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


def add_nearest_(param: Any, update: Any) -> None:
    """``param += update`` computed in FP32 and rounded to the nearest bf16 (ties to even)."""
    param.copy_(param.float() + update)


def add_stochastic_(param: Any, update: Any, generator: Any = None) -> None:
    """``param += update`` computed in FP32 and rounded stochastically (``round_stochastic``)."""
    param.copy_(round_stochastic(param.float() + update, generator))


def kahan_add_(param: Any, compensation: Any, update: Any) -> None:
    """``param += update`` with Kahan compensation: the exact sum param + compensation + update
    (FP32) rounds to the nearest bf16, and what that rounding lost is kept in
    ``compensation`` (bf16) for the next update."""
    exact = param.float() + (compensation.float() + update)
    param.copy_(exact)
    compensation.copy_(exact - param.float())
