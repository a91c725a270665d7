"""Run directories: records.jsonl is the truth, results.csv is derived; the record schema is
bench/schema.py (its names re-exported here).

A run directory holds ``meta.json`` (environment and matrix), ``records.jsonl`` (one JSON
record per finished cell and repeat, appended with flush + fsync) and ``results.csv``. A record
keeps the raw step times of its timed window (``step_times_ms``); the time statistics are
derived from them by one rule (``step_stats``) wherever a record or a row is read, so a better
statistic later applies to old results too (pyperf's model). results.csv is derived from
records.jsonl when a sweep ends, and by a reader that finds it missing or older than
records.jsonl (a running or stopped sweep), never rewritten per cell. torch-free: analysis
(report, gate) reads these files on any machine.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench import BadInput

# Re-exported (``as``): callers find a run directory's readers, costs and flags here.
from bench.costs import COST, with_costs
from bench.costs import PRICES as PRICES
from bench.costs import energy_usd_per_1m_samples as energy_usd_per_1m_samples
from bench.costs import prices as prices
from bench.costs import usd_per_1m_samples as usd_per_1m_samples
from bench.readers import load_jsonl, parse_number, read_csv, warn
from bench.readers import truthy as truthy
from bench.rows import upgrade, with_raw_stats, without_duplicates, without_nonfinite
from bench.schema import (  # noqa: F401 (re-exported: callers find the schema here)
    CELL_NOISE,
    COMPUTE,
    CONVERSION,
    ENVIRONMENT,
    FAILED,
    FIELDS,
    HELD_DTYPES,
    IDENTITY,
    KEY,
    MEMORY,
    MFU_ABOVE_100,
    MODEL,
    NUMERICS,
    PEAK_MEMORY,
    PLACEMENT,
    POWER,
    SCALE_TRAJECTORY,
    SCHEMA_VERSION,
    STATUS,
    STATUSES,
    STEP_TIMES,
    TIMING,
    CellNoise,
)

RUNS = Path("results") / "runs"  # scratch run directories (git-ignored)
# Every file a run directory holds, named here only; the modules that write them import these.
RECORDS = "records.jsonl"  # the truth: one record per process (the sweep)
RESULTS = "results.csv"  # derived from RECORDS
META = "meta.json"  # environment fingerprint and matrix (the run command)
LOCK = ".lock"  # held by the one process writing the directory (bench/run/lock.py)
PARITY = "parity.csv"  # verdicts (bench/parity/stage.py)
PARITY_CURVES = "parity_curves.csv"
GRAD_HIST = "grad_hist.csv"  # FP32 gradient magnitudes per power of two
PARITY_RUNS = "parity_runs.jsonl"  # finished parity runs, for a resume
PEERS = "peers.csv"  # `ampbench peers --out-dir RUN_DIR`
REPORT = "report.md"
PLOTS = "plots"


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


STEP_STATS = ("step_ms_median", "step_ms_iqr", "step_ms_min")  # derived from STEP_TIMES


def step_stats(times_ms: Sequence[float]) -> dict[str, float]:
    """Median, interquartile range and minimum of raw step times (ms): the one rule, applied
    by the cell when it writes a record and by every reader to the raw times it finds."""
    if len(times_ms) >= 2:
        q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    else:
        q1 = q3 = times_ms[0]
    return {"step_ms_median": statistics.median(times_ms), "step_ms_iqr": q3 - q1,
            "step_ms_min": min(times_ms)}


def with_step_stats(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with STEP_STATS derived from its raw step times; one without any (schema 1-5,
    a failed cell) keeps the statistics it has."""
    times = record.get(STEP_TIMES)
    return {**record, **step_stats(times)} if isinstance(times, list) and times else record


# Record fields that hold numbers (or null) and whole numbers of at least 0 or 1: a record
# read back with anything else in them is damaged.
_RECORD_INTS = {"repeat": 0, "batch_size": 0, "seq_len": 1, "image_size": 1, "grad_accum": 1,
                "world_size": 1, "warmup_steps": 0, "timed_steps": 0, "fp8_converted": 0,
                "fp8_num_unconverted": 0}
_RECORD_NUMBERS = tuple(f for f in TIMING if f not in ("host_bound", "memory_format")) + (
    MEMORY + tuple(f for f in COMPUTE if f != "mfu_flag") + NUMERICS) + (
    "power_avg_w", "power_max_w", "idle_power_w", "energy_j", "energy_check_pct",
    "joules_per_sample", "sm_clock_mhz_avg", "temp_max_c")
