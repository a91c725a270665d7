"""Baselines: where a device's baseline lives, and ``ampbench baseline RUN_DIR`` promoting one.

A baseline is promoted deliberately, never automatically: ``python -m bench baseline RUN_DIR
[--out PATH]`` copies the run's results (one device only, at least one ok cell) to
``results/baselines/<device-slug>.csv``, the file ``ampbench gate`` compares later runs of that
device against by default. The run's parity verdicts travel with it as the sibling
``<name>.parity.csv``; a stale sibling from an older baseline is removed. Promoting a run with
uncommitted changes or throttled cells warns. torch-free.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from bench import BadInput, paths, store
from bench.analysis import cells, noise
from bench.analysis.checks import ALWAYS, CHECKABLE
from bench.parity.verdict import VERDICTS, worst_verdict

BASELINES = Path("results") / "baselines"
PARITY = store.PARITY


def parity_path(source: Path) -> Path | None:
    """The parity CSV that goes with a side: a run directory's ``parity.csv`` (the directory
    named, or its results.csv or records.jsonl), or for a CSV ``X.csv`` its sibling
    ``X.parity.csv``; None when there is none."""
    if source.is_dir():
        path = source / PARITY
    elif source.name in (store.RESULTS, store.RECORDS):
        path = source.parent / PARITY
    else:
        path = source.with_name(f"{source.stem}.parity.csv")
    return path if path.exists() else None


def parity_verdicts(source: Path) -> dict[tuple[str, str], str] | None:
    """(model, precision) -> worst verdict over seeds, or None when the side has no parity CSV;
    BadInput for one the gate cannot read."""
    path = parity_path(source)
    if path is None:
        return None
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise BadInput(f"{path}: not a readable CSV ({reason})") from None
    missing = [c for c in ("model", "precision", "verdict") if c not in frame.columns]
    if missing:
        raise BadInput(f"{path}: missing column(s) {', '.join(missing)}")
    verdicts: dict[tuple[str, str], str] = {}
    for (model, precision), rows in frame.groupby(["model", "precision"]):
        seen = {str(v).strip().upper() for v in rows["verdict"].dropna()}
        unknown = seen - set(VERDICTS) - {""}
        if unknown:
            raise BadInput(f"{path}: unknown verdict '{sorted(unknown)[0]}' "
                           f"(valid: {', '.join(VERDICTS)})")
        worst = worst_verdict(seen)
        if worst:  # the FP32 reference rows may carry no verdict
            verdicts[(str(model), str(precision))] = worst
    return verdicts


def check(frame: pd.DataFrame, metrics: Sequence[str], source: Path | str) -> None:
    """A baseline is the reference: an infinite value of ``metrics``, or an ok cell without
    the measurements every ok cell has, means the file is damaged (bad input), not that
    nothing can be checked. The gate asks it of its baseline, and ``promote`` of a run for
    every metric a check may name: it promotes only what the gate accepts."""
    ok = frame[frame["status"] == "ok"]
    for column in dict.fromkeys([*metrics, *ALWAYS]):
        if column not in ok:
            continue
        values = pd.to_numeric(ok[column], errors="coerce")
        bad = values.map(lambda v: math.isinf(v)) | (values.isna() & (column in ALWAYS))
        if bad.any():
            row = frame.attrs["lines"][frame.index.get_loc(bad.idxmax())] \
                if "lines" in frame.attrs else int(bad.idxmax()) + 2  # after the header
            raise BadInput(f"{source}: line {row}: ok cell with {column}="
                           f"{ok[column][bad].iloc[0]}; a baseline needs finite measurements")


def device_of(frame: pd.DataFrame, source: Path | str) -> str:
    """The one device whose rows ``frame`` holds; BadInput for none named or several."""
    if "device_name" not in frame.columns:
        raise BadInput(f"{source}: missing column(s) device_name")
    names = sorted(set(map(cells.device_name, frame["device_name"])))
    if len(names) != 1:
        raise BadInput(f"{source}: rows from {len(names)} devices ({', '.join(names)}); "
                       f"a baseline covers one device")
    return names[0]


def baseline_for(current: Path | str, baselines: Path = BASELINES) -> Path:
    """Where the baseline for the current run's device lives (it may not exist yet)."""
    frame = store.load_results(current, cell_noise=noise.results_columns)
    return baselines / f"{store.device_slug(device_of(frame, current))}.csv"


def promote(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Copy a run's results (and parity verdicts) to a baseline CSV; returns its path."""
    if out:
        paths.output_file(out, "--out", make_parents=True)
    frame = store.load_results(run_dir, cell_noise=noise.results_columns)
    device = device_of(frame, run_dir)
    if not (frame["status"] == "ok").any():
        raise BadInput(f"{run_dir}: no cell with status ok; nothing worth a baseline")
    check(frame, CHECKABLE, run_dir)  # what the gate would refuse as its baseline
    parity_verdicts(Path(run_dir))
    path = paths.output_file(out or BASELINES / f"{store.device_slug(device)}.csv", "--out",
                             make_parents=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # never left behind, whatever failed
    # The parity sibling travels with the CSV; a stale one from an older baseline must not stay.
    sibling = path.with_name(f"{path.stem}.parity.csv")
    source_parity = parity_path(Path(run_dir))
    if source_parity is not None:
        shutil.copyfile(source_parity, sibling)
    elif sibling.exists():
        sibling.unlink()
    for column, why in (("git_dirty", "uncommitted changes"), ("throttled", "throttled cells")):
        if column in frame and any(store.truthy(v) for v in frame[column]):
            print(f"warning: {run_dir} has {why}; promoted anyway", file=sys.stderr)
    return path


def promote_main(args: argparse.Namespace) -> int:
    """``ampbench baseline RUN_DIR``: promote a run to this device's baseline."""
    path = promote(args.run_dir, args.out)
    parity = path.with_name(f"{path.stem}.parity.csv")
    print(f"promoted {args.run_dir} to {path}" + (f" (+ {parity})" if parity.exists() else ""))
    return 0
