"""Regression gate: compare a run against a baseline and exit 1 on a regression.

Run ``python -m bench gate --baseline results/baselines/<device>.csv --current RUN_DIR``; with
neither flag (``nox -s gate``) the latest run under ``results/runs/`` is gated against this
device's baseline ``results/baselines/<device-slug>.csv``. A baseline is promoted deliberately,
never automatically, with ``python -m bench baseline RUN_DIR [--out PATH]``.

Matching. Rows are grouped into cells by (model, precision, batch_size, seq_len, image_size,
grad_accum, compile, world_size) and ``device_name``; the repeats of a cell are one cell. A
baseline from another device is refused unless ``--allow-device-mismatch`` (then the device is
left out of the key).

Checks. ``--check METRIC:[+|-]THRESHOLD[%]`` (repeatable; replaces the defaults): ``-`` means a
drop is the regression, ``+`` a rise; without a sign the metric's usual direction is used; ``%``
makes the threshold relative to the baseline, without it the threshold is in the metric's unit.
Defaults: ``samples_per_s:-5% step_ms_median:+5% peak_mem_reserved_gib:+5% joules_per_sample:+5%``.
A memory check on a cell with no reserved/allocated memory (CPU) falls back to ``peak_rss_gib``;
a metric empty on either side (no NVML: no joules) is reported as n/a.

Noise rule (bench/analysis/noise.py). Each side of a cell gets a value, the median over its ``ok``
processes, and a standard error from the noise between processes: the cell's own spread (three
processes or more), the run's band (the median spread of its cells with several processes, or
of its calibration cell) and, for time-derived metrics, the cell's step spread, whichever is
largest; the same cell on the same machine has one per-process noise, so each side takes the
larger of the two sides' (a current run of one process inherits its baseline's spread). A check
fails only when the change is beyond its threshold in the bad direction AND beyond ``noise.Z``
standard errors of the difference. When ``Z`` standard errors are wider than the threshold, a
change of the threshold's size could not have been seen: the check is ``too noisy`` (a warning;
a failure with ``--fail-on-noisy``). Unknown noise is unbounded: such a check is too noisy.

Other verdicts. Status ok -> oom/timeout/error fails (ok -> unsupported/skipped warns). A cell
that was ok in the baseline and is absent from the current run fails, and so does a measurement
the baseline has and the current run lost (empty, NaN, inf). A baseline holding inf, or an ok
cell without its step times or throughput, is bad input. Metric checks on a throttled cell
(either side) are reported as ``throttled``, not failed, unless ``--fail-on-throttled``; those
of a contended cell (other processes used more than 10% of the run's cores while one of its
processes ran: ``others_cpu_pct``) as ``contended``. Parity: a run directory's ``parity.csv``,
or for a baseline CSV ``X.csv`` its sibling ``X.parity.csv``; a (model, precision) whose
verdict goes PASS -> FAIL fails (any FAIL among its seeds makes the verdict FAIL); other changes
and a missing side warn.

Output: a table on stdout, markdown appended to ``$GITHUB_STEP_SUMMARY`` when it is set.
Exit 0 pass, 1 regression, 2 bad input. torch-free.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from bench import BadInput, parity, paths, store
from bench.analysis import noise
from bench.run import contention

KEY = store.KEY
# A key field left empty in a hand-written CSV means its default, so it still matches.
_KEY_DEFAULTS = {"grad_accum": "1", "world_size": "1", "compile": "false"}

DEFAULT_CHECKS = ("samples_per_s:-5%", "step_ms_median:+5%", "peak_mem_reserved_gib:+5%",
                  "joules_per_sample:+5%")

# Metrics a check may name: numeric measurements of results.csv.
CHECKABLE = (
    "step_ms_median", "step_ms_iqr", "step_ms_min", "samples_per_s", "tokens_per_s", "startup_s",
    "peak_mem_allocated_gib", "peak_mem_reserved_gib", "peak_rss_gib",
    "flops_per_step", "achieved_tflops", "mfu_pct",
    "power_avg_w", "power_max_w", "energy_j", "joules_per_sample", "sm_clock_mhz_avg",
    "temp_max_c", "loss_last", "nonfinite_steps", "scaler_skipped_steps",
)
_HIGHER_IS_BETTER = frozenset({"samples_per_s", "tokens_per_s", "achieved_tflops", "mfu_pct",
                               "sm_clock_mhz_avg"})
# Every ok cell measures these: a baseline without them is damaged, a current run lost them.
_ALWAYS = ("step_ms_median", "step_ms_iqr", "samples_per_s")
# CUDA memory columns are empty on CPU, where the child's peak RSS is the measure.
_FALLBACK = {"peak_mem_reserved_gib": "peak_rss_gib", "peak_mem_allocated_gib": "peak_rss_gib"}

_FAILED_STATUS = frozenset({"oom", "timeout", "error"})

BASELINES = Path("results") / "baselines"
PARITY = "parity.csv"

PASS, FAIL, WARN, NOISY = "pass", "FAIL", "warn", "too noisy"


_CHECK_RE = re.compile(r"^\s*([a-z_]+)\s*:\s*([+-]?)\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*$")


@dataclass(frozen=True)
class Check:
    """A regression check such as ``samples_per_s:-5%`` (a drop of more than 5% fails)."""

    metric: str
    threshold: float
    worse: int  # +1: a rise is a regression; -1: a drop is
    percent: bool = True

    @classmethod
    def parse(cls, text: str) -> Check:
        """Parse ``METRIC:[+|-]THRESHOLD[%]``; a bad expression raises BadInput."""
        match = _CHECK_RE.match(text)
        if not match:
            raise BadInput(f"check '{text}' is not METRIC:[+|-]THRESHOLD[%] "
                           f"(e.g. samples_per_s:-5% or peak_rss_gib:+0.5)")
        metric, sign, number, percent = match.groups()
        if metric not in CHECKABLE:
            raise BadInput(f"check '{text}': unknown metric '{metric}'; "
                           f"valid: {', '.join(CHECKABLE)}")
        usual = -1 if metric in _HIGHER_IS_BETTER else 1
        worse = {"+": 1, "-": -1}.get(sign, usual)
        return cls(metric, float(number), worse, bool(percent))

    def __str__(self) -> str:
        sign = "+" if self.worse > 0 else "-"
        return f"{self.metric}:{sign}{self.threshold:g}{'%' if self.percent else ''}"

    def change(self, baseline: float, current: float) -> float:
        """Current minus baseline: in percent of the baseline, or in the metric's unit."""
        if not self.percent:
            return current - baseline
        if baseline == 0:
            return 0.0 if current == 0 else math.copysign(math.inf, current)
        return (current - baseline) / abs(baseline) * 100.0

    def judge(self, baseline: noise.Estimate, current: noise.Estimate) -> str:
        """PASS, FAIL (beyond the threshold and beyond the noise of both sides) or NOISY (no
        regression seen, but the noise is too wide to have seen one of the threshold's size)."""
        change = self.change(baseline.value, current.value)
        sigma = self.sigma(baseline, current)
        if change * self.worse > self.threshold and change * self.worse > noise.Z * sigma:
            return FAIL
        if noise.Z * sigma > self.threshold:
            return NOISY
        return PASS

    def sigma(self, baseline: noise.Estimate, current: noise.Estimate) -> float:
        """The standard error of ``change``, in its unit (percent or the metric's)."""
        if self.percent:
            return math.hypot(baseline.error, current.error) * 100.0
        return math.hypot(baseline.error * baseline.value, current.error * current.value)

    def fails(self, baseline: noise.Estimate, current: noise.Estimate) -> bool:
        """A regression: beyond the threshold and beyond the noise of both sides."""
        return self.judge(baseline, current) == FAIL


