"""What every figure of the report shares: one fixed colour and marker per policy, the
``Plotter`` that makes a titled figure on an Agg canvas, its legend, and saves it as PNG and SVG
with the same bytes on every run, and the y axis of a figure with noise intervals: limits set
by the points (``fit_limits``), so one very wide interval cannot squash them, a log axis with
readable ticks (``log_axis``), and the intervals as thin bars cut and marked at the axis
(``interval_bars``). bench/report/plots.py and bench/report/parity_plots.py draw with it.
torch-free."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from bench.report.loading import Run, _ordered


def plot_name(kind: str, model: str) -> str:
    """The file stem of a per-model figure: ``grad_range-gpt2-tiny``."""
    return f"{kind}-{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}"


# One colour and marker per policy, the same in every plot of every report.
_COLOURS = {
    "fp32": "#333333", "tf32": "#0173b2", "fp16": "#029e73", "bf16": "#de8f05",
    "fp16-noscale": "#d55e00", "fp8": "#cc78bc", "fp8-rowwise": "#ca9161",
    "bf16-pure": "#8c564b", "bf16-pure-sr": "#17becf", "bf16-pure-kahan": "#bcbd22",
    "fp8-rowwise-gw-hp": "#9467bd", "fp8-filtered": "#e377c2", "mxfp8": "#7f7f7f",
    "nvfp4": "#2ca02c",
}
_EXTRA_COLOURS = ("#fbafe4", "#56b4e9", "#ece133", "#949494")
_MARKERS = {"fp32": "o", "tf32": "s", "fp16": "^", "bf16": "D", "fp16-noscale": "v",
            "fp8": "P", "fp8-rowwise": "X", "bf16-pure": "d", "bf16-pure-sr": "p",
            "bf16-pure-kahan": "8", "fp8-rowwise-gw-hp": "H", "fp8-filtered": "1",
            "mxfp8": "2", "nvfp4": "3"}
_EXTRA_MARKERS = ("*", "h", "<", ">")


def policy_style(policies: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(colour, marker) per policy: the fixed ones, and the next spare ones for any other. A
    policy trained under a strategy (parity's ``bf16@fsdp2:bf16/fp32``) keeps its policy's
    colour, with a spare marker of its own: beside the policy's one-process line it reads as
    the same policy, sharded."""
    colours, markers = dict(_COLOURS), dict(_MARKERS)
    extras = [p for p in _ordered(policies) if p not in colours]
    for i, policy in enumerate(extras):
        colours[policy] = colours.get(policy.partition("@")[0]) or \
            _EXTRA_COLOURS[i % len(_EXTRA_COLOURS)]
        markers[policy] = _EXTRA_MARKERS[i % len(_EXTRA_MARKERS)]
    return colours, markers


