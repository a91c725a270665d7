"""report.md: the environment, the noise band, the headline summary per model (only claims
beyond the noise), the model sections and the plots list; ``write_report`` writes it all."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from bench import store
from bench.analysis import noise
from bench.report import accuracy, peers
from bench.report.formats import fmt_width, is_num
from bench.report.loading import PLOTS, REPORT, THROTTLED_MARK, Run, _ordered, load
from bench.report.parity_plots import GRAD_RANGE, LOSS_SCALE
from bench.report.plots import plot
from bench.report.tables import (
    _label,
    _memory_column,
    _Model,
    _model,
    _model_section,
    _ratio,
    _same_key,
    _speedup,
    _versus,
)

# ------------------------------------------------------------------------------ headline


@dataclass(frozen=True)
class Headline:
    """A model's best numbers over FP32 across its cells, and its parity verdicts."""

    model: str
    speedup: str
    memory_saving: str
    energy_saving: str
    parity: str


def _best(model: _Model, ratio_of: Any, better: int, fmt: Any) -> str:
    """The best of ``ratio_of(cell)`` over ok non-fp32 cells that is beyond noise in the good
    direction (``better`` +1: above 1; -1: below 1), as 'text (policy, batch N)'; 'none beyond
    noise' when no cell's interval excludes no change that way, 'n/a' when nothing compares."""
    candidates = [cell for _, cell in model.cells.iterrows()  # emulated speed is no finding
                  if cell["status"] == "ok" and cell["precision"] != "fp32"
                  and not cell["emulated"]]
    found = [(r, cell) for cell in candidates
             if not _contended(model, cell) and (r := ratio_of(cell)) is not None]
    if not found:
        left_out = any(_contended(model, cell) for cell in candidates)
        return "n/a" + (" (contended cells left out)" if left_out else "")
    # A claim is beyond the noise, the right way, and big enough to show (1%, 0.01x).
    good = [(r, cell) for r, cell in found
            if r.beyond_noise and (r.value - 1) * better >= _SHOWN]
    if not good:
        known = any(math.isfinite(r.half_width) for r, _ in found)
        return "none beyond noise" if known else "not judged (noise not measured)"
    ratio, cell = max(good, key=lambda item: (item[0].value - 1) * better)
    mark = f" {THROTTLED_MARK}" if cell["throttled"] else ""
    return f"{fmt(ratio)} ({_label(cell, model.row_keys)}){mark}"


_SHOWN = 0.005  # the smallest change a summary shows as a number: 1% or 0.01x after rounding


def _contended(model: _Model, cell: pd.Series) -> bool:
    """The cell, or the fp32 cell it is compared with, ran beside others' work."""
    fp32 = _same_key(model, cell, "fp32")
    return bool(cell["contended"] or (fp32 is not None and fp32["contended"]))


def _fmt_saving(ratio: noise.Ratio) -> str:
    return f"{1 - ratio.value:.0%}{fmt_width(ratio, 100, '%', 0)}"


def _parity_summary(run: Run, name: str) -> str:
    if run.parity is None:
        return "not run"
    rows = run.parity[run.parity["model"] == name]
    if rows.empty:
        return "not run"
    parts = []
    for verdict in ("FAIL", "INCONCLUSIVE"):
        policies = _ordered(rows.loc[rows["verdict"] == verdict, "precision"])
        if policies:
            parts.append(f"{verdict}: {', '.join(policies)}")
    judged = rows[rows["verdict"] != ""]
    if not parts:
        return f"PASS ({len(judged)} policies)" if len(judged) else "no verdicts"
    return "; ".join(parts)


def headline(run: Run) -> list[Headline]:
    """Per model: best speedup, memory saving and energy saving over FP32, parity verdicts."""
    mem_column, _ = _memory_column(run)
    out = []
    for name in run.cells["model"].drop_duplicates():
        model = _model(run, name)
        out.append(Headline(
            model=name,
            speedup=_best(model, lambda c, m=model: _speedup(m, c, "fp32"), +1,
                          lambda r: f"{r.value:.2f}x{fmt_width(r, 1, '', 2)}"),
            memory_saving=_best(model, lambda c, m=model: _versus(m, c, "fp32", mem_column),
                                -1, _fmt_saving),
            energy_saving=_best(model, lambda c, m=model: _versus(m, c, "fp32",
                                                                  "joules_per_sample"),
                                -1, _fmt_saving),
            parity=_parity_summary(run, name),
        ))
    return out


def _parity_failures(run: Run) -> list[str]:
    if run.parity is None:
        return []
    fails = run.parity[run.parity["verdict"] == "FAIL"]
    out = []
    for _, row in fails.iterrows():
        detail = ""
        if is_num(row["delta"]):
            detail = f" (eval loss {row['delta']:+.3g} vs fp32"
            detail += f", tolerance {row['tolerance']:.3g})" if is_num(row["tolerance"]) else ")"
        if is_num(row["nonfinite_steps"]) and row["nonfinite_steps"] > 0:
            detail += f", {int(row['nonfinite_steps'])} non-finite steps"
        out.append(f"{row['model']} {row['precision']}{detail}")
    return out


