"""The tables of report.md: per model one table per metric (speedups and changes with their
noise intervals), the scaling table, and the notes under them. Numbers are written by
bench/report/formats.py. torch-free."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import pandas as pd
from tabulate import tabulate

from bench import store
from bench.analysis import noise
from bench.report import held
from bench.report.formats import (
    fmt_change,
    fmt_gib,
    fmt_int,
    fmt_rate,
    fmt_ratio,
    fmt_sig,
    fmt_usd,
    is_num,
)
from bench.report.loading import (
    _SECONDARY_HEADERS,
    CONTENDED_MARK,
    KEY,
    THROTTLED_MARK,
    Run,
)
from bench.report.notes import _mfu_impossible, _notes
from bench.report.view import _Model, _model

# A cell whose processes or steps spread wider than this is flagged with the advice to fix it.


# ------------------------------------------------------------------------------ tables


def _row_id(cell: pd.Series, keys: Sequence[str]) -> tuple[Any, ...]:
    return tuple(None if pd.isna(cell[k]) else cell[k] for k in keys)


def _grid(model: _Model) -> tuple[list[tuple[Any, ...]], dict[tuple[Any, ...], pd.Series]]:
    """Sorted row ids, and (row id, policy) -> cell; the row keys are all that vary in a model."""
    lookup = {(_row_id(cell, model.row_keys), cell["precision"]): cell
              for _, cell in model.cells.iterrows()}
    rows = sorted({row for row, _ in lookup}, key=lambda r: tuple((v is None, v) for v in r))
    return rows, lookup


def _matching(cells: pd.DataFrame, cell: pd.Series, **changes: Any) -> pd.DataFrame:
    """The rows of ``cells`` whose key is ``cell``'s with ``changes`` (NaN matches NaN)."""
    for k in KEY:
        want = changes.get(k, cell[k])
        cells = cells[cells[k].isna()] if pd.isna(want) else cells[cells[k] == want]
    return cells


def _same_key(model: _Model, cell: pd.Series, policy: str) -> pd.Series | None:
    """The same cell (same key) under another policy, whatever its status."""
    other = _matching(model.cells, cell, precision=policy)
    return other.iloc[0] if len(other) else None


def _reference(model: _Model, cell: pd.Series, policy: str) -> pd.Series | None:
    """The same cell (same key) under another policy, when it ran ok."""
    other = _same_key(model, cell, policy)
    return other if other is not None and other["status"] == "ok" else None


def _compared(model: _Model, policy: str, prefer: int | None = None) -> pd.Series | None:
    """The policy's ok cell that is compared with fp32's: at batch ``prefer`` where both ran
    ok there, else at the largest batch where both did; None without such a pair."""
    cells = model.cells[(model.cells["precision"] == policy) & (model.cells["status"] == "ok")]
    pairs = {int(cell["batch_size"]) if is_num(cell["batch_size"]) else 0: cell
             for _, cell in cells.iterrows() if _reference(model, cell, "fp32") is not None}
    if not pairs:
        return None
    return pairs[prefer if prefer in pairs else max(pairs)]


def _ratio(value: float, base: float) -> float | None:
    if is_num(value) and is_num(base) and base != 0:
        return float(value) / float(base)
    return None


def _estimate(cell: pd.Series, column: str) -> noise.Estimate | None:
    """An aggregated cell's value with its standard error (``<column>_err``)."""
    if not is_num(cell[column]):
        return None
    error = cell.get(f"{column}_err")
    # n=1 with the error as the spread: the estimate's error is the cell's standard error.
    # An error never measured is unbounded: nothing is claimed from it.
    return noise.Estimate(float(cell[column]),
                          float(error) if error is not None and pd.notna(error) else math.inf, 1,
                          str(cell.get("noise_source") or noise.NONE))