def parse_checks(texts: Iterable[str] | None) -> list[Check]:
    """The checks given on the command line, or the defaults when none were."""
    return [Check.parse(text) for text in (texts or DEFAULT_CHECKS)]


@dataclass
class _Cell:
    key: tuple[str, ...]
    label: str
    status: str
    throttled: bool
    ok: pd.DataFrame  # the ok repeats
    contended: bool = False  # others used the run's cores while a process of it ran


@dataclass
class _Side:
    """One side of the comparison: its cells and, per metric, their estimates and the band."""

    cells: dict[tuple[str, ...], _Cell]
    _estimates: dict[str, tuple[dict[tuple[str, ...], noise.Estimate], noise.Band]] = field(
        default_factory=dict)

    def _of(self, metric: str) -> tuple[dict[tuple[str, ...], noise.Estimate], noise.Band]:
        if metric not in self._estimates:
            self._estimates[metric] = noise.cell_estimates(
                {key: cell.ok.to_dict("records") for key, cell in self.cells.items()}, metric)
        return self._estimates[metric]

    def band(self, metric: str) -> noise.Band:
        return self._of(metric)[1]

    def estimate(self, cell: _Cell, metric: str) -> noise.Estimate | None:
        """The cell's value and noise for ``metric``; None when no ok process measured it."""
        return self._of(metric)[0].get(cell.key)

    def lost(self, cell: _Cell, metric: str) -> bool:
        """Some ok process of the cell has no finite value for ``metric``."""
        return metric not in cell.ok or len(noise.finite(cell.ok[metric])) < len(cell.ok)


