"""parity.csv: its columns, the row of a run that failed, and the verdicts judged from its rows.

Per (model, policy), on the mean final eval loss over seeds: ``delta = mean(policy) -
mean(fp32)``, ``tolerance = max(ABS_FLOOR, K_SIGMA * fp32_std)``; FAIL on any non-finite loss
or ``|delta| > tolerance``, INCONCLUSIVE when FP32's band is too wide or runs are missing, PASS
otherwise (the rules in full: bench/parity/__init__.py). torch-free: the parent side judges
from the rows its children wrote, and the report and the gate read the verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench import BadInput

ABS_FLOOR = 0.03  # nats: eval-loss differences below this are never a failure
K_SIGMA = 3.0  # band half-width in FP32 seed-to-seed standard deviations
MAX_BAND_FRACTION = 0.10  # fp32_std above this fraction of the FP32 improvement: INCONCLUSIVE

COLUMNS = (
    "model", "precision", "seed", "steps", "eval_loss", "eval_accuracy", "optimal_loss",
    "steps_to_target", "time_to_target_s", "nonfinite_steps", "scaler_skipped_steps",
    "underflow_frac", "subnormal_frac", "fp32_mean", "fp32_std", "delta", "tolerance", "verdict",
)
EXTRA_COLUMNS = ("scaler_first_skip_step", "scaler_scale_final", "initial_eval_loss",
                 "final_train_loss", "train_time_s", "step_time_ms", "batch_size", "error",
                 "strategy", "ranks")
CURVE_COLUMNS = ("model", "precision", "seed", "step", "loss", "scale", "skipped", "time_s",
                 "lost_frac")
HIST_COLUMNS = ("model", "kind", "step", "log2_bin", "count", "zeros")
VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")
_WORST_FIRST = ("FAIL", "INCONCLUSIVE", "PASS")
_ERROR_CHARS = 300  # an error column keeps one line of at most this many characters


def failed_row(model: str, precision_name: str, seed: int, steps: int,
               error: str) -> dict[str, Any]:
    """The parity.csv row of a run that left no result (a crash, an OOM, a kill, a timeout):
    no losses, ``error`` (its last line, shortened) saying why."""
    row = dict.fromkeys(COLUMNS + EXTRA_COLUMNS)
    lines = [line for line in error.strip().splitlines() if line.strip()] or ["unknown error"]
    row.update(model=model, precision=precision_name, seed=seed, steps=steps,
               eval_loss=math.nan, error=lines[-1][:_ERROR_CHARS])
    return row


def judge(frame: Any) -> Any:
    """Fill fp32_mean, fp32_std, delta, tolerance, verdict and steps_to_target per model.

    ``frame`` has one row per (model, precision, seed) with eval_loss, nonfinite_steps,
    initial_eval_loss, final_train_loss, ``error`` (set for a run that crashed) and (for
    steps_to_target and time_to_target_s) a ``curve`` list of (step, loss, time_s) triples;
    it is returned with those columns filled.
    """
    import pandas as pd

    frame = frame.copy()
    if "error" not in frame:
        frame["error"] = None
    for col in ("fp32_mean", "fp32_std", "delta", "tolerance"):
        frame[col] = float("nan")
    frame["verdict"] = None
    for col in ("steps_to_target", "time_to_target_s"):
        frame[col] = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    crashed = frame["error"].notna()
    for model, rows in frame.groupby("model", sort=False):
        _judge_model(frame, str(model), rows, crashed)
    return frame


def _judge_model(frame: Any, model: str, rows: Any, crashed: Any) -> None:
    """Judge one model's rows of ``frame`` in place against its FP32 band."""
    ref = rows[rows["precision"] == "fp32"]
    if ref.empty:
        raise BadInput(f"parity for {model} needs fp32 runs as the reference band")
    ref = ref[~crashed[ref.index]]
    ref_loss = ref["eval_loss"].astype(float)
    fp32_mean = float(ref_loss.mean(skipna=False)) if len(ref) else math.nan
    fp32_std = float(ref_loss.std(ddof=1)) if len(ref) > 1 else math.nan
    tolerance = max(ABS_FLOOR, K_SIGMA * fp32_std) if math.isfinite(fp32_std) else math.nan
    improvement = float(ref["initial_eval_loss"].astype(float).mean()) - fp32_mean
    too_wide = (not math.isfinite(fp32_std) or not improvement > 0
                or fp32_std > MAX_BAND_FRACTION * improvement)
    target = target_loss(ref["final_train_loss"].astype(float), tolerance)
    for _, group in rows.groupby("precision", sort=False):
        ran = group[~crashed[group.index]]
        mean = float(ran["eval_loss"].astype(float).mean(skipna=False)) if len(ran) \
            else math.nan
        delta = mean - fp32_mean
        nonfinite = bool((ran["nonfinite_steps"].astype(float) > 0).any()) or (
            len(ran) > 0 and not math.isfinite(mean))
        verdict = _verdict(delta, tolerance, too_wide or len(ran) < len(group), nonfinite)
        frame.loc[group.index, ["fp32_mean", "fp32_std", "delta", "tolerance"]] = [
            fp32_mean, fp32_std, delta, tolerance]
        frame.loc[group.index, "verdict"] = verdict
        if "curve" in frame:
            for idx in ran.index:
                reached = _reached(frame.at[idx, "curve"], target)
                if reached is not None:
                    frame.at[idx, "steps_to_target"], frame.at[idx, "time_to_target_s"] = \
                        reached


