"""The report's "which layers ran in which format" table: per model, each FP8-family policy's
format (float8 tensorwise, rowwise, rowwise with a bf16 weight gradient, mxfp8, nvfp4), the rule
that chose its layers, how many ``nn.Linear`` layers it converted and which it left in bf16,
from the records' conversion fields (bench/cell/low_precision.py). torch-free."""

from __future__ import annotations

from typing import Any

import pandas as pd
from tabulate import tabulate

from bench import precision
from bench.report.formats import is_num
from bench.report.loading import Run

TITLE = "Which layers ran in which format"


def _family(name: str) -> bool:
    try:
        return precision.get(name).fp8_recipe is not None
    except ValueError:  # a policy this version does not know: not one of the family
        return False


def _row(policy: str, cells: pd.DataFrame) -> list[Any]:
    """One policy's row from its cells (every batch size converts the same layers)."""
    ran = cells[cells["fp8_converted"].map(is_num)]
    if not len(ran):
        status = next((s for s in cells["status"] if s != "ok"), "not recorded")
        error = next((str(e) for e in cells["error"] if str(e).strip()), "")
        return [policy, "-", "-", "-", "-", f"{status}: {error}" if error else status]
    first = ran.iloc[0]
    mark = " (emulated)" if bool(ran["emulated"].any()) else ""
    left = first["fp8_num_unconverted"]
    return [policy, f"{first['low_precision_format'] or '-'}{mark}",
            first["low_precision_filter"] or "-", int(float(first["fp8_converted"])),
            int(float(left)) if is_num(left) else "-", first["fp8_unconverted"] or "-"]


def table(run: Run, model: str) -> list[str]:
    """The model's table as report lines, or nothing when no FP8-family cell of it was run."""
    cells = run.cells[run.cells["model"] == model]
    policies = [p for p in dict.fromkeys(cells["precision"]) if _family(p)]
    if not policies:
        return []
    rows = [_row(p, cells[cells["precision"] == p]) for p in policies]
    headers = ["policy", "format", "layers chosen by", "converted", "left in bf16",
               "left in bf16 (name, in x out: why)"]
    return [f"**{TITLE}** (`nn.Linear` layers; everything else ran under bf16 autocast)", "",
            tabulate(rows, headers=headers, tablefmt="github"), ""]