def _versus(model: _Model, cell: pd.Series, over: str, column: str) -> noise.Ratio | None:
    """``column`` of ``cell`` over the same cell under policy ``over``, with its noise."""
    base = _reference(model, cell, over)
    value = _estimate(cell, column)
    reference = _estimate(base, column) if base is not None else None
    if value is None or reference is None or reference.value == 0:
        return None
    return value.ratio(reference)


def _speedup(model: _Model, cell: pd.Series, over: str) -> noise.Ratio | None:
    return _versus(model, cell, over, "samples_per_s")


def _memory_column(run: Run) -> tuple[str, str]:
    """GPU runs report reserved memory; CPU runs the child's peak RSS."""
    if run.cells["peak_mem_reserved_gib"].notna().any():
        return "peak_mem_reserved_gib", "peak reserved memory"
    return "peak_rss_gib", "peak RSS"


def _table(model: _Model, text: Any, always: bool = False) -> str | None:
    """A GitHub table, rows = batch sizes, columns = policies; None when no ok cell has a value
    (unless ``always``: the statuses alone are worth a table).

    ``text(cell) -> str | None`` formats an ok cell; None means the metric is not available.
    """
    rows, lookup = _grid(model)
    body, any_value = [], False
    for row in rows:
        line = [("yes" if v else "no") if k == "compile" else str(v) if k == "strategy"
                else fmt_int(v) for k, v in zip(model.row_keys, row, strict=True)]
        for policy in model.policies:
            cell = lookup.get((row, policy))
            if cell is None:
                line.append("")
                continue
            if cell["status"] != "ok":
                line.append(cell["status"])
                continue
            value = text(cell)
            any_value |= value is not None
            value = value if value is not None else "n/a"
            line.append(value + (f" {THROTTLED_MARK}" if cell["throttled"] else "")
                        + (f" {CONTENDED_MARK}" if cell["contended"] else ""))
        body.append(line)
    if not any_value and not always:
        return None
    headers = [("batch" if k == "batch_size" else _SECONDARY_HEADERS[k]) for k in model.row_keys]
    return tabulate(body, headers=headers + model.policies, tablefmt="github",
                    colalign=["right"] * (len(headers) + len(model.policies)),
                    disable_numparse=True)


# A metric table: its title, the text of an ok cell (None: not available), and what the
# "Not shown" note says when no cell has a value (None: the table is shown anyway).
_Section = tuple[str, Callable[[pd.Series], str | None], str | None]


def _model_section(run: Run, name: str, parity: Sequence[str] = ()) -> list[str]:
    """A model's section: its metric tables, then ``parity`` (the parity block's lines)."""
    model = _model(run, name)
    lines = [f"## {name}", ""]
    shape = _shape(model)
    if shape:
        lines += [shape, ""]
    skipped = []
    any_ok = bool((model.cells["status"] == "ok").any())
    for title, text, missing in _sections(run, model):
        table = _table(model, text, always=missing is None)
        if table is None:
            if any_ok:  # with nothing ok, the statuses in the first table say it all
                skipped.append(missing)
            continue
        lines += [f"**{title}**", "", table, ""]
    scaling = _scaling_table(model)
    if scaling:
        lines += ["**Scaling efficiency vs world size 1** (samples/s(ws) / (ws x samples/s(1)))",
                  "", scaling, ""]
    per_rank = _rank_memory_table(model, *_memory_column(run))
    if per_rank:
        lines += [per_rank[0], "", per_rank[1], ""]
    if parity:
        lines += parity
    elif run.parity is None:
        skipped.append("parity: not run")
    notes = _notes(model)
    if skipped:
        notes.append("Not shown: " + "; ".join(skipped) + ".")
    if notes:
        lines += [*(f"- {n}" for n in notes), ""]
    return lines


