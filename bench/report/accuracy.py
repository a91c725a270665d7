"""The parity block of a model's section in report.md: the verdict table, time to accuracy
against FP32 (MLPerf's measure: training time until FP32's final training loss, within the
parity tolerance, is reached), where the FP32 gradients fall in FP16's range, and the loss
scale's life, with their figures. A parity task without benchmark cells gets a section of its
own. torch-free."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from tabulate import tabulate

from bench.analysis import noise
from bench.report import gradients
from bench.report.formats import fmt_int, fmt_ratio, fmt_sig, is_num
from bench.report.loading import PLOTS, Run, _ordered
from bench.report.parity_plots import GRAD_RANGE, LOSS_SCALE, plot_name, scaled_curves
from bench.report.tables import _model, _ratio, _speedup

NOT_REACHED = "not reached"


def models(run: Run) -> list[str]:
    """Every model that parity ran, or that grad_hist.csv has, in file order."""
    found: list[str] = []
    for frame in (run.parity, run.curves, run.grad_hist):
        if frame is not None:
            found += [str(m) for m in frame["model"].drop_duplicates()]
    return list(dict.fromkeys(found))


def _parity_table(run: Run, name: str) -> str | None:
    """The verdict table: per policy, verdict, eval loss against FP32's band, telemetry."""
    if run.parity is None:
        return None
    rows = run.parity[run.parity["model"] == name].set_index("precision")
    if rows.empty:
        return None
    policies = _ordered(list(rows.index))

    def row(label: str, text: Any) -> list[str]:
        return [label, *(text(rows.loc[p]) for p in policies)]

    def number(column: str, fmt: str) -> Any:
        return lambda r: format(r[column], fmt) if is_num(r[column]) else ""

    def delta(r: pd.Series) -> str:
        if not is_num(r["delta"]):
            return ""
        text = f"{r['delta']:+.3g}" if r["delta"] else "0"
        return text + (f" (±{r['tolerance']:.3g})" if is_num(r["tolerance"]) else "")

    seeds = sorted({int(s) for s in rows["seeds"]})
    body = [
        row("verdict", lambda r: r["verdict"] or ("reference" if r.name == "fp32" else "")),
        row(f"eval loss (mean of {'/'.join(map(str, seeds))} seeds)", number("eval_loss", ".4g")),
        row("change vs fp32 (tolerance)", delta),
        row("eval accuracy", lambda r: f"{r['eval_accuracy'] * 100:.1f}%"
            if is_num(r["eval_accuracy"]) else ""),
        row("non-finite steps", lambda r: fmt_int(r["nonfinite_steps"])),
    ]
    if rows["optimal_loss"].notna().any():  # a source whose entropy rate is known exactly
        body.insert(2, row("achievable optimum (entropy rate)", number("optimal_loss", ".4g")))
    if rows["scaler_skipped_steps"].notna().any():
        body.append(row("loss-scaler skipped steps", lambda r: fmt_int(r["scaler_skipped_steps"])))
    if rows["underflow_frac"].notna().any():
        # Measured on FP32 gradients: what FP16 without loss scaling would flush to zero.
        body.append(row("FP32 gradients below FP16's range", lambda r: f"{r['underflow_frac']:.2%}"
                        if is_num(r["underflow_frac"]) else ""))
    if rows["crashed"].any():
        body.append(row("crashed runs (see parity.csv)", lambda r: fmt_int(r["crashed"])))
    return tabulate(body, headers=["", *policies], tablefmt="github", disable_numparse=True,
                    colalign=["left"] + ["right"] * len(policies))


# ------------------------------------------------------------------------------ time to accuracy


def _seed_estimates(run: Run, column: str) -> dict[tuple[str, str], noise.Estimate]:
    """Per (model, policy): the median over its seeds of ``column`` with its noise, the seeds
    being the repeats (bench/analysis/noise.py: own spread, guarded by the parity run's band)."""
    runs = run.parity_runs
    if runs is None:
        return {}
    groups = {(str(m), str(p)): group.to_dict("records")
              for (m, p), group in runs.groupby(["model", "precision"], sort=False)}
    return noise.cell_estimates(groups, column)[0]


def _reached(rows: pd.DataFrame) -> tuple[int, int]:
    """(seeds that reached the target, seeds)."""
    return int(rows["time_to_target_s"].notna().sum()), len(rows)


def _of_seeds(reached: int, seeds: int) -> str:
    return "" if reached == seeds else f" ({reached} of {seeds} seeds)"


def _bench_speedup(run: Run, name: str, policy: str) -> str:
    """The benchmark's throughput speedup over fp32 of ``policy`` at the largest batch where
    both ran ok, or '' without such cells."""
    if policy == "fp32":
        return "reference"
    model = _model(run, name)
    found = []
    for _, cell in model.cells.iterrows():
        if cell["precision"] == policy and cell["status"] == "ok":
            ratio = _speedup(model, cell, "fp32")
            if ratio is not None:
                found.append((int(cell["batch_size"]), ratio))
    if not found:
        return ""
    batch, ratio = max(found, key=lambda item: item[0])
    return f"{fmt_ratio(ratio)} (batch {batch})"


