"""What a cell's model held between steps, from its record: parameter and optimizer-state
bytes and their dtypes (bench/cell/footprint.py), as the report's memory table writes them.
Counted bytes, not measured: no spread. torch-free."""

from __future__ import annotations

from typing import Any

import pandas as pd

from bench.report.formats import fmt_sig, is_num

_SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def held_bytes(cell: pd.Series | None) -> float | None:
    """What the cell's model held between steps: parameter + optimizer-state bytes."""
    if cell is None or not is_num(cell.get("param_bytes")) \
            or not is_num(cell.get("optim_state_bytes")):
        return None
    return float(cell["param_bytes"]) + float(cell["optim_state_bytes"])


def dtypes_text(value: Any) -> str:
    """"bf16", or "fp32 98% bf16 2%" for a record's "float32:0.98;bfloat16:0.02"."""
    parts = [p.partition(":") for p in str(value).split(";") if p]
    return " ".join(_SHORT_DTYPES.get(name, name) + (f" {float(share):.0%}" if share else "")
                    for name, _, share in parts)


def text(cell: pd.Series, fp32: pd.Series | None) -> str | None:
    """'0.27 + 0.54 (bf16/bf16) (-50%)': weights + optimizer state in MiB, their dtypes, and
    the change of their sum against ``fp32``'s cell (exact: counted bytes, no spread)."""
    held = held_bytes(cell)
    if held is None:
        return None
    weights, state = dtypes_text(cell["param_dtypes"]), dtypes_text(cell["optim_state_dtypes"])
    out = (f"{fmt_sig(cell['param_bytes'] / 2**20)} + "
           f"{fmt_sig(cell['optim_state_bytes'] / 2**20)} "
           f"({weights if weights == state else f'{weights}/{state}'})")
    base = held_bytes(fp32)
    if base and cell["precision"] != "fp32":
        out += f" ({held / base - 1:+.0%})"
    return out
