"""Reading a run directory for the report: results.csv folded into one row per cell (with
each noisy metric's standard error), meta.json, parity.csv and the loss curves. torch-free."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bench import BadInput, parity, store, strategy
from bench.analysis import baseline, noise, numerics
from bench.analysis.cells import group_frame
from bench.precision import NAMES as _POLICY_NAMES
from bench.run import contention as load_

REPORT = store.REPORT
PLOTS = store.PLOTS
INDEX = "README.md"
PARITY = store.PARITY
CURVES = store.PARITY_CURVES
GRAD_HIST = store.GRAD_HIST
PEERS = store.PEERS

POLICY_ORDER = _POLICY_NAMES  # the canonical order, FP8 beside the other policies
KEY = store.KEY
# Key columns besides the batch size that become extra row labels when they vary in a model.
_SECONDARY = ("seq_len", "image_size", "grad_accum", "compile", "world_size", "strategy")
_SECONDARY_HEADERS = {"seq_len": "seq len", "image_size": "image", "grad_accum": "grad accum",
                      "compile": "compile", "world_size": "world size", "strategy": "strategy"}
_KEY_DEFAULTS: dict[str, Any] = {"grad_accum": 1, "world_size": 1, "compile": False}
METRICS = (
    "samples_per_s", "tokens_per_s", "step_ms_median", "step_ms_iqr", "peak_mem_allocated_gib",
    "peak_mem_reserved_gib", "peak_rss_gib", "achieved_tflops", "mfu_pct", "mfu_fp8_pct",
    "power_avg_w", "energy_j", "joules_per_sample", "sm_clock_mhz_avg", "temp_max_c",
    "host_ms_median", "param_bytes", "optim_state_bytes", "peak_mem_rank_min_gib",
)
# The worst status speaks for a cell none of whose repeats ran.
THROTTLED_MARK = "†"
CONTENDED_MARK = "‡"  # other processes used the cores while the cell ran



# ------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class Run:
    """One run directory, read and folded: what the tables and plots are drawn from."""

    path: Path
    meta: dict[str, Any]
    cells: pd.DataFrame  # one row per cell: KEY, status, medians of the ok repeats, flags
    max_batch: pd.DataFrame  # model, precision, status, max_batch (empty without a search)
    parity: pd.DataFrame | None  # one row per (model, precision); None without parity.csv
    curves: pd.DataFrame | None  # model, precision, seed, step, loss (, scale, skipped, time_s)
    # parity.csv as written: one row per (model, precision, seed), numbers as numbers.
    parity_runs: pd.DataFrame | None = None
    grad_hist: pd.DataFrame | None = None  # model, kind, step, log2_bin, count, zeros
    peers: pd.DataFrame | None = None  # peers.csv as written
    prices: dict[str, float] = field(default_factory=dict)  # store.PRICES keys given
    # What reading left out (lines damaged or cut off, a process twice): the report says so.
    problems: list[str] = field(default_factory=list)

    def parity_row(self, model: str, policy: str) -> pd.Series | None:
        """parity.csv's verdict row of (model, policy): the policy's own, else (parity on
        several ranks only) its worst under a strategy (``policy@strategy``, whose
        ``precision`` says which); None without one."""
        if self.parity is None:
            return None
        rows = self.parity[self.parity["model"] == model]
        own = rows[rows["precision"] == policy]
        if not own.empty:
            return own.iloc[0]
        shared = rows[rows["precision"].str.startswith(f"{policy}@")]
        worst = parity.worst_verdict(str(v) for v in shared["verdict"].dropna())
        return None if shared.empty else (
            shared[shared["verdict"] == worst] if worst else shared).iloc[0]

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




def _read_csv(path: Path, required: Sequence[str], whole: dict[str, int] | None = None,
              signed: Sequence[str] = ()) -> pd.DataFrame | None:
    """A parity CSV through the one checked reader (store.read_csv), None when absent or empty;
    a damaged line is a warning and skipped, text in a number column is BadInput."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    return store.read_csv(path, required, whole, signed=signed, strict=False)


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
    frame["strategy"] = [strategy.of_record({"strategy": v}) for v in frame["strategy"]]
    for column in METRICS:
        values = frame[column] if column in frame.columns else None
        frame[column] = pd.to_numeric(values, errors="coerce") if values is not None else math.nan
    for column in ("throttled", "max_batch_search"):
        frame[column] = frame[column].map(store.truthy) if column in frame.columns else False
    for column in ("throttle_reasons", "error", "device_name", "max_batch", "mfu_flag"):
        if column not in frame.columns:
            frame[column] = None
    # A max-batch record is flagged, or at least carries its result.
    frame["max_batch_search"] |= pd.to_numeric(frame["max_batch"], errors="coerce").notna()
    return frame


