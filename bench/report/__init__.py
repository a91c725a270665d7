"""Reports and publishing: report.md and plots for a run directory, and the published-runs index.

    python -m bench report                        # the latest run under results/runs/
    python -m bench report RUN_DIR --out DIR      # report.md and plots/ into DIR
    python -m bench report RUN_DIR --price-per-hour 2.5   # with the cost of 1M samples
    python -m bench publish RUN_DIR               # -> results/<device-slug>/<date>/ + index

Inputs (all files; see bench/store.py): ``results.csv`` (one row per cell and repeat; a cell's
repeats are folded into the median of its ``ok`` repeats), ``meta.json`` (environment, prices),
and when present ``parity.csv``, ``parity_curves.csv``, ``grad_hist.csv``, ``peers.csv`` and
max-batch records (rows of results.csv with
``max_batch_search`` set). A cell is one (model, precision, batch_size, seq_len, image_size,
grad_accum, compile, world_size).

report.md: the environment, the summary (per model and policy, at the largest batch both ran:
speedup, memory and energy change against FP32 with their intervals, and the parity verdict;
what is within the noise says so), then per model one table per metric with batch sizes as
rows and policies as columns. Failed cells show their status (oom, error, ...); cells throttled
during the timed window carry a dagger. Language models report tokens/s and joules per token.

Plots (PNG and SVG, Agg backend, one fixed colour and marker per policy) go to ``plots/``.

With ``grad_hist.csv`` and the scaler columns of the parity files, each parity model's section
also shows where its FP32 gradients fall in FP16's range (before and after the fp16 runs' loss
scale) and the loss scale over training; with timing in parity.csv, time to accuracy against
FP32; with ``peers.csv``, a Peers section; with a price (``--price-per-hour``,
``--price-per-kwh``, or the run's meta.json), a cost table per model.

One file per job: ``loading`` (the run directory into one row per cell), ``formats`` (how
numbers are written), ``tables`` (the per-model tables and their notes), ``summary`` (the
first screen, and results/README.md's headline), ``markdown`` (report.md), ``accuracy`` (the
parity block: verdicts, time to accuracy, gradient shares), ``gradients`` (the shares FP16
loses), ``figures`` (colours, markers, the figure maker, y-axis limits and log ticks, interval
bars: what both plotting modules share), ``plots`` and ``parity_plots`` (the figures),
``peers`` (the Peers section) and ``publishing`` (results/ and its index); this module keeps
the entry points callers know.

torch-free: the package reads files only, so it runs on a laptop and in CPU CI.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import store
from bench.report.loading import (
    CURVES,
    INDEX,
    METRICS,
    PARITY,
    PLOTS,
    POLICY_ORDER,
    REPORT,
    THROTTLED_MARK,
    Run,
    aggregate,
    load,
)
from bench.report.markdown import render, write_report
from bench.report.plots import plot
from bench.report.publishing import publish, render_index, write_index
from bench.report.summary import Headline, headline

# ------------------------------------------------------------------------------ CLI


def main(args: argparse.Namespace) -> int:
    """``ampbench report [RUN_DIR] [--out DIR]``: write report.md and plots."""
    run_dir = Path(args.run_dir) if args.run_dir else store.latest_run()
    path = write_report(run_dir, args.out, getattr(args, "price_per_hour", None),
                        getattr(args, "price_per_kwh", None))
    plots = path.parent / PLOTS
    print(f"wrote {path}" + (f" and {plots}/" if plots.is_dir() else ""))
    return 0


def publish_main(args: argparse.Namespace) -> int:
    """``ampbench publish RUN_DIR [--results DIR]``: copy a run into results/ and index it."""
    dest = publish(args.run_dir, args.results)
    print(f"published {args.run_dir} to {dest}; index {Path(args.results) / INDEX}")
    return 0



__all__ = [
    "CURVES", "INDEX", "METRICS", "PARITY", "PLOTS", "POLICY_ORDER", "REPORT", "THROTTLED_MARK",
    "Headline", "Run", "aggregate", "headline", "load", "main", "plot", "publish", "publish_main",
    "render", "render_index", "write_index", "write_report",
]