def target_loss(fp32_finals: Iterable[float], tolerance: float) -> float:
    """Time to accuracy's target (see the package docstring): FP32's mean final training loss
    plus the parity tolerance, never below its worst seed's; NaN without FP32 seeds."""
    finals = [float(f) for f in fp32_finals]
    if not finals:
        return math.nan
    return max(max(finals), sum(finals) / len(finals) + tolerance)


def worst_verdict(verdicts: Iterable[str]) -> str | None:
    """The verdict that speaks for several seeds: FAIL over INCONCLUSIVE over PASS."""
    seen = set(verdicts)
    return next((v for v in _WORST_FIRST if v in seen), None)


def _verdict(delta: float, tolerance: float, cannot_judge: bool, nonfinite: bool) -> str:
    """FAIL on a non-finite loss whatever else; INCONCLUSIVE when the band or the runs do not
    allow a judgement; else PASS within the tolerance."""
    if nonfinite:
        return "FAIL"
    if cannot_judge:
        return "INCONCLUSIVE"
    return "PASS" if abs(delta) <= tolerance else "FAIL"


def _reached(curve: Sequence[tuple[int, float, float | None]],
             target: float) -> tuple[int, float | None] | None:
    """(step, training time) of the first sample whose training loss is at or below
    ``target``, else None."""
    if not math.isfinite(target):
        return None
    return next(((step, time_s) for step, loss, time_s in curve if loss <= target), None)


def summarize(frame: Any) -> str:
    """A tabulate table of verdicts: one line per (model, precision)."""
    from tabulate import tabulate

    agg = frame.groupby(["model", "precision"], sort=False).agg(
        eval_loss=("eval_loss", "mean"), eval_accuracy=("eval_accuracy", "mean"),
        optimal_loss=("optimal_loss", "first"), delta=("delta", "first"),
        tolerance=("tolerance", "first"),
        skipped=("scaler_skipped_steps", lambda s: s.sum(min_count=1)),  # empty: no scaler
        underflow_frac=("underflow_frac", "mean"), verdict=("verdict", "first"),
    ).reset_index()
    agg = agg.rename(columns={"eval_loss": "eval loss", "eval_accuracy": "accuracy",
                              "optimal_loss": "optimum", "delta": "change vs fp32",
                              "skipped": "scaler skips", "underflow_frac": "fp16 underflow"})
    # Empty, not 'nan', where a column does not apply (no optimum, no scaler).
    return tabulate(agg.astype(object).where(agg.notna(), None), headers="keys",
                    showindex=False, floatfmt=".4g", tablefmt="github", missingval="")


def verdict_table(path: Path | str) -> str:
    """parity.csv's verdicts under a title, then convergence's (bench/parity/convergence.py):
    the end of `ampbench parity` and of the parity stage of `ampbench run`."""
    import pandas as pd

    from bench.parity import convergence

    frame = pd.read_csv(path)
    converged = convergence.summary(frame)
    return ("Accuracy parity against fp32 (means over seeds; PASS within tolerance):\n"
            + summarize(frame) + (f"\n\n{converged}" if converged else ""))