# Metrics whose between-process noise the tables state (a ``<metric>_err`` column each).
_NOISY = ("samples_per_s", "tokens_per_s", "peak_mem_reserved_gib", "peak_rss_gib",
          "joules_per_sample")


def _flags(ok: pd.DataFrame) -> dict[str, Any]:
    """A cell's marks, from its ok processes: any one throttled, contended, ... marks it."""
    reasons = sorted({r.strip() for v in ok["throttle_reasons"].dropna()
                      for r in str(v).split(";") if r.strip()})
    # Why an MFU is empty, from any ok repeat: one impossible value makes the cell's suspect.
    mfu_flags = (str(f).strip() for f in ok["mfu_flag"].dropna())
    return {
        "throttled": bool(ok["throttled"].any()),
        "contended": load_.contended_rows(ok),
        # Ran beside other cells on the node's other devices (`run --devices`): shared power,
        # heat and host, so its numbers are not those of a cell alone on the node.
        "co_scheduled": "neighbours" in ok and any(
            isinstance(v, str) and v.strip() for v in ok["neighbours"]),
        "host_bound": "host_bound" in ok and any(map(store.truthy, ok["host_bound"])),
        "emulated": "emulated" in ok and any(map(store.truthy, ok["emulated"])),
        "throttle_reasons": ";".join(reasons),
        "mfu_flag": "; ".join(dict.fromkeys(f for f in mfu_flags if f)),
    }


