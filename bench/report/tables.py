"""Numbers and tables of report.md: formats, the per-model metric tables (speedups and changes
with their noise intervals), scaling and parity tables, the notes under them. torch-free."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from tabulate import tabulate

from bench import store
from bench.analysis import noise
from bench.report.loading import (
    _SECONDARY,
    _SECONDARY_HEADERS,
    CONTENDED_MARK,
    KEY,
    THROTTLED_MARK,
    Run,
    _ordered,
)

# ------------------------------------------------------------------------------ numbers


def _is_num(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _fmt_rate(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _fmt_gib(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _fmt_sig(value: float) -> str:
    """Three significant digits, trailing zeros kept so a column reads evenly (0.300, 12.0)."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:#.3g}"


def _fmt_change(ratio: noise.Ratio) -> str:
    """'-12% ±3%', bold when beyond noise; never '-0%', and a change that rounds to 0% is
    never bold."""
    percent = round((ratio.value - 1) * 100)
    text = f"{percent:+d}%" if percent else "0%"
    bold = ratio.beyond_noise and percent != 0
    return (f"**{text}**" if bold else text) + _fmt_width(ratio, 100, "%", 0)


def _fmt_ratio(ratio: noise.Ratio) -> str:
    """'1.52x ±0.04', bold when beyond noise (and not 1.00x)."""
    text = f"{ratio.value:.2f}x"
    bold = ratio.beyond_noise and text != "1.00x"
    return (f"**{text}**" if bold else text) + _fmt_width(ratio, 1, "", 2)


def _fmt_width(ratio: noise.Ratio, scale: float, unit: str, digits: int) -> str:
    """' ±0.04' (the noise interval), or ' (noise unknown)' where none was measured."""
    if not math.isfinite(ratio.half_width):
        return " (noise unknown)"
    return f" ±{ratio.half_width * scale:.{digits}f}{unit}"


def _fmt_pct(value: Any) -> str:
    return f"{float(value):.1f}%" if _is_num(value) else "n/a"


def _fmt_int(value: Any) -> str:
    return f"{int(value)}" if _is_num(value) else ""


def _fmt_usd(value: float, error: Any) -> str | None:
    """'$0.123 ±0.004': a price with its noise interval (``error``: relative standard error),
    to the digits the value shows; None where there is no value."""
    if not _is_num(value):
        return None
    digits = max(2, 2 - math.floor(math.log10(abs(value)))) if value else 2
    text = f"${value:,.{digits}f}"
    if not _is_num(error):
        return text + " (noise unknown)"
    return text + f" ±{noise.Z * float(error) * abs(value):.{digits}f}"


# A cell whose processes or steps spread wider than this is flagged with the advice to fix it.
_WIDE_PCT = 10.0


# ------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class _Model:
    """What a model's tables need: its cells, row keys and units."""

    name: str
    cells: pd.DataFrame
    row_keys: list[str]
    policies: list[str]
    language: bool  # language models: tokens/s and joules per token

    @property
    def rate_column(self) -> str:
        if self.language and self.cells["tokens_per_s"].notna().any():
            return "tokens_per_s"
        return "samples_per_s"

    @property
    def rate_unit(self) -> str:
        return "tokens/s" if self.rate_column == "tokens_per_s" else "samples/s"

    @property
    def energy_unit(self) -> str:
        return "J/token" if self.language else "J/sample"

    def energy(self, cell: pd.Series) -> float:
        value = cell["joules_per_sample"]
        if self.language and _is_num(cell["seq_len"]) and cell["seq_len"] > 0:
            return float(value) / float(cell["seq_len"])
        return float(value)


def _model(run: Run, name: str) -> _Model:
    cells = run.cells[run.cells["model"] == name]
    row_keys = ["batch_size"] + [k for k in _SECONDARY if cells[k].nunique(dropna=False) > 1]
    language = bool(cells["seq_len"].notna().any())
    return _Model(name, cells, row_keys, _ordered(cells["precision"]), language)


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


def _ratio(value: float, base: float) -> float | None:
    if _is_num(value) and _is_num(base) and base != 0:
        return float(value) / float(base)
    return None


def _estimate(cell: pd.Series, column: str) -> noise.Estimate | None:
    """An aggregated cell's value with its standard error (``<column>_err``)."""
    if not _is_num(cell[column]):
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
        line = [_fmt_int(v) if k != "compile" else ("yes" if v else "no")
                for k, v in zip(model.row_keys, row, strict=True)]
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


