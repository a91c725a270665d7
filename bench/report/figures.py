"""What every figure of the report shares: one fixed colour and marker per policy, and the
``Plotter`` that makes a titled figure on an Agg canvas, its legend, and saves it as PNG and SVG
with the same bytes on every run. bench/report/plots.py and bench/report/parity_plots.py draw
with it. torch-free."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from bench.report.loading import Run, _ordered

# One colour and marker per policy, the same in every plot of every report.
_COLOURS = {
    "fp32": "#333333", "tf32": "#0173b2", "fp16": "#029e73", "bf16": "#de8f05",
    "fp16-noscale": "#d55e00", "fp8": "#cc78bc", "fp8-rowwise": "#ca9161",
}
_EXTRA_COLOURS = ("#fbafe4", "#56b4e9", "#ece133", "#949494")
_MARKERS = {"fp32": "o", "tf32": "s", "fp16": "^", "bf16": "D", "fp16-noscale": "v",
            "fp8": "P", "fp8-rowwise": "X"}
_EXTRA_MARKERS = ("*", "h", "<", ">")


def policy_style(policies: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(colour, marker) per policy: the fixed ones, and the next spare ones for any other."""
    colours, markers = dict(_COLOURS), dict(_MARKERS)
    extras = [p for p in _ordered(policies) if p not in colours]
    for i, policy in enumerate(extras):
        colours[policy] = _EXTRA_COLOURS[i % len(_EXTRA_COLOURS)]
        markers[policy] = _EXTRA_MARKERS[i % len(_EXTRA_MARKERS)]
    return colours, markers


@dataclass
class Plotter:
    """Makes, labels and saves the figures of one run into ``out``."""

    run: Run
    out: Path
    colours: dict[str, str]
    markers: dict[str, str]

    def figure(self, num_panels: int, title: str, width: float = 4.4,
               height: float = 3.4) -> tuple[Figure, list[Axes]]:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        cols = min(num_panels, 3)
        rows = math.ceil(num_panels / cols)
        fig_width = max(width * cols, 6.4)
        fig = Figure(figsize=(fig_width, height * rows + 0.9), layout="constrained")
        FigureCanvasAgg(fig)  # Agg, never a GUI backend
        axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
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
        # Below the panels: beside them it collides with the title of a one-panel figure.
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 7),
                   frameon=False)

    def save(self, fig: Figure, name: str) -> list[Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        paths = [self.out / f"{name}.png", self.out / f"{name}.svg"]
        # No dates or random ids in the files: re-rendering a run gives the same bytes.
        fig.savefig(paths[0], dpi=120, metadata={"Software": None})
        import matplotlib as mpl

        with mpl.rc_context({"svg.hashsalt": "ampbench"}):
            fig.savefig(paths[1], metadata={"Date": None})
        return paths
