"""The report's figures, asserted on the matplotlib objects the figure makers return: one y scale
per figure, intervals on the log scale, limits set by the points, memory differences shown."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bench import report, store
from bench.report import plots
from bench.report.figures import Plotter, fit_limits, log_ticks, policy_style
from bench.report.parity_plots import loss_figure

RUN = Path(__file__).parent / "fixtures" / "report" / "run"


def _record(**fields: Any) -> dict[str, Any]:
    row = dict(run_id="plots", model="resnet-tiny", precision="fp32", batch_size=8,
               image_size=32, grad_accum=1, compile=False, world_size=1, repeat=0, status="ok",
               samples_per_s=100.0, peak_rss_gib=0.5, device="cpu", device_name="a CPU",
               throttled=False)
    row.update(fields)
    row["cell_id"] = "-".join(str(row.get(k)) for k in store.IDENTITY[3:12])
    return store.empty_record(**row)


def _processes(rates: list[float], **fields: Any) -> list[dict[str, Any]]:
    """One cell run in a process per rate."""
    return [_record(repeat=i, samples_per_s=r, **fields) for i, r in enumerate(rates)]


def _plotter(tmp_path: Path, records: list[dict[str, Any]]) -> Plotter:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    store.write_csv(run_dir, records)
    run = report.load(run_dir)
    return Plotter(run, tmp_path / "plots", *policy_style(run.policies))


# A shared CPU: fp32 and bf16 of two models, three processes each, ~40% apart from each other,
# so every speedup's interval is several times wider than the speedups themselves.
_NOISY = [
    *_processes([100, 60, 170], precision="fp32", batch_size=8),
    *_processes([150, 90, 260], precision="bf16", batch_size=8),
    *_processes([120, 70, 200], precision="fp32", batch_size=16),
    *_processes([130, 80, 220], precision="bf16", batch_size=16),
    *_processes([100, 60, 170], model="bert-tiny", precision="fp32"),
    *_processes([40, 25, 70], model="bert-tiny", precision="bf16"),
]


def _bars(ax: Any) -> list[tuple[float, float]]:
    """(low, high) of every error bar drawn on ``ax``."""
    out = []
    for container in ax.containers:
        for collection in container.lines[2]:
            out += [(seg[0][1], seg[1][1]) for seg in collection.get_segments()]
    return out


def _speedups(plotter: Plotter) -> dict[str, list[float]]:
    cells = plotter.run.cells
    out: dict[str, list[float]] = {}
    for (model, _batch), group in cells.groupby(["model", "batch_size"]):
        rate = group.set_index("precision")["samples_per_s"]
        out.setdefault(model, []).append(rate["bf16"] / rate["fp32"])
    return out


def test_speedup_has_one_log_scale_and_limits_set_by_the_points(tmp_path):
    plotter = _plotter(tmp_path, _NOISY)
    fig = plots.speedup_figure(plotter)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2
    assert {ax.get_yscale() for ax in axes} == {"log"}
    assert len({ax.get_ylim() for ax in axes}) == 1  # one range: speedups compare across models
    bottom, top = axes[0].get_ylim()
    points = [v for values in _speedups(plotter).values() for v in values]
    assert bottom < min(*points, 1.0) and max(*points, 1.0) < top  # 1x and every point shown
    ends = [end for ax in axes for bar in _bars(ax) for end in bar]
    # The intervals are far wider than the points' spread: the axis is not stretched to them...
    assert min(ends) < bottom / 2 and max(ends) > top * 2
    assert math.log(top / bottom) < 2 * math.log(max(*points, 1.0) / min(*points, 1.0)) + 1
    # ...they are cut at the axis, marked there and explained in the legend.
    arrows = [line for ax in axes for line in ax.lines if line.get_marker() in ("^", "v")]
    assert arrows
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("past the axis" in t for t in legend) and "fp32 (1x)" in legend


def test_speedup_intervals_are_symmetric_on_the_log_scale(tmp_path):
    plotter = _plotter(tmp_path, _NOISY)
    fig = plots.speedup_figure(plotter)
    expected = _speedups(plotter)
    for ax in fig.axes:
        bars = _bars(ax)
        assert len(bars) == len(expected[ax.get_title()])
        for (low, high), value in zip(sorted(bars), sorted(expected[ax.get_title()]),
                                      strict=True):
            assert 0 < low < value < high
            assert value - low < high - value  # asymmetric on a linear reading
            assert math.sqrt(low * high) == pytest.approx(value)  # symmetric in log


def test_unknown_noise_draws_no_bar_and_says_so(tmp_path):
    # One process per cell and no calibration: nothing measured the noise.
    plotter = _plotter(tmp_path, [_record(precision="fp32"),
                                  _record(precision="bf16", samples_per_s=150.0)])
    fig = plots.speedup_figure(plotter)
    assert _bars(fig.axes[0]) == []
    assert any("not measured" in t.get_text() for t in fig.legends[0].get_texts())


def test_memory_shows_a_few_percent_as_a_change_against_fp32(tmp_path):
    records = []
    for model in ("resnet-tiny", "bert-tiny"):
        for precision, gib in (("fp32", 0.400), ("bf16", 0.410), ("fp16", 0.380)):
            records += [_record(model=model, precision=precision, repeat=i, peak_rss_gib=gib,
                                samples_per_s=100.0 + i) for i in range(3)]
    fig = plots.memory_figure(_plotter(tmp_path, records))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert {ax.get_yscale() for ax in axes} == {"linear"}
    assert len({ax.get_ylim() for ax in axes}) == 1
    bottom, top = axes[0].get_ylim()
    # -5% and +2.5% against fp32 (0%): they fill the axis rather than sit on a line far from
    # a zero-GiB floor (-100%).
    assert bottom < -5.0 and top > 2.5
    assert (2.5 - -5.0) / (top - bottom) > 0.5
    assert "change" in axes[0].get_ylabel() and "fp32" in axes[0].get_ylabel()


def test_memory_without_fp32_is_drawn_in_gib(tmp_path):
    fig = plots.memory_figure(_plotter(tmp_path, [_record(precision="bf16", peak_rss_gib=0.4)]))
    assert "GiB" in fig.axes[0].get_ylabel()
    assert fig.axes[0].get_ylim()[0] == 0


def _curves(spans: dict[str, float]) -> pd.DataFrame:
    """Loss curves per model, falling ``span``-fold over ten steps."""
    rows = [dict(model=model, precision=precision, seed=0, step=step,
                 loss=4.0 * span ** (-step / 10) * (1.02 if precision == "bf16" else 1.0))
            for model, span in spans.items() for precision in ("fp32", "bf16")
            for step in range(11)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize(("spans", "scale"), [
    ({"resnet-tiny": 40.0, "gpt2-tiny": 3.0}, "log"),  # one model needs log: every panel
    ({"resnet-tiny": 4.0, "gpt2-tiny": 3.0}, "linear"),
])
def test_loss_curves_have_one_y_scale(tmp_path, spans, scale):
    run = replace(report.load(RUN), curves=_curves(spans), parity=None)
    fig = loss_figure(Plotter(run, tmp_path, *policy_style(run.policies)))
    assert [ax.get_yscale() for ax in fig.axes if ax.get_visible()] == [scale, scale]


def test_fit_limits_follow_the_points_not_enormous_intervals():
    bottom, top = fit_limits([0.8, 1.0, 1.5], [0.05, 30.0], log=True)
    assert bottom < 0.8 and top > 1.5 and bottom > 0.05 * 2 and top < 30.0 / 2
    # An interval a little beyond the points widens the axis to show its end.
    bottom, top = fit_limits([0.8, 1.0, 1.5], [0.7, 1.7], log=True)
    assert bottom < 0.7 and top > 1.7
    # From zero, never below it; and no usable point gives no limits.
    assert fit_limits([400.0, 500.0], [300.0, 900.0], from_zero=True)[0] == 0.0
    assert fit_limits([math.nan], [1.0]) is None


@pytest.mark.parametrize(("bottom", "top"), [(0.9, 1.3), (0.04, 4.0), (1.0, 5.6)])
def test_log_ticks_are_plain_numbers_within_the_axis(bottom, top):
    ticks = log_ticks(bottom, top)
    assert len(ticks) >= 3 and all(bottom <= t <= top for t in ticks)
    assert all(len(f"{t:g}") <= 4 for t in ticks)


def test_a_policy_under_a_strategy_keeps_its_colour_and_long_labels_wrap_into_rows(tmp_path):
    colours, markers = policy_style(["fp32", "fp32@fsdp2:bf16/fp32", "bf16-pure",
                                     "bf16-pure@fsdp2:bf16/fp32"])
    assert colours["fp32@fsdp2:bf16/fp32"] == colours["fp32"]
    assert colours["bf16-pure@fsdp2:bf16/fp32"] == colours["bf16-pure"]
    assert markers["fp32@fsdp2:bf16/fp32"] != markers["fp32"]
    assert markers["bf16-pure@fsdp2:bf16/fp32"] != markers["bf16-pure"]

    long = [f"{p}@fsdp2:bf16/fp32" for p in ("fp32", "bf16", "bf16-pure", "bf16-pure-sr")]
    plotter = Plotter(None, tmp_path, *policy_style(long))  # type: ignore[arg-type]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4), layout="constrained")
    FigureCanvasAgg(fig)
    plotter.legend(fig, long)
    fig.canvas.draw()
    box = fig.legends[0].get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width  # wrapped into rows, not off the edges
