"""FSDP2 for a cell: torch's ``fully_shard`` on every block and on the root, as torchtitan does.

``shard(model, strategy)`` shards ``model`` in place under the strategy's MixedPrecisionPolicy
(bench/strategy.py) and returns it; the process group must be up. The units are the elements
of every ``nn.ModuleList`` (the transformer blocks of GPT, BERT and Llama, and most models of
one's own), or, for a model without one, its top-level ``nn.Sequential`` children (ResNet's
residual stages); the root takes what is left (embeddings, head, norms), so a tied embedding
and head stay one parameter. Each unit's parameters are gathered for its forward and backward
only and its gradients reduce-scattered when its backward ends: a rank holds 1/world of the
parameters, gradients and optimizer state between steps.

``scaler`` is the loss scaler under FSDP2: a ShardedGradScaler, whose inf/NaN check is agreed
over every rank's shard (GradScaler's would look at this rank's shard alone, and ranks could
disagree on skipping a step).
"""

from __future__ import annotations

from typing import Any

from bench.strategy import Strategy

_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def units(model: Any) -> list[Any]:
    """The modules ``shard`` gives a unit of their own, in model order."""
    from torch import nn

    found: list[Any] = []
    inside: list[str] = []  # units' names: a ModuleList within a unit stays in that unit
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        if any(name.startswith(f"{unit}.") for unit in inside):
            continue
        for index, child in enumerate(module):
            found.append(child)
            inside.append(f"{name}.{index}" if name else str(index))
    if not found:
        found = [child for child in model.children()
                 if isinstance(child, nn.Sequential) and len(child) > 0]
    return found


def policy(strategy: Strategy) -> Any:
    """The MixedPrecisionPolicy of ``strategy``: fp32 parameters are left as stored (no cast)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    param = strategy.param_dtype or "fp32"
    return MixedPrecisionPolicy(
        param_dtype=getattr(torch, _DTYPES[param]) if param != "fp32" else None,
        reduce_dtype=getattr(torch, _DTYPES[strategy.reduce_dtype or "fp32"]),
    )


def shard(model: Any, strategy: Strategy) -> Any:
    """``model`` sharded in place: ``fully_shard`` on each unit, then on the root."""
    from torch.distributed.fsdp import fully_shard

    mp_policy = policy(strategy)
    blocks = units(model)
    for i, block in enumerate(blocks):
        # The last unit's parameters are needed again first in backward: torchtitan keeps them.
        fully_shard(block, mp_policy=mp_policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mp_policy=mp_policy)
    return model


def scaler(device_type: str, enabled: bool) -> Any:
    """The loss scaler for a sharded model: a ShardedGradScaler (off unless ``enabled``)."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(device_type, enabled=enabled)
