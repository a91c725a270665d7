"""report.md: the environment, the noise band, the summary (bench/report/summary.py), the
model sections and the plots list; ``write_report`` writes it all."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from bench import BadInput, paths, store
from bench.analysis import noise
from bench.report import accuracy, low_precision, peers, samples, summary
from bench.report.formats import is_num
from bench.report.loading import PLOTS, REPORT, THROTTLED_MARK, Run, _ordered, load
from bench.report.lost_updates import LOST_UPDATES
from bench.report.parity_plots import GRAD_RANGE, LOSS_SCALE, REAL_LOSS
from bench.report.plots import plot
from bench.report.tables import _model_section, _ratio

# ------------------------------------------------------------------------------ report.md


def _environment(run: Run) -> list[str]:
    """The report's first lines: device, software, the run itself, clocks and warnings."""
    lines = [_device_line(run)]
    software = _software_line(run)
    if software:
        lines.append(software)
    threads = _threads_line(run)
    if threads:
        lines.append(threads)
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
    for warning in [*(run.meta.get("warnings") or []), *run.problems]:
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


def _threads_line(run: Run) -> str | None:
    """torch's thread pools, the thread variables and CUDA_VISIBLE_DEVICES as the run had
    them; None for a run recorded before they were (schema < 7)."""
    intra, inter = _recorded(run, "torch_num_threads"), _recorded(run, "torch_num_interop_threads")
    if not is_num(intra):
        return None

    def shown(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "unset"
        return f"{float(value):g}" if is_num(value) else f"'{value}'" if value == "" \
            else str(value)

    variables = ", ".join(f"{name} {shown(_recorded(run, name.lower()))}" for name in (
        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES"))
    interop = f", {float(inter):g} inter-op" if is_num(inter) else ""
    return f"- **Threads:** torch {float(intra):g} intra-op{interop}; {variables}"


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
    line = (f"- **Noise:** {noise.describe(band)}. Bold numbers are beyond the noise; the "
            f"others are not findings.")
    exact = [label for column, label in (("peak_mem_reserved_gib", "peak reserved memory"),
                                         ("peak_mem_allocated_gib", "peak allocated memory"),
                                         ("peak_rss_gib", "peak RSS"))
             if (run.cells.get(f"{column}_err", pd.Series(dtype=float)) == 0).any()]
    if exact:
        line += (f" {' and '.join(exact).capitalize()} marked (exact) measured the same in every "
                 "process of the run that was repeated: the same program allocates the same "
                 "way each time, so those changes carry no measurable noise.")
    odd = run.cells[run.cells["outliers"].astype(bool)] if "outliers" in run.cells else []
    if len(odd):
        line += (" Outlier processes (more than "
                 f"{noise.OUTLIER_Z:g} robust standard deviations from their cell's median; "
                 "the cell's value is the median and its spread is robust, so they move "
                 "neither much): " + "; ".join(
                     f"{c['model']} {c['precision']} batch {c['batch_size']}: {c['outliers']}"
                     for _, c in odd.iterrows()) + ".")
    return line


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
    "memory": "Peak memory: change against fp32",
    "energy": "Energy per sample",
    "pareto": "Throughput vs energy",
    "loss_curves": "Training loss per policy",
    "max_batch": "Largest batch that fits",
}


_PARITY_PLOTS = (f"{GRAD_RANGE}-", f"{LOSS_SCALE}-", f"{REAL_LOSS}-",  # one per parity model
                 f"{LOST_UPDATES}-")


def render(run: Run, plots: Sequence[str] = ()) -> str:
    """report.md text for a run; ``plots`` are the plot names written beside it."""
    lines = [f"# ampbench report: {run.device_name}", "", *_environment(run), _noise_line(run),
             "", *summary.summary(run)]
    benchmarked = list(run.cells["model"].drop_duplicates())
    for name in benchmarked:
        lines += _model_section(run, name, accuracy.block(run, name, plots))
        lines += low_precision.table(run, name)
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
        lines += [f"Error bars: the noise interval ({noise.Z:g} standard errors, on the log "
                  f"scale). SVG versions beside them in `{PLOTS}/`.", ""]
    lines += samples.appendix(run)
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(run_dir: Path | str, out_dir: Path | str | None = None,
                 price_per_hour: float | None = None,
                 price_per_kwh: float | None = None) -> Path:
    """Write report.md and plots/ for a run (into ``out_dir`` when given); returns report.md.
    A price given here overrides the one the run recorded in meta.json."""
    run = load(run_dir, price_per_hour, price_per_kwh)
    if out_dir is None and not run.path.is_dir():
        raise BadInput(f"{run_dir}: a results CSV outside a run directory; pass --out DIR "
                       "for its report.md")
    out = paths.output_dir(out_dir if out_dir is not None else run.path,
                           "--out" if out_dir is not None else "run directory")
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