# What an ok record measured: NaN or inf in one is damage (a loss may be NaN: that is a result).
MEASUREMENTS = tuple(f for f in _RECORD_NUMBERS if f not in NUMERICS)
# Every ok record has these (null only for a failed cell).
ALWAYS_MEASURED = ("step_ms_median", "step_ms_iqr", "samples_per_s")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def record_problem(record: Any) -> str | None:
    """Why ``record`` is not a usable record (None when it is): what a resumed run, the
    summary and results.csv need of it."""
    if not isinstance(record, dict):
        return f"not a record but {type(record).__name__} {str(record)[:40]}"
    for field in ("cell_id", "model", "precision"):
        if not isinstance(record.get(field), str) or not record[field]:
            return f"no {field}"
    if record.get("status") not in STATUSES:
        return f"status {record.get('status')!r} is not one of {', '.join(STATUSES)}"
    for field, low in _RECORD_INTS.items():
        value = record.get(field)
        required = field in ("repeat", "batch_size")
        if (value is not None or required) and not (
                isinstance(value, int) and not isinstance(value, bool) and value >= low):
            return f"{field} {value!r} is not a whole number of at least {low}"
    for field in _RECORD_NUMBERS:
        value = record.get(field)
        if value is not None and not _is_number(value):
            return f"{field} {value!r} is not a number"
    times = record.get(STEP_TIMES)
    if times is not None and not (isinstance(times, list) and times and all(
            _is_number(t) and 0 <= t < math.inf for t in times)):
        return f"{STEP_TIMES} {str(times)[:40]} is not a list of step times"
    scales = record.get(SCALE_TRAJECTORY)
    if scales is not None and not (isinstance(scales, list) and all(
            isinstance(p, list) and len(p) == 2 and _is_number(p[0]) and 0 <= p[0] < math.inf
            and isinstance(p[1], int) and p[1] >= 1 for p in scales)):
        return f"{SCALE_TRAJECTORY} {str(scales)[:40]} is not a list of [scale, steps] pairs"
    if record["status"] == "ok":
        for field in MEASUREMENTS:
            value = record.get(field)
            if _is_number(value) and not math.isfinite(value):
                return f"ok record with {field} {value}: not a finite measurement"
    return None