@dataclass(frozen=True)
class _Timing:
    """One model's parity timing, read per policy: each method is a row of the time table."""

    name: str
    by_policy: dict[str, pd.DataFrame]  # its parity.csv rows, one per seed
    step: dict[tuple[str, str], noise.Estimate]  # (model, policy) -> median step time, ms
    tta: dict[tuple[str, str], noise.Estimate]  # (model, policy) -> median time to target, s

    def step_ms(self, policy: str) -> str:
        est = self.step.get((self.name, policy))
        return fmt_sig(est.value) if est else ""

    def step_speedup(self, policy: str) -> str:
        if policy == "fp32":
            return "reference"
        est, fp32 = self.step.get((self.name, policy)), self.step.get((self.name, "fp32"))
        if est is None or fp32 is None:
            return ""
        return fmt_ratio(fp32.ratio(est))

    def median_steps(self, policy: str) -> float:
        values = (self.by_policy[policy]["steps_to_target"].dropna()
                  if policy in self.by_policy else ())
        return float(values.median()) if len(values) else math.nan

    def steps(self, policy: str) -> str:
        group, median = self.by_policy[policy], self.median_steps(policy)
        if math.isnan(median):
            return NOT_REACHED
        text = f"{median:g}"
        ratio = _ratio(median, self.median_steps("fp32"))
        if policy != "fp32" and ratio is not None:
            text += f" ({ratio:.2f}x)"
        return text + _of_seeds(int(group["steps_to_target"].notna().sum()), len(group))

    def seconds(self, policy: str) -> str:
        est = self.tta.get((self.name, policy))
        if est is None:
            return NOT_REACHED
        return f"{fmt_sig(est.value)}{_of_seeds(*_reached(self.by_policy[policy]))}"

    def tta_speedup(self, policy: str) -> str:
        if policy == "fp32":
            return "reference"
        est, fp32 = self.tta.get((self.name, policy)), self.tta.get((self.name, "fp32"))
        if est is None:
            return NOT_REACHED
        if fp32 is None:
            return "n/a (fp32 not reached)"
        return fmt_ratio(fp32.ratio(est))


def time_table(run: Run, name: str) -> str | None:
    """Per policy: step time, its speedup over fp32, steps and time to the target and the
    time-to-accuracy speedup, next to the benchmark's throughput speedup; None
    when parity.csv has no timing for ``name``."""
    runs = run.parity_runs
    if runs is None:
        return None
    rows = runs[runs["model"] == name]
    if rows.empty or rows[["step_time_ms", "time_to_target_s"]].isna().all().all():
        return None
    policies = _ordered(rows["precision"])
    timing = _Timing(name, {p: rows[rows["precision"] == p] for p in policies},
                     _seed_estimates(run, "step_time_ms"), _seed_estimates(run, "time_to_target_s"))

    def row(label: str, text: Any) -> list[str]:
        return [label, *(text(p) for p in policies)]

    body = [
        row("median step time, ms", timing.step_ms),
        row("step-time speedup over fp32", timing.step_speedup),
        row("steps to the target (x fp32's)", timing.steps),
        row("time to the target, s", timing.seconds),
        row("time-to-accuracy speedup over fp32", timing.tta_speedup),
    ]
    if len(_model(run, name).cells):
        body.append(row("benchmark throughput speedup", lambda p: _bench_speedup(run, name, p)))
    return tabulate(body, headers=["", *policies], tablefmt="github", disable_numparse=True,
                    colalign=["left"] + ["right"] * len(policies))


_TIME_NOTE = (
    "Training time counts the timed training steps only (probes and evaluation excluded); the "
    "target is FP32's mean final training loss plus the parity tolerance, never below its worst "
    "seed's, so that every FP32 run reaches it. Medians over seeds, ± across seeds "
    f"({noise.Z:g} standard errors), bold beyond it. A policy faster per step that needs more "
    "steps gains less in time to accuracy than in step time.")


# ------------------------------------------------------------------------------ the block


def _figure(title: str, name: str, plots: Sequence[str]) -> list[str]:
    return [f"![{title}]({PLOTS}/{name}.png)", ""] if name in plots else []


def block(run: Run, name: str, plots: Sequence[str] = ()) -> list[str]:
    """The parity lines of ``name``'s section ([] when parity has nothing on it)."""
    lines: list[str] = []
    table = _parity_table(run, name)
    if table:
        lines += ["**Accuracy parity** (final eval loss against the FP32 seed band)", "",
                  table, ""]
    times = time_table(run, name)
    if times:
        lines += ["**Time to accuracy** (to FP32's final training loss, within the parity "
                  "tolerance)", "", times, "", _TIME_NOTE, ""]
    shares = [s for s in gradients.shares(run, name) if s.nonzero]
    if shares:
        steps = sorted({step for s in shares for step in s.steps})
        lines += [f"**Gradients in FP16's range** (FP32 reference, steps "
                  f"{', '.join(map(str, steps))}; shares of the non-zero elements): "
                  + "; ".join(gradients.describe(s) for s in shares) + ".", ""]
        lines += _figure(f"{name}: FP32 gradients against FP16's range",
                         plot_name(GRAD_RANGE, name), plots)
    if not scaled_curves(run.curves, name).empty:
        skipped = run.curves.loc[(run.curves["model"] == name), "skipped"]  # type: ignore[index]
        text = "**Loss scale over training** (GradScaler's scale per seed"
        text += f"; {int(skipped.sum())} skipped steps in all)" if skipped.notna().any() else ")"
        lines += [text, ""]
        lines += _figure(f"{name}: loss scale over training", plot_name(LOSS_SCALE, name),
                         plots)
    return lines