@dataclass
class Finding:
    """One line of the verdict: what was compared and whether it passes, warns or fails."""

    cell: str
    what: str
    verdict: str  # "pass" | "warn" | "FAIL"
    detail: str


@dataclass
class _Row:
    cell: _Cell | None
    base: _Cell | None
    cells: dict[str, str] = field(default_factory=dict)  # column -> table text
    verdicts: dict[str, str] = field(default_factory=dict)  # check -> its verdict
    result: str = PASS


# ---------------------------------------------------------------------------------- loading


def _canon(value: Any, column: str = "") -> str:
    """A key value as a comparable string: 64.0 == 64 == "64", True == "True", NaN == ""."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        text = ""
    elif isinstance(value, (bool, np.bool_)):
        text = "true" if value else "false"
    elif isinstance(value, (float, np.floating)):
        number = float(value)
        text = str(int(number)) if number.is_integer() else repr(number)
    else:
        text = str(value).strip()
        if text.lower() in ("true", "false"):
            text = text.lower()
        else:
            try:  # "64.0" in a hand-written CSV is still 64
                number = float(text)
                text = str(int(number)) if number.is_integer() else text
            except ValueError:
                pass
    return text or _KEY_DEFAULTS.get(column, "")




def _validate_baseline(frame: pd.DataFrame, checks: Sequence[Check], source: Path) -> None:
    """A baseline is the reference: an infinite value, or an ok cell without the measurements
    every ok cell has, means the file is damaged (bad input), not that nothing can be checked."""
    ok = frame[frame["status"] == "ok"]
    for column in dict.fromkeys([*(c.metric for c in checks), *_ALWAYS]):
        if column not in ok:
            continue
        values = pd.to_numeric(ok[column], errors="coerce")
        bad = values.map(lambda v: math.isinf(v)) | (values.isna() & (column in _ALWAYS))
        if bad.any():
            row = frame.attrs["lines"][frame.index.get_loc(bad.idxmax())] \
                if "lines" in frame.attrs else int(bad.idxmax()) + 2  # after the header
            raise BadInput(f"{source}: line {row}: ok cell with {column}="
                           f"{ok[column][bad].iloc[0]}; a baseline needs finite measurements")


def _load(source: Path | str, checks: Sequence[Check]) -> pd.DataFrame:
    """results.csv of a run dir or a CSV (store's one reader), with the columns the gate reads."""
    frame = store.load_results(source)
    needed = [*KEY, "status", "device_name"]
    for check in checks:
        needed.append(check.metric)
    missing = [c for c in dict.fromkeys(needed) if c not in frame.columns]
    if missing:
        raise BadInput(f"{source}: missing column(s) {', '.join(missing)}")
    # store.load_results has refused unknown statuses and text where numbers belong.
    frame["device_name"] = frame["device_name"].map(lambda v: _canon(v) or "unknown device")
    return frame


def _label(key: dict[str, str]) -> str:
    parts = [key["model"], key["precision"], f"b={key['batch_size']}"]
    if key["seq_len"]:
        parts.append(f"seq={key['seq_len']}")
    if key["image_size"]:
        parts.append(f"img={key['image_size']}")
    if key["grad_accum"] != "1":
        parts.append(f"ga={key['grad_accum']}")
    if key["compile"] == "true":
        parts.append("compile")
    if key["world_size"] != "1":
        parts.append(f"ws={key['world_size']}")
    return " ".join(parts)


def _cells(frame: pd.DataFrame, with_device: bool) -> dict[tuple[str, ...], _Cell]:
    columns = [*KEY, "device_name"] if with_device else list(KEY)
    if frame.empty:
        return {}
    keys = frame[columns].apply(lambda row: tuple(_canon(row[c], c) for c in columns), axis=1)
    cells: dict[tuple[str, ...], _Cell] = {}
    for key, rows in frame.groupby(keys, sort=True):
        statuses = list(rows["status"])
        # The worst repeat speaks for the cell: one OOM among repeats is still an OOM.
        status = next((s for s in store.FAILED if s in statuses), "ok")
        throttled = "throttled" in rows and any(store.truthy(v) for v in rows["throttled"])
        label = _label(dict(zip(columns, key, strict=True)))
        if with_device and len(set(frame["device_name"])) > 1:
            label += f" [{key[-1]}]"
        ok = rows[rows["status"] == "ok"]
        contended = "others_cpu_pct" in ok and any(map(contention.contended, ok["others_cpu_pct"]))
        cells[key] = _Cell(key, label, status, throttled, ok, contended)
    return cells


def _parity_path(source: Path) -> Path | None:
    if source.is_dir():
        path = source / PARITY
    elif source.name == store.RESULTS:
        path = source.parent / PARITY
    else:
        path = source.with_name(f"{source.stem}.parity.csv")
    return path if path.exists() else None


def _parity(source: Path) -> dict[tuple[str, str], str] | None:
    """(model, precision) -> worst verdict over seeds, or None when the side has no parity CSV."""
    path = _parity_path(source)
    if path is None:
        return None
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise BadInput(f"{path}: not a readable CSV ({reason})") from None
    missing = [c for c in ("model", "precision", "verdict") if c not in frame.columns]
    if missing:
        raise BadInput(f"{path}: missing column(s) {', '.join(missing)}")
    verdicts: dict[tuple[str, str], str] = {}
    for (model, precision), rows in frame.groupby(["model", "precision"]):
        seen = {str(v).strip().upper() for v in rows["verdict"].dropna()}
        unknown = seen - set(parity.VERDICTS) - {""}
        if unknown:
            raise BadInput(f"{path}: unknown verdict '{sorted(unknown)[0]}' "
                           f"(valid: {', '.join(parity.VERDICTS)})")
        worst = parity.worst_verdict(seen)
        if worst:  # the FP32 reference rows may carry no verdict
            verdicts[(str(model), str(precision))] = worst
    return verdicts


# ------------------------------------------------------------------------------- comparing


@dataclass
class Outcome:
    """Everything the gate decided: the per-cell table, the findings, and the exit code."""

    checks: list[Check]
    rows: list[_Row]
    findings: list[Finding]
    parity: list[tuple[str, str, str, str, str]]
    bands: tuple[noise.Band, noise.Band] = (noise.Band(None, noise.NONE),) * 2
    fail_on_noisy: bool = False

    @property
    def failed(self) -> bool:
        bad = {FAIL, NOISY} if self.fail_on_noisy else {FAIL}
        return any(f.verdict in bad for f in self.findings)


def _fmt_change(check: Check, change: float) -> str:
    return f"{change:+.1f}%" if check.percent else f"{change:+.3g}"


def _fmt_estimate(est: noise.Estimate) -> str:
    width = f"±{noise.Z * est.error * 100:.1f}%" if math.isfinite(est.error) else \
        "noise unknown"
    return f"{est.value:.4g} {width} (n={est.n}, {est.source})"


def _compare_metric(check: Check, base: tuple[_Side, _Cell], cur: tuple[_Side, _Cell],
                    fail_on_throttled: bool, findings: list[Finding]) -> tuple[str, str]:
    """(table text, verdict) for one check on one matched cell."""
    (base_side, base_cell), (cur_side, cur_cell) = base, cur
    metric = check.metric
    b, c = base_side.estimate(base_cell, metric), cur_side.estimate(cur_cell, metric)
    if b is None and c is None and metric in _FALLBACK:
        metric = _FALLBACK[metric]
        b, c = base_side.estimate(base_cell, metric), cur_side.estimate(cur_cell, metric)
    if b is None:
        return "n/a", PASS  # the baseline never measured it (no NVML: no joules)
    if c is None or cur_side.lost(cur_cell, metric):
        findings.append(Finding(cur_cell.label, metric, FAIL,
                                f"{metric}: the baseline measured it, the current run has no "
                                f"finite value (lost)"))
        return "lost FAIL", FAIL
    b, c = noise.shared(b, c)
    change = check.change(b.value, c.value)
    width = noise.Z * check.sigma(b, c)
    text = f"{_fmt_change(check, change)} ±{width:.1f}" if math.isfinite(width) else \
        _fmt_change(check, change)
    if metric != check.metric:
        text += f" ({metric})"
    detail = (f"{metric} {_fmt_change(check, change)} (baseline {_fmt_estimate(b)}, current "
              f"{_fmt_estimate(c)}; limit {check})")
    verdict = check.judge(b, c)
    if verdict == PASS:
        return text, PASS
    if verdict == NOISY:
        findings.append(Finding(cur_cell.label, metric, NOISY,
                                f"{detail}; the noise ({text.partition(' ')[2] or 'unknown'}) "
                                f"is wider than the threshold: cannot judge"))
        return f"{text} too noisy", NOISY
    if (base_cell.throttled or cur_cell.throttled) and not fail_on_throttled:
        findings.append(Finding(cur_cell.label, metric, WARN, f"{detail}; throttled, not failed"))
        return f"{text} throttled", WARN
    if base_cell.contended or cur_cell.contended:
        findings.append(Finding(cur_cell.label, metric, WARN,
                                f"{detail}; other processes used the cores while it ran "
                                f"(contended), not failed: rerun it on an idle machine"))
        return f"{text} contended", WARN
    findings.append(Finding(cur_cell.label, metric, FAIL, detail))
    return f"{text} FAIL", FAIL


def _worst(*verdicts: str) -> str:
    return next((v for v in (FAIL, WARN, NOISY) if v in verdicts), PASS)


def compare(baseline: pd.DataFrame, current: pd.DataFrame, checks: Sequence[Check], *,
            with_device: bool = True, fail_on_throttled: bool = False,
            fail_on_noisy: bool = False,
            parity: tuple[dict | None, dict | None] = (None, None)) -> Outcome:
    """Match cells of two results frames and apply the checks; nothing is printed."""
    base_side = _Side(_cells(baseline, with_device))
    cur_side = _Side(_cells(current, with_device))
    base_cells, cur_cells = base_side.cells, cur_side.cells
    findings: list[Finding] = []
    rows: list[_Row] = []
    for key in sorted(set(base_cells) | set(cur_cells)):
        base, cur = base_cells.get(key), cur_cells.get(key)
        row = _Row(cur, base)
        rows.append(row)
        if cur is None:
            assert base is not None
            verdict = FAIL if base.status == "ok" else WARN
            row.cells["status"] = f"{base.status} -> missing"
            row.result = verdict
            findings.append(Finding(base.label, "cell", verdict,
                                    f"in the baseline ({base.status}) but not in the current run"))
            continue
        if base is None:
            row.cells["status"] = f"new ({cur.status})"
            continue
        row.cells["status"] = (base.status if base.status == cur.status
                               else f"{base.status} -> {cur.status}")
        if base.throttled or cur.throttled:
            side = "both" if base.throttled and cur.throttled else (
                "baseline" if base.throttled else "current")
            row.cells["status"] += f" (throttled: {side})"
        if base.contended or cur.contended:
            side = "both" if base.contended and cur.contended else (
                "baseline" if base.contended else "current")
            row.cells["status"] += f" (contended: {side})"
        if base.status == "ok" and cur.status != "ok":
            verdict = FAIL if cur.status in _FAILED_STATUS else WARN
            findings.append(Finding(cur.label, "status", verdict,
                                    f"status ok -> {cur.status}"))
            row.result = verdict
            continue
        if base.status != "ok" or cur.status != "ok":
            continue  # nothing measured on one side: no metric to compare
        verdicts = []
        for check in checks:
            text, verdict = _compare_metric(check, (base_side, base), (cur_side, cur),
                                            fail_on_throttled, findings)
            row.cells[str(check)] = text
            row.verdicts[str(check)] = verdict if text != "n/a" else "n/a"
            verdicts.append(verdict)
        row.result = _worst(*verdicts)
    metric = checks[0].metric if checks else "samples_per_s"
    return Outcome(list(checks), rows, findings, _compare_parity(*parity, findings),
                   (base_side.band(metric), cur_side.band(metric)), fail_on_noisy)


def _compare_parity(base: dict | None, cur: dict | None,
                    findings: list[Finding]) -> list[tuple[str, str, str, str, str]]:
    if base is None and cur is None:
        return []
    if cur is None:
        findings.append(Finding("parity", "parity", WARN,
                                "the baseline has parity verdicts but the current run has none"))
    table = []
    for model, precision in sorted(set(base or {}) | set(cur or {})):
        b = (base or {}).get((model, precision), "-")
        c = (cur or {}).get((model, precision), "-")
        label = f"{model} {precision}"
        if b == c or cur is None:
            verdict = PASS
        elif b == "PASS" and c == "FAIL":
            verdict = FAIL
            findings.append(Finding(label, "parity", FAIL, "parity PASS -> FAIL"))
        elif c in ("FAIL", "INCONCLUSIVE", "-"):
            verdict = WARN
            findings.append(Finding(label, "parity", WARN, f"parity {b} -> {c}"))
        else:
            verdict = PASS  # an improvement
        table.append((model, precision, b, c, verdict))
    return table


# ------------------------------------------------------------------------------- reporting


def render(outcome: Outcome, tablefmt: str = "simple") -> str:
    """The per-cell table, the parity table and the findings, as text in ``tablefmt``."""
    columns = ["status", *(str(c) for c in outcome.checks)]
    table = []
    for row in outcome.rows:
        cell = row.cell or row.base
        assert cell is not None
        table.append([cell.label, *(row.cells.get(c, "") for c in columns), row.result])
    parts = [tabulate(table, headers=["cell", *columns, "result"], tablefmt=tablefmt)]
    if outcome.parity:
        parts.append(tabulate(outcome.parity, tablefmt=tablefmt,
                              headers=["model", "precision", "baseline", "current", "result"]))
    return "\n\n".join(parts)


def _summary_line(outcome: Outcome) -> str:
    num_fail = sum(f.verdict == FAIL for f in outcome.findings)
    num_warn = sum(f.verdict == WARN for f in outcome.findings)
    num_noisy = sum(f.verdict == NOISY for f in outcome.findings)
    verdict = "FAIL" if outcome.failed else "PASS"
    return (f"gate {verdict}: {len(outcome.rows)} cell(s), {num_fail} regression(s), "
            f"{num_warn} warning(s), {num_noisy} check(s) too noisy to judge")


def _noise_lines(outcome: Outcome) -> list[str]:
    """Which band each side used, and what a too-noisy check needs."""
    lines = [f"noise, {side}: {noise.describe(band)}"
             for side, band in zip(("baseline", "current"), outcome.bands, strict=True)]
    if any(f.verdict == NOISY for f in outcome.findings):
        lines.append("too noisy: more repeats on both sides (--repeats 3 or more), an idle "
                     "machine and locked clocks narrow the band; --fail-on-noisy fails on it")
    return lines


def _markdown(outcome: Outcome, baseline: str, current: str) -> str:
    lines = [f"### ampbench {_summary_line(outcome)}", "",
             f"baseline `{baseline}`, current `{current}`, checks "
             + ", ".join(f"`{c}`" for c in outcome.checks), "",
             render(outcome, "github"), "", *_noise_lines(outcome), ""]
    for f in outcome.findings:
        lines.append(f"- **{f.verdict}** {f.cell}: {f.detail}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- CLI




def _single_device(frame: pd.DataFrame, source: Path | str) -> str:
    names = sorted(set(frame["device_name"]))
    if len(names) != 1:
        raise BadInput(f"{source}: rows from {len(names)} devices ({', '.join(names)}); "
                       f"a baseline covers one device")
    return names[0]




def baseline_for(current: Path | str, baselines: Path = BASELINES) -> Path:
    """Where the baseline for the current run's device lives (it may not exist yet)."""
    frame = store.load_results(current)
    if "device_name" not in frame.columns:
        raise BadInput(f"{current}: missing column(s) device_name")
    names = frame["device_name"].map(lambda v: _canon(v) or "unknown device")
    return baselines / f"{store.device_slug(_single_device(names.to_frame(), current))}.csv"


def judge_runs(baseline: Path, current: Path, checks: Sequence[Check], *,
               allow_device_mismatch: bool = False, fail_on_throttled: bool = False,
               fail_on_noisy: bool = False) -> Outcome:
    """Load both sides (run directories or CSVs), refuse bad input, and compare them."""
    base_frame = _load(baseline, checks)
    if base_frame.empty:
        raise BadInput(f"baseline {baseline} has no rows")
    _validate_baseline(base_frame, checks, baseline)
    cur_frame = _load(current, checks)
    base_devices = set(base_frame["device_name"])
    cur_devices = set(cur_frame["device_name"])
    if not cur_devices <= base_devices and not allow_device_mismatch:
        raise BadInput(f"baseline {baseline} is from {', '.join(sorted(base_devices))} but the "
                       f"current run is from {', '.join(sorted(cur_devices))}; gate against "
                       f"that device's baseline or pass --allow-device-mismatch")
    return compare(base_frame, cur_frame, checks, with_device=not allow_device_mismatch,
                   fail_on_throttled=fail_on_throttled, fail_on_noisy=fail_on_noisy,
                   parity=(_parity(baseline), _parity(current)))


def main(args: argparse.Namespace) -> int:
    """``ampbench gate``: exit 0 pass, 1 regression (bad input raises BadInput -> 2)."""
    checks = parse_checks(args.check)
    current = Path(args.current) if args.current else store.latest_run()
    if args.baseline:
        baseline = Path(args.baseline)
    else:
        baseline = baseline_for(current)
        if not baseline.exists():
            raise BadInput(f"no baseline {baseline} for this device; promote one with "
                           f"`python -m bench baseline RUN_DIR` or pass --baseline")
    outcome = judge_runs(baseline, current, checks,
                         allow_device_mismatch=args.allow_device_mismatch,
                         fail_on_throttled=args.fail_on_throttled,
                         fail_on_noisy=args.fail_on_noisy)
    print(f"baseline {baseline}  current {current}  checks {' '.join(map(str, checks))}")
    print(render(outcome))
    for f in outcome.findings:
        print(f"{f.verdict:4}  {f.cell}: {f.detail}")
    print("\n".join(_noise_lines(outcome)))
    print(_summary_line(outcome))
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(_markdown(outcome, str(baseline), str(current)))
    return 1 if outcome.failed else 0


def promote(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Copy a run's results (and parity verdicts) to a baseline CSV; returns its path."""
    if out:
        paths.output_file(out, "--out", make_parents=True)
    frame = store.load_results(run_dir)
    if "device_name" not in frame.columns:
        raise BadInput(f"{run_dir}: missing column(s) device_name")
    device = _single_device(
        frame["device_name"].map(lambda v: _canon(v) or "unknown device").to_frame(), run_dir)
    if not (frame["status"] == "ok").any():
        raise BadInput(f"{run_dir}: no cell with status ok; nothing worth a baseline")
    path = paths.output_file(out or BASELINES / f"{store.device_slug(device)}.csv", "--out",
                             make_parents=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # never left behind, whatever failed
    # The parity sibling travels with the CSV; a stale one from an older baseline must not stay.
    sibling = path.with_name(f"{path.stem}.parity.csv")
    source_parity = _parity_path(Path(run_dir))
    if source_parity is not None:
        shutil.copyfile(source_parity, sibling)
    elif sibling.exists():
        sibling.unlink()
    for column, why in (("git_dirty", "uncommitted changes"), ("throttled", "throttled cells")):
        if column in frame and any(store.truthy(v) for v in frame[column]):
            print(f"warning: {run_dir} has {why}; promoted anyway", file=sys.stderr)
    return path


def promote_main(args: argparse.Namespace) -> int:
    """``ampbench baseline RUN_DIR``: promote a run to this device's baseline."""
    path = promote(args.run_dir, args.out)
    parity = path.with_name(f"{path.stem}.parity.csv")
    print(f"promoted {args.run_dir} to {path}" + (f" (+ {parity})" if parity.exists() else ""))
    return 0
