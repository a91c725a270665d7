"""The figures of the parity runs: the training loss per policy, a panel per parity model
(``loss_curves``), and one of each per parity model: where the FP32 gradients fall in FP16's
range before and after loss scaling (``grad_range-<model>``, the histogram of Micikevicius et
al., 2018, "Mixed Precision Training"), and the GradScaler's scale over training with its
skipped steps (``loss_scale-<model>``). torch-free."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from bench.report import gradients, lost_updates
from bench.report.figures import log_axis, plot_name
from bench.report.gradients import (
    FP16_MAX,
    FP16_NORMAL_LOG2,
    FP16_OVERFLOW_LOG2,
    FP16_TINY_LOG2,
    Shares,
)
from bench.report.loading import Run, _ordered

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from bench.report.figures import Plotter

GRAD_RANGE = "grad_range"
LOSS_SCALE = "loss_scale"
REAL_LOSS = "real_loss"  # a real-data task's loss curves with its final eval losses
_UNSCALED, _SCALED = "#7f7f7f", "#029e73"  # grey: FP32 as measured; fp16's colour: scaled
_LOST = "#d55e00"  # what FP16 loses: outside its range, skipped steps
_SEED_COLOURS = ("#0173b2", "#029e73", "#cc78bc", "#56b4e9", "#949494", "#ca9161")


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _pow2(exponent: int) -> str:
    """'2⁻²⁴': superscript digits, not mathtext (whose parser costs seconds per report)."""
    return "2" + str(exponent).translate(_SUPERSCRIPT)


def _range_panel(ax: Axes, item: Shares) -> None:
    from matplotlib.ticker import MultipleLocator, PercentFormatter

    hist = item.histogram
    shift = item.log2_scale
    ax.axvspan(-200, FP16_TINY_LOG2, color=_LOST, alpha=0.07, lw=0)
    ax.axvspan(FP16_OVERFLOW_LOG2, 200, color=_LOST, alpha=0.07, lw=0)
    ax.bar(hist.index, hist.to_numpy(), width=1.0, align="edge", color=_UNSCALED, alpha=0.55,
           label="FP32 gradients (unscaled)")
    if shift is not None and shift != 0:
        ax.stairs(hist.to_numpy(), [*(hist.index + shift), hist.index[-1] + shift + 1],
                  color=_SCALED, lw=1.8, baseline=None,
                  label=f"\u00d7 loss scale {_pow2(shift)} (fp16 runs)")
    # FP16's limits, labelled above the panel where no bar or box can cover them.
    for x, style, label in ((FP16_TINY_LOG2, "--", _pow2(FP16_TINY_LOG2)),
                            (FP16_NORMAL_LOG2, ":", _pow2(FP16_NORMAL_LOG2)),
                            (math.log2(FP16_MAX), "-", "65504")):
        ax.axvline(x, color=_LOST, ls=style, lw=1.3)
        ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8,
                    color=_LOST)
    edges = [*hist.index, hist.index[-1] + 1]
    if shift is not None:
        edges += [edges[0] + shift, edges[-1] + shift]
    low = min(min(edges), FP16_TINY_LOG2) - 2
    high = max(max(edges), FP16_OVERFLOW_LOG2) + 2
    ax.set_xlim(low, high)
    ax.set_ylim(0, max(float(hist.max()), 1e-9) * 1.45)  # headroom for the shares box
    ax.xaxis.set_major_locator(MultipleLocator(8 if high - low > 40 else 4))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    tiny = _pow2(FP16_TINY_LOG2)
    lines = [f"below {tiny}: {gradients.pct(item.below())}"]
    if shift is not None:
        lines += [f"below {tiny} after \u00d7{_pow2(shift)}: {gradients.pct(item.below(shift))}",
                  f"above 65504 after \u00d7{_pow2(shift)}: {gradients.pct(item.above(shift))}"]
    lines.append(f"exactly zero: {gradients.pct(item.zero_share)} of all elements")
    # In the top corner over the lower bars (either histogram's), where it hides least.
    third = (high - low) / 3
    pairs = [(hist.index, hist)] + ([(hist.index + shift, hist)] if shift else [])
    heights = [(b, h) for bins, values in pairs for b, h in zip(bins, values, strict=True)]
    left = max((h for b, h in heights if b < low + third), default=0.0)
    right = max((h for b, h in heights if b + 1 > high - third), default=0.0)
    x, align = (0.02, "left") if left <= right else (0.98, "right")
    ax.text(x, 0.97, "\n".join(lines), transform=ax.transAxes, ha=align, va="top", fontsize=7,
            bbox={"facecolor": "white", "edgecolor": "#cccccc", "alpha": 0.9})
    steps = ", ".join(map(str, item.steps))
    ax.set_title(f"{item.kind} gradients (step{'s' if len(item.steps) > 1 else ''} {steps})",
                 pad=16)
    ax.set_xlabel("log\u2082 |gradient|  (the bar at b: 2\u1d47 to 2\u1d47\u207a\u00b9)")
    ax.set_ylabel("share of non-zero elements")


def _range_plot(plotter: Plotter, model: str) -> list[Path]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    items = gradients.shares(plotter.run, model)
    items = [i for i in items if i.nonzero]
    if not items:
        return []
    fig, axes = plotter.figure(len(items), f"{model}: FP32 gradients against FP16's range",
                               width=5.2, height=3.6)
    for ax, item in zip(axes, items, strict=True):
        _range_panel(ax, item)
    handles = [Patch(color=_UNSCALED, alpha=0.55, label="FP32 gradients (unscaled)")]
    shift = items[0].log2_scale
    if shift:
        handles.append(Line2D([], [], color=_SCALED, lw=1.8,
                              label=f"the same \u00d7 {_pow2(shift)}, the fp16 runs' loss scale"))
    handles.append(Patch(color=_LOST, alpha=0.15, label="outside FP16's range"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    return plotter.save(fig, plot_name(GRAD_RANGE, model))


def scaled_curves(curves: pd.DataFrame | None, model: str) -> pd.DataFrame:
    """The model's curve points that carry a loss scale (the runs with a GradScaler)."""
    if curves is None:
        return pd.DataFrame()
    rows = curves[(curves["model"] == model) & curves["scale"].notna() & (curves["scale"] > 0)]
    return rows.sort_values(["precision", "seed", "step"])


