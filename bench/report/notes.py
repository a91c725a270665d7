"""The notes under a model's tables in report.md: what its cells' flags (MFU, throttling,
contention, co-scheduling, host-bound steps, wide spreads) and failures mean. torch-free."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from bench import store
from bench.report.formats import fmt_pct, fmt_sig
from bench.report.loading import _SECONDARY_HEADERS, CONTENDED_MARK, THROTTLED_MARK
from bench.report.view import _Model

# A cell whose processes or steps spread wider than this is flagged with the advice to fix it.
_WIDE_PCT = 10.0


def _label(cell: pd.Series, row_keys: Sequence[str]) -> str:
    parts = [str(cell["precision"]), f"batch {int(cell['batch_size'])}"]
    for key in row_keys[1:]:
        parts.append(f"{_SECONDARY_HEADERS[key]} {cell[key]}")
    return ", ".join(parts)


def _mfu_impossible(cell: pd.Series) -> bool:
    return store.MFU_ABOVE_100 in str(cell.get("mfu_flag") or "")


def _notes(model: _Model) -> list[str]:
    """The notes under a model's tables: what its cells' flags and failures mean."""
    return [*_mfu_notes(model), *_throttle_notes(model), *_contention_notes(model),
            *_host_bound_notes(model), *_spread_notes(model), *_failure_notes(model)]


def _labels(model: _Model, cells: pd.DataFrame) -> str:
    return "; ".join(_label(c, model.row_keys) for _, c in cells.iterrows())


def _mfu_notes(model: _Model) -> list[str]:
    impossible = model.cells[(model.cells["status"] == "ok") & model.cells["mfu_flag"].map(
        lambda flag: store.MFU_ABOVE_100 in str(flag or ""))]
    if not len(impossible):
        return []
    items = [f"{_label(cell, model.row_keys)} ({cell['mfu_flag']})"
             for _, cell in impossible.iterrows()]
    return ["MFU flagged: above 100% of the peak, which no run reaches, so the FLOP "
            "count or the peak is wrong (pass --peak-tflops if the table's is); not "
            f"shown as a number: {'; '.join(items)}."]


def _throttle_notes(model: _Model) -> list[str]:
    """Throttled cells (heat, hardware), then the power-capped ones (routine, no dagger)."""
    notes = []
    throttled = model.cells[model.cells["throttled"]]
    if len(throttled):
        items = []
        for _, cell in throttled.iterrows():
            reasons = cell["throttle_reasons"].replace(";", ", ")
            items.append(_label(cell, model.row_keys) + (f" ({reasons})" if reasons else ""))
        notes.append(f"{THROTTLED_MARK} throttled during the timed window, numbers understate "
                     f"the device: {'; '.join(items)}.")
    capped = model.cells[~model.cells["throttled"] & model.cells["throttle_reasons"].map(
        lambda reasons: "sw_power_cap" in str(reasons).split(";"))]
    if len(capped):
        notes.append("Power-capped (the clocks held to the power limit, routine under heavy load; "
                     f"not marked {THROTTLED_MARK}, its share of the window is in "
                     "throttle_shares): "
                     f"{_labels(model, capped)}.")
    return notes


def _contention_notes(model: _Model) -> list[str]:
    """Cells that shared the machine with others' work, and cells that emulated their math."""
    notes = []
    contended = model.cells[model.cells["contended"]]
    if len(contended):
        notes.append(f"{CONTENDED_MARK} other processes used more than 10% of the run's cores "
                     f"(or held its GPU) while it ran, so its numbers measure them too (not "
                     f"claimed in the summary; rerun on an idle machine): "
                     f"{_labels(model, contended)}.")
    beside = model.cells[model.cells["co_scheduled"]]
    if len(beside):
        alone = len(model.cells) - len(beside)
        notes.append("Co-scheduled: these cells ran beside other cells on the node's other "
                     "devices (`run --devices`), sharing its power, heat, host cores and "
                     "memory bandwidth; their throughput and energy may differ from a cell "
                     f"alone on the node ({alone} of {len(model.cells)} ran alone; each "
                     "record's neighbours name the others): "
                     f"{_labels(model, beside)}.")
    emulated = model.cells[model.cells["emulated"]]
    if len(emulated):
        notes.append("Emulated: these cells ran their low-precision math in software (FP8 off "
                     "CUDA), so the numerics are right but the speed says nothing about the "
                     "hardware; no summary claims them: "
                     f"{_labels(model, emulated)}.")
    return notes


def _host_bound_notes(model: _Model) -> list[str]:
    host_bound = model.cells[model.cells["host_bound"]]
    if not len(host_bound):
        return []
    items = [f"{_label(cell, model.row_keys)} (host {fmt_sig(cell['host_ms_median'])} ms "
             f"per step, GPU {fmt_sig(cell['step_ms_median'])} ms)"
             for _, cell in host_bound.iterrows()]
    return [f"Host-bound: the GPU waited for the CPU's kernel launches, so these numbers "
            f"understate the GPU and the speedup of a faster policy (a larger batch, "
            f"torch.compile or CUDA graphs launch less): {'; '.join(items)}."]


def _spread_notes(model: _Model) -> list[str]:
    ok = model.cells[model.cells["status"] == "ok"]
    spreads = ok[["noise_pct", "step_spread_pct"]].where(
        ok[["noise_pct", "step_spread_pct"]].abs() < math.inf)  # unknown is not wide
    wide = ok[(spreads > _WIDE_PCT).any(axis=1)]
    if not len(wide):
        return []
    items = [f"{_label(cell, model.row_keys)} (between processes "
             f"{fmt_pct(cell['noise_pct'])}, step IQR {fmt_pct(cell['step_spread_pct'])})"
             for _, cell in wide.iterrows()]
    return [f"Wide spread (over {_WIDE_PCT:g}%): {'; '.join(items)}. Their numbers "
            "cannot show small differences: rerun with --repeats 3 or more on an idle "
            "machine, with GPU clocks locked (nvidia-smi --lock-gpu-clocks) where there "
            "is a GPU."]


def _failure_notes(model: _Model) -> list[str]:
    """Each failed cell's error, and each cell some of whose repeats failed."""
    notes = []
    for _, cell in model.cells.iterrows():
        label = _label(cell, model.row_keys)
        if cell["status"] in ("error", "timeout") and cell["error"]:
            message = " ".join(str(cell["error"]).split())
            message = message if len(message) <= 120 else message[:117] + "..."
            notes.append(f"{label}: {cell['status']}: {message}")
        elif cell["status"] == "ok" and cell["failed_repeats"]:
            notes.append(f"{label}: {cell['failed_repeats']} of {cell['repeats']} repeats "
                         f"failed; the median is over the ok ones.")
    return notes