# What an FP8-family cell's conversion did (store.CONVERSION but ``emulated``, a flag above):
# the report's "which layers ran in which format" table (bench/report/low_precision.py).
LOW_PRECISION = ("fp8_converted", "fp8_unconverted", "fp8_num_unconverted",
                 "low_precision_format", "low_precision_filter")


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell key: the median of its ok processes with each noisy metric's relative
    standard error (``<metric>_err``), its status and throttling."""
    frame = _normalise(frame)
    groups = list(group_frame(frame).values())  # bench/analysis/cells.py: the one grouping
    processes = {i: g[g["status"] == "ok"].to_dict("records") for i, g in enumerate(groups)}
    noisy = {metric: noise.cell_estimates(processes, metric) for metric in _NOISY}
    rows = []
    for i, group in enumerate(groups):
        ok = group[group["status"] == "ok"]
        first = group.iloc[0]
        row: dict[str, Any] = {k: first[k] for k in KEY}
        statuses = set(group["status"])
        row["status"] = "ok" if len(ok) else next(
            (s for s in store.FAILED if s in statuses), sorted(statuses)[0])
        for column in METRICS:
            row[column] = ok[column].median()  # NaN when no repeat ran ok
        for column in _NOISY:
            est = noisy[column][0].get(i)
            row[f"{column}_err"] = est.error if est else math.nan
            if column == "samples_per_s":
                row["noise_pct"] = est.spread * 100 if est else math.nan
                row["noise_source"] = est.source if est else noise.NONE
        within = (ok["step_ms_iqr"] / ok["step_ms_median"]).dropna()
        row["step_spread_pct"] = within.median() * 100 if len(within) else math.nan
        row["outliers"] = _outliers(ok, within.median() / 1.349 if len(within) else None)
        row.update(_flags(ok))
        errors = [str(e).strip() for e in group["error"].dropna() if str(e).strip()]
        row["error"] = errors[0] if errors else ""
        row["repeats"] = len(group)
        row["calibration_processes"] = sum(map(store.truthy, group["calibration"])) \
            if "calibration" in group else 0
        row["failed_repeats"] = len(group) - len(ok)
        row["device_name"] = first["device_name"]
        row["numerics"] = numerics.of_processes(str(first["precision"]), ok)  # summed
        for column in ("param_dtypes", "optim_state_dtypes", *LOW_PRECISION):  # the same in
            # every ok repeat
            row[column] = ok[column].dropna().iloc[0] \
                if column in ok and ok[column].notna().any() else None
        rows.append(row)
    columns = [*KEY, "status", *METRICS, *(f"{m}_err" for m in _NOISY), "noise_pct",
               "noise_source", "step_spread_pct", "throttled", "contended", "co_scheduled",
               "host_bound", "emulated", "mfu_flag", "outliers",
               "throttle_reasons", "error", "repeats", "calibration_processes", "failed_repeats",
               "device_name", "param_dtypes", "optim_state_dtypes", "numerics", *LOW_PRECISION]
    cells = pd.DataFrame(rows, columns=columns)
    # The run's between-process band, for the report's words.
    cells.attrs["band"] = noisy["samples_per_s"][1]
    return cells


def _outliers(ok: pd.DataFrame, floor: float | None) -> str:
    """The cell's outlier processes by samples/s (bench/analysis/noise.py's rule), as
    'process 4: 836 samples/s' joined by '; ', or ''."""
    rows = ok[ok["samples_per_s"].notna()]
    values = [float(v) for v in rows["samples_per_s"]]
    found = noise.outliers(values, floor)
    if not found:
        return ""
    median = statistics.median(values)
    names = [rows.iloc[i].get("repeat") for i in found]
    return "; ".join(f"process {_process(n)}: {values[i]:,.0f} samples/s "
                     f"against the median {median:,.0f}" for i, n in zip(found, names,
                                                                         strict=True))


def _process(repeat: Any) -> str:
    try:
        return str(int(float(repeat)))
    except (TypeError, ValueError, OverflowError):  # None, text, NaN, inf
        return "?"


def _max_batch(frame: pd.DataFrame) -> pd.DataFrame:
    searched = frame[frame["max_batch_search"]] if len(frame) else frame
    columns = ["model", "precision", "status", "max_batch", "throttled"]
    if searched.empty:
        return pd.DataFrame(columns=columns)
    out = searched[["model", "precision", "status", "throttled"]].copy()
    out["max_batch"] = pd.to_numeric(searched["max_batch"], errors="coerce")
    # A resumed search may have written a group twice; the last record wins.
    return out.drop_duplicates(["model", "precision"], keep="last")[columns]


# parity.csv's numbers the report reads per seed (timing and the scale the scaler settled on).
_PARITY_NUMBERS = ("steps_to_target", "scaler_scale_final", "train_time_s", "step_time_ms",
                   "time_to_target_s", "final_train_loss", "batch_size", "tolerance")


def _parity_runs(path: Path) -> pd.DataFrame | None:
    """parity.csv with one row per (model, precision, seed), or None when it is absent."""
    frame = _read_csv(path, ("model", "precision"), {"seed": 0},
                      ("eval_loss", "eval_accuracy", "delta", "tolerance", "optimal_loss",
                       *_PARITY_NUMBERS))
    if frame is None or frame.empty:
        return None
    frame = frame.copy()
    frame["model"] = frame["model"].astype(str)
    frame["precision"] = frame["precision"].astype(str)
    for column in _PARITY_NUMBERS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce") if column in frame \
            else math.nan
    return frame


def _parity(frame: pd.DataFrame | None) -> pd.DataFrame | None:
    """parity.csv's rows folded to one row per (model, precision); None when there are none."""
    if frame is None:
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
    frame = _read_csv(path, ("model", "precision", "step", "loss"), {"step": 0}, ("loss",))
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
    for column in ("scale", "skipped", "time_s", "lost_frac"):  # empty where not measured
        frame[column] = pd.to_numeric(frame[column], errors="coerce") if column in frame \
            else math.nan
    return frame.dropna(subset=["step"])