# ------------------------------------------------------------------------------ report.md


def _environment(run: Run) -> list[str]:
    """The report's first lines: device, software, the run itself, clocks and warnings."""
    lines = [_device_line(run)]
    software = _software_line(run)
    if software:
        lines.append(software)
    lines.append(_run_line(run))
    ok = run.cells[run.cells["status"] == "ok"]
    lines.append(_clocks_line(ok))
    throttled = ok[ok["throttled"]]
    if len(throttled):
        reasons = sorted({r for v in throttled["throttle_reasons"] for r in v.split(";") if r})
        lines.append(f"- **Warning: throttling.** {len(throttled)} of {len(ok)} ok cells were "
                     f"throttled" + (f" ({', '.join(reasons)})" if reasons else "")
                     + f"; they are marked {THROTTLED_MARK} and their numbers understate "
                       "the device.")
    for warning in run.meta.get("warnings") or []:
        lines.append(f"- **Warning:** {warning}")
    return lines


def _recorded(run: Run, key: str) -> Any:
    """``key`` from meta.json, else from the first cell that has it."""
    value = run.meta.get(key)
    cells = run.cells
    if (value is None or value == "") and key in cells and cells[key].notna().any():
        value = cells[key].dropna().iloc[0]
    return value


def _device_line(run: Run) -> str:
    kind = _recorded(run, "device")
    count = _recorded(run, "device_count")
    extra = ", ".join(p for p in (str(kind) if kind else "",
                                  f"{count} devices" if is_num(count) and int(count) > 1 else "")
                      if p)
    return f"- **Device:** {run.device_name}" + (f" ({extra})" if extra else "")


def _software_line(run: Run) -> str | None:
    """Driver, CUDA, cuDNN, torch and Python versions; None when none is known."""
    from bench.telemetry.env import no_gpu_text  # torch-free

    cuda, build = _recorded(run, "cuda_version"), _recorded(run, "torch_cuda_build")
    if _recorded(run, "device") == "cpu" and cuda:  # before torch_cuda_build: torch's build
        cuda, build = None, build or cuda
    software = [f"{label} {value}" for label, value in (
        ("driver", _recorded(run, "driver_version")), ("CUDA", cuda),
        ("cuDNN", _recorded(run, "cudnn_version")), ("torch", _recorded(run, "torch_version")),
        ("Python", _recorded(run, "python_version"))) if value]
    if not software:
        return None
    no_gpu = None if cuda else no_gpu_text(build)  # "torch built for CUDA 13.0; no GPU"
    return "- **Software:** " + ", ".join(software) + (f" ({no_gpu})" if no_gpu else "")


def _run_line(run: Run) -> str:
    """The run's id, commit, date, matrix, and how many processes measured each cell."""
    meta, cells = run.meta, run.cells
    run_parts = [run.run_id]
    sha = meta.get("git_sha")
    if sha:
        dirty = " (uncommitted changes)" if store.truthy(meta.get("git_dirty")) else ""
        run_parts.append(f"git {str(sha)[:10]}{dirty}")
    when = meta.get("created") or meta.get("timestamp")
    if when:
        run_parts.append(str(when))
    matrix = meta.get("matrix") or {}
    if isinstance(matrix, dict) and matrix.get("name"):
        run_parts.append(f"matrix '{matrix['name']}'")
    repeats = sorted(set(cells["repeats"] - cells["calibration_processes"])) if len(cells) \
        else [0]
    run_parts.append(("up to " if len(repeats) > 1 else "") + f"{repeats[-1]} process"
                     + ("es" if repeats[-1] != 1 else "") + " per cell")
    extra = int(cells["calibration_processes"].sum()) if len(cells) else 0
    if extra:
        run_parts.append(f"{extra} more of a calibration cell")
    return "- **Run:** " + ", ".join(run_parts)


def _clocks_line(ok: pd.DataFrame) -> str:
    """SM clock, temperature and power over the ok cells."""
    def span(column: str) -> str:
        low, high = f"{ok[column].min():,.0f}", f"{ok[column].max():,.0f}"
        return low if low == high else f"{low}-{high}"

    clocks = []
    if ok["sm_clock_mhz_avg"].notna().any():
        clocks.append(f"SM clock {span('sm_clock_mhz_avg')} MHz (cell averages)")
    if ok["temp_max_c"].notna().any():
        clocks.append(f"max temperature {ok['temp_max_c'].max():.0f} °C")
    if ok["power_avg_w"].notna().any():
        clocks.append(f"average power {span('power_avg_w')} W")
    return "- **Clocks:** " + ("; ".join(clocks) if clocks else "not measured (no NVML readings)")


