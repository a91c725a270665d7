"""The gate's error rates on this machine: same-code reruns and a regression of known size.

    python -m bench.analysis.gate_rates                # cpu preset: 1 + 3 reruns + 1 slowed run
    python -m bench.analysis.gate_rates --reruns 5 --repeats 3 --slowdown 0.2 \
        --out results/runs/rates
    nox -s gate_rates -- --reruns 3

A benchmark of the benchmark, not a unit test: it runs the preset (sweep only, no parity or
report) once as the baseline, ``--reruns`` more times with the same code, and once more with
every cell slowed by ``--slowdown`` for real (AMPBENCH_SLOWDOWN: after each training step
the cell busy-works for that share of its own step time; test-only, CPU). Each rerun is gated
against the baseline with the default checks: every FAIL there is a false positive. The slowed
run is gated the same way: a cell whose samples/s check fails is detected. Writes
``rates.json`` and ``rates.md`` into ``--out`` and prints the summary.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench import store
from bench.analysis import gate, noise


def _run(preset: str, repeats: int, out: Path, slowdown: float = 0.0) -> None:
    env = {**os.environ, "AMPBENCH_SLOWDOWN": str(slowdown) if slowdown else ""}
    argv = [sys.executable, "-m", "bench", "run", "--preset", preset, "--repeats", str(repeats),
            "--no-parity", "--no-report", "--out", str(out)]
    print(f"rates: {' '.join(argv[1:])}" + (f" (slowed {slowdown:.0%})" if slowdown else ""),
          file=sys.stderr, flush=True)
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)


def tally(outcome: gate.Outcome) -> Counter[str]:
    """Verdicts over every (cell, check) the gate judged: pass, FAIL, too noisy, warn."""
    counts: Counter[str] = Counter()
    for row in outcome.rows:
        counts.update(v for v in row.verdicts.values() if v != "n/a")
    return counts


def detection(outcome: gate.Outcome, metric: str = "samples_per_s") -> Counter[str]:
    """Per cell, the verdict of its ``metric`` check: FAIL is a detected slowdown."""
    return Counter(v for row in outcome.rows for check, v in row.verdicts.items()
                   if check.startswith(f"{metric}:") and v != "n/a")


def measure(preset: str, reruns: int, repeats: int, slowdown: float, out: Path,
            baseline_repeats: int | None = None) -> dict[str, Any]:
    """Run everything and gate it; the figures as a dict (also written to rates.json)."""
    checks = gate.parse_checks(None)
    baseline = out / "run-0"
    _run(preset, baseline_repeats or repeats, baseline)
    same: list[dict[str, Any]] = []
    for i in range(1, reruns + 1):
        _run(preset, repeats, out / f"run-{i}")
        outcome = gate.judge_runs(baseline, out / f"run-{i}", checks)
        same.append({"run": i, "verdicts": dict(tally(outcome)),
                     "false_positives": [f"{f.cell}: {f.detail}" for f in outcome.findings
                                         if f.verdict == gate.FAIL]})
    _run(preset, repeats, out / "slowed", slowdown)
    slowed = gate.judge_runs(baseline, out / "slowed", checks)
    judged = sum(sum(r["verdicts"].values()) for r in same)
    false_pos = sum(r["verdicts"].get(gate.FAIL, 0) for r in same)
    noisy = sum(r["verdicts"].get(gate.NOISY, 0) for r in same)
    caught = detection(slowed)
    cells = sum(caught.values())
    figures = {
        "preset": preset, "repeats": repeats, "baseline_repeats": baseline_repeats or repeats,
        "reruns": reruns, "slowdown": slowdown,
        "device_name": str(store.load_results(baseline, cell_noise=noise.results_columns)[
            "device_name"].dropna().iloc[0]),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checks": [str(c) for c in checks],
        "same_code": {"judged_checks": judged, "false_positives": false_pos,
                      "too_noisy": noisy, "per_rerun": same},
        "slowed": {"cells": cells, "detected": caught.get(gate.FAIL, 0),
                   "too_noisy": caught.get(gate.NOISY, 0), "missed": caught.get(gate.PASS, 0),
                   "band": [b.spread for b in slowed.bands]},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "rates.json").write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    (out / "rates.md").write_text(render(figures), encoding="utf-8")
    return figures


def render(figures: dict[str, Any]) -> str:
    """The figures as a short markdown summary."""
    same, slowed = figures["same_code"], figures["slowed"]
    runs = f"{figures['reruns']} same-code reruns"
    return "\n".join([
        f"# Gate error rates: {figures['device_name']}", "",
        f"{figures['preset']} preset, baseline {figures.get('baseline_repeats', '?')} "
        f"repeat(s) per cell, reruns {figures['repeats']}, checks "
        + ", ".join(f"`{c}`" for c in figures["checks"]) + f"; {figures['timestamp']}.", "",
        f"- **False positives:** {same['false_positives']} of {same['judged_checks']} checks "
        f"failed over {runs} ({same['too_noisy']} too noisy to judge).",
        f"- **Detection:** every cell slowed by {figures['slowdown']:.0%} for real: "
        f"{slowed['detected']} of {slowed['cells']} cells failed the samples/s check "
        f"({slowed['too_noisy']} too noisy, {slowed['missed']} missed).", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.analysis.gate_rates", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--preset", default="cpu", help="matrix preset to rerun (default cpu)")
    parser.add_argument("--reruns", type=int, default=3, help="same-code reruns (default 3)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="processes per cell of the reruns and the slowed run (default 1)")
    parser.add_argument("--baseline-repeats", type=int, default=None,
                        help="processes per cell of the baseline (default: --repeats)")
    parser.add_argument("--slowdown", type=float, default=0.2,
                        help="the injected slowdown, a share of the step time (default 0.2)")
    parser.add_argument("--out", type=Path, help="directory for the runs and rates.md "
                        "(default results/runs/rates-<time>)")
    args = parser.parse_args(argv)
    if args.reruns < 1 or args.repeats < 1 or not 0 < args.slowdown <= 10:
        parser.error("--reruns and --repeats must be at least 1, --slowdown in (0, 10]")
    stamp = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}"
    out = args.out or store.RUNS / f"rates-{stamp}"
    figures = measure(args.preset, args.reruns, args.repeats, args.slowdown, out,
                      args.baseline_repeats)
    print(render(figures))
    print(f"rates: {out / 'rates.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