def load_records(run_dir: Path, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Every complete record; for a repeated (cell_id, repeat) the last one wins. A damaged
    line is a warning and skipped (a resumed run runs its cell again), and a line cut off by
    a writer killed mid-line is skipped; given ``skipped``, why for each goes there instead
    (load_results: the report and the gate say it). Time statistics come from the raw step
    times where a record has them. BadInput for records of a newer schema (``check_schema``)."""
    path = Path(run_dir) / RECORDS
    latest: dict[tuple[Any, Any], dict[str, Any]] = {}
    for record in load_jsonl(path, record_problem, skipped):
        latest[(record["cell_id"], record["repeat"])] = with_step_stats(record)
    check_schema(path, [r.get("schema") for r in latest.values()])
    return list(latest.values())


def check_schema(path: Path, schemas: Iterable[Any]) -> None:
    """BadInput when ``path`` holds rows of a newer schema than this code knows: what their
    fields mean may have changed (as schema 5 changed mfu_pct), so no answer read from them by
    this schema's rules can be trusted, and a resumed run must not append older rows to them."""
    newer = [n for n in map(parse_number, schemas) if n is not None and n > SCHEMA_VERSION]
    if newer:
        raise BadInput(f"{path}: schema {max(newer):g} ({len(newer)} row(s)), newer than the "
                       f"schema {SCHEMA_VERSION} this ampbench reads; read it with the "
                       "ampbench that wrote it, or a newer one")


def write_csv(run_dir: Path, records: Iterable[dict[str, Any]] | None = None,
              cell_noise: CellNoise | None = None) -> Path:
    """Derive results.csv from records.jsonl (or ``records``), atomically replaced: when a
    sweep ends, and when a reader finds it missing or stale (``results_csv``). ``cell_noise``
    fills the CELL_NOISE columns (bench.analysis.noise.results_columns); without it they are
    empty."""
    import pandas as pd

    run_dir = Path(run_dir)
    rows = [with_step_stats(r) for r in (load_records(run_dir) if records is None else records)]
    frame = pd.DataFrame(rows)
    # Every field, in one step (one insert per missing field would fragment the frame).
    missing = [f for f in FIELDS if f not in frame.columns]
    frame = frame.reindex(columns=[*frame.columns, *missing]).astype(
        dict.fromkeys(missing, object))
    frame = with_costs(_with_cell_noise(frame, cell_noise), read_meta(run_dir))
    derived = CELL_NOISE + tuple(c for c in COST if c in frame.columns)
    extra = [c for c in frame.columns if c not in FIELDS + derived]
    frame = frame[list(FIELDS + derived) + extra]
    # Lists as one column each: reasons as names, step times exactly (repr reads back as is).
    for column, text in (("throttle_reasons", str), ("neighbours", str),
                         (SCALE_TRAJECTORY, lambda p: f"{p[0]:g}:{p[1]}"),
                         (STEP_TIMES, lambda t: repr(float(t)))):
        frame[column] = frame[column].map(
            lambda v, text=text: ";".join(map(text, v)) if isinstance(v, list) else v)
    path = run_dir / RESULTS
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # a reader may derive it at once
    try:
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a runner stopped mid-write leaves no stray file
    return path


def results_csv(run_dir: Path, cell_noise: CellNoise | None = None) -> Path:
    """``run_dir``'s results.csv, derived from records.jsonl first when it is missing or not
    newer than records.jsonl: a sweep writes it when it ends, so one that is running, was
    stopped or was killed leaves it behind. Unwritable: the one there, with a warning."""
    run_dir = Path(run_dir)
    path, records = run_dir / RESULTS, run_dir / RECORDS
    if not records.exists() or (
            path.exists() and path.stat().st_mtime_ns > records.stat().st_mtime_ns):
        return path
    try:
        return write_csv(run_dir, cell_noise=cell_noise)
    except OSError as exc:
        if not path.exists():
            raise BadInput(f"{path}: cannot derive it from {RECORDS} ({exc.strerror})") from None
        print(f"warning: {path}: older than {RECORDS} and cannot be derived again "
              f"({exc.strerror}); read as it is", file=sys.stderr)
        return path


def _with_cell_noise(frame: Any, cell_noise: CellNoise | None) -> Any:
    """``frame`` with the CELL_NOISE columns: filled by ``cell_noise`` (a function of the
    analysis side, so that store imports nothing from it), else empty."""
    if cell_noise is not None:
        return cell_noise(frame)
    frame = frame.copy()
    for column in CELL_NOISE:
        frame[column] = None
    return frame


def write_meta(run_dir: Path, meta: dict[str, Any]) -> Path:
    """Write meta.json atomically."""
    path = Path(run_dir) / META
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a runner stopped mid-write leaves no stray file
    return path


def read_meta(run_dir: Path) -> dict[str, Any]:
    """meta.json of a run directory, or {} when it has none or it is damaged (a warning)."""
    path = Path(run_dir) / META
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        warn(path, path.read_bytes()[:exc.start].count(b"\n") + 1, "not UTF-8 text")
        return {}
    except json.JSONDecodeError as exc:
        warn(path, exc.lineno, f"not valid JSON ({exc.msg})")
        return {}
    except OSError as exc:
        raise BadInput(f"{path}: cannot read it ({exc.strerror})") from None
    if not isinstance(meta, dict):
        warn(path, 1, f"not a JSON object but {type(meta).__name__}")
        return {}
    return meta


# What results.csv's columns may hold, beyond text. Whole numbers with their least value;
# numbers that cannot be negative; numbers of either sign. Empty (NaN) is allowed everywhere
# but in REQUIRED: a failed cell has no measurements, and what a missing one means is the
# reader's caller's to say (the gate fails it).
REQUIRED = ("model", "precision", "batch_size", "status")
WHOLE = {"batch_size": 0, "seq_len": 1, "image_size": 1, "grad_accum": 1, "world_size": 1,
         "repeat": 0, "warmup_steps": 0, "timed_steps": 0, "device_count": 0,
         "nonfinite_steps": 0, "scaler_skipped_steps": 0, "nonfinite_grad_steps": 0,
         "nonfinite_params": 0, "num_steps_counted": 0, "scaler_scale_changes": 0,
         "max_batch": 0, "num_processes": 0,
         "fp8_converted": 0, "fp8_num_unconverted": 0}
NON_NEGATIVE = (
    "step_ms_median", "step_ms_iqr", "step_ms_min", "samples_per_s", "tokens_per_s",
    "startup_s", *MEMORY, "flops_per_step", "achieved_tflops", "peak_tflops", "mfu_pct",
    "peak_fp8_tflops", "mfu_fp8_pct",
    "power_avg_w", "power_max_w", "idle_power_w", "energy_j", "joules_per_sample",
    "sm_clock_mhz_avg", "scaler_scale_final", "scaler_scale_min", "scaler_scale_max",
    "cell_samples_per_s",
    "cell_samples_per_s_err_pct", "process_spread_pct", "noise_pct", "host_ms_median", *COST,
)
SIGNED = ("loss_first", "loss_last", "energy_check_pct", "temp_max_c", "queued_ms_median")


def resolve(source: Path | str) -> tuple[Path | None, Path]:
    """(run directory or None, results CSV) of what a command was pointed at: a run directory,
    its results.csv or its records.jsonl, or a results CSV of its own (a baseline); the one
    rule by which report, gate and baseline take a path. BadInput for anything else."""
    path = Path(source)
    run_dir = path if path.is_dir() else path.parent if path.name in (RESULTS, RECORDS) \
        and path.is_file() else None
    if run_dir is not None and not any((run_dir / n).is_file() for n in (RESULTS, RECORDS)):
        raise BadInput(f"{source}: not a run directory (no {RESULTS} or {RECORDS})")
    if run_dir is None and not path.is_file():
        raise BadInput(f"{source}: no such run directory or results CSV")
    return run_dir, path if run_dir is None else run_dir / RESULTS


def load_results(source: Path | str, strict: bool = True,
                 cell_noise: CellNoise | None = None) -> Any:
    """results.csv (or a baseline) as a DataFrame, from any path ``resolve`` takes: the one
    reader that decides such a file is malformed (BadInput naming file, line and column; see
    ``read_csv``). ``strict=False``: a damaged line is a warning and skipped instead. A run
    directory's results.csv is derived first when missing or stale (``results_csv``; its noise
    columns by ``cell_noise``, see ``write_csv``). Status values come back stripped and
    lower-case; time statistics come from the raw step times where a row has them, and the
    noise columns from ``cell_noise`` when given (derived on read: a file saved without them,
    or by an older statistic, reads the same as one derived now). What was read around (a
    process twice, a damaged or cut-off line of either file) is in ``frame.attrs["problems"]``."""
    run_dir, path = resolve(source)
    skipped: list[str] = []
    if run_dir is not None:
        path = results_csv(run_dir, cell_noise)
        load_records(run_dir, skipped)  # only for what it leaves out: results.csv has the rest
    frame = read_csv(path, REQUIRED, WHOLE, NON_NEGATIVE, SIGNED, strict=strict)
    status = frame["status"].astype(str).str.strip().str.lower()
    unknown = ~status.isin(STATUSES)
    if unknown.any():
        row = int(unknown.to_numpy().argmax())
        raise BadInput(f"{path}: line {frame.attrs['lines'][row]}: unknown status "
                       f"'{frame['status'].iloc[row]}' (valid: {', '.join(STATUSES)})")
    frame["status"] = status
    if "schema" in frame.columns:
        check_schema(path, frame["schema"])
    identity = ("run_id", "cell_id", *KEY, "device_name", "repeat", "max_batch_search")
    frame = without_duplicates(frame, path, identity)
    frame = upgrade(with_raw_stats(frame, path, STEP_TIMES, step_stats))
    if not strict:
        # Empty and NaN read alike here: only an ok row without throughput is said empty.
        frame = without_nonfinite(frame, path, MEASUREMENTS, ("samples_per_s",))
    problems = [*skipped, *frame.attrs.get("problems", [])]
    frame = frame if cell_noise is None else cell_noise(frame)
    frame.attrs["problems"] = problems
    return frame


_SPREAD_WARNING = 0.10  # IQR / median above this makes a number hard to trust


def record_line(record: dict[str, Any]) -> str:
    """One human-readable line for a record (stderr of a cell, progress of a run)."""
    size = f" T={record['seq_len']}" if record.get("seq_len") else \
        f" {record['image_size']}px" if record.get("image_size") else ""
    head = f"{record['model']} {record['precision']} b={record['batch_size']}{size}"
    if (record.get("world_size") or 1) > 1:
        head += f" ws={record['world_size']}"
    if record.get("strategy") not in (None, "", "ddp"):
        head += f" {record['strategy']}"
    if record["status"] != "ok":
        error = (record.get("error") or "").splitlines()
        return f"{head}: {record['status']}" + (f" ({error[-1][:160]})" if error else "")
    mem = record["peak_mem_reserved_gib"] or record["peak_rss_gib"]
    mem_kind = "reserved" if record["peak_mem_reserved_gib"] is not None else "rss"
    steps = len(record.get(STEP_TIMES) or []) or record.get("timed_steps")
    spread = "IQR n/a: 1 step" if steps == 1 else f"IQR {record['step_ms_iqr']:.2f}"  # not 0
    line = (f"{head}: ok {record['samples_per_s']:,.1f} samples/s, step "
            f"{record['step_ms_median']:.2f} ms ({spread}), "
            f"peak {mem:.2f} GiB {mem_kind}, {record['achieved_tflops']:.3f} TFLOP/s")
    if record["step_ms_iqr"] > _SPREAD_WARNING * record["step_ms_median"]:
        line += " [wide spread: IQR > 10% of median]"
    if record.get("host_bound"):
        line += " [host-bound: the GPU waits for the host's kernel launches]"
    if record.get("emulated"):
        line += " [emulated: software FP8, its speed is not FP8's]"
    return line


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