def _sections(run: Run, model: _Model) -> list[_Section]:
    """The metric tables of a model's section, in order; the cost tables where a price is."""
    mem_column, mem_label = _memory_column(run)
    over = "over fp32 (over tf32)" if "tf32" in model.policies else "over fp32"
    sections: list[_Section] = [
        (f"Throughput, {model.rate_unit}", partial(_rate_text, model), None),
        (f"Speedup {over}", partial(_speedup_text, model), "no fp32 cell ran ok: no speedup"),
        (f"{mem_label[0].upper()}{mem_label[1:]}, GiB (change vs fp32)",
         partial(_memory_text, model, mem_column), "peak memory: not measured"),
        (f"Energy, {model.energy_unit} (change vs fp32)", partial(_energy_text, model),
         "energy: not measured (no NVML power readings)"),
        (_mfu_title(model), _mfu_text, "MFU: no peak FLOP/s known for this device"),
    ]
    if model.cells["param_bytes"].notna().any():  # recorded since schema 8
        sections.insert(3, ("Weights + optimizer state, MiB, their dtypes (change vs fp32)",
                            partial(_held_text, model), "weights and optimizer state: not "
                            "recorded"))
    price_hour, price_kwh = run.prices.get("price_per_hour"), run.prices.get("price_per_kwh")
    if price_hour is not None:
        per = f"${price_hour:g} per device-hour" + (
            " x world size" if (model.cells["world_size"] > 1).any() else "")
        sections.append((f"Cost, $ per 1M samples (at {per})", partial(_cost_text, price_hour),
                         "cost: no throughput"))
    if price_kwh is not None:
        sections.append((f"Energy cost, $ per 1M samples (at ${price_kwh:g} per kWh)",
                         partial(_energy_cost_text, price_kwh), "energy cost: energy not measured"))
    return sections


def _rate_text(model: _Model, cell: pd.Series) -> str | None:
    value = cell[model.rate_column]
    return fmt_rate(value) if is_num(value) else None


def _speedup_text(model: _Model, cell: pd.Series) -> str | None:
    """Over fp32, and over tf32 in brackets where the model ran tf32 (not for fp32, tf32)."""
    if cell["precision"] == "fp32":
        return "1x (reference)"
    over32 = _speedup(model, cell, "fp32")
    if over32 is None:
        fp32 = _same_key(model, cell, "fp32")
        return f"n/a (fp32 {fp32['status']})" if fp32 is not None else None
    text = fmt_ratio(over32)
    if "tf32" in model.policies and cell["precision"] not in ("fp32", "tf32"):
        over_tf32 = _speedup(model, cell, "tf32")
        text += f" ({fmt_ratio(over_tf32)})" if over_tf32 is not None else " (n/a)"
    return text


def _with_change(model: _Model, cell: pd.Series, column: str, text: str) -> str:
    """``text`` with the change of ``column`` against fp32 in brackets, where there is one."""
    ratio = _versus(model, cell, "fp32", column)
    if ratio is not None and cell["precision"] != "fp32":
        text += f" ({fmt_change(ratio)})"
    return text


def _memory_text(model: _Model, column: str, cell: pd.Series) -> str | None:
    if not is_num(cell[column]):
        return None
    return _with_change(model, cell, column, fmt_gib(cell[column]))


def _held_text(model: _Model, cell: pd.Series) -> str | None:
    return held.text(cell, _reference(model, cell, "fp32"))


def _energy_text(model: _Model, cell: pd.Series) -> str | None:
    if not is_num(cell["joules_per_sample"]):
        return None
    return _with_change(model, cell, "joules_per_sample", fmt_sig(model.energy(cell)))


def _mfu_text(cell: pd.Series) -> str | None:
    if _mfu_impossible(cell):
        return "flagged"  # the note under the table says why; never a number
    text = f"{cell['mfu_pct']:.1f}%" if is_num(cell["mfu_pct"]) else None
    if is_num(cell["mfu_fp8_pct"]):
        text = f"{text or 'n/a'} ({cell['mfu_fp8_pct']:.1f}% of FP8)"
    return text