_HIST_COLUMNS = ("model", "kind", "step", "log2_bin", "count", "zeros")


def _grad_hist(path: Path) -> pd.DataFrame | None:
    """grad_hist.csv (whole numbers checked), or None when it is absent or empty."""
    # log2_bin is empty on the row of a group whose elements were all zero.
    frame = _read_csv(path, [c for c in _HIST_COLUMNS if c != "log2_bin"],
                      {"step": 0, "count": 0, "zeros": 0}, ("log2_bin",))
    if frame is None or frame.empty:
        return None
    if "log2_bin" not in frame.columns:
        raise BadInput(f"{path}: missing column(s) log2_bin")
    frame = frame.copy()
    bins = pd.to_numeric(frame["log2_bin"], errors="coerce")
    if not (bins.dropna() % 1 == 0).all():
        raise BadInput(f"{path}: column log2_bin holds a fraction, not a power of two's "
                       "exponent")
    frame["log2_bin"] = bins
    for column in ("model", "kind"):
        frame[column] = frame[column].astype(str).str.strip()
    for column in ("step", "count", "zeros"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame.dropna(subset=["count"])


def _peers(path: Path) -> pd.DataFrame | None:
    """peers.csv as `ampbench peers` wrote it, or None when it is absent."""
    frame = _read_csv(path, ("model", "precision", "status"))
    return None if frame is None or frame.empty else frame


def _problems(problems: list[str]) -> list[str]:
    """The report's warning for each file that was read around: a cut-off line means the run
    was stopped mid-write, so the report says it is incomplete."""
    cut = [p for p in problems if "cut off" in p]
    lead = ["incomplete: the run was stopped mid-write (a line cut off); this report covers "
            "the lines before it, and `ampbench run --resume` runs the rest"] if cut else []
    return lead + [f"read around: {p}" for p in problems]


def prices(meta: dict[str, Any], price_per_hour: float | None = None,
           price_per_kwh: float | None = None) -> dict[str, float]:
    """The prices a report uses: those given here, else those the run kept in meta.json."""
    # A price given replaces the recorded one, damaged or not.
    return store.prices(meta, {"price_per_hour": price_per_hour, "price_per_kwh": price_per_kwh})


def load(run_dir: Path | str, price_per_hour: float | None = None,
         price_per_kwh: float | None = None) -> Run:
    """Read a run (a run directory, its results.csv or records.jsonl, or a results CSV of its
    own: store.resolve) and its meta.json and parity files into a Run; a price given here
    overrides the one the run recorded. Lines read around are the report's warnings."""
    home, csv = store.resolve(run_dir)  # the one rule the gate and baseline take paths by
    # The reader the gate uses too: both refuse the same files; a damaged line is skipped here.
    raw = store.load_results(home or csv, strict=False, cell_noise=noise.results_columns)
    problems = raw.attrs.get("problems", [])
    raw = _normalise(raw)
    path = home or csv
    meta = store.read_meta(home) if home else {}
    parity_csv = path / PARITY if home else baseline.parity_path(csv)  # X.csv: X.parity.csv
    runs = _parity_runs(parity_csv) if parity_csv else None
    return Run(
        path=path,
        meta=meta,
        cells=aggregate(raw[~raw["max_batch_search"]]),
        max_batch=_max_batch(raw),
        parity=_parity(runs),
        curves=_curves(path / CURVES) if home else None,
        parity_runs=runs,
        grad_hist=_grad_hist(path / GRAD_HIST) if home else None,
        peers=_peers(path / PEERS) if home else None,
        problems=_problems(problems),
        prices=prices(meta, price_per_hour, price_per_kwh),
    )


