"""The report's plots, PNG and SVG on Agg canvases (bench/report/figures.py): a panel per model
and a line per policy over batch sizes for throughput, speedup, memory and energy, with noise
intervals; the Pareto front and the largest batch. ``plot`` draws them, the loss curves and
the parity figures (bench/report/parity_plots.py). torch-free.

Each figure has one y scale on every panel: throughput and energy from zero; speedup, a ratio,
on a log axis shared by the panels with 1x marked; memory as the change against fp32 in
percent, shared, 0% marked (a few percent do not show on an axis from zero GiB). The limits
come from the points, so an interval wider than the points' spread is cut at the axis and
marked with an arrowhead rather than squashing them; an unknown noise draws no bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from bench.report.figures import (
    Plotter,
    cut_handle,
    fit_limits,
    interval_bars,
    log_axis,
    policy_style,
)
from bench.report.formats import is_num
from bench.report.loading import _SECONDARY_HEADERS, THROTTLED_MARK, Run, _ordered
from bench.report.parity_plots import loss_figure, plot_parity
from bench.report.tables import _estimate, _memory_column, _speedup, _versus
from bench.report.view import _Model, _model


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

    values = sorted({int(b) for b in batches if is_num(b)})
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


def _failed_marks(ax: Axes, plotter: Plotter, cells: pd.DataFrame, policies: list[str]) -> bool:
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


@dataclass(frozen=True)
class _YAxis:
    """A per-batch figure's y axis, one scale on every panel.

    ``kind``: ``amount`` (linear from zero: throughput, energy), ``ratio`` (log, where 0.5x and
    2x lie as far from 1x: speedup), ``change`` (percent against fp32, linear: memory, whose
    few percent would vanish on an axis from zero). ``shared``: one y range across the panels,
    where the quantity compares across models.
    """

    label: Callable[[_Model], str]
    kind: str = "amount"
    shared: bool = False

    @property
    def reference(self) -> float | None:
        """Where fp32 lies: 1x, 0%; None for an amount."""
        return {"ratio": 1.0, "change": 0.0}.get(self.kind)

    def limits(self, ok: pd.DataFrame) -> tuple[float, float] | None:
        """From the points (and the reference), not from intervals that may be enormous."""
        points = [*ok["value"], *([] if self.reference is None else [self.reference])]
        ends = [*ok["low"], *ok["high"]]
        # Points closer than 1.5x (or 4 points of percent) do not fill the panel.
        min_span = {"ratio": math.log(1.5), "change": 4.0}.get(self.kind, 0.0)
        return fit_limits(points, ends, log=self.kind == "ratio", min_span=min_span,
                          from_zero=self.kind == "amount")


_UNITS = {"ratio": "x", "change": "%", "amount": ""}
_DODGE = 0.03  # log2 units between two policies' points at one batch


# A panel's data: the model, its cells in the main configuration, the ok ones with a value
# (columns ``value``, ``low``, ``high``: NaN ends where the noise is unknown, ``unknown``), and
# what was held fixed ('' if nothing).
_Panel = tuple[_Model, pd.DataFrame, pd.DataFrame, str]


def _per_batch_figure(plotter: Plotter, title: str, value: Any, axis: _YAxis,
                      skip: Sequence[str] = (), empty: str = "no cell ran ok") -> Figure | None:
    """A panel per model, a line per policy over batch sizes; None values are left out; None
    when no panel has a point.

    ``value(model, cell)`` gives a number, or an estimate with ``value``, ``error``, ``low`` and
    ``high`` (noise.Estimate, noise.Ratio), drawn with its interval as an error bar.
    """
    run = plotter.run
    models = list(run.cells["model"].drop_duplicates())
    panels = {name: _per_batch_panel(run, name, value, skip, axis.kind) for name in models}
    oks = [ok for _, _, ok, _ in panels.values() if len(ok)]
    if not oks:
        return None
    policies = [p for p in run.policies
                if any(p in set(cells["precision"]) for _, cells, _, _ in panels.values())]
    fig, axes = plotter.figure(len(models), title, sharey=axis.shared)
    shared = axis.limits(pd.concat(oks)) if axis.shared else None
    notes: set[str] = set()
    for ax, model_name in zip(axes, models, strict=True):
        notes |= _per_batch_axes(ax, plotter, panels[model_name], policies, axis,
                                 shared or axis.limits(panels[model_name][2]), empty)
    plotter.legend(fig, [p for p in policies if p not in skip],
                   _per_batch_handles(plotter, axis, notes))
    return fig


def _per_batch_axes(ax: Axes, plotter: Plotter, panel: _Panel, policies: list[str],
                    axis: _YAxis, limits: tuple[float, float] | None, empty: str) -> set[str]:
    """One model's panel; returns what the legend must explain (failed, cut, unknown)."""
    from matplotlib.ticker import FuncFormatter

    model, cells, ok, held = panel
    notes = set()
    if limits is not None and (len(ok) or axis.shared):
        if axis.kind == "ratio":
            log_axis(ax, *limits, unit="x")
        else:
            ax.set_ylim(*limits)
        if axis.kind == "change":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+g}%" if v else "0%"))
        elif axis.kind == "amount" and limits[1] >= 10_000:
            ax.yaxis.set_major_formatter(FuncFormatter(_compact))  # 600k, not 600000
    if axis.reference is not None and limits is not None:
        ax.axhline(axis.reference, color=plotter.colours["fp32"], lw=1, ls="--", zorder=1)
    if len(ok):
        if _draw_lines(ax, plotter, ok, policies):
            notes.add("cut")
        if ok["unknown"].any():
            notes.add("unknown")
    else:  # an empty panel keeps its place; its y axis would only show made-up numbers
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center",
                color="#777777", bbox={"facecolor": "white", "edgecolor": "none"})
        if not axis.shared:
            ax.set_ylim(0, 1)
            ax.set_yticks([])
    if _failed_marks(ax, plotter, cells, policies):
        notes.add("failed")
    _batch_axis(ax, cells["batch_size"])
    if not axis.shared or ax.get_subplotspec().is_first_col():
        ax.set_ylabel(axis.label(model))
    ax.set_title(f"{model.name} ({held})" if held else model.name)
    return notes