def _model_section(run: Run, name: str, parity: Sequence[str] = ()) -> list[str]:
    """A model's section: its metric tables, then ``parity`` (the parity block's lines)."""
    model = _model(run, name)
    lines = [f"## {name}", ""]
    shape = _shape(model)
    if shape:
        lines += [shape, ""]
    mem_column, mem_label = _memory_column(run)
    has_tf32 = "tf32" in model.policies

    def rate(cell: pd.Series) -> str | None:
        value = cell[model.rate_column]
        return _fmt_rate(value) if _is_num(value) else None

    def speedup(cell: pd.Series) -> str | None:
        if cell["precision"] == "fp32":
            return "1x (reference)"
        over32 = _speedup(model, cell, "fp32")
        if over32 is None:
            fp32 = _same_key(model, cell, "fp32")
            return f"n/a (fp32 {fp32['status']})" if fp32 is not None else None
        text = _fmt_ratio(over32)
        if has_tf32 and cell["precision"] not in ("fp32", "tf32"):
            over_tf32 = _speedup(model, cell, "tf32")
            text += f" ({_fmt_ratio(over_tf32)})" if over_tf32 is not None else " (n/a)"
        return text

    def change(cell: pd.Series, column: str, text: str) -> str:
        ratio = _versus(model, cell, "fp32", column)
        if ratio is not None and cell["precision"] != "fp32":
            text += f" ({_fmt_change(ratio)})"
        return text

    def memory(cell: pd.Series) -> str | None:
        if not _is_num(cell[mem_column]):
            return None
        return change(cell, mem_column, _fmt_gib(cell[mem_column]))

    def energy(cell: pd.Series) -> str | None:
        if not _is_num(cell["joules_per_sample"]):
            return None
        return change(cell, "joules_per_sample", _fmt_sig(model.energy(cell)))

    def mfu(cell: pd.Series) -> str | None:
        if _mfu_impossible(cell):
            return "flagged"  # the note under the table says why; never a number
        text = f"{cell['mfu_pct']:.1f}%" if _is_num(cell["mfu_pct"]) else None
        if _is_num(cell["mfu_fp8_pct"]):
            text = f"{text or 'n/a'} ({cell['mfu_fp8_pct']:.1f}% of FP8)"
        return text

    price_hour, price_kwh = run.prices.get("price_per_hour"), run.prices.get("price_per_kwh")

    def cost(cell: pd.Series) -> str | None:
        value = store.usd_per_1m_samples(price_hour or 0, cell["world_size"],
                                         cell["samples_per_s"])
        return _fmt_usd(value, cell.get("samples_per_s_err"))

    def energy_cost(cell: pd.Series) -> str | None:
        value = store.energy_usd_per_1m_samples(price_kwh or 0, cell["joules_per_sample"])
        return _fmt_usd(value, cell.get("joules_per_sample_err"))

    over = "over fp32 (over tf32)" if has_tf32 else "over fp32"
    sections = [
        (f"Throughput, {model.rate_unit}", rate, None),
        (f"Speedup {over}", speedup, "no fp32 cell ran ok: no speedup"),
        (f"{mem_label[0].upper()}{mem_label[1:]}, GiB (change vs fp32)", memory,
         "peak memory: not measured"),
        (f"Energy, {model.energy_unit} (change vs fp32)", energy,
         "energy: not measured (no NVML power readings)"),
        (_mfu_title(model), mfu, "MFU: no peak FLOP/s known for this device"),
    ]
    if price_hour is not None:
        per = f"${price_hour:g} per device-hour" + (
            " x world size" if (model.cells["world_size"] > 1).any() else "")
        sections.append((f"Cost, $ per 1M samples (at {per})", cost, "cost: no throughput"))
    if price_kwh is not None:
        sections.append((f"Energy cost, $ per 1M samples (at ${price_kwh:g} per kWh)",
                         energy_cost, "energy cost: energy not measured"))
    skipped = []
    any_ok = bool((model.cells["status"] == "ok").any())
    for title, text, missing in sections:
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


def _label(cell: pd.Series, row_keys: Sequence[str]) -> str:
    parts = [str(cell["precision"]), f"batch {int(cell['batch_size'])}"]
    for key in row_keys[1:]:
        parts.append(f"{_SECONDARY_HEADERS[key]} {cell[key]}")
    return ", ".join(parts)


def _mfu_impossible(cell: pd.Series) -> bool:
    return store.MFU_ABOVE_100 in str(cell.get("mfu_flag") or "")