def _scale_plot(plotter: Plotter, model: str) -> list[Path]:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    rows = scaled_curves(plotter.run.curves, model)
    if rows.empty:
        return []
    fig, axes = plotter.figure(1, f"{model}: loss scale over training", width=6.4, height=3.4)
    ax = axes[0]
    runs = list(rows.groupby(["precision", "seed"], sort=False))
    palette = [_SEED_COLOURS[i % len(_SEED_COLOURS)] for i in range(len(runs))]
    handles = []
    for i, ((policy, seed), line) in enumerate(runs):
        label = f"{policy} seed {int(seed)}" if rows["precision"].nunique() > 1 \
            else f"seed {int(seed)}"
        # Seeds often share a scale for long stretches: wide lines under narrow, dashed
        # ones on top, so each stays visible where they coincide.
        style = {"color": palette[i], "lw": max(3.4 - 1.1 * i, 1.2),
                 "ls": ("-", "--", ":", "-.")[i % 4], "alpha": 0.9}
        ax.step(line["step"], line["scale"], where="post", **style)
        handles.append(Line2D([], [], label=label, **style))
    skipped = rows[rows["skipped"].fillna(0) > 0]
    # One mark per point, the counts of the seeds that skipped there.
    for (step, scale), point in skipped.groupby(["step", "scale"], sort=True):
        counts = [int(c) for c in point["skipped"]]
        text = f"{counts[0]}" if len(counts) == 1 else (
            f"{counts[0]} (×{len(counts)} seeds)" if len(set(counts)) == 1
            else "+".join(map(str, counts)))
        ax.scatter([step], [scale], marker="x", s=45, color=_LOST, zorder=4, linewidths=1.8)
        ax.annotate(text, (step, scale), xytext=(4, 5), textcoords="offset points",
                    fontsize=7, color=_LOST)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_locator(LogLocator(base=2, numticks=8))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _pow2(round(math.log2(v)))
                                               if v > 0 else ""))
    low, high = rows["scale"].min(), rows["scale"].max()
    ax.set_ylim(low / 2, high * 2)
    ax.set_xlabel("training step")
    ax.set_ylabel("GradScaler scale")
    if rows["skipped"].notna().any():
        handles.append(Line2D([], [], ls="none", marker="x", color=_LOST,
                              label="skipped steps in the window\n(count beside)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5),
               frameon=False)
    return plotter.save(fig, plot_name(LOSS_SCALE, model))


def loss_figure(plotter: Plotter) -> Figure | None:
    """Training loss over steps, a panel per parity model; one y scale for every panel: log
    when any model's loss falls more than 20-fold (its tail would lie flat on a linear axis),
    linear otherwise. None without curves."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    curves = plotter.run.curves
    if curves is None or curves["loss"].notna().sum() == 0:
        return None
    models = list(curves["model"].drop_duplicates())
    policies = _ordered(curves["precision"])
    finite = [curves.loc[curves["model"] == m, "loss"].dropna() for m in models]
    log = all(f.min() > 0 for f in finite if len(f)) and any(
        len(f) and f.max() / f.min() > 20 for f in finite)
    fig, axes = plotter.figure(len(models), "Training loss per policy")
    band_seeds, any_optimum = 0, False
    for ax, model_name in zip(axes, models, strict=True):
        seeds, optimum = _loss_panel(ax, plotter, curves[curves["model"] == model_name],
                                     policies, log)
        band_seeds, any_optimum = max(band_seeds, seeds), any_optimum or optimum
    extra = [Patch(color=plotter.colours["fp32"], alpha=0.18,
                   label=f"fp32 seed range\n({band_seeds} seeds)")] if band_seeds else []
    if any_optimum:
        extra.append(Line2D([], [], color="#777777", lw=1.2, ls=":",
                            label="achievable optimum\n(entropy rate)"))
    plotter.legend(fig, policies, extra)
    return fig


def _loss_panel(ax: Axes, plotter: Plotter, rows: pd.DataFrame, policies: list[str],
                log: bool) -> tuple[int, bool]:
    """One model's loss curves; returns the seeds in its fp32 band and whether the achievable
    optimum is drawn."""
    import seaborn as sns

    if log:
        ax.set_yscale("log")  # before drawing, so the view fits the data in log units
    optimum = _optimum(plotter.run, str(rows["model"].iloc[0]))
    if optimum is not None:
        ax.axhline(optimum, color="#777777", lw=1.2, ls=":", zorder=1)
    fp32 = rows[rows["precision"] == "fp32"].dropna(subset=["loss"])
    if len(fp32):
        band = fp32.groupby("step")["loss"].agg(["min", "max"])
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
    if log:
        log_axis(ax, *ax.get_ylim())
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (nats, mean of seeds" + (", log)" if log else ")"))
    ax.set_title(str(rows["model"].iloc[0]))
    return (fp32["seed"].nunique() if len(fp32) else 0), optimum is not None


def _optimum(run: Run, model: str) -> float | None:
    """The lowest loss any model can reach on the parity task, where it is known exactly."""
    if run.parity is None:
        return None
    values = run.parity.loc[run.parity["model"] == model, "optimal_loss"].dropna()
    return float(values.iloc[0]) if len(values) else None


def _nonfinite_marks(ax: Axes, plotter: Plotter, rows: pd.DataFrame,
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


def _real_plot(plotter: Plotter, model: str) -> list[Path]:
    """A real-data task's training loss per policy (FP32's seed range shaded) with each
    policy's final eval loss on the held-out split (a star at the last step, mean of
    seeds), and the loss of a model that learnt nothing (uniform over the vocabulary)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from bench.parity import data

    curves = plotter.run.curves
    rows = curves[curves["model"] == model] if curves is not None else pd.DataFrame()
    if rows.empty or rows["loss"].notna().sum() == 0:
        return []
    policies = _ordered(rows["precision"])
    fig, axes = plotter.figure(1, f"{model}: training loss on real data", width=8.4,
                               height=4.0)
    ax = axes[0]
    seeds, _ = _loss_panel(ax, plotter, rows, policies, log=False)
    extra: list[Any] = [Patch(color=plotter.colours["fp32"], alpha=0.18,
                              label=f"fp32 seed range ({seeds} seeds)")] if seeds else []
    parity = plotter.run.parity
    judged = parity[parity["model"] == model] if parity is not None else pd.DataFrame()
    last = float(rows["step"].max())
    for _, row in judged.iterrows():
        loss = float(row["eval_loss"]) if pd.notna(row["eval_loss"]) else math.nan
        if row["precision"] in plotter.colours and math.isfinite(loss):
            ax.scatter([last], [loss], marker="*", s=110, zorder=5,
                       color=plotter.colours[row["precision"]], edgecolors="white")
    if len(judged):
        extra.append(Line2D([], [], ls="none", marker="*", markersize=10, color="#555555",
                            label="final eval loss\n(held out)"))
    if model in data.SHAKESPEARE_TASKS:
        ax.axhline(math.log(65), color="#777777", lw=1.2, ls=":", zorder=1)
        extra.append(Line2D([], [], color="#777777", lw=1.2, ls=":",
                            label="learnt nothing (ln 65)"))
        ax.set_ylabel("loss (nats per character)")
    plotter.legend(fig, policies, extra)
    return plotter.save(fig, plot_name(REAL_LOSS, model))


def plot_parity(plotter: Plotter) -> list[Path]:
    """Both figures for every parity model whose data they need, and the real-data figure
    for each real-data task."""
    from bench.parity import data

    written: list[Path] = []
    for model in gradients.models(plotter.run):
        written += _range_plot(plotter, model)
    curves = plotter.run.curves
    for model in [] if curves is None else curves["model"].drop_duplicates():
        written += _scale_plot(plotter, model)
        written += lost_updates.plot(plotter, model)
        if model in data.TASK_MODELS:
            written += _real_plot(plotter, model)
    return written
