"""The report's numerics health table, next to the parity verdicts on the first screen: per model
and policy, the optimizer steps the loss scaler skipped (their share), the non-finite losses and
gradients, and the loss scale's final value and range, summed over the policy's benchmark
cells; a cell the gate fails on its numerics (bench/analysis/numerics.py, the one rule) is
named. torch-free."""

from __future__ import annotations

from collections.abc import Sequence

from tabulate import tabulate

from bench.analysis import numerics
from bench.analysis.numerics import Health
from bench.report.loading import Run, _ordered
from bench.report.notes import _label
from bench.report.view import _model


def _total(policy: str, healths: Sequence[Health]) -> Health:
    """One Health over several cells (their batch sizes): counts summed, the scale's range
    widened."""

    def total(values: list[int | None]) -> int | None:
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    mins = [h.scale_min for h in healths if h.scale_min is not None]
    maxs = [h.scale_max for h in healths if h.scale_max is not None]
    return Health(
        policy=policy,
        steps=total([h.steps for h in healths]),
        skipped=total([h.skipped for h in healths]),
        nonfinite_losses=total([h.nonfinite_losses for h in healths]),
        nonfinite_grad_steps=total([h.nonfinite_grad_steps for h in healths]),
        nonfinite_params=total([h.nonfinite_params for h in healths]),
        scale_final=tuple(s for h in healths for s in h.scale_final),
        scale_min=min(mins) if mins else None,
        scale_max=max(maxs) if maxs else None,
        scale_changes=total([h.scale_changes for h in healths]),
    )


def _gradients(health: Health) -> str:
    if health.nonfinite_grad_steps is not None:
        return f"{health.nonfinite_grad_steps} step(s) (the scaler's check)" \
            if health.nonfinite_grad_steps else "none (the scaler's check)"
    if health.nonfinite_params is None:
        return ""
    if health.nonfinite_params:
        return f"yes: {health.nonfinite_params} parameter(s) non-finite at the end"
    return "none reached the weights"


def rows(run: Run) -> list[list[str]]:
    """Per model and policy with numerics recorded: skipped steps, non-finite losses and
    gradients, loss scale, and the verdict, as table cells."""
    body = []
    for name in run.cells["model"].drop_duplicates():
        model = _model(run, name)
        ok = model.cells[model.cells["status"] == "ok"]
        for policy in _ordered(ok["precision"]):
            cells = ok[ok["precision"] == policy]
            healths = [h for h in cells["numerics"] if h.nonfinite_losses is not None]
            if not healths:
                continue  # recorded before schema 8, or no ok cell
            health = _total(policy, healths)
            failing = [f"{_label(cell, model.row_keys)}: {'; '.join(problems)}"
                       for _, cell in cells.iterrows()
                       if (problems := cell["numerics"].problems())]
            if failing:
                verdict = "**FAIL** " + "; ".join(failing)
            elif policy in numerics.ABLATIONS and (health.nonfinite_losses
                                                   or health.nonfinite_params):
                verdict = "ablation: non-finite values are its finding"
            else:
                verdict = "ok"
            body.append([name, policy, health.skipped_text(),
                         f"{health.nonfinite_losses} of {health.steps}" if health.steps
                         else str(health.nonfinite_losses),
                         _gradients(health), health.scale_text() or "no scaler", verdict])
    return body


def block(run: Run) -> list[str]:
    """The table with its one-line legend; [] when no cell recorded its numerics."""
    body = rows(run)
    if not body:
        return []
    return [f"**Numerics health** (every training step of the benchmark cells, warmup "
            f"included, summed over batch sizes and processes; the gate fails a cell whose "
            f"scaler skipped more than {numerics.SKIPPED_SHARE_LIMIT:.0%} of its steps (and "
            f"more than {numerics.CALIBRATION_SKIPS}: GradScaler's first skips calibrate its "
            "scale), or that had a non-finite loss or weight under a policy that is no "
            "ablation. Without a scaler gradients are not checked per step; a non-finite one "
            "would leave the weights non-finite, which is checked once at the end.)", "",
            tabulate(body, headers=["model", "policy", "skipped optimizer steps",
                                    "non-finite losses", "non-finite gradients",
                                    "loss scale: final (range, changes)", "health"],
                     tablefmt="github", disable_numparse=True), ""]