def _mfu_title(model: _Model) -> str:
    """Which peak each policy's MFU is against: the same for every autocast policy, so FP8's
    reads beside bf16's; an FP8 policy's own peak in parentheses."""
    title = ("MFU, % of the dense peak (fp32: FP32, tf32: TF32, the others: FP16/BF16, "
             "comparable across them)")
    if model.cells["mfu_fp8_pct"].notna().any():
        title += "; FP8 policies also of the FP8 peak"
    return title


def _notes(model: _Model) -> list[str]:
    notes = []
    impossible = model.cells[(model.cells["status"] == "ok") & model.cells["mfu_flag"].map(
        lambda flag: store.MFU_ABOVE_100 in str(flag or ""))]
    if len(impossible):
        items = [f"{_label(cell, model.row_keys)} ({cell['mfu_flag']})"
                 for _, cell in impossible.iterrows()]
        notes.append("MFU flagged: above 100% of the peak, which no run reaches, so the FLOP "
                     "count or the peak is wrong (pass --peak-tflops if the table's is); not "
                     f"shown as a number: {'; '.join(items)}.")
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
                     f"{'; '.join(_label(c, model.row_keys) for _, c in capped.iterrows())}.")
    contended = model.cells[model.cells["contended"]]
    if len(contended):
        notes.append(f"{CONTENDED_MARK} other processes used more than 10% of the run's cores "
                     f"while it ran, so its numbers measure them too (not claimed in the "
                     f"summary; rerun on an idle machine): "
                     f"{'; '.join(_label(c, model.row_keys) for _, c in contended.iterrows())}.")
    emulated = model.cells[model.cells["emulated"]]
    if len(emulated):
        notes.append("Emulated: these cells ran their low-precision math in software (FP8 off "
                     "CUDA), so the numerics are right but the speed says nothing about the "
                     "hardware; no summary claims them: "
                     f"{'; '.join(_label(c, model.row_keys) for _, c in emulated.iterrows())}.")
    host_bound = model.cells[model.cells["host_bound"]]
    if len(host_bound):
        items = [f"{_label(cell, model.row_keys)} (host {_fmt_sig(cell['host_ms_median'])} ms "
                 f"per step, GPU {_fmt_sig(cell['step_ms_median'])} ms)"
                 for _, cell in host_bound.iterrows()]
        notes.append(f"Host-bound: the GPU waited for the CPU's kernel launches, so these numbers "
                     f"understate the GPU and the speedup of a faster policy (a larger batch, "
                     f"torch.compile or CUDA graphs launch less): {'; '.join(items)}.")
    ok = model.cells[model.cells["status"] == "ok"]
    spreads = ok[["noise_pct", "step_spread_pct"]].where(
        ok[["noise_pct", "step_spread_pct"]].abs() < math.inf)  # unknown is not wide
    wide = ok[(spreads > _WIDE_PCT).any(axis=1)]
    if len(wide):
        items = [f"{_label(cell, model.row_keys)} (between processes "
                 f"{_fmt_pct(cell['noise_pct'])}, step IQR {_fmt_pct(cell['step_spread_pct'])})"
                 for _, cell in wide.iterrows()]
        notes.append(f"Wide spread (over {_WIDE_PCT:g}%): {'; '.join(items)}. Their numbers "
                     "cannot show small differences: rerun with --repeats 3 or more on an idle "
                     "machine, with GPU clocks locked (nvidia-smi --lock-gpu-clocks) where there "
                     "is a GPU.")
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


def _scaling_table(model: _Model) -> str | None:
    """Efficiency = samples/s(ws) / (ws * samples/s(1)), when the model ran at several sizes."""
    sizes = sorted(int(v) for v in model.cells["world_size"].dropna().unique())
    if len(sizes) < 2 or 1 not in sizes:
        return None

    def efficiency(cell: pd.Series) -> str | None:
        if cell["world_size"] == 1:
            return None
        single = _matching(model.cells, cell, world_size=1)
        single = single[single["status"] == "ok"]
        if single.empty:
            return None
        ratio = _ratio(cell["samples_per_s"],
                       float(cell["world_size"]) * float(single.iloc[0]["samples_per_s"]))
        return f"{ratio * 100:.0f}%" if ratio is not None else None

    multi = _Model(model.name, model.cells[model.cells["world_size"] != 1],
                   model.row_keys, model.policies, model.language)
    return _table(multi, efficiency)