@dataclass
class Plotter:
    """Makes, labels and saves the figures of one run into ``out``."""

    run: Run
    out: Path
    colours: dict[str, str]
    markers: dict[str, str]

    def figure(self, num_panels: int, title: str, width: float = 4.4, height: float = 3.4,
               sharey: bool = False) -> tuple[Figure, list[Axes]]:
        """A titled figure of ``num_panels`` panels; ``sharey``: one y range for all of them
        (tick labels on the left column only)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        cols = min(num_panels, 3)
        rows = math.ceil(num_panels / cols)
        fig_width = max(width * cols, 6.4)
        fig = Figure(figsize=(fig_width, height * rows + 0.9), layout="constrained")
        FigureCanvasAgg(fig)  # Agg, never a GUI backend
        axes = list(fig.subplots(rows, cols, squeeze=False, sharey=sharey).ravel())
        for ax in axes[num_panels:]:
            ax.set_visible(False)
        text = f"{title} on {self.run.device_name}"
        if len(text) > 8 * fig_width:  # about what fits across at this font size
            text = f"{title}\non {self.run.device_name}"
        fig.suptitle(text, fontweight="bold")
        return fig, axes[:num_panels]

    def legend(self, fig: Figure, policies: Sequence[str], extra: Sequence[Any] = ()) -> None:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=self.colours[p], marker=self.markers[p], mfc="none",
                          mew=1.6, label=p) for p in policies]
        handles = [*handles, *extra]
        # Below the panels: beside them it collides with the title of a one-panel figure. As
        # many columns as fit across (about 12 characters an inch, a marker's 5 beside each
        # label), so long labels (bf16-pure@fsdp2:bf16/fp32) wrap into rows, not off the edge.
        widest = max((len(line) for h in handles for line in str(h.get_label()).splitlines()),
                     default=1)
        fits = max(1, int(fig.get_figwidth() * 12) // (widest + 5))
        fig.legend(handles=handles, loc="outside lower center",
                   ncols=max(1, min(len(handles), 7, fits)), frameon=False)

    def save(self, fig: Figure, name: str) -> list[Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        paths = [self.out / f"{name}.png", self.out / f"{name}.svg"]
        # No dates or random ids in the files: re-rendering a run gives the same bytes.
        fig.savefig(paths[0], dpi=120, metadata={"Software": None})
        import matplotlib as mpl

        with mpl.rc_context({"svg.hashsalt": "ampbench"}):
            fig.savefig(paths[1], metadata={"Date": None})
        return paths


# How far a y axis reaches beyond its points, in spans of the points (log units on a log axis):
# a margin past the outermost point, and at most _REACH for an interval's end. A wider interval
# (a CPU run's speedup can read [0.39-3.32]) is cut at the axis and marked, rather than the axis
# stretched until the points it belongs to collapse into a line.
_MARGIN = 0.12
_REACH = 0.5


def _usable(value: Any, log: bool) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and (value > 0 or not log)


def fit_limits(points: Sequence[float], ends: Sequence[float], log: bool = False,
               min_span: float = 0.0, from_zero: bool = False) -> tuple[float, float] | None:
    """(bottom, top) of a y axis: every one of ``points`` with a margin, and the intervals'
    ``ends`` as far as ``_REACH`` beyond them. ``min_span`` (in log units on a log axis) keeps
    points that nearly coincide from filling the panel; ``from_zero`` starts a linear axis at
    zero. None without a usable point."""
    to, back = (math.log, math.exp) if log else (float, float)
    values = [to(v) for v in points if _usable(v, log)]
    if not values:
        return None
    low, high = min(values), max(values)
    if from_zero and not log:
        low = min(low, 0.0)
    elif high - low < min_span:  # widen about the middle
        middle = (low + high) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
    span = high - low or max(abs(high), 1.0) * 0.2
    outer = [to(v) for v in ends if _usable(v, log)]
    below = min([low, *outer])
    above = max([high, *outer])
    margin = _MARGIN * span
    bottom = min(low - margin, max(below - margin / 2, low - _REACH * span))
    top = max(high + margin, min(above + margin / 2, high + _REACH * span))
    if from_zero and not log and low >= 0:
        bottom = 0.0
    return back(bottom), back(top)


def log_ticks(bottom: float, top: float) -> list[float]:
    """Ticks for a log axis from ``bottom`` to ``top``: 1, 2, 5 per decade over a wide range
    (1, 1.5, 2, 3, 5, 7 over one or two decades), evenly stepped plain numbers (0.9, 1, 1.1
    ...) over a narrow one."""
    from matplotlib.ticker import MaxNLocator

    if top / bottom < 4:
        values = list(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(bottom, top))
    else:
        subs = ((1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if top / bottom < 30
                else (1.0, 2.0, 5.0) if top / bottom < 1e4 else (1.0,))
        decades = range(math.floor(math.log10(bottom)), math.ceil(math.log10(top)) + 1)
        values = [m * 10.0 ** e for e in decades for m in subs]
    return [float(f"{v:.6g}") for v in values if bottom <= v <= top and v > 0]


def log_axis(ax: Axes, bottom: float, top: float, unit: str = "") -> None:
    """A log y axis from ``bottom`` to ``top`` labelled with plain numbers (0.5x, 1x, 2x)."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ax.set_yticks(log_ticks(bottom, top))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}{unit}"))


def interval_bars(ax: Axes, x: Sequence[float], values: Sequence[float],
                  lows: Sequence[float], highs: Sequence[float], colour: str,
                  zorder: float = 2) -> bool:
    """Each point's interval as a thin bar from ``lows`` to ``highs`` (NaN: no bar, the noise
    is unknown); an end beyond the axis (its limits set first) is cut there and marked with
    an arrowhead at the edge. True when any end was cut."""
    bars = [(x_, v, lo, hi) for x_, v, lo, hi in zip(x, values, lows, highs, strict=True)
            if math.isfinite(lo) and math.isfinite(hi)]
    if not bars:
        return False
    ax.errorbar([b[0] for b in bars], [b[1] for b in bars],
                yerr=[[v - lo for _, v, lo, _ in bars], [hi - v for _, v, _, hi in bars]],
                fmt="none", ecolor=colour, elinewidth=1.0, capsize=2.5, alpha=0.55,
                zorder=zorder)
    bottom, top = ax.get_ylim()
    cut = False
    for x_, _, lo, hi in bars:
        for beyond, y, marker in ((hi > top, 0.985, "^"), (lo < bottom, 0.015, "v")):
            if beyond:
                ax.plot([x_], [y], marker=marker, ms=5, ls="none", color=colour, alpha=0.8,
                        transform=ax.get_xaxis_transform(), clip_on=False, zorder=zorder)
                cut = True
    return cut


def cut_handle() -> Any:
    """The legend's entry for an interval cut at the axis."""
    from matplotlib.lines import Line2D

    return Line2D([], [], color="#777777", marker="^", ms=5, ls="none",
                  label="interval runs\npast the axis")
