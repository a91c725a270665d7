"""Regression gate: compare a run against a baseline and exit 1 on a regression.

Run ``python -m bench gate --baseline results/baselines/<device>.csv --current RUN_DIR``; with
neither flag (``nox -s gate``) the latest run under ``results/runs/`` is gated against this
device's baseline ``results/baselines/<device-slug>.csv``, which ``python -m bench baseline
RUN_DIR`` promotes (bench/analysis/baseline.py).

Matching. Rows are grouped into cells by store.KEY and ``device_name`` (bench/analysis/cells.py);
the repeats of a cell, and the extra processes of a calibration cell, are one cell. A baseline
from another device is refused unless ``--allow-device-mismatch`` (then the device is left out
of the key).

Checks (bench/analysis/checks.py). ``--check METRIC:[+|-]THRESHOLD[%]``, repeatable; defaults
``samples_per_s:-5% step_ms_median:+5% peak_mem_reserved_gib:+5% joules_per_sample:+5%``.
A memory check on a cell with no reserved/allocated memory (CPU) falls back to ``peak_rss_gib``;
a metric empty on either side (no NVML: no joules) is reported as n/a.

Noise rule (bench/analysis/noise.py). Each side of a cell gets a value, the median over its ``ok``
processes, and a standard error from the noise between processes: the cell's own spread (three
processes or more), the run's band (the median spread of its cells with several processes, or
of its calibration cell) and, for time-derived metrics, the cell's step spread, whichever is
largest; the same cell on the same machine has one per-process noise, so each side takes the
larger of the two sides' (a current run of one process inherits its baseline's spread). A check
fails only when the change is beyond its threshold in the bad direction AND its ``noise.Z``-sigma
interval (a ratio's, on the log scale) excludes no change. When a change of the threshold's
size would not be beyond that noise, it could not have been seen: the check is ``too noisy``
(a warning; a failure with ``--fail-on-noisy``). Unknown noise is unbounded: such a check is
too noisy.

Changed models. A model of the user's own (docs/your-model.md) carries the sha256 of its
source in every row (``model_sha256``); a cell whose hash differs between baseline and current
run is not compared at all: it FAILs as "the model changed", since no number measured on one
model says anything about another, and passing it would let a changed model go unmeasured.
Promote a new baseline for the changed model.

Other verdicts. Status ok -> oom/timeout/error fails (ok -> unsupported/skipped warns). A cell
that was ok in the baseline and is absent from the current run fails, and so does a measurement
the baseline has and the current run lost (empty, NaN, inf). A baseline holding inf, or an ok
cell without its step times or throughput, is bad input. Metric checks on a throttled cell
(either side) are reported as ``throttled``, not failed, unless ``--fail-on-throttled``; those
of a contended cell (other processes used more than 10% of the run's cores while one of its
processes ran: ``others_cpu_pct``, or held its GPU: ``num_others_on_gpu``) as ``contended``.
Parity: a run directory's ``parity.csv``, or for a baseline CSV ``X.csv`` its sibling
``X.parity.csv``; a (model, precision) whose verdict goes PASS -> FAIL fails (any FAIL among
its seeds makes the verdict FAIL); other changes and a missing side warn.

Numerics health (bench/analysis/numerics.py, ``judge_numerics``), of the current run alone: a
cell fails when its loss scaler skipped more than ``SKIPPED_SHARE_LIMIT`` (10%) of its
optimizer steps (and more than ``CALIBRATION_SKIPS``, 4: GradScaler's scale starts at 2^16 and
halves on each skip, so a few early skips are its calibration; the reference models' fp16 cells
skip 0 to 2 of 35), or when a policy that is no ablation (fp16-noscale is one) had a
non-finite loss or ended with non-finite weights. The table's ``numerics`` column says what
each cell skipped; a row without the numerics columns (an older CSV) is not judged.

Output: a table on stdout, markdown appended to ``$GITHUB_STEP_SUMMARY`` when it is set.
Exit 0 pass, 1 regression, 2 bad input. torch-free.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from bench import BadInput, store
from bench.analysis import baseline as baselines
from bench.analysis import cells, noise, numerics
from bench.analysis.cells import CellKey
from bench.analysis.checks import FAIL, FALLBACK, NOISY, PASS, WARN, Check, parse_checks
from bench.run import contention

_FAILED_STATUS = frozenset({"oom", "timeout", "error"})


@dataclass
class _Cell:
    key: CellKey
    label: str
    status: str
    throttled: bool
    ok: pd.DataFrame  # the ok repeats
    contended: bool = False  # others used the run's cores while a process of it ran
    # sha256 of a user's model source (store.MODEL); empty for the reference models
    model_sha256: frozenset[str] = frozenset()


@dataclass
class _Side:
    """One side of the comparison: its cells and, per metric, their estimates and the band."""

    cells: dict[CellKey, _Cell]
    _estimates: dict[str, tuple[dict[CellKey, noise.Estimate], noise.Band]] = field(
        default_factory=dict)

    def _of(self, metric: str) -> tuple[dict[CellKey, noise.Estimate], noise.Band]:
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


def _load(source: Path | str, checks: Sequence[Check]) -> pd.DataFrame:
    """results.csv of a run dir or a CSV (store's one reader), with the columns the gate reads."""
    frame = store.load_results(source, cell_noise=noise.results_columns)
    # A CSV from before schema 8 has no strategy column: its cells are ddp (cells.canonical).
    needed = [*(k for k in store.KEY if k != "strategy"), "status", "device_name",
              *(check.metric for check in checks)]
    missing = [c for c in dict.fromkeys(needed) if c not in frame.columns]
    if missing:
        raise BadInput(f"{source}: missing column(s) {', '.join(missing)}")
    if "strategy" not in frame.columns:
        frame["strategy"] = None
    # store.load_results has refused unknown statuses and text where numbers belong.
    frame["device_name"] = frame["device_name"].map(cells.device_name)
    return frame


def _cells(frame: pd.DataFrame, with_device: bool) -> dict[CellKey, _Cell]:
    """The side's cells; a max-batch run's search rows are cells too (its results)."""
    mixed = with_device and len(set(frame.get("device_name", ()))) > 1
    found: dict[CellKey, _Cell] = {}
    for key, rows in cells.group_frame(frame, with_device=with_device, searches=True).items():
        statuses = list(rows["status"])
        # The worst repeat speaks for the cell: one OOM among repeats is still an OOM.
        status = next((s for s in store.FAILED if s in statuses), "ok")
        throttled = "throttled" in rows and any(store.truthy(v) for v in rows["throttled"])
        label = cells.label(key) + (f" [{key.device_name}]" if mixed else "")
        ok = rows[rows["status"] == "ok"]
        contended = contention.contended_rows(ok)
        hashes = frozenset(str(v) for v in rows.get("model_sha256", ())
                           if isinstance(v, str) and v.strip())
        found[key] = _Cell(key, label, status, throttled, ok, contended, hashes)
    return found


def _model_changed(base: _Cell, cur: _Cell) -> str | None:
    """Why the two sides of a cell measured different models (their sources' hashes differ),
    or None when they measured the same one."""
    if base.model_sha256 == cur.model_sha256:
        return None

    def short(hashes: frozenset[str]) -> str:
        return ", ".join(sorted(h[:12] for h in hashes)) or "none"

    return (f"the model changed (source sha256 {short(base.model_sha256)} in the baseline, "
            f"{short(cur.model_sha256)} now): not comparable; promote a new baseline for it")


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


def _fmt_interval(check: Check, b: noise.Estimate, c: noise.Estimate) -> str:
    """'-12.3% [-20.1% to -3.6%]': the change with its interval, or the change alone where
    the noise is unknown."""
    text = _fmt_change(check, check.change(b.value, c.value))
    span = _fmt_noise(check, b, c)
    return text if span == "unknown" else f"{text} {span}"


def _fmt_noise(check: Check, b: noise.Estimate, c: noise.Estimate) -> str:
    """The change's interval alone ('[-20.1% to +3.6%]'), or 'unknown'."""
    low, high = check.interval(b, c)
    if not (math.isfinite(low) and math.isfinite(high)):
        return "unknown"
    return f"[{_fmt_change(check, low)} to {_fmt_change(check, high)}]"


def _fmt_estimate(est: noise.Estimate) -> str:
    if not math.isfinite(est.error):
        return f"{est.value:.4g} noise unknown (n={est.n}, {est.source})"
    return f"{est.value:.4g} [{est.low:.4g}–{est.high:.4g}] (n={est.n}, {est.source})"


def _compare_metric(check: Check, base: tuple[_Side, _Cell], cur: tuple[_Side, _Cell],
                    fail_on_throttled: bool, findings: list[Finding]) -> tuple[str, str]:
    """(table text, verdict) for one check on one matched cell."""
    (base_side, base_cell), (cur_side, cur_cell) = base, cur
    metric = check.metric
    b, c = base_side.estimate(base_cell, metric), cur_side.estimate(cur_cell, metric)
    if b is None and c is None and metric in FALLBACK:
        metric = FALLBACK[metric]
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
    text = _fmt_interval(check, b, c)
    if metric != check.metric:
        text += f" ({metric})"
    detail = (f"{metric} {_fmt_change(check, change)} (baseline {_fmt_estimate(b)}, current "
              f"{_fmt_estimate(c)}; limit {check})")
    verdict = check.judge(b, c)
    if verdict == PASS:
        return text, PASS
    if verdict == NOISY:
        findings.append(Finding(cur_cell.label, metric, NOISY,
                                f"{detail}; the noise ({_fmt_noise(check, b, c)}) could not "
                                f"show a change of the threshold's size: cannot judge"))
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
    for key in sorted(set(base_cells) | set(cur_cells), key=cells.sort_key):
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
        changed = _model_changed(base, cur)
        if changed:
            row.cells["status"] = "model changed"
            row.result = FAIL
            findings.append(Finding(cur.label, "model", FAIL, changed))
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


def judge_numerics(rows: Sequence[_Row], findings: list[Finding]) -> None:
    """The current run's own numerics (no baseline needed): each row's numerics column, and
    a FAIL finding and result for an unhealthy cell."""
    for row in rows:
        if row.cell is not None:
            row.result = _worst(row.result, _numerics_verdict(row, findings))


def _numerics_verdict(row: _Row, findings: list[Finding]) -> str:
    cell = row.cell
    if cell is None or cell.ok.empty:
        return PASS
    health = numerics.of_processes(cell.key.precision, cell.ok)
    problems = health.problems()
    text = "n/a" if health.nonfinite_losses is None else (
        f"skipped {health.skipped_text()}" if health.skipped is not None else "ok")
    row.cells["numerics"] = text + (" FAIL" if problems else "")
    for problem in problems:
        findings.append(Finding(cell.label, "numerics", FAIL, problem))
    return FAIL if problems else PASS


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
    columns = ["status", "numerics", *(str(c) for c in outcome.checks)]
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


def judge_runs(baseline: Path, current: Path, checks: Sequence[Check], *,
               allow_device_mismatch: bool = False, fail_on_throttled: bool = False,
               fail_on_noisy: bool = False) -> Outcome:
    """Load both sides (run directories or CSVs), refuse bad input, and compare them."""
    base_frame = _load(baseline, checks)
    if base_frame.empty:
        raise BadInput(f"baseline {baseline} has no rows")
    baselines.check(base_frame, [c.metric for c in checks], baseline)
    cur_frame = _load(current, checks)
    base_devices = set(base_frame["device_name"])
    cur_devices = set(cur_frame["device_name"])
    if not cur_devices <= base_devices and not allow_device_mismatch:
        raise BadInput(f"baseline {baseline} is from {', '.join(sorted(base_devices))} but the "
                       f"current run is from {', '.join(sorted(cur_devices))}; gate against "
                       f"that device's baseline or pass --allow-device-mismatch")
    outcome = compare(base_frame, cur_frame, checks, with_device=not allow_device_mismatch,
                      fail_on_throttled=fail_on_throttled, fail_on_noisy=fail_on_noisy,
                      parity=(baselines.parity_verdicts(baseline),
                              baselines.parity_verdicts(current)))
    judge_numerics(outcome.rows, outcome.findings)
    # What the reader left out (a process written twice) is said, not silently dropped.
    outcome.findings += [Finding(side, "input", WARN, problem) for side, frame in (
        ("baseline", base_frame), ("current", cur_frame)) for problem in frame.attrs.get(
        "problems", [])]
    return outcome


def main(args: argparse.Namespace) -> int:
    """``ampbench gate``: exit 0 pass, 1 regression (bad input raises BadInput -> 2)."""
    checks = parse_checks(args.check)
    current = Path(args.current) if args.current else store.latest_run()
    if args.baseline:
        baseline = Path(args.baseline)
    else:
        baseline = baselines.baseline_for(current)
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
