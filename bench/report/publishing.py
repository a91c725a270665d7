"""Publishing: copy a run into results/<device>/<date>/ and regenerate results/README.md, the
index of published runs. torch-free."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from tabulate import tabulate

from bench import BadInput, store
from bench.analysis import noise
from bench.report.loading import INDEX, PLOTS, REPORT, THROTTLED_MARK, Run, load
from bench.report.markdown import write_report
from bench.report.summary import headline

# ------------------------------------------------------------------------------ publish


def _run_date(run: Run) -> str:
    for value in (run.meta.get("created"), run.meta.get("timestamp")):
        if value:
            match = re.match(r"\d{4}-\d{2}-\d{2}", str(value))
            if match:
                return match.group(0)
    match = re.match(r"(\d{4})(\d{2})(\d{2})-", run.run_id)
    return "-".join(match.groups()) if match else "undated"


def _destination(run: Run, results: Path) -> Path:
    """results/<slug>/<date>/, or <date>-2, -3 ... when another run already has that date."""
    device_dir = results / store.device_slug(run.device_name)
    date = _run_date(run)
    candidates = sorted(device_dir.glob(f"{date}*/"), key=lambda p: p.name)
    for candidate in candidates:  # publishing the same run again replaces its own copy
        if store.read_meta(candidate).get("run_id") == run.run_id:
            return candidate
    taken = {p.name for p in candidates}
    name, n = date, 1
    while name in taken:
        n += 1
        name = f"{date}-{n}"
    return device_dir / name


def publish(run_dir: Path | str, results: Path | str = "results") -> Path:
    """Copy a run's CSVs, meta.json, report.md and plots to results/<device>/<date>/; index it."""
    run = load(run_dir)
    if not run.path.is_dir():
        raise BadInput(f"{run_dir}: a results CSV outside a run directory; publish takes a run "
                       "directory (its meta.json, report and plots go with it)")
    if run.cells.empty and run.max_batch.empty:
        raise BadInput(f"{run_dir}: the run has no benchmark cells; nothing to publish")
    results = Path(results)
    if not (run.path / REPORT).exists() or not (run.path / PLOTS).is_dir():
        write_report(run.path)
    dest = _destination(run, results)
    dest.mkdir(parents=True, exist_ok=True)
    if not (run.path / store.RESULTS).exists():
        store.write_csv(run.path, cell_noise=noise.results_columns)
    for source in [*sorted(run.path.glob("*.csv")), run.path / store.META, run.path / REPORT]:
        if source.exists():
            shutil.copy2(source, dest / source.name)
    if (dest / PLOTS).exists():  # plots of an earlier publish of this run must not linger
        shutil.rmtree(dest / PLOTS)
    if (run.path / PLOTS).is_dir():
        shutil.copytree(run.path / PLOTS, dest / PLOTS)
    write_index(results)
    return dest


def _published(results: Path) -> list[Path]:
    """Published run directories: results/<device>/<date>/ with a results.csv."""
    skip = {store.RUNS.name, "baselines"}
    return sorted(p.parent for p in results.glob(f"*/*/{store.RESULTS}")
                  if p.parent.parent.name not in skip)


_INDEX_INTRO = """\
# Published runs

Each published run lives in `results/<device>/<date>/`: `results.csv` (one row per cell and
repeat), `meta.json` (environment and matrix), `parity.csv`, `parity_curves.csv` and
`grad_hist.csv` when accuracy parity ran, `peers.csv` when `ampbench peers --out-dir` ran,
`report.md` (tables) and `plots/`. Publish a run with

```bash
python -m bench publish results/runs/<run_id>
```

This index is regenerated from those directories on every publish; do not edit it by hand.
Headline numbers are the best over a model's batch sizes and policies against FP32 at the same
batch size, beyond the noise (intervals: 3 standard errors, on the log scale; {mark} marks a
throttled cell); each report's Summary compares every policy at one batch size.
"""


def render_index(results: Path | str) -> str:
    """results/README.md text: every published run with its headline numbers, per device."""
    results = Path(results)
    lines = [_INDEX_INTRO.format(mark=THROTTLED_MARK)]
    runs = [load(p) for p in _published(results)]
    if not runs:
        lines.append("No runs published yet.\n")
        return "\n".join(lines)
    by_device: dict[str, list[Run]] = {}
    for run in runs:
        by_device.setdefault(run.device_name, []).append(run)
    for device in sorted(by_device):
        body = []
        for run in sorted(by_device[device], key=lambda r: r.path.name, reverse=True):
            link = run.path.relative_to(results).as_posix()
            torch_version = run.meta.get("torch_version") or ""
            for h in headline(run):
                body.append([run.path.name, f"[{run.run_id}]({link}/{REPORT})", torch_version,
                             h.model, h.speedup, h.memory_saving, h.energy_saving, h.parity])
        lines += [f"## {device}", "",
                  tabulate(body, headers=["date", "run", "torch", "model", "best speedup",
                                          "best memory change", "best energy change",
                                          "parity"],
                           tablefmt="github", disable_numparse=True), ""]
    return "\n".join(lines)


def write_index(results: Path | str) -> Path:
    """Regenerate results/README.md from the published directories (idempotent)."""
    path = Path(results) / INDEX
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(render_index(results), encoding="utf-8")
    tmp.replace(path)
    return path