def _point(estimate: Any, kind: str) -> tuple[float, float, float, bool]:
    """(value, low, high, unknown) as plotted: a change in percent; no ends (NaN) where the
    noise is unknown or there is no estimate."""
    value = getattr(estimate, "value", estimate)
    if value is None or not is_num(value):
        return math.nan, math.nan, math.nan, False
    error = getattr(estimate, "error", None)
    known = error is not None and math.isfinite(error)
    low, high = (estimate.low, estimate.high) if known else (math.nan, math.nan)
    if kind == "change":
        value, low, high = ((end - 1) * 100 for end in (value, low, high))
    return float(value), low, high, error is not None and not known


def _per_batch_panel(run: Run, model_name: str, value: Callable[[_Model, pd.Series], Any],
                     skip: Sequence[str], kind: str) -> _Panel:
    """One model's panel data: its cells of the main configuration and their values."""
    model = _model(run, model_name)
    cells, held = _primary(model.cells)
    # A skipped policy draws no line, but where it failed the reader must see why.
    cells = cells[~cells["precision"].isin(skip) | (cells["status"] != "ok")]
    ok = cells[(cells["status"] == "ok")].copy()
    points = [_point(value(model, c), kind) for _, c in ok.iterrows()]
    for i, column in enumerate(("value", "low", "high", "unknown")):
        ok[column] = [p[i] for p in points]
    return model, cells, ok.dropna(subset=["value"]), held


def _draw_lines(ax: Axes, plotter: Plotter, ok: pd.DataFrame, policies: list[str]) -> bool:
    """A line per policy with its noise intervals (the axis' limits set first), and the
    throttled mark on throttled cells; True when an interval was cut at the axis."""
    import seaborn as sns

    drawn = [p for p in policies if p in set(ok["precision"])]
    cut = False
    for i, policy in enumerate(drawn):
        mine = ok[ok["precision"] == policy].copy()
        # Each policy a little aside (a factor, as the batch axis may be log): intervals at one
        # batch would otherwise lie on top of each other.
        mine["x"] = mine["batch_size"] * 2 ** (_DODGE * (i - (len(drawn) - 1) / 2))
        # Policies often coincide (fp32 and tf32 memory, say): hollow markers of
        # different shapes stay readable on top of each other, filled ones hide.
        sns.lineplot(data=mine, x="x", y="value",
                     color=plotter.colours[policy], marker=plotter.markers[policy],
                     mfc="none", mec=plotter.colours[policy], mew=1.6, markersize=8,
                     lw=1.6, errorbar=None, legend=False, ax=ax, zorder=3 + i)
        # Under the points, thin and faint: the interval (noise.Z sigma) must not hide them.
        cut |= interval_bars(ax, list(mine["x"]), list(mine["value"]), list(mine["low"]),
                             list(mine["high"]), plotter.colours[policy], zorder=2)
        for _, cell in mine[mine["throttled"]].iterrows():
            ax.annotate(THROTTLED_MARK, (cell["x"], cell["value"]), xytext=(4, 4),
                        textcoords="offset points", fontsize=11, color=plotter.colours[policy])
    return cut


def _per_batch_handles(plotter: Plotter, axis: _YAxis, notes: set[str]) -> list[Any]:
    """The legend's entries beside the policies: the fp32 line, intervals cut at the axis,
    points without an interval, did-not-run, throttled."""
    from matplotlib.lines import Line2D

    extra = []
    if axis.reference is not None:
        extra.append(Line2D([], [], color=plotter.colours["fp32"], lw=1, ls="--",
                            label=f"fp32 ({axis.reference:g}{_UNITS[axis.kind]})"))
    if "cut" in notes:
        extra.append(cut_handle())
    if "unknown" in notes:
        extra.append(Line2D([], [], ls="none", label="no bar: noise\nnot measured"))
    if "failed" in notes:
        extra.append(Line2D([], [], color="#777777", marker="x", mew=2, ls="none",
                            label="did not run\n(status shown)"))
    if plotter.run.cells["throttled"].any():
        extra.append(Line2D([], [], ls="none", marker=f"${THROTTLED_MARK}$", color="#333333",
                            label="throttled"))
    return extra


