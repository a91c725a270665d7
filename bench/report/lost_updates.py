"""The parity figure and line that show why bf16 weights stall at a small learning rate: the
share of non-zero AdamW updates that left their weight unchanged, by step and policy
(``lost_frac`` of parity_curves.csv, bench/parity/updates.py). Drawn for a parity model where
some policy loses at least ``SHOWN_FROM`` of its updates. torch-free."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from bench.report.figures import plot_name
from bench.report.loading import PLOTS, Run, _ordered

if TYPE_CHECKING:
    from bench.report.figures import Plotter

LOST_UPDATES = "lost_updates"
SHOWN_FROM = 0.01  # below this every policy applies its updates: nothing to show
NOTE = ("Under round-to-nearest (bf16-pure) such updates are lost for good: each is below half "
        "a bf16 spacing of its weight. Stochastic rounding (bf16-pure-sr) moves each weight up "
        "with a probability in proportion to its update, so nothing is lost on average; Kahan "
        "summation (bf16-pure-kahan) keeps the unapplied part in its compensation buffer until "
        "it moves the weight. FP32 weights (fp32, and bf16 autocast's FP32 masters) lose "
        "almost none.")


def shares(run: Run, model: str) -> pd.DataFrame:
    """The model's lost shares, the mean over seeds per (policy, step); empty when no policy
    reaches SHOWN_FROM (or the curves predate the column)."""
    curves = run.curves
    if curves is None or "lost_frac" not in curves:
        return pd.DataFrame()
    rows = curves[(curves["model"] == model) & curves["lost_frac"].notna()]
    if rows.empty or rows["lost_frac"].max() < SHOWN_FROM:
        return pd.DataFrame()
    return rows.groupby(["precision", "step"], as_index=False)["lost_frac"].mean()


def plot(plotter: Plotter, model: str) -> list[Path]:
    """``lost_updates-<model>``: the share of updates lost by step, a line per policy."""
    import seaborn as sns
    from matplotlib.ticker import PercentFormatter


    mean = shares(plotter.run, model)
    if mean.empty:
        return []
    policies = _ordered(mean["precision"])
    fig, axes = plotter.figure(1, f"{model}: updates lost to rounding", width=6.4, height=3.4)
    ax = axes[0]
    for policy in policies:
        colour = plotter.colours[policy]
        sns.lineplot(data=mean[mean["precision"] == policy], x="step", y="lost_frac",
                     color=colour, marker=plotter.markers[policy], mfc="none", mec=colour,
                     mew=1.4, markersize=5, lw=1.4, errorbar=None, legend=False, ax=ax)
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("training step")
    ax.set_ylabel("non-zero updates that left\nthe weight unchanged (mean of seeds)")
    plotter.legend(fig, policies)
    return plotter.save(fig, plot_name(LOST_UPDATES, model))


def block(run: Run, model: str, plots: Sequence[str] = ()) -> list[str]:
    """The report's lines on lost updates for ``model`` ([] when nothing is lost)."""

    mean = shares(run, model)
    if mean.empty:
        return []
    overall = mean.groupby("precision")["lost_frac"].mean()
    text = "; ".join(f"{p} {overall[p]:.1%}" for p in _ordered(mean["precision"]))
    lines = [f"**Updates lost to rounding** (share of the non-zero AdamW updates that left "
             f"their weight unchanged, at the last step of every curve window, mean over steps "
             f"and seeds): {text}. {NOTE}", ""]
    name = plot_name(LOST_UPDATES, model)
    if name in plots:
        lines += [f"![{model}: updates lost to rounding]({PLOTS}/{name}.png)", ""]
    return lines
