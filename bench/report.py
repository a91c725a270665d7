"""Reports and publishing: report.md and plots for a run directory, and the published-runs index.

    python -m bench report                        # the latest run under results/runs/
    python -m bench report RUN_DIR --out DIR      # report.md and plots/ into DIR
    python -m bench publish RUN_DIR               # -> results/<device-slug>/<date>/ + index

Inputs (all files; see bench/store.py): ``results.csv`` (one row per cell and repeat; a cell's
repeats are folded into the median of its ``ok`` repeats), ``meta.json`` (environment), and when
present ``parity.csv``, ``parity_curves.csv`` and max-batch records (rows of results.csv with
``max_batch_search`` set). A cell is one (model, precision, batch_size, seq_len, image_size,
grad_accum, compile, world_size).

report.md: the environment, a headline summary per model (best speedup, memory and energy
saving over FP32, parity failures), then per model one table per metric with batch sizes as
rows and policies as columns. Failed cells show their status (oom, error, ...); cells throttled
during the timed window carry a dagger. Language models report tokens/s and joules per token.

Plots (PNG and SVG, Agg backend, one fixed colour and marker per policy) go to ``plots/``.

torch-free: this module reads files only, so it runs on a laptop and in CPU CI.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from tabulate import tabulate

from bench import BadInput, parity, store

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

REPORT = "report.md"
PLOTS = "plots"
INDEX = "README.md"
PARITY = "parity.csv"
CURVES = "parity_curves.csv"

POLICY_ORDER = ("fp32", "tf32", "fp16", "bf16", "fp16-noscale")
KEY = store.KEY
# Key columns besides the batch size that become extra row labels when they vary in a model.
_SECONDARY = ("seq_len", "image_size", "grad_accum", "compile", "world_size")
_SECONDARY_HEADERS = {"seq_len": "seq len", "image_size": "image", "grad_accum": "grad accum",
                      "compile": "compile", "world_size": "world size"}
_KEY_DEFAULTS: dict[str, Any] = {"grad_accum": 1, "world_size": 1, "compile": False}
METRICS = (
    "samples_per_s", "tokens_per_s", "step_ms_median", "step_ms_iqr", "peak_mem_allocated_gib",
    "peak_mem_reserved_gib", "peak_rss_gib", "achieved_tflops", "mfu_pct", "power_avg_w",
    "energy_j", "joules_per_sample", "sm_clock_mhz_avg", "temp_max_c",
)
# The worst status speaks for a cell none of whose repeats ran.
THROTTLED_MARK = "†"

# One colour and marker per policy, the same in every plot of every report.
_COLOURS = {
    "fp32": "#333333", "tf32": "#0173b2", "fp16": "#029e73", "bf16": "#de8f05",
    "fp16-noscale": "#d55e00",
}
_EXTRA_COLOURS = ("#cc78bc", "#ca9161", "#fbafe4", "#56b4e9", "#ece133", "#949494")
_MARKERS = {"fp32": "o", "tf32": "s", "fp16": "^", "bf16": "D", "fp16-noscale": "v"}
_EXTRA_MARKERS = ("P", "X", "*", "h", "<", ">")


# ------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class Run:
    """One run directory, read and folded: what the tables and plots are drawn from."""

    path: Path
    meta: dict[str, Any]
    cells: pd.DataFrame  # one row per cell: KEY, status, medians of the ok repeats, flags
    max_batch: pd.DataFrame  # model, precision, status, max_batch (empty without a search)
    parity: pd.DataFrame | None  # one row per (model, precision); None without parity.csv
    curves: pd.DataFrame | None  # model, precision, seed, step, loss

    @property
    def device_name(self) -> str:
        names = list(dict.fromkeys(str(n) for n in self.cells["device_name"].dropna()))
        if self.meta.get("device_name") and len(names) <= 1:
            return str(self.meta["device_name"])
        return " + ".join(names) if names else "unknown device"  # a mixed run says so

    @property
    def run_id(self) -> str:
        return str(self.meta.get("run_id") or self.path.name)

    @property
    def policies(self) -> list[str]:
        seen = list(self.cells["precision"]) + list(self.max_batch["precision"])
        if self.parity is not None:
            seen += list(self.parity["precision"])
        if self.curves is not None:
            seen += list(self.curves["precision"])
        return _ordered(seen)


def _ordered(policies: Sequence[Any]) -> list[str]:
    """Known policies in their canonical order, then the others in order of appearance."""
    unique = list(dict.fromkeys(str(p) for p in policies))
    return [p for p in POLICY_ORDER if p in unique] + [p for p in unique if p not in POLICY_ORDER]




def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise BadInput(f"{path}: not a readable CSV ({reason})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise BadInput(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Key columns with one spelling (64.0 == 64, "True" == True), metrics as numbers."""
    frame = frame.copy()
    for column in KEY:
        if column not in frame.columns:
            frame[column] = None
    frame["model"] = frame["model"].astype(str)
    frame["precision"] = frame["precision"].astype(str)
    frame["status"] = frame["status"].fillna("error").astype(str).str.strip().str.lower()
    for column in ("batch_size", "seq_len", "image_size", "grad_accum", "world_size"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    for column in ("grad_accum", "world_size"):
        frame[column] = frame[column].fillna(_KEY_DEFAULTS[column])
    frame["compile"] = frame["compile"].map(store.truthy)
    for column in METRICS:
        values = frame[column] if column in frame.columns else None
        frame[column] = pd.to_numeric(values, errors="coerce") if values is not None else math.nan
    for column in ("throttled", "max_batch_search"):
        frame[column] = frame[column].map(store.truthy) if column in frame.columns else False
    for column in ("throttle_reasons", "error", "device_name", "max_batch"):
        if column not in frame.columns:
            frame[column] = None
    # A max-batch record is flagged, or at least carries its result.
    frame["max_batch_search"] |= pd.to_numeric(frame["max_batch"], errors="coerce").notna()
    return frame


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell key: the median of its ok repeats, its status and throttling."""
    frame = _normalise(frame)
    rows = []
    for _, group in frame.groupby(list(KEY), dropna=False, sort=False):
        ok = group[group["status"] == "ok"]
        first = group.iloc[0]
        row: dict[str, Any] = {k: first[k] for k in KEY}
        statuses = set(group["status"])
        row["status"] = "ok" if len(ok) else next(
            (s for s in store.FAILED if s in statuses), sorted(statuses)[0])
        for column in METRICS:
            row[column] = ok[column].median()  # NaN when no repeat ran ok
        reasons = sorted({r.strip() for v in ok["throttle_reasons"].dropna()
                          for r in str(v).split(";") if r.strip()})
        row["throttled"] = bool(ok["throttled"].any())
        row["throttle_reasons"] = ";".join(reasons)
        errors = [str(e).strip() for e in group["error"].dropna() if str(e).strip()]
        row["error"] = errors[0] if errors else ""
        row["repeats"] = len(group)
        row["failed_repeats"] = len(group) - len(ok)
        row["device_name"] = first["device_name"]
        rows.append(row)
    columns = [*KEY, "status", *METRICS, "throttled", "throttle_reasons", "error", "repeats",
               "failed_repeats", "device_name"]
    return pd.DataFrame(rows, columns=columns)


def _max_batch(frame: pd.DataFrame) -> pd.DataFrame:
    searched = frame[frame["max_batch_search"]] if len(frame) else frame
    columns = ["model", "precision", "status", "max_batch", "throttled"]
    if searched.empty:
        return pd.DataFrame(columns=columns)
    out = searched[["model", "precision", "status", "throttled"]].copy()
    out["max_batch"] = pd.to_numeric(searched["max_batch"], errors="coerce")
    # A resumed search may have written a group twice; the last record wins.
    return out.drop_duplicates(["model", "precision"], keep="last")[columns]


def _parity(path: Path) -> pd.DataFrame | None:
    """parity.csv folded to one row per (model, precision), or None when it is absent."""
    frame = _read_csv(path, ("model", "precision"))
    if frame is None or frame.empty:
        return None
    rows = []
    for (model, precision), group in frame.groupby(["model", "precision"], sort=False):
        def numbers(column: str, group: pd.DataFrame = group) -> pd.Series:
            """The column as numbers; all NaN where an older parity.csv lacks it."""
            return pd.to_numeric(group[column], errors="coerce") if column in group \
                else pd.Series(math.nan, index=group.index)

        verdicts = {str(v).strip().upper() for v in group.get("verdict", pd.Series()).dropna()}
        rows.append({
            "model": str(model), "precision": str(precision),
            "verdict": parity.worst_verdict(verdicts) or "",
            "seeds": len(group),
            "eval_loss": numbers("eval_loss").mean(),
            "eval_accuracy": numbers("eval_accuracy").mean(),
            "delta": _first_number(group.get("delta")),
            "tolerance": _first_number(group.get("tolerance")),
            "nonfinite_steps": numbers("nonfinite_steps").sum(min_count=1),
            "optimal_loss": _first_number(group.get("optimal_loss")),
            "scaler_skipped_steps": numbers("scaler_skipped_steps").sum(min_count=1),
            "underflow_frac": numbers("underflow_frac").mean(),
            "crashed": int(group["error"].notna().sum()) if "error" in group else 0,
        })
    return pd.DataFrame(rows)


def _first_number(column: pd.Series | None) -> float:
    if column is None:
        return math.nan
    values = pd.to_numeric(column, errors="coerce").dropna()
    return float(values.iloc[0]) if len(values) else math.nan


def _curves(path: Path) -> pd.DataFrame | None:
    frame = _read_csv(path, ("model", "precision", "step", "loss"))
    if frame is None or frame.empty:
        return None
    frame = frame.copy()
    if "seed" not in frame.columns:
        frame["seed"] = 0
    frame["step"] = pd.to_numeric(frame["step"], errors="coerce")
    # An inf would wreck the axis limits; a non-finite point is simply not drawn.
    loss = pd.to_numeric(frame["loss"], errors="coerce")
    frame["loss"] = loss.where(loss.abs() != math.inf)
    frame["model"] = frame["model"].astype(str)
    frame["precision"] = frame["precision"].astype(str)
    return frame.dropna(subset=["step"])


def load(run_dir: Path | str) -> Run:
    """Read a run directory (results.csv, meta.json, parity files) into a Run."""
    path = Path(run_dir)
    if not path.is_dir():
        raise BadInput(f"{run_dir}: no such run directory")
    if not (path / store.RESULTS).exists() and not (path / store.RECORDS).exists():
        raise BadInput(f"{run_dir}: not a run directory (no {store.RESULTS} or {store.RECORDS})")
    raw = _normalise(store.load_results(path))
    bad = sorted(set(raw["status"]) - set(store.STATUSES))
    if bad:
        raise BadInput(f"{path / store.RESULTS}: unknown status '{bad[0]}' "
                       f"(valid: {', '.join(store.STATUSES)})")
    return Run(
        path=path,
        meta=store.read_meta(path),
        cells=aggregate(raw[~raw["max_batch_search"]]),
        max_batch=_max_batch(raw),
        parity=_parity(path / PARITY),
        curves=_curves(path / CURVES),
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


def _fmt_change(ratio: float) -> str:
    percent = round((ratio - 1) * 100)
    return f"{percent:+d}%" if percent else "0%"


def _fmt_int(value: Any) -> str:
    return f"{int(value)}" if _is_num(value) else ""


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


def _speedup(model: _Model, cell: pd.Series, over: str) -> float | None:
    base = _reference(model, cell, over)
    if base is None:
        return None
    return _ratio(cell["samples_per_s"], base["samples_per_s"])


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
            line.append(value + (f" {THROTTLED_MARK}" if cell["throttled"] else ""))
        body.append(line)
    if not any_value and not always:
        return None
    headers = [("batch" if k == "batch_size" else _SECONDARY_HEADERS[k]) for k in model.row_keys]
    return tabulate(body, headers=headers + model.policies, tablefmt="github",
                    colalign=["right"] * (len(headers) + len(model.policies)),
                    disable_numparse=True)


def _model_section(run: Run, name: str) -> list[str]:
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
        over32 = _speedup(model, cell, "fp32")
        if over32 is None:
            fp32 = _same_key(model, cell, "fp32")
            return f"n/a (fp32 {fp32['status']})" if fp32 is not None else None
        text = f"{over32:.2f}x"
        if has_tf32 and cell["precision"] not in ("fp32", "tf32"):
            over_tf32 = _speedup(model, cell, "tf32")
            text += f" ({over_tf32:.2f}x)" if over_tf32 is not None else " (n/a)"
        return text

    def memory(cell: pd.Series) -> str | None:
        if not _is_num(cell[mem_column]):
            return None
        text = _fmt_gib(cell[mem_column])
        base = _reference(model, cell, "fp32")
        ratio = _ratio(cell[mem_column], base[mem_column]) if base is not None else None
        if ratio is not None and cell["precision"] != "fp32":
            text += f" ({_fmt_change(ratio)})"
        return text

    def energy(cell: pd.Series) -> str | None:
        if not _is_num(cell["joules_per_sample"]):
            return None
        text = _fmt_sig(model.energy(cell))
        base = _reference(model, cell, "fp32")
        ratio = _ratio(cell["joules_per_sample"], base["joules_per_sample"]) \
            if base is not None else None
        if ratio is not None and cell["precision"] != "fp32":
            text += f" ({_fmt_change(ratio)})"
        return text

    def mfu(cell: pd.Series) -> str | None:
        return f"{cell['mfu_pct']:.1f}%" if _is_num(cell["mfu_pct"]) else None

    over = "over fp32 (over tf32)" if has_tf32 else "over fp32"
    sections = [
        (f"Throughput, {model.rate_unit}", rate, None),
        (f"Speedup {over}", speedup, "no fp32 cell ran ok: no speedup"),
        (f"{mem_label[0].upper()}{mem_label[1:]}, GiB (change vs fp32)", memory,
         "peak memory: not measured"),
        (f"Energy, {model.energy_unit} (change vs fp32)", energy,
         "energy: not measured (no NVML power readings)"),
        ("MFU (model FLOPs utilisation)", mfu, "MFU: no peak FLOP/s known for this device"),
    ]
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
    parity = _parity_table(run, name)
    if parity:
        lines += ["**Accuracy parity** (final eval loss against the FP32 seed band)", "",
                  parity, ""]
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


def _notes(model: _Model) -> list[str]:
    notes = []
    throttled = model.cells[model.cells["throttled"]]
    if len(throttled):
        items = []
        for _, cell in throttled.iterrows():
            reasons = cell["throttle_reasons"].replace(";", ", ")
            items.append(_label(cell, model.row_keys) + (f" ({reasons})" if reasons else ""))
        notes.append(f"{THROTTLED_MARK} throttled during the timed window, numbers understate "
                     f"the device: {'; '.join(items)}.")
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


def _parity_table(run: Run, name: str) -> str | None:
    if run.parity is None:
        return None
    rows = run.parity[run.parity["model"] == name].set_index("precision")
    if rows.empty:
        return None
    policies = _ordered(list(rows.index))

    def row(label: str, text: Any) -> list[str]:
        return [label, *(text(rows.loc[p]) for p in policies)]

    def number(column: str, fmt: str) -> Any:
        return lambda r: format(r[column], fmt) if _is_num(r[column]) else ""

    def delta(r: pd.Series) -> str:
        if not _is_num(r["delta"]):
            return ""
        text = f"{r['delta']:+.3g}" if r["delta"] else "0"
        return text + (f" (±{r['tolerance']:.3g})" if _is_num(r["tolerance"]) else "")

    seeds = sorted({int(s) for s in rows["seeds"]})
    body = [
        row("verdict", lambda r: r["verdict"] or ("reference" if r.name == "fp32" else "")),
        row(f"eval loss (mean of {'/'.join(map(str, seeds))} seeds)", number("eval_loss", ".4g")),
        row("change vs fp32 (tolerance)", delta),
        row("eval accuracy", lambda r: f"{r['eval_accuracy'] * 100:.1f}%"
            if _is_num(r["eval_accuracy"]) else ""),
        row("non-finite steps", lambda r: _fmt_int(r["nonfinite_steps"])),
    ]
    if rows["optimal_loss"].notna().any():  # a source whose entropy rate is known exactly
        body.insert(2, row("achievable optimum (entropy rate)", number("optimal_loss", ".4g")))
    if rows["scaler_skipped_steps"].notna().any():
        body.append(row("loss-scaler skipped steps", lambda r: _fmt_int(r["scaler_skipped_steps"])))
    if rows["underflow_frac"].notna().any():
        # Measured on FP32 gradients: what FP16 without loss scaling would flush to zero.
        body.append(row("FP32 gradients below FP16's range", lambda r: f"{r['underflow_frac']:.2%}"
                        if _is_num(r["underflow_frac"]) else ""))
    if rows["crashed"].any():
        body.append(row("crashed runs (see parity.csv)", lambda r: _fmt_int(r["crashed"])))
    return tabulate(body, headers=["", *policies], tablefmt="github", disable_numparse=True,
                    colalign=["left"] + ["right"] * len(policies))


# ------------------------------------------------------------------------------ headline


@dataclass(frozen=True)
class Headline:
    """A model's best numbers over FP32 across its cells, and its parity verdicts."""

    model: str
    speedup: str
    memory_saving: str
    energy_saving: str
    parity: str


def _best(model: _Model, value: Any, fmt: Any) -> str:
    """The largest ``value(cell)`` over ok non-fp32 cells, as 'text (policy, batch N)'."""
    best: tuple[float, pd.Series] | None = None
    for _, cell in model.cells.iterrows():
        if cell["status"] != "ok" or cell["precision"] == "fp32":
            continue
        v = value(cell)
        if v is not None and (best is None or v > best[0]):
            best = (v, cell)
    if best is None:
        return "n/a"
    v, cell = best
    mark = f" {THROTTLED_MARK}" if cell["throttled"] else ""
    return f"{fmt(v)} ({_label(cell, model.row_keys)}){mark}"


def _saving(model: _Model, column: str) -> Any:
    def saving(cell: pd.Series) -> float | None:
        base = _reference(model, cell, "fp32")
        ratio = _ratio(cell[column], base[column]) if base is not None else None
        return 1 - ratio if ratio is not None else None

    return saving


def _parity_summary(run: Run, name: str) -> str:
    if run.parity is None:
        return "not run"
    rows = run.parity[run.parity["model"] == name]
    if rows.empty:
        return "not run"
    parts = []
    for verdict in ("FAIL", "INCONCLUSIVE"):
        policies = _ordered(rows.loc[rows["verdict"] == verdict, "precision"])
        if policies:
            parts.append(f"{verdict}: {', '.join(policies)}")
    judged = rows[rows["verdict"] != ""]
    if not parts:
        return f"PASS ({len(judged)} policies)" if len(judged) else "no verdicts"
    return "; ".join(parts)


def headline(run: Run) -> list[Headline]:
    """Per model: best speedup, memory saving and energy saving over FP32, parity verdicts."""
    mem_column, _ = _memory_column(run)
    out = []
    for name in run.cells["model"].drop_duplicates():
        model = _model(run, name)
        out.append(Headline(
            model=name,
            speedup=_best(model, lambda c, m=model: _speedup(m, c, "fp32"), "{:.2f}x".format),
            memory_saving=_best(model, _saving(model, mem_column), "{:.0%}".format),
            energy_saving=_best(model, _saving(model, "joules_per_sample"), "{:.0%}".format),
            parity=_parity_summary(run, name),
        ))
    return out


def _parity_failures(run: Run) -> list[str]:
    if run.parity is None:
        return []
    fails = run.parity[run.parity["verdict"] == "FAIL"]
    out = []
    for _, row in fails.iterrows():
        detail = ""
        if _is_num(row["delta"]):
            detail = f" (eval loss {row['delta']:+.3g} vs fp32"
            detail += f", tolerance {row['tolerance']:.3g})" if _is_num(row["tolerance"]) else ")"
        if _is_num(row["nonfinite_steps"]) and row["nonfinite_steps"] > 0:
            detail += f", {int(row['nonfinite_steps'])} non-finite steps"
        out.append(f"{row['model']} {row['precision']}{detail}")
    return out


# ------------------------------------------------------------------------------ report.md


def _environment(run: Run) -> list[str]:
    meta, cells = run.meta, run.cells

    def get(key: str) -> Any:
        value = meta.get(key)
        if (value is None or value == "") and key in cells and cells[key].notna().any():
            value = cells[key].dropna().iloc[0]
        return value

    device = run.device_name
    kind = get("device")
    count = get("device_count")
    extra = ", ".join(p for p in (str(kind) if kind else "",
                                  f"{count} devices" if _is_num(count) and int(count) > 1 else "")
                      if p)
    lines = [f"- **Device:** {device}" + (f" ({extra})" if extra else "")]
    software = [f"{label} {get(key)}" for label, key in (
        ("driver", "driver_version"), ("CUDA", "cuda_version"), ("cuDNN", "cudnn_version"),
        ("torch", "torch_version"), ("Python", "python_version")) if get(key)]
    if software:
        lines.append("- **Software:** " + ", ".join(software))
    run_parts = [run.run_id]
    sha = meta.get("git_sha")
    if sha:
        dirty = " (uncommitted changes)" if store.truthy(meta.get("git_dirty")) else ""
        run_parts.append(f"git {str(sha)[:10]}{dirty}")
    when = meta.get("created") or meta.get("timestamp")
    if when:
        run_parts.append(str(when))
    matrix = meta.get("matrix") or {}
    if isinstance(matrix, dict) and matrix.get("name"):
        run_parts.append(f"matrix '{matrix['name']}'")
    repeats = sorted(set(cells["repeats"])) if len(cells) else [0]
    run_parts.append(("up to " if len(repeats) > 1 else "") + f"{repeats[-1]} repeat"
                     + ("s" if repeats[-1] != 1 else "") + " per cell")
    lines.append("- **Run:** " + ", ".join(run_parts))
    ok = cells[cells["status"] == "ok"]
    def span(column: str) -> str:
        low, high = f"{ok[column].min():,.0f}", f"{ok[column].max():,.0f}"
        return low if low == high else f"{low}-{high}"

    clocks = []
    if ok["sm_clock_mhz_avg"].notna().any():
        clocks.append(f"SM clock {span('sm_clock_mhz_avg')} MHz (cell averages)")
    if ok["temp_max_c"].notna().any():
        clocks.append(f"max temperature {ok['temp_max_c'].max():.0f} °C")
    if ok["power_avg_w"].notna().any():
        clocks.append(f"average power {span('power_avg_w')} W")
    lines.append("- **Clocks:** " + ("; ".join(clocks) if clocks
                                     else "not measured (no NVML readings)"))
    throttled = ok[ok["throttled"]]
    if len(throttled):
        reasons = sorted({r for v in throttled["throttle_reasons"] for r in v.split(";") if r})
        lines.append(f"- **Warning: throttling.** {len(throttled)} of {len(ok)} ok cells were "
                     f"throttled" + (f" ({', '.join(reasons)})" if reasons else "")
                     + f"; they are marked {THROTTLED_MARK} and their numbers understate "
                       "the device.")
    for warning in meta.get("warnings") or []:
        lines.append(f"- **Warning:** {warning}")
    return lines


def _summary(run: Run) -> list[str]:
    rows = headline(run)
    mem_label = _memory_column(run)[1]
    lines = ["## Summary", ""]
    if rows:
        body = [[h.model, h.speedup, h.memory_saving, h.energy_saving, h.parity] for h in rows]
        lines += [tabulate(body, headers=["model", "best speedup over fp32",
                                          f"best {mem_label} saving", "best energy saving",
                                          "parity"], tablefmt="github", disable_numparse=True),
                  ""]
    else:
        lines += ["No benchmark cells in this run.", ""]
    failures = _parity_failures(run)
    if failures:
        lines += [f"**Parity FAIL:** {'; '.join(failures)}.", ""]
    counts = run.cells["status"].value_counts()
    failed = [f"{int(counts[s])} {s}" for s in store.FAILED if s in counts]
    lines += [f"{len(run.cells)} cells: {int(counts.get('ok', 0))} ok"
              + (", " + ", ".join(failed) if failed else "") + ".", ""]
    return lines


def _max_batch_section(run: Run) -> list[str]:
    frame = run.max_batch
    if frame.empty:
        return []
    policies = _ordered(frame["precision"])
    body = []
    for name in frame["model"].drop_duplicates():
        rows = frame[frame["model"] == name].set_index("precision")
        base = rows.loc["fp32", "max_batch"] if "fp32" in rows.index else math.nan
        line = [name]
        for policy in policies:
            if policy not in rows.index:
                line.append("")
                continue
            row = rows.loc[policy]
            if not _is_num(row["max_batch"]):
                line.append(str(row["status"]))
                continue
            text = f"{int(row['max_batch']):,}"
            ratio = _ratio(row["max_batch"], base)
            if ratio is not None and policy != "fp32":
                text += f" ({ratio:.2f}x)"
            line.append(text)
        body.append(line)
    return ["## Largest batch that fits", "",
            tabulate(body, headers=["model", *policies], tablefmt="github",
                     disable_numparse=True, colalign=["left"] + ["right"] * len(policies)),
            "", "In brackets: the ratio to fp32's largest batch.", ""]


_PLOT_TITLES = {
    "throughput": "Throughput vs batch size",
    "speedup": "Speedup over fp32",
    "memory": "Peak memory",
    "energy": "Energy per sample",
    "pareto": "Throughput vs energy",
    "loss_curves": "Training loss per policy",
    "max_batch": "Largest batch that fits",
}


def render(run: Run, plots: Sequence[str] = ()) -> str:
    """report.md text for a run; ``plots`` are the plot names written beside it."""
    lines = [f"# ampbench report: {run.device_name}", "", *_environment(run), "",
             *_summary(run)]
    for name in run.cells["model"].drop_duplicates():
        lines += _model_section(run, name)
    lines += _max_batch_section(run)
    if plots:
        lines += ["## Plots", ""]
        for name in plots:
            lines += [f"![{_PLOT_TITLES.get(name, name)}]({PLOTS}/{name}.png)", ""]
        lines += [f"SVG versions beside them in `{PLOTS}/`.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(run_dir: Path | str, out_dir: Path | str | None = None) -> Path:
    """Write report.md and plots/ for a run (into ``out_dir`` when given); returns report.md."""
    run = load(run_dir)
    out = Path(out_dir) if out_dir is not None else run.path
    out.mkdir(parents=True, exist_ok=True)
    written = plot(run, out / PLOTS)
    for name in set(_PLOT_TITLES) - {p.stem for p in written}:  # stale from an earlier report
        for suffix in (".png", ".svg"):
            (out / PLOTS / f"{name}{suffix}").unlink(missing_ok=True)
    path = out / REPORT
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(render(run, [p.stem for p in written if p.suffix == ".png"]),
                   encoding="utf-8")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------ plots


def _style(policies: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    colours, markers = dict(_COLOURS), dict(_MARKERS)
    extras = [p for p in _ordered(policies) if p not in colours]
    for i, policy in enumerate(extras):
        colours[policy] = _EXTRA_COLOURS[i % len(_EXTRA_COLOURS)]
        markers[policy] = _EXTRA_MARKERS[i % len(_EXTRA_MARKERS)]
    return colours, markers


@dataclass
class _Plotter:
    run: Run
    out: Path
    colours: dict[str, str]
    markers: dict[str, str]

    def figure(self, num_panels: int, title: str, width: float = 4.4,
               height: float = 3.4) -> tuple[Figure, list[Axes]]:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        cols = min(num_panels, 3)
        rows = math.ceil(num_panels / cols)
        fig_width = max(width * cols, 6.4)
        fig = Figure(figsize=(fig_width, height * rows + 0.9), layout="constrained")
        FigureCanvasAgg(fig)  # Agg, never a GUI backend
        axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
        for ax in axes[num_panels:]:
            ax.set_visible(False)
        text = f"{title} on {self.run.device_name}"
        if len(text) > 8 * fig_width:  # about what fits across at this font size
            text = f"{title}\non {self.run.device_name}"
        fig.suptitle(text, fontweight="bold")
        return fig, axes[:num_panels]

    def legend(self, fig: Figure, policies: Sequence[str], extra: Sequence[Any] = ()) -> None:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=self.colours[p], marker=self.markers[p], mfc="none",
                          mew=1.6, label=p) for p in policies]
        handles = [*handles, *extra]
        # Below the panels: beside them it collides with the title of a one-panel figure.
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 7),
                   frameon=False)

    def save(self, fig: Figure, name: str) -> list[Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        paths = [self.out / f"{name}.png", self.out / f"{name}.svg"]
        # No dates or random ids in the files: re-rendering a run gives the same bytes.
        fig.savefig(paths[0], dpi=120, metadata={"Software": None})
        import matplotlib as mpl

        with mpl.rc_context({"svg.hashsalt": "ampbench"}):
            fig.savefig(paths[1], metadata={"Date": None})
        return paths


def _primary(cells: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Cells of the main configuration, and a note naming what was held fixed ('' if nothing).

    A line per policy over batch sizes needs one point per batch; other axes of the matrix are
    held: world size at its smallest, sequence length, compile ... at their most common value.
    """
    held = []
    if cells.empty:
        return cells, ""
    if cells["world_size"].nunique() > 1:
        cells = cells[cells["world_size"] == cells["world_size"].min()]
        held.append(f"world size {cells['world_size'].iloc[0]}")
    for key in ("seq_len", "image_size", "grad_accum", "compile"):
        counts = cells[key].value_counts(dropna=False)
        if len(counts) > 1:
            top = counts.index[0]
            cells = cells[cells[key].isna()] if pd.isna(top) else cells[cells[key] == top]
            held.append(f"{_SECONDARY_HEADERS[key]} {top}")
    return cells, ", ".join(held)


def _batch_axis(ax: Axes, batches: Sequence[Any]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    values = sorted({int(b) for b in batches if _is_num(b)})
    if not values:
        return
    if values[0] > 0 and values[-1] / values[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(values))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(values, [str(v) for v in values])
    if len(values) == 1:
        ax.set_xlim(values[0] * 0.5, values[0] * 1.5)
    ax.set_xlabel("batch size (samples per step)")


def _compact(value: float, _: Any = None) -> str:
    """An axis label for large counts: 600k, 1.2M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _log_y(ax: Axes, unit: str = "x") -> None:
    """A log y axis labelled 0.5, 1, 2, 5 ... (plain numbers, not powers of ten)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}{unit}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _ratio_axis(ax: Axes, values: Sequence[float]) -> None:
    """Ratios spanning a wide range read best on a log axis, where 0.5x and 2x are symmetric."""
    from matplotlib.ticker import FuncFormatter

    finite = [v for v in values if _is_num(v) and v > 0]
    if finite and max(finite) / min(finite) > 8:
        _log_y(ax)
    else:  # from zero, so a 1.2x gain does not look like a 5x one
        ax.set_ylim(bottom=0, top=max(finite, default=1.0) * 1.08)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))


def _failed_marks(ax: Axes, plotter: _Plotter, cells: pd.DataFrame, policies: list[str]) -> bool:
    """Cells that did not run: an x at the foot of the panel, labelled with the status."""
    failed = cells[cells["status"] != "ok"]
    last = cells["batch_size"].max()
    stacked: dict[Any, int] = {}
    for _, cell in failed.sort_values("precision", key=lambda s: s.map(policies.index)).iterrows():
        policy = cell["precision"]
        # Along the foot of the panel, stacked where several policies failed at one batch.
        level = stacked[cell["batch_size"]] = stacked.get(cell["batch_size"], -1) + 1
        y = 0.05 + 0.07 * level
        transform = ax.get_xaxis_transform()
        ax.plot([cell["batch_size"]], [y], marker="x", ms=6, mew=2, ls="none",
                color=plotter.colours[policy], transform=transform, clip_on=False)
        # Text inward from the last batch, so it stays inside the panel.
        inward = cell["batch_size"] == last and cells["batch_size"].nunique() > 1
        ax.annotate(f"{policy} {cell['status']}", (cell["batch_size"], y), xycoords=transform,
                    xytext=(-6 if inward else 6, 0), textcoords="offset points", fontsize=7,
                    va="center", ha="right" if inward else "left",
                    color=plotter.colours[policy])
    return not failed.empty


def _failed_handle() -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], color="#777777", marker="x", mew=2, ls="none",
                  label="did not run\n(status shown)")


def _per_batch_plot(plotter: _Plotter, name: str, title: str,
                    value: Any, ylabel: Any, baseline_one: bool = False,
                    skip: Sequence[str] = (), empty: str = "no cell ran ok") -> list[Path]:
    """A panel per model, a line per policy over batch sizes; None values are left out."""
    import seaborn as sns
    from matplotlib.ticker import FuncFormatter

    run = plotter.run
    models = list(run.cells["model"].drop_duplicates())
    frames = {}
    for model_name in models:
        model = _model(run, model_name)
        cells, held = _primary(model.cells)
        # A skipped policy draws no line, but where it failed the reader must see why.
        cells = cells[~cells["precision"].isin(skip) | (cells["status"] != "ok")]
        ok = cells[(cells["status"] == "ok")].copy()
        ok["value"] = [value(model, c) for _, c in ok.iterrows()]
        frames[model_name] = (model, cells, ok.dropna(subset=["value"]), held)
    if not any(len(ok) for _, _, ok, _ in frames.values()):
        return []
    policies = [p for p in run.policies
                if any(p in set(cells["precision"]) for _, cells, _, _ in frames.values())]
    fig, axes = plotter.figure(len(models), title)
    any_failed = False
    for ax, model_name in zip(axes, models, strict=True):
        model, cells, ok, held = frames[model_name]
        if len(ok):
            drawn = [p for p in policies if p in set(ok["precision"])]
            for i, policy in enumerate(drawn):
                # Policies often coincide (fp32 and tf32 memory, say): hollow markers of
                # different shapes stay readable on top of each other, filled ones hide.
                sns.lineplot(data=ok[ok["precision"] == policy], x="batch_size", y="value",
                             color=plotter.colours[policy], marker=plotter.markers[policy],
                             mfc="none", mec=plotter.colours[policy], mew=1.6, markersize=8,
                             lw=1.6, errorbar=None, legend=False, ax=ax, zorder=2 + i)
            for _, cell in ok[ok["throttled"]].iterrows():
                ax.annotate(THROTTLED_MARK, (cell["batch_size"], cell["value"]),
                            xytext=(4, 4), textcoords="offset points", fontsize=11,
                            color=plotter.colours[cell["precision"]])
        else:  # an empty panel keeps its place; its y axis would only show made-up numbers
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center",
                    color="#777777", bbox={"facecolor": "white", "edgecolor": "none"})
            ax.set_ylim(0, 1)
            ax.set_yticks([])
        if baseline_one and len(ok):
            ax.axhline(1.0, color=plotter.colours["fp32"], lw=1, ls="--")
            _ratio_axis(ax, [1.0, *ok["value"]])
        any_failed |= _failed_marks(ax, plotter, cells, policies)
        _batch_axis(ax, cells["batch_size"])
        if len(ok) and not baseline_one:
            ax.set_ylim(bottom=0)
        if len(ok) and not baseline_one and ok["value"].max() >= 10_000:
            ax.yaxis.set_major_formatter(FuncFormatter(_compact))  # 600k, not 600000
        ax.set_ylabel(ylabel(model))
        ax.set_title(f"{model_name} ({held})" if held else model_name)
    extra = [_failed_handle()] if any_failed else []
    if baseline_one:
        from matplotlib.lines import Line2D

        extra.insert(0, Line2D([], [], color=plotter.colours["fp32"], lw=1, ls="--",
                               label="fp32 (1x)"))
    if run.cells["throttled"].any():
        from matplotlib.lines import Line2D

        extra.append(Line2D([], [], ls="none", marker=f"${THROTTLED_MARK}$", color="#333333",
                            label="throttled"))
    plotter.legend(fig, [p for p in policies if p not in skip], extra)
    return plotter.save(fig, name)


def _pareto_plot(plotter: _Plotter) -> list[Path]:
    import seaborn as sns
    from matplotlib.ticker import FuncFormatter

    run = plotter.run
    models = [m for m in run.cells["model"].drop_duplicates()]
    data = {}
    for model_name in models:
        model = _model(run, model_name)
        ok, held = _primary(model.cells)
        ok = ok[(ok["status"] == "ok") & ok["joules_per_sample"].notna()
                & ok[model.rate_column].notna()].copy()
        ok["energy"] = [model.energy(c) for _, c in ok.iterrows()]
        ok["rate"] = ok[model.rate_column]
        if len(ok):
            data[model_name] = (model, ok, held)
    if not data:
        return []
    policies = [p for p in run.policies if any(p in set(ok["precision"])
                                               for _, ok, _ in data.values())]
    fig, axes = plotter.figure(len(data), "Throughput vs energy")
    for ax, (model_name, (model, ok, held)) in zip(axes, data.items(), strict=True):
        order = [p for p in policies if p in set(ok["precision"])]
        # A faint line per policy in batch order shows where a larger batch moves the point.
        sns.lineplot(data=ok.sort_values("batch_size"), x="rate", y="energy", hue="precision",
                     hue_order=order, palette=plotter.colours, sort=False, errorbar=None,
                     legend=False, ax=ax, lw=1, alpha=0.45)
        for policy in order:
            points = ok[ok["precision"] == policy]
            ax.scatter(points["rate"], points["energy"], marker=plotter.markers[policy], s=55,
                       facecolors="none", edgecolors=plotter.colours[policy], linewidths=1.6,
                       zorder=3)
        # Non-dominated points: nothing else is both faster and cheaper per sample.
        front = []
        for _, cell in ok.sort_values(["rate", "energy"], ascending=[False, True]).iterrows():
            if not front or cell["energy"] < front[-1]["energy"]:
                front.append(cell)
        front.sort(key=lambda c: c["rate"])
        ax.plot([c["rate"] for c in front], [c["energy"] for c in front], ls="--", lw=1,
                color="#777777", zorder=2)
        ax.scatter([c["rate"] for c in front], [c["energy"] for c in front], s=220,
                   facecolors="none", edgecolors="#777777", zorder=2)
        middle = (ok["rate"].min() + ok["rate"].max()) / 2
        for cell in front:  # labelling every point would bury them; the front is what counts
            label = f"{cell['precision']} b{int(cell['batch_size'])}"
            label += THROTTLED_MARK if cell["throttled"] else ""
            right = cell["rate"] > middle  # label inward, away from the panel's edge
            ax.annotate(label, (cell["rate"], cell["energy"]), xytext=(-9 if right else 9, 9),
                        textcoords="offset points", fontsize=7, color="#333333",
                        ha="right" if right else "left")
        if ok["rate"].max() >= 10_000:
            ax.xaxis.set_major_formatter(FuncFormatter(_compact))
        ax.margins(0.12)
        ax.set_xlabel(f"throughput ({model.rate_unit}, higher is better)")
        ax.set_ylabel(f"energy ({model.energy_unit}, lower is better)")
        ax.set_title(f"{model_name} ({held})" if held else model_name)
    from matplotlib.lines import Line2D

    plotter.legend(fig, policies, [Line2D([], [], ls="--", color="#777777", marker="o", ms=11,
                                          mfc="none", label="Pareto front\n(b = batch size)")])
    return plotter.save(fig, "pareto")


def _loss_plot(plotter: _Plotter) -> list[Path]:
    import seaborn as sns
    from matplotlib.patches import Patch

    curves = plotter.run.curves
    if curves is None or curves["loss"].notna().sum() == 0:
        return []
    models = list(curves["model"].drop_duplicates())
    policies = _ordered(curves["precision"])
    fig, axes = plotter.figure(len(models), "Training loss per policy")
    band_seeds = 0
    any_optimum = False
    for ax, model_name in zip(axes, models, strict=True):
        rows = curves[curves["model"] == model_name]
        optimum = _optimum(plotter.run, model_name)
        if optimum is not None:
            ax.axhline(optimum, color="#777777", lw=1.2, ls=":", zorder=1)
            any_optimum = True
        fp32 = rows[rows["precision"] == "fp32"].dropna(subset=["loss"])
        if len(fp32):
            band = fp32.groupby("step")["loss"].agg(["min", "max"])
            band_seeds = max(band_seeds, fp32["seed"].nunique())
            ax.fill_between(band.index, band["min"], band["max"], color=plotter.colours["fp32"],
                            alpha=0.18, lw=0)
        mean = rows.groupby(["precision", "step"], as_index=False)["loss"].mean()
        every = max(1, mean["step"].nunique() // 10)  # a marker on every point is a smear
        for policy in [p for p in policies if p in set(mean["precision"])]:
            line = mean[mean["precision"] == policy]
            if line["loss"].isna().all():
                continue
            colour = plotter.colours[policy]
            # fp32 thick underneath: a policy that tracks it exactly still leaves it visible.
            sns.lineplot(data=line, x="step", y="loss", color=colour,
                         marker=plotter.markers[policy], mfc="none", mec=colour, mew=1.4,
                         markersize=6, markevery=every, lw=3.0 if policy == "fp32" else 1.3,
                         errorbar=None, legend=False, ax=ax)
        _nonfinite_marks(ax, plotter, rows, mean)
        finite = rows["loss"].dropna()
        if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 20:
            _log_y(ax, unit="")
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (nats, mean over seeds)")
        ax.set_title(model_name)
    extra = [Patch(color=plotter.colours["fp32"], alpha=0.18,
                   label=f"fp32 seed range\n({band_seeds} seeds)")] if band_seeds else []
    if any_optimum:
        from matplotlib.lines import Line2D

        extra.append(Line2D([], [], color="#777777", lw=1.2, ls=":",
                            label="achievable optimum\n(entropy rate)"))
    plotter.legend(fig, policies, extra)
    return plotter.save(fig, "loss_curves")


def _optimum(run: Run, model: str) -> float | None:
    """The lowest loss any model can reach on the parity task, where it is known exactly."""
    if run.parity is None:
        return None
    values = run.parity.loc[run.parity["model"] == model, "optimal_loss"].dropna()
    return float(values.iloc[0]) if len(values) else None


def _nonfinite_marks(ax: Axes, plotter: _Plotter, rows: pd.DataFrame,
                     mean: pd.DataFrame) -> None:
    """Where a policy's loss went non-finite its line just stops; say so on the plot."""
    for policy, group in rows[rows["loss"].isna()].groupby("precision", sort=False):
        first = group["step"].min()
        before = mean[(mean["precision"] == policy) & (mean["step"] < first)].dropna()
        if before.empty:
            at = (first, 0.5)
            coords: Any = ("data", "axes fraction")
        else:
            at, coords = (before["step"].iloc[-1], before["loss"].iloc[-1]), "data"
        colour = plotter.colours[policy]
        ax.annotate(f"{policy}: non-finite loss\nfrom step {int(first)}", at, xycoords=coords,
                    xytext=(0, 22), textcoords="offset points", ha="center", fontsize=7,
                    color=colour, arrowprops={"arrowstyle": "->", "color": colour, "lw": 0.8},
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})


def _max_batch_plot(plotter: _Plotter) -> list[Path]:
    import seaborn as sns

    frame = plotter.run.max_batch
    if frame.empty:
        return []
    policies = _ordered(frame["precision"])
    fig, axes = plotter.figure(1, "Largest batch that fits",
                               width=max(4.4, 0.6 * frame["model"].nunique() * len(policies)))
    ax = axes[0]
    models = list(frame["model"].drop_duplicates())
    fits = frame.dropna(subset=["max_batch"])
    if len(fits):
        sns.barplot(data=fits, x="model", y="max_batch", hue="precision", hue_order=policies,
                    palette=plotter.colours, saturation=1, legend=False, ax=ax, order=models)
        for container in ax.containers:
            ax.bar_label(container, fmt="{:,.0f}", fontsize=7, padding=2)
    else:
        ax.set_ylim(0, 1)
        ax.set_yticks([])
    # A search that failed has no bar; its status goes where the bar would stand.
    width = 0.8 / len(policies)
    for _, row in frame[frame["max_batch"].isna()].iterrows():
        x = models.index(row["model"]) - 0.4 + (policies.index(row["precision"]) + 0.5) * width
        ax.text(x, 0, f" {row['precision']} {row['status']}", rotation=90, ha="center",
                va="bottom", fontsize=7, color=plotter.colours[row["precision"]],
                transform=ax.get_xaxis_transform())
    ax.set_xlim(-0.5, len(models) - 0.5)
    ax.set_xlabel("model")
    ax.set_ylabel("largest batch that fits (samples)")
    plotter.legend(fig, policies)
    return plotter.save(fig, "max_batch")


def plot(run: Run, out: Path) -> list[Path]:
    """Every plot the run's data supports, PNG and SVG, into ``out``; returns the files."""
    import seaborn as sns

    # Figures are drawn on their own Agg canvases (no pyplot state, no window, no global
    # backend switch for a caller that has one).
    plotter = _Plotter(run, Path(out), *_style(run.policies))
    mem_column, mem_label = _memory_column(run)
    written: list[Path] = []
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        written += _per_batch_plot(
            plotter, "throughput", "Training throughput",
            lambda m, c: c[m.rate_column] if _is_num(c[m.rate_column]) else None,
            lambda m: f"throughput ({m.rate_unit})")
        written += _per_batch_plot(
            plotter, "speedup", "Speedup over fp32", lambda m, c: _speedup(m, c, "fp32"),
            lambda m: "speedup over fp32 at the same batch", baseline_one=True, skip=("fp32",),
            empty="no policy ran ok\nbeside an ok fp32 cell")
        written += _per_batch_plot(
            plotter, "memory", f"{mem_label[0].upper()}{mem_label[1:]}",
            lambda m, c: c[mem_column] if _is_num(c[mem_column]) else None,
            lambda m: f"{mem_label} (GiB)", empty="no memory measured")
        written += _per_batch_plot(
            plotter, "energy", "Energy per sample",
            lambda m, c: m.energy(c) if _is_num(c["joules_per_sample"]) else None,
            lambda m: f"energy ({m.energy_unit})", empty="no energy measured")
        written += _pareto_plot(plotter)
        written += _loss_plot(plotter)
        written += _max_batch_plot(plotter)
    return written


# ------------------------------------------------------------------------------ publish


def _run_date(run: Run) -> str:
    for value in (run.meta.get("created"), run.meta.get("timestamp")):
        if value:
            match = re.match(r"\d{4}-\d{2}-\d{2}", str(value))
            if match:
                return match.group(0)
    match = re.match(r"(\d{4})(\d{2})(\d{2})-", run.run_id)
    return "-".join(match.groups()) if match else "undated"


def _destination(run: Run, results: Path) -> Path:
    """results/<slug>/<date>/, or <date>-2, -3 ... when another run already has that date."""
    device_dir = results / store.device_slug(run.device_name)
    date = _run_date(run)
    candidates = sorted(device_dir.glob(f"{date}*/"), key=lambda p: p.name)
    for candidate in candidates:  # publishing the same run again replaces its own copy
        if store.read_meta(candidate).get("run_id") == run.run_id:
            return candidate
    taken = {p.name for p in candidates}
    name, n = date, 1
    while name in taken:
        n += 1
        name = f"{date}-{n}"
    return device_dir / name


def publish(run_dir: Path | str, results: Path | str = "results") -> Path:
    """Copy a run's CSVs, meta.json, report.md and plots to results/<device>/<date>/; index it."""
    run = load(run_dir)
    if run.cells.empty and run.max_batch.empty:
        raise BadInput(f"{run_dir}: the run has no benchmark cells; nothing to publish")
    results = Path(results)
    if not (run.path / REPORT).exists() or not (run.path / PLOTS).is_dir():
        write_report(run.path)
    dest = _destination(run, results)
    dest.mkdir(parents=True, exist_ok=True)
    if not (run.path / store.RESULTS).exists():
        store.write_csv(run.path)
    for source in [*sorted(run.path.glob("*.csv")), run.path / store.META, run.path / REPORT]:
        if source.exists():
            shutil.copy2(source, dest / source.name)
    if (dest / PLOTS).exists():  # plots of an earlier publish of this run must not linger
        shutil.rmtree(dest / PLOTS)
    if (run.path / PLOTS).is_dir():
        shutil.copytree(run.path / PLOTS, dest / PLOTS)
    write_index(results)
    return dest


def _published(results: Path) -> list[Path]:
    """Published run directories: results/<device>/<date>/ with a results.csv."""
    skip = {store.RUNS.name, "baselines"}
    return sorted(p.parent for p in results.glob(f"*/*/{store.RESULTS}")
                  if p.parent.parent.name not in skip)


_INDEX_INTRO = """\
# Published runs

Each published run lives in `results/<device>/<date>/`: `results.csv` (one row per cell and
repeat), `meta.json` (environment and matrix), `parity.csv` and `parity_curves.csv` when
accuracy parity ran, `report.md` (tables) and `plots/`. Publish a run with

```bash
python -m bench publish results/runs/<run_id>
```

This index is regenerated from those directories on every publish; do not edit it by hand.
Headline numbers are the best over a model's batch sizes against FP32 at the same batch size
({mark} marks a throttled cell).
"""


def render_index(results: Path | str) -> str:
    """results/README.md text: every published run with its headline numbers, per device."""
    results = Path(results)
    lines = [_INDEX_INTRO.format(mark=THROTTLED_MARK)]
    runs = [load(p) for p in _published(results)]
    if not runs:
        lines.append("No runs published yet.\n")
        return "\n".join(lines)
    by_device: dict[str, list[Run]] = {}
    for run in runs:
        by_device.setdefault(run.device_name, []).append(run)
    for device in sorted(by_device):
        body = []
        for run in sorted(by_device[device], key=lambda r: r.path.name, reverse=True):
            link = run.path.relative_to(results).as_posix()
            torch_version = run.meta.get("torch_version") or ""
            for h in headline(run):
                body.append([run.path.name, f"[{run.run_id}]({link}/{REPORT})", torch_version,
                             h.model, h.speedup, h.memory_saving, h.energy_saving, h.parity])
        lines += [f"## {device}", "",
                  tabulate(body, headers=["date", "run", "torch", "model", "best speedup",
                                          "memory saving", "energy saving", "parity"],
                           tablefmt="github", disable_numparse=True), ""]
    return "\n".join(lines)


def write_index(results: Path | str) -> Path:
    """Regenerate results/README.md from the published directories (idempotent)."""
    path = Path(results) / INDEX
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(render_index(results), encoding="utf-8")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------ CLI


def main(args: argparse.Namespace) -> int:
    """``ampbench report [RUN_DIR] [--out DIR]``: write report.md and plots."""
    run_dir = Path(args.run_dir) if args.run_dir else store.latest_run()
    path = write_report(run_dir, args.out)
    plots = path.parent / PLOTS
    print(f"wrote {path}" + (f" and {plots}/" if plots.is_dir() else ""))
    return 0


def publish_main(args: argparse.Namespace) -> int:
    """``ampbench publish RUN_DIR [--results DIR]``: copy a run into results/ and index it."""
    dest = publish(args.run_dir, args.results)
    print(f"published {args.run_dir} to {dest}; index {Path(args.results) / INDEX}")
    return 0