def _noise_line(run: Run) -> str:
    band = run.cells.attrs.get("band") or noise.pooled([])
    return (f"- **Noise:** {noise.describe(band)}. Bold numbers are beyond the noise; the "
            f"others are not findings.")


def _summary(run: Run) -> list[str]:
    rows = headline(run)
    mem_label = _memory_column(run)[1]
    lines = ["## Summary", ""]
    if rows:
        body = [[h.model, h.speedup, h.memory_saving, h.energy_saving, h.parity] for h in rows]
        lines += [tabulate(body, headers=["model", "best speedup over fp32",
                                          f"best {mem_label} saving", "best energy saving",
                                          "parity"], tablefmt="github", disable_numparse=True),
                  ""]
    else:
        lines += ["No benchmark cells in this run.", ""]
    failures = _parity_failures(run)
    if failures:
        lines += [f"**Parity FAIL:** {'; '.join(failures)}.", ""]
    counts = run.cells["status"].value_counts()
    failed = [f"{int(counts[s])} {s}" for s in store.FAILED if s in counts]
    lines += [f"{len(run.cells)} cells: {int(counts.get('ok', 0))} ok"
              + (", " + ", ".join(failed) if failed else "") + ".", ""]
    return lines


def _max_batch_section(run: Run) -> list[str]:
    frame = run.max_batch
    if frame.empty:
        return []
    policies = _ordered(frame["precision"])
    body = []
    for name in frame["model"].drop_duplicates():
        rows = frame[frame["model"] == name].set_index("precision")
        base = rows.loc["fp32", "max_batch"] if "fp32" in rows.index else math.nan
        line = [name]
        for policy in policies:
            if policy not in rows.index:
                line.append("")
                continue
            row = rows.loc[policy]
            if not is_num(row["max_batch"]):
                line.append(str(row["status"]))
                continue
            text = f"{int(row['max_batch']):,}"
            ratio = _ratio(row["max_batch"], base)
            if ratio is not None and policy != "fp32":
                text += f" ({ratio:.2f}x)"
            line.append(text)
        body.append(line)
    return ["## Largest batch that fits", "",
            tabulate(body, headers=["model", *policies], tablefmt="github",
                     disable_numparse=True, colalign=["left"] + ["right"] * len(policies)),
            "", "In brackets: the ratio to fp32's largest batch.", ""]


_PLOT_TITLES = {
    "throughput": "Throughput vs batch size",
    "speedup": "Speedup over fp32",
    "memory": "Peak memory",
    "energy": "Energy per sample",
    "pareto": "Throughput vs energy",
    "loss_curves": "Training loss per policy",
    "max_batch": "Largest batch that fits",
}


_PARITY_PLOTS = (f"{GRAD_RANGE}-", f"{LOSS_SCALE}-")  # one per parity model


def render(run: Run, plots: Sequence[str] = ()) -> str:
    """report.md text for a run; ``plots`` are the plot names written beside it."""
    lines = [f"# ampbench report: {run.device_name}", "", *_environment(run), _noise_line(run),
             "", *_summary(run)]
    benchmarked = list(run.cells["model"].drop_duplicates())
    for name in benchmarked:
        lines += _model_section(run, name, accuracy.block(run, name, plots))
    for name in accuracy.models(run):
        if name not in benchmarked:  # a parity task with no benchmark cells of its own
            lines += [f"## {name} (parity task)", "", "No benchmark cells: parity only.", "",
                      *accuracy.block(run, name, plots)]
    lines += _max_batch_section(run)
    lines += peers.section(run)
    shown = [name for name in plots if not name.startswith(_PARITY_PLOTS)]  # in their section
    if shown:
        lines += ["## Plots", ""]
        for name in shown:
            lines += [f"![{_PLOT_TITLES.get(name, name)}]({PLOTS}/{name}.png)", ""]
        lines += [f"Error bars: the noise interval (±{noise.Z:g} standard errors). SVG versions "
                  f"beside them in `{PLOTS}/`.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(run_dir: Path | str, out_dir: Path | str | None = None,
                 price_per_hour: float | None = None,
                 price_per_kwh: float | None = None) -> Path:
    """Write report.md and plots/ for a run (into ``out_dir`` when given); returns report.md.
    A price given here overrides the one the run recorded in meta.json."""
    run = load(run_dir, price_per_hour, price_per_kwh)
    out = Path(out_dir) if out_dir is not None else run.path
    out.mkdir(parents=True, exist_ok=True)
    written = plot(run, out / PLOTS)
    stale = {p.stem for prefix in _PARITY_PLOTS for p in (out / PLOTS).glob(f"{prefix}*.png")}
    for name in (set(_PLOT_TITLES) | stale) - {p.stem for p in written}:  # from an earlier one
        for suffix in (".png", ".svg"):
            (out / PLOTS / f"{name}{suffix}").unlink(missing_ok=True)
    path = out / REPORT
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(render(run, [p.stem for p in written if p.suffix == ".png"]),
                   encoding="utf-8")
    tmp.replace(path)
    return path