def _pareto_plot(plotter: Plotter) -> list[Path]:
    import seaborn as sns
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    run = plotter.run
    data = _pareto_data(run)
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
        _draw_front(ax, ok)
        if ok["rate"].max() >= 10_000:
            ax.xaxis.set_major_formatter(FuncFormatter(_compact))
        ax.margins(0.12)
        ax.set_xlabel(f"throughput ({model.rate_unit}, higher is better)")
        ax.set_ylabel(f"energy ({model.energy_unit}, lower is better)")
        ax.set_title(f"{model_name} ({held})" if held else model_name)
    plotter.legend(fig, policies, [Line2D([], [], ls="--", color="#777777", marker="o", ms=11,
                                          mfc="none", label="Pareto front\n(b = batch size)")])
    return plotter.save(fig, "pareto")


def _pareto_data(run: Run) -> dict[str, tuple[_Model, pd.DataFrame, str]]:
    """Per model with any: its ok cells of the main configuration that have both a rate and an
    energy (columns ``rate`` and ``energy``), and what was held fixed."""
    data = {}
    for model_name in run.cells["model"].drop_duplicates():
        model = _model(run, model_name)
        ok, held = _primary(model.cells)
        ok = ok[(ok["status"] == "ok") & ok["joules_per_sample"].notna()
                & ok[model.rate_column].notna()].copy()
        ok["energy"] = [model.energy(c) for _, c in ok.iterrows()]
        ok["rate"] = ok[model.rate_column]
        if len(ok):
            data[model_name] = (model, ok, held)
    return data


def _draw_front(ax: Axes, ok: pd.DataFrame) -> None:
    """The Pareto front, circled and labelled: nothing else is both faster and cheaper."""
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


def _max_batch_plot(plotter: Plotter) -> list[Path]:
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


def throughput_figure(plotter: Plotter) -> Figure | None:
    """Throughput per model over batch sizes, from zero (units differ across models)."""
    return _per_batch_figure(plotter, "Training throughput",
                             lambda m, c: _estimate(c, m.rate_column),
                             _YAxis(lambda m: f"throughput ({m.rate_unit})"))


def speedup_figure(plotter: Plotter) -> Figure | None:
    """Speedup over fp32 at the same batch: a ratio, so a log axis on every panel, one range
    for all of them, 1x marked."""
    return _per_batch_figure(plotter, "Speedup over fp32", lambda m, c: _speedup(m, c, "fp32"),
                             _YAxis(lambda m: "speedup over fp32 at the same batch (log)",
                                    "ratio", shared=True),
                             skip=("fp32",), empty="no policy ran ok\nbeside an ok fp32 cell")


def memory_figure(plotter: Plotter) -> Figure | None:
    """Peak memory as the change against fp32 at the same batch, in percent with its interval,
    one range for every panel (a few percent would not show on an axis from zero GiB); in GiB
    from zero where no policy has an fp32 cell beside it."""
    column, label = _memory_column(plotter.run)
    title = f"{label[0].upper()}{label[1:]}"
    change = _per_batch_figure(plotter, f"{title}: change against fp32",
                               lambda m, c: _versus(m, c, "fp32", column),
                               _YAxis(lambda m: f"change in {label} vs fp32 (same batch)", "change",
                                      shared=True),
                               skip=("fp32",), empty="no memory measured\nbeside an ok fp32 cell")
    return change or _per_batch_figure(plotter, title, lambda m, c: _estimate(c, column),
                                       _YAxis(lambda m: f"{label} (GiB)"),
                                       empty="no memory measured")


def energy_figure(plotter: Plotter) -> Figure | None:
    """Energy per sample (per token for language models), from zero."""
    def energy(model: _Model, cell: pd.Series) -> Any:
        est = _estimate(cell, "joules_per_sample")
        return None if est is None else replace(est, value=model.energy(cell))

    return _per_batch_figure(plotter, "Energy per sample", energy,
                             _YAxis(lambda m: f"energy ({m.energy_unit})"),
                             empty="no energy measured")


def plot(run: Run, out: Path) -> list[Path]:
    """Every plot the run's data supports, PNG and SVG, into ``out``; returns the files."""
    import seaborn as sns

    # Figures are drawn on their own Agg canvases (no pyplot state, no window, no global
    # backend switch for a caller that has one).
    plotter = Plotter(run, Path(out), *policy_style(run.policies))
    makers = (("throughput", throughput_figure), ("speedup", speedup_figure),
              ("memory", memory_figure), ("energy", energy_figure))
    written: list[Path] = []
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        for name, make in makers:
            fig = make(plotter)
            written += plotter.save(fig, name) if fig is not None else []
        written += _pareto_plot(plotter)
        fig = loss_figure(plotter)
        written += plotter.save(fig, "loss_curves") if fig is not None else []
        written += _max_batch_plot(plotter)
        written += plot_parity(plotter)
    return written