def _cost_text(price_hour: float, cell: pd.Series) -> str | None:
    value = store.usd_per_1m_samples(price_hour or 0, cell["world_size"], cell["samples_per_s"])
    return fmt_usd(value, cell.get("samples_per_s_err"))


def _energy_cost_text(price_kwh: float, cell: pd.Series) -> str | None:
    value = store.energy_usd_per_1m_samples(price_kwh or 0, cell["joules_per_sample"])
    return fmt_usd(value, cell.get("joules_per_sample_err"))


def _shape(model: _Model) -> str:
    parts = []
    for column, unit in (("seq_len", "tokens per sequence"), ("image_size", "px images")):
        values = model.cells[column].dropna().unique()
        if len(values) == 1:
            parts.append(f"{int(values[0])} {unit}")
    grad = model.cells["grad_accum"].dropna().unique()
    if len(grad) == 1 and grad[0] != 1:
        parts.append(f"{int(grad[0])} micro-batches per step")
    if model.cells["compile"].nunique() == 1 and bool(model.cells["compile"].iloc[0]):
        parts.append("torch.compile")
    return ", ".join(parts).capitalize() + "." if parts else ""


def _mfu_title(model: _Model) -> str:
    """Which peak each policy's MFU is against: the same for every autocast policy, so FP8's
    reads beside bf16's; an FP8 policy's own peak in parentheses."""
    title = ("MFU, % of the dense peak (fp32: FP32, tf32: TF32, the others: FP16/BF16, "
             "comparable across them)")
    if model.cells["mfu_fp8_pct"].notna().any():
        title += "; FP8 policies also of the FP8 peak"
    return title



def _rank_memory_table(model: _Model, column: str, label: str) -> tuple[str, str] | None:
    """(title, table) of the multi-process cells' memory per rank: the largest rank's peak (the
    cell's ``column``, as in the memory table) / the smallest rank's, and the weights +
    optimizer state one rank holds (all of them under DDP, a shard under FSDP2); None
    without such a cell."""
    multi = model.cells[model.cells["world_size"] != 1]
    if multi.empty or not (multi["status"] == "ok").any():
        return None

    def text(cell: pd.Series) -> str | None:
        if not is_num(cell[column]):
            return None
        low = cell["peak_mem_rank_min_gib"]
        optim = cell["optim_state_bytes"] if is_num(cell["optim_state_bytes"]) else 0
        held = cell["param_bytes"] + optim if is_num(cell["param_bytes"]) else None
        return (fmt_gib(cell[column]) + (f" / {fmt_gib(low)}" if is_num(low) else "")
                + (f", holds {held / 2**20:.1f} MiB" if held is not None else ""))

    table = _table(_Model(model.name, multi, model.row_keys, model.policies, model.language),
                   text)
    if table is None:
        return None
    return (f"**Memory per rank, GiB: {label} of the largest rank / the smallest rank, and the "
            "weights + optimizer state one rank holds** (the memory table above shows the "
            "largest rank's)", table)


def _scaling_table(model: _Model) -> str | None:
    """Efficiency = samples/s(ws) / (ws * samples/s(1)), when the model ran at several sizes."""
    sizes = sorted(int(v) for v in model.cells["world_size"].dropna().unique())
    if len(sizes) < 2 or 1 not in sizes:
        return None

    def efficiency(cell: pd.Series) -> str | None:
        if cell["world_size"] == 1:
            return None
        # One process shares nothing: every strategy's cells scale against the same one.
        single = _matching(model.cells, cell, world_size=1, strategy="ddp")
        single = single[single["status"] == "ok"]
        if single.empty:
            return None
        ratio = _ratio(cell["samples_per_s"],
                       float(cell["world_size"]) * float(single.iloc[0]["samples_per_s"]))
        return f"{ratio * 100:.0f}%" if ratio is not None else None

    multi = _Model(model.name, model.cells[model.cells["world_size"] != 1],
                   model.row_keys, model.policies, model.language)
    return _table(multi, efficiency)
