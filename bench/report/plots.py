"""The report's plots, PNG and SVG on Agg canvases (bench/report/figures.py): throughput and
speedup with noise intervals, memory, energy, Pareto front, loss curves and the largest batch;
``plot`` draws them and the parity figures (bench/report/parity_plots.py). torch-free."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes

from bench.report.figures import Plotter, policy_style
from bench.report.formats import is_num
from bench.report.loading import _SECONDARY_HEADERS, THROTTLED_MARK, Run, _ordered
from bench.report.parity_plots import plot_parity
from bench.report.tables import _estimate, _memory_column, _Model, _model, _speedup


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


def _log_y(ax: Axes, unit: str = "x") -> None:
    """A log y axis labelled 0.5, 1, 2, 5 ... (plain numbers, not powers of ten)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}{unit}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _ratio_axis(ax: Axes, values: Sequence[float]) -> None:
    """Ratios spanning a wide range read best on a log axis, where 0.5x and 2x are symmetric."""
    from matplotlib.ticker import FuncFormatter

    finite = [v for v in values if is_num(v) and v > 0]
    if finite and max(finite) / min(finite) > 8:
        _log_y(ax)
    else:  # from zero, so a 1.2x gain does not look like a 5x one
        ax.set_ylim(bottom=0, top=max(finite, default=1.0) * 1.08)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))


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


def _failed_handle() -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], color="#777777", marker="x", mew=2, ls="none",
                  label="did not run\n(status shown)")


# A panel's data: the model, its cells in the main configuration, the ok ones with a value
# (columns ``value`` and ``half_width``), and what was held fixed ('' if nothing).
_Panel = tuple[_Model, pd.DataFrame, pd.DataFrame, str]


def _per_batch_plot(plotter: Plotter, name: str, title: str,
                    value: Any, ylabel: Any, baseline_one: bool = False,
                    skip: Sequence[str] = (), empty: str = "no cell ran ok") -> list[Path]:
    """A panel per model, a line per policy over batch sizes; None values are left out.

    ``value(model, cell)`` gives a number, or an estimate with ``value`` and ``half_width``
    (noise.Estimate, noise.Ratio), drawn with its interval as an error bar.
    """
    from matplotlib.ticker import FuncFormatter

    run = plotter.run
    models = list(run.cells["model"].drop_duplicates())
    panels = {model_name: _per_batch_panel(run, model_name, value, skip)
              for model_name in models}
    if not any(len(ok) for _, _, ok, _ in panels.values()):
        return []
    policies = [p for p in run.policies
                if any(p in set(cells["precision"]) for _, cells, _, _ in panels.values())]
    fig, axes = plotter.figure(len(models), title)
    any_failed = False
    for ax, model_name in zip(axes, models, strict=True):
        model, cells, ok, held = panels[model_name]
        if len(ok):
            _draw_lines(ax, plotter, ok, policies)
        else:  # an empty panel keeps its place; its y axis would only show made-up numbers
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center",
                    color="#777777", bbox={"facecolor": "white", "edgecolor": "none"})
            ax.set_ylim(0, 1)
            ax.set_yticks([])
        if baseline_one and len(ok):
            ax.axhline(1.0, color=plotter.colours["fp32"], lw=1, ls="--")
            spread = ok["half_width"].fillna(0)
            _ratio_axis(ax, [1.0, *(ok["value"] + spread), *(ok["value"] - spread)])
        any_failed |= _failed_marks(ax, plotter, cells, policies)
        _batch_axis(ax, cells["batch_size"])
        if len(ok) and not baseline_one:
            ax.set_ylim(bottom=0)
        if len(ok) and not baseline_one and ok["value"].max() >= 10_000:
            ax.yaxis.set_major_formatter(FuncFormatter(_compact))  # 600k, not 600000
        ax.set_ylabel(ylabel(model))
        ax.set_title(f"{model_name} ({held})" if held else model_name)
    extra = _per_batch_handles(plotter, baseline_one, any_failed)
    plotter.legend(fig, [p for p in policies if p not in skip], extra)
    return plotter.save(fig, name)


def _per_batch_panel(run: Run, model_name: str, value: Callable[[_Model, pd.Series], Any],
                     skip: Sequence[str]) -> _Panel:
    """One model's panel data: its cells of the main configuration and their values."""
    model = _model(run, model_name)
    cells, held = _primary(model.cells)
    # A skipped policy draws no line, but where it failed the reader must see why.
    cells = cells[~cells["precision"].isin(skip) | (cells["status"] != "ok")]
    ok = cells[(cells["status"] == "ok")].copy()
    values = [value(model, c) for _, c in ok.iterrows()]
    ok["value"] = [getattr(v, "value", v) for v in values]
    widths = [getattr(v, "half_width", math.nan) for v in values]
    ok["half_width"] = [w if math.isfinite(w) else math.nan for w in widths]
    return model, cells, ok.dropna(subset=["value"]), held


