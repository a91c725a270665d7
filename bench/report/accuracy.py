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

from bench import parity
from bench.analysis import noise
from bench.parity import convergence
from bench.report import gradients, lost_updates, samples
from bench.report.formats import fmt_int, fmt_ratio, fmt_sig, is_num
from bench.report.loading import PLOTS, Run, _ordered
from bench.report.parity_plots import (
    GRAD_RANGE,
    LOSS_SCALE,
    REAL_LOSS,
    plot_name,
    scaled_curves,
)
from bench.report.tables import _compared, _ratio, _speedup
from bench.report.view import _model

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
        body.append(row("weight gradients below 2^-24 (FP32 copy; mean of every probe and seed)",
                        lambda r: f"{r['underflow_frac']:.1%}"
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


def _censored_median(values: Sequence[Any]) -> float:
    """The median over every seed, a seed that did not reach the target (None or NaN) counting
    as slower than any that did: inf when the median seed did not reach it."""
    times = sorted(float(v) if is_num(v) else math.inf for v in values)
    if not times:
        return math.nan
    middle = len(times) // 2
    return times[middle] if len(times) % 2 else (times[middle - 1] + times[middle]) / 2


def _of_seeds(group: pd.DataFrame) -> str:
    reached = int(group["steps_to_target"].notna().sum())
    return "" if reached == len(group) else f" ({reached} of {len(group)} seeds)"


def _bench_speedup(run: Run, name: str, policy: str, batch: int | None) -> str:
    """The benchmark's throughput speedup over fp32 of ``policy``: at the parity runs' batch
    where the benchmark ran it, else at the largest batch where both ran ok; '' without."""
    if policy == "fp32":
        return "reference"
    model = _model(run, name)
    cell = _compared(model, policy, batch)
    ratio = _speedup(model, cell, "fp32") if cell is not None else None
    if ratio is None:
        return ""
    return f"{fmt_ratio(ratio)} (batch {int(cell['batch_size'])})"


@dataclass(frozen=True)
class _Timing:
    """One model's parity timing, read per policy: each method is a row of the time table.
    Medians over every seed; a seed that did not reach the target counts as the slowest."""

    name: str
    by_policy: dict[str, pd.DataFrame]  # its parity.csv rows, one per seed
    step: dict[tuple[str, str], noise.Estimate]  # (model, policy) -> median step time, ms
    tta: dict[tuple[str, str], noise.Estimate]  # (model, policy) -> spread of time to target

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
        return _censored_median(list(self.by_policy[policy]["steps_to_target"]))

    def steps(self, policy: str) -> str:
        median = self.median_steps(policy)
        if not math.isfinite(median):
            return NOT_REACHED + _of_seeds(self.by_policy[policy])
        text = f"{median:g}"
        ratio = _ratio(median, self.median_steps("fp32"))
        if policy != "fp32" and ratio is not None and math.isfinite(ratio):
            text += f" ({ratio:.2f}x)"
        return text + _of_seeds(self.by_policy[policy])

    def time(self, policy: str) -> noise.Estimate | None:
        """The censored median time to the target with the seeds' spread; None if the
        median seed did not reach it."""
        value = _censored_median(list(self.by_policy[policy]["time_to_target_s"]))
        spread = self.tta.get((self.name, policy))
        if not math.isfinite(value) or spread is None:
            return None
        return noise.Estimate(value, spread.spread, len(self.by_policy[policy]), spread.source)

    def seconds(self, policy: str) -> str:
        est = self.time(policy)
        text = fmt_sig(est.value) if est is not None else NOT_REACHED
        return text + _of_seeds(self.by_policy[policy])

    def tta_speedup(self, policy: str) -> str:
        if policy == "fp32":
            return "reference"
        est, fp32 = self.time(policy), self.time("fp32")
        if est is None:
            return NOT_REACHED
        if fp32 is None:
            return "n/a (fp32 not reached)"
        return fmt_ratio(fp32.ratio(est))


def _parity_batch(rows: pd.DataFrame) -> int | None:
    sizes = rows["batch_size"].dropna() if "batch_size" in rows else ()
    return int(sizes.iloc[0]) if len(sizes) else None


def time_table(run: Run, name: str) -> str | None:
    """Per policy: step time in the parity runs, its speedup over fp32, steps and time to the
    target and the time-to-accuracy speedup, next to the benchmark's throughput speedup; None
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
    batch = _parity_batch(rows)
    at = f"batch {batch}" if batch else "parity's batch"

    def row(label: str, text: Any) -> list[str]:
        return [label, *(text(p) for p in policies)]

    body = [
        row(f"step time in the parity runs ({at}), ms", timing.step_ms),
        row("its speedup over fp32", timing.step_speedup),
        row("steps to the target (x fp32's)", timing.steps),
        row("time to the target, s", timing.seconds),
        row("time-to-accuracy speedup over fp32", timing.tta_speedup),
    ]
    if len(_model(run, name).cells):
        body.append(row("benchmark throughput speedup (its own processes)",
                        lambda p: _bench_speedup(run, name, p, batch)))
    return tabulate(body, headers=["", *policies], tablefmt="github", disable_numparse=True,
                    colalign=["left"] + ["right"] * len(policies))


def missed_target(run: Run, name: str) -> list[str]:
    """For each seed that did not reach the target: what it did instead (its final training
    loss against the target, or its crash)."""
    runs = run.parity_runs
    if runs is None or "steps_to_target" not in runs:
        return []
    rows = runs[runs["model"] == name]
    fp32 = rows[rows["precision"] == "fp32"]
    tolerance = pd.to_numeric(fp32.get("tolerance"), errors="coerce").dropna()
    target = parity.target_loss(pd.to_numeric(fp32["final_train_loss"], errors="coerce")
                                .dropna(), float(tolerance.iloc[0])) if len(tolerance) \
        else math.nan
    out = []
    for _, seed in rows[rows["steps_to_target"].isna()].iterrows():
        what = f"{seed['precision']} seed {seed['seed']}"
        if "error" in seed and isinstance(seed["error"], str) and seed["error"].strip():
            out.append(f"{what} crashed ({seed['error'].strip()[:80]})")
        elif is_num(seed["final_train_loss"]) and math.isfinite(target):
            final = float(seed["final_train_loss"])
            out.append(f"{what} ended at training loss {final:.5g}, above the target "
                       f"{target:.5g}" if final > target else
                       f"{what} did not reach the target {target:.5g} at any logged step "
                       f"(final training loss {final:.5g})")
        else:
            out.append(f"{what} did not reach the target")
    return out


_TIME_NOTE = (
    "Training time counts the timed training steps only (probes and evaluation excluded); the "
    "target is FP32's mean final training loss plus the parity tolerance, never below its worst "
    "seed's, so that every FP32 run reaches it. Medians over every seed, a seed that did not "
    "reach the target counting as slower than any that did (not reached: the median seed did "
    f"not); intervals across seeds ({noise.Z:g} standard errors, on the log scale), bold beyond "
    "them. Two measurements answer \"is it faster?\" here: the step time inside the parity "
    "runs (at their batch, during training) and the benchmark's throughput (its own processes, "
    "after warmup, at the batch shown). Where they differ beyond their intervals, the batch "
    "size or the machine's load differ between them; the benchmark's is the summary's number. "
    "A policy faster per step that needs more steps gains less in time to accuracy than in "
    "step time.")


# ------------------------------------------------------------------------------ convergence


def convergence_block(run: Run, name: str) -> list[str]:
    """MLPerf-style convergence of ``name``'s policies (bench/parity/convergence.py): the
    table, each policy's verdict line and the rule; [] without steps to the target."""
    runs = run.parity_runs
    if runs is None:
        return []
    policies = _ordered(runs.loc[runs["model"] == name, "precision"])
    results = convergence.judge(runs, name, policies)
    if not results:
        return []
    return ["**Convergence (MLPerf-style)** (steps and seconds to the time-to-accuracy target, "
            "fastest and slowest seed dropped; is each policy slower to converge than fp32?)",
            "", convergence.table(results), "",
            *(f"- {line}" for line in convergence.verdict_lines(results)), "",
            f"{convergence.NOTE} {convergence.ENERGY_NOTE}", ""]


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
        measured = samples.describe(name)  # real data: what the eval loss is measured on
        lines += [measured, ""] if measured else []
        lines += _figure(f"{name}: training loss on real data", plot_name(REAL_LOSS, name),
                         plots)
    times = time_table(run, name)
    if times:
        lines += ["**Time to accuracy** (to FP32's final training loss, within the parity "
                  "tolerance)", "", times, ""]
        missed = missed_target(run, name)
        if missed:
            lines += [f"Seeds that did not reach the target: {'; '.join(missed)}.", ""]
        lines += [_TIME_NOTE, ""]
    lines += convergence_block(run, name)
    shares = [s for s in gradients.shares(run, name) if s.nonzero]
    if shares:
        steps = sorted({step for s in shares for step in s.steps})
        lines += [f"**Gradients in FP16's range** (FP32 seed 0, steps "
                  f"{', '.join(map(str, steps))} pooled; shares of the non-zero elements; the "
                  "parity table's row averages every probe and seed instead): "
                  + "; ".join(gradients.describe(s) for s in shares) + ".", ""]
        lines += _figure(f"{name}: FP32 gradients against FP16's range",
                         plot_name(GRAD_RANGE, name), plots)
    lines += lost_updates.block(run, name, plots)
    if not scaled_curves(run.curves, name).empty:
        skipped = run.curves.loc[(run.curves["model"] == name), "skipped"]  # type: ignore[index]
        text = "**Loss scale over training** (GradScaler's scale per seed"
        text += f"; {int(skipped.sum())} skipped steps in all)" if skipped.notna().any() else ")"
        lines += [text, ""]
        lines += _figure(f"{name}: loss scale over training", plot_name(LOSS_SCALE, name),
                         plots)
    return lines
