"""Run directories and the record schema: records.jsonl is the truth, results.csv is derived.

A run directory holds ``meta.json`` (environment and matrix), ``records.jsonl`` (one JSON
record per finished cell and repeat, appended with flush + fsync) and ``results.csv``.
torch-free: analysis (report, gate) reads these files on any machine.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench import BadInput

SCHEMA_VERSION = 1

IDENTITY = (
    "schema", "run_id", "cell_id", "model", "precision", "batch_size", "seq_len", "image_size",
    "grad_accum", "compile", "world_size", "repeat",
)
STATUS = ("status", "error")
TIMING = (
    "warmup_steps", "timed_steps", "step_ms_median", "step_ms_iqr", "step_ms_min",
    "samples_per_s", "tokens_per_s", "startup_s",
)
MEMORY = ("peak_mem_allocated_gib", "peak_mem_reserved_gib", "peak_rss_gib")
COMPUTE = ("flops_per_step", "achieved_tflops", "peak_tflops", "mfu_pct")
POWER = (
    "power_avg_w", "power_max_w", "power_source", "idle_power_w", "energy_j", "energy_source",
    "energy_check_pct", "joules_per_sample", "sm_clock_mhz_avg", "temp_max_c",
    "throttle_reasons", "throttled",
)
NUMERICS = (
    "loss_first", "loss_last", "nonfinite_steps", "scaler_scale_final", "scaler_skipped_steps",
)
ENVIRONMENT = (
    "device", "device_name", "device_count", "driver_version", "torch_version", "cuda_version",
    "cudnn_version", "python_version", "machine_id", "git_sha", "git_dirty", "timestamp",
)
FIELDS: tuple[str, ...] = (
    IDENTITY + STATUS + TIMING + MEMORY + COMPUTE + POWER + NUMERICS + ENVIRONMENT
)

# What identifies a cell across runs: a cell's repeats share these, and the report and the
# gate match cells on them.
KEY = ("model", "precision", "batch_size", "seq_len", "image_size", "grad_accum", "compile",
       "world_size")

STATUSES = ("ok", "oom", "timeout", "error", "unsupported", "skipped")
FAILED = ("error", "timeout", "oom", "unsupported", "skipped")  # worst first

RUNS = Path("results") / "runs"  # scratch run directories (git-ignored)
RECORDS = "records.jsonl"
RESULTS = "results.csv"
META = "meta.json"


def empty_record(**fields: Any) -> dict[str, Any]:
    """A record with every schema field present (None where unknown), updated with ``fields``."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"not schema fields: {sorted(unknown)}")
    record: dict[str, Any] = dict.fromkeys(FIELDS)
    record["schema"] = SCHEMA_VERSION
    record.update(fields)
    return record


def append(run_dir: Path, record: dict[str, Any], name: str = RECORDS) -> None:
    """Append one record to records.jsonl (or another JSON-lines file ``name``) as a single
    line, flushed and fsynced: a crash never half-writes a row."""
    path = Path(run_dir) / name
    line = (json.dumps(record, sort_keys=False, allow_nan=True) + "\n").encode("utf-8")
    # One write() of the whole line; a reader ignores a line without its newline. A writer
    # killed mid-line leaves such a torn tail: end it first, so this record starts a line.
    with open(path, "ab+") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete record; for a repeated (cell_id, repeat) the last one wins."""
    path = Path(run_dir) / RECORDS
    if not path.exists():
        return []
    latest: dict[tuple[Any, Any], dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn tail of a killed writer
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line that a later append ended
            latest[(record.get("cell_id"), record.get("repeat"))] = record
    return list(latest.values())


def write_csv(run_dir: Path, records: Iterable[dict[str, Any]] | None = None) -> Path:
    """Derive results.csv from records.jsonl (atomically replaced)."""
    import pandas as pd

    run_dir = Path(run_dir)
    rows = list(records) if records is not None else load_records(run_dir)
    frame = pd.DataFrame(rows)
    for field in FIELDS:
        if field not in frame.columns:
            frame[field] = None
    extra = [c for c in frame.columns if c not in FIELDS]
    frame = frame[list(FIELDS) + extra]
    if "throttle_reasons" in frame.columns:
        frame["throttle_reasons"] = frame["throttle_reasons"].map(
            lambda v: ";".join(v) if isinstance(v, list) else v
        )
    path = run_dir / RESULTS
    tmp = path.with_suffix(".csv.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def write_meta(run_dir: Path, meta: dict[str, Any]) -> Path:
    """Write meta.json atomically."""
    path = Path(run_dir) / META
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_meta(run_dir: Path) -> dict[str, Any]:
    """meta.json of a run directory, or {} when it has none."""
    path = Path(run_dir) / META
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_results(source: Path | str) -> Any:
    """results.csv as a DataFrame, from a run directory or a CSV path; bad input raises BadInput."""
    import pandas as pd

    path = Path(source)
    if path.is_dir():
        csv = path / RESULTS
        if not csv.exists() and (path / RECORDS).exists():
            write_csv(path)
        path = csv
    if not path.exists():
        raise BadInput(f"{source}: no such run directory or results CSV")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise BadInput(f"{path}: not a readable CSV ({reason})") from None
    required = ("model", "precision", "batch_size", "status")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise BadInput(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


def latest_run(runs: Path = RUNS) -> Path:
    """The most recently written run directory under ``runs``; BadInput when there is none."""
    written = {}
    for candidate in Path(runs).glob("*/"):
        times = [f.stat().st_mtime for f in (candidate / RESULTS, candidate / RECORDS)
                 if f.exists()]
        if times:
            written[candidate] = max(times)
    if not written:
        raise BadInput(f"no run directory under {runs}; pass RUN_DIR")
    return max(written, key=written.__getitem__)


def truthy(value: Any) -> bool:
    """A flag read back from JSON or CSV: True, "True", "true", 1 -> True; NaN, "" -> False."""
    import pandas as pd

    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return not pd.isna(value) and bool(value)


_MARKS = re.compile(r"\((?:r|tm|c)\)|[®™©]", re.IGNORECASE)
# CPU brand strings carry words that say nothing about the part: "CPU @ 2.90GHz", "Processor".
# Only the noise goes; a name like "Test CPU" keeps its "cpu".
_CPU_NOISE = re.compile(
    r"(?:\bcpu\s*)?@\s*[\d.]+\s*[gm]hz|\b\d+-core\s+processor\b|\bprocessor\s*$"
    r"|\bwith\b.*\bgraphics\b",
    re.IGNORECASE,
)


def device_slug(name: str | None) -> str:
    """A device name as a file name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'.

    Trademark marks and CPU brand-string noise go: 'Intel(R) Xeon(R) Platinum 8375C CPU @
    2.90GHz' -> 'intel-xeon-platinum-8375c'. Run ids, published runs and baselines all use it.
    """
    text = _CPU_NOISE.sub(" ", _MARKS.sub(" ", str(name or "")))
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown-device"