def _draw_lines(ax: Axes, plotter: Plotter, ok: pd.DataFrame, policies: list[str]) -> None:
    """A line per policy with its noise intervals, and the throttled mark on throttled cells."""
    import seaborn as sns

    drawn = [p for p in policies if p in set(ok["precision"])]
    for i, policy in enumerate(drawn):
        # Policies often coincide (fp32 and tf32 memory, say): hollow markers of
        # different shapes stay readable on top of each other, filled ones hide.
        sns.lineplot(data=ok[ok["precision"] == policy], x="batch_size", y="value",
                     color=plotter.colours[policy], marker=plotter.markers[policy],
                     mfc="none", mec=plotter.colours[policy], mew=1.6, markersize=8,
                     lw=1.6, errorbar=None, legend=False, ax=ax, zorder=2 + i)
        mine = ok[(ok["precision"] == policy) & ok["half_width"].notna()]
        if len(mine):  # the noise interval of each point (noise.Z sigma)
            ax.errorbar(mine["batch_size"], mine["value"], yerr=mine["half_width"],
                        fmt="none", ecolor=plotter.colours[policy], elinewidth=1.2,
                        capsize=3, alpha=0.8, zorder=2 + i)
    for _, cell in ok[ok["throttled"]].iterrows():
        ax.annotate(THROTTLED_MARK, (cell["batch_size"], cell["value"]),
                    xytext=(4, 4), textcoords="offset points", fontsize=11,
                    color=plotter.colours[cell["precision"]])


def _per_batch_handles(plotter: Plotter, baseline_one: bool, any_failed: bool) -> list[Any]:
    """The legend's entries beside the policies: the 1x line, did-not-run, throttled."""
    from matplotlib.lines import Line2D

    extra = [_failed_handle()] if any_failed else []
    if baseline_one:
        extra.insert(0, Line2D([], [], color=plotter.colours["fp32"], lw=1, ls="--",
                               label="fp32 (1x)"))
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


def _loss_plot(plotter: Plotter) -> list[Path]:
    import seaborn as sns
    from matplotlib.patches import Patch

    curves = plotter.run.curves
    if curves is None or curves["loss"].notna().sum() == 0:
        return []
    models = list(curves["model"].drop_duplicates())
    policies = _ordered(curves["precision"])
    fig, axes = plotter.figure(len(models), "Training loss per policy")
    band_seeds = 0
    any_optimum = False
    for ax, model_name in zip(axes, models, strict=True):
        rows = curves[curves["model"] == model_name]
        optimum = _optimum(plotter.run, model_name)
        if optimum is not None:
            ax.axhline(optimum, color="#777777", lw=1.2, ls=":", zorder=1)
            any_optimum = True
        fp32 = rows[rows["precision"] == "fp32"].dropna(subset=["loss"])
        if len(fp32):
            band = fp32.groupby("step")["loss"].agg(["min", "max"])
            band_seeds = max(band_seeds, fp32["seed"].nunique())
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
        finite = rows["loss"].dropna()
        if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 20:
            _log_y(ax, unit="")
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (nats, mean over seeds)")
        ax.set_title(model_name)
    extra = [Patch(color=plotter.colours["fp32"], alpha=0.18,
                   label=f"fp32 seed range\n({band_seeds} seeds)")] if band_seeds else []
    if any_optimum:
        from matplotlib.lines import Line2D

        extra.append(Line2D([], [], color="#777777", lw=1.2, ls=":",
                            label="achievable optimum\n(entropy rate)"))
    plotter.legend(fig, policies, extra)
    return plotter.save(fig, "loss_curves")


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


def plot(run: Run, out: Path) -> list[Path]:
    """Every plot the run's data supports, PNG and SVG, into ``out``; returns the files."""
    import seaborn as sns

    # Figures are drawn on their own Agg canvases (no pyplot state, no window, no global
    # backend switch for a caller that has one).
    plotter = Plotter(run, Path(out), *policy_style(run.policies))
    mem_column, mem_label = _memory_column(run)
    written: list[Path] = []
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        written += _per_batch_plot(
            plotter, "throughput", "Training throughput",
            lambda m, c: _estimate(c, m.rate_column),
            lambda m: f"throughput ({m.rate_unit})")
        written += _per_batch_plot(
            plotter, "speedup", "Speedup over fp32", lambda m, c: _speedup(m, c, "fp32"),
            lambda m: "speedup over fp32 at the same batch", baseline_one=True, skip=("fp32",),
            empty="no policy ran ok\nbeside an ok fp32 cell")
        written += _per_batch_plot(
            plotter, "memory", f"{mem_label[0].upper()}{mem_label[1:]}",
            lambda m, c: c[mem_column] if is_num(c[mem_column]) else None,
            lambda m: f"{mem_label} (GiB)", empty="no memory measured")
        written += _per_batch_plot(
            plotter, "energy", "Energy per sample",
            lambda m, c: m.energy(c) if is_num(c["joules_per_sample"]) else None,
            lambda m: f"energy ({m.energy_unit})", empty="no energy measured")
        written += _pareto_plot(plotter)
        written += _loss_plot(plotter)
        written += _max_batch_plot(plotter)
        written += plot_parity(plotter)
    return written
