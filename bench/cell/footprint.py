"""What a trained model holds between steps: the bytes of its weights and of its optimizer
state, by dtype (the record's ``param_bytes``, ``optim_state_bytes``, ``param_dtypes`` and
``optim_state_dtypes``). FP32 masters with FP32 AdamW state hold 12 bytes per parameter;
the pure-bf16 policies 6 (8 with Kahan's compensation buffer). torch only, in the cell.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any


def _by_dtype(tensors: Iterable[Any]) -> Counter[str]:
    """Bytes per dtype name ("bfloat16", "float32" ...) of ``tensors``, each storage once."""
    held: Counter[str] = Counter()
    seen: set[int] = set()
    for t in tensors:
        # A tensor subclass (torchao's Float8 weights) still reports its own dtype and size.
        key = id(t)
        if key in seen or not hasattr(t, "dtype"):
            continue
        seen.add(key)
        t = t.to_local() if hasattr(t, "to_local") else t  # FSDP2's DTensor: this rank's shard
        held[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
    return held


def _dtypes(held: Counter[str]) -> str:
    """"bfloat16" or "float32:0.98;bfloat16:0.02": the dtypes, most bytes first, each with its
    share of the bytes when there is more than one."""
    total = sum(held.values())
    if len(held) <= 1:
        return next(iter(held), "")
    return ";".join(f"{name}:{count / total:.3g}" for name, count in held.most_common())


def fields(model: Any, optimizer: Any) -> dict[str, Any]:
    """The record's footprint fields of ``model``'s parameters and ``optimizer``'s state."""
    params = _by_dtype(model.parameters())
    # Per-parameter tensors only: AdamW's step counters are FP32 scalars, bookkeeping of a few
    # bytes that would list float32 beside a bf16 state.
    state = _by_dtype(value for per_param in optimizer.state.values()
                      for value in per_param.values()
                      if hasattr(value, "element_size") and value.dim() > 0)
    return {"param_bytes": sum(params.values()), "param_dtypes": _dtypes(params),
            "optim_state_bytes": sum(state.values()), "optim_state_dtypes": _dtypes(state)}
