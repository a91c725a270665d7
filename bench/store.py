"""Run directories and the record schema: records.jsonl is the truth, results.csv is derived.

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
from collections.abc import Callable, Iterable, Sequence
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

SCHEMA_VERSION = 6  # 2: calibration and the per-cell noise columns; 3: host timing,
# memory_format, wall_s, throttle_shares/power_capped/power_scope, throttled = thermal/hw only;
# 4: emulated, fp8_converted, fp8_unconverted; 5: peak_fp8_tflops, mfu_fp8_pct, mfu_flag, and an
# FP8 row's mfu_pct is against the bf16 peak (it was against the FP8 peak: see _upgrade);
# 6: step_times_ms, the timed window's raw step times, from which every reader derives
# step_ms_median/iqr/min (records of 1-5 have none and keep their stored statistics)

IDENTITY = (
    "schema", "run_id", "cell_id", "model", "precision", "batch_size", "seq_len", "image_size",
    "grad_accum", "compile", "world_size", "repeat", "calibration",
)
STATUS = ("status", "error")
TIMING = (
    "warmup_steps", "timed_steps", "step_ms_median", "step_ms_iqr", "step_ms_min",
    "samples_per_s", "tokens_per_s", "startup_s",
    "wall_s",  # the cell's process from start to exit, as the runner saw it (--time-budget)
    # The host's time issuing a step, the GPU work still queued when it had (bench/cell/timing.py),
    # whether the GPU waited for the host; the image layout used (None: not an image model).
    "host_ms_median", "queued_ms_median", "host_bound", "memory_format",
)
MEMORY = ("peak_mem_allocated_gib", "peak_mem_reserved_gib", "peak_rss_gib")
# MFU (bench/cell/flops.py):
# ``mfu_pct`` against the policy's comparable dense peak (bf16's for every
# autocast policy, FP8 included), ``mfu_fp8_pct`` against the FP8 peak (FP8 policies only), and
# ``mfu_flag``: "" or why an MFU is empty (no peak for the device; above 100%, with the value).
COMPUTE = ("flops_per_step", "achieved_tflops", "peak_tflops", "mfu_pct", "peak_fp8_tflops",
           "mfu_fp8_pct", "mfu_flag")
MFU_ABOVE_100 = "above 100%"  # how mfu_flag starts for an MFU no run can reach
POWER = (
    "power_avg_w", "power_max_w", "power_source", "idle_power_w", "energy_j", "energy_source",
    "energy_check_pct", "joules_per_sample", "sm_clock_mhz_avg", "temp_max_c",
    "throttle_reasons", "throttled", "others_cpu_pct",
    # Each clock-event reason's share of the samples ("sw_power_cap:0.82;..."), whether the
    # power limit held the clocks (``throttled`` is heat and hardware slowdown only), and
    # whose power it is: "gpu", or "shared_gpu" for a MIG instance (bench/telemetry/monitor.py).
    "throttle_shares", "power_capped", "power_scope",
)
NUMERICS = (
    "loss_first", "loss_last", "nonfinite_steps", "scaler_scale_final", "scaler_skipped_steps",
)
# What the policy did to the model (bench/precision.py): whether its low-precision math ran
# emulated in software (FP8 off CUDA: its speed says nothing about FP8), and for FP8 how many
# nn.Linear layers torchao converted and which it left in bf16 ("name (in x out), ...").
CONVERSION = ("emulated", "fp8_converted", "fp8_unconverted")
ENVIRONMENT = (
    "device", "device_name", "device_count", "driver_version", "torch_version", "cuda_version",
    "torch_cuda_build", "cudnn_version", "python_version", "machine_id", "git_sha", "git_dirty",
    "timestamp",
)
# The raw step times (ms) of the timed window, in order: the slowest rank's under torchrun.
# Last: a long list, kept in records.jsonl and as one ";"-joined column of results.csv.
STEP_TIMES = "step_times_ms"
FIELDS: tuple[str, ...] = (
    IDENTITY + STATUS + TIMING + MEMORY + COMPUTE + POWER + NUMERICS + CONVERSION + ENVIRONMENT
    + (STEP_TIMES,)
)

# Derived into results.csv from all of a cell's processes (the same on each of its rows): the
# cell's throughput (median over its ok processes), that value's relative standard error, the
# spread between its processes and the per-process noise used, with where that came from
# (bench/analysis/noise.py).
CELL_NOISE = ("num_processes", "cell_samples_per_s", "cell_samples_per_s_err_pct",
              "process_spread_pct", "noise_pct", "noise_source")
# What computes them: results.csv's rows in, the same rows with CELL_NOISE out. The analysis
# side has it (bench.analysis.noise.results_columns); its writers and readers pass it in.
CellNoise = Callable[[Any], Any]

# What identifies a cell across runs: a cell's repeats share these, and the report and the
# gate match cells on them.
KEY = ("model", "precision", "batch_size", "seq_len", "image_size", "grad_accum", "compile",
       "world_size")

STATUSES = ("ok", "oom", "timeout", "error", "unsupported", "skipped")
FAILED = ("error", "timeout", "oom", "unsupported", "skipped")  # worst first

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
                "world_size": 1, "warmup_steps": 0, "timed_steps": 0, "fp8_converted": 0}
_RECORD_NUMBERS = tuple(f for f in TIMING if f not in ("host_bound", "memory_format")) + (
    MEMORY + tuple(f for f in COMPUTE if f != "mfu_flag") + NUMERICS) + (
    "power_avg_w", "power_max_w", "idle_power_w", "energy_j", "energy_check_pct",
    "joules_per_sample", "sm_clock_mhz_avg", "temp_max_c")


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
            _is_number(t) and t >= 0 for t in times)):
        return f"{STEP_TIMES} {str(times)[:40]} is not a list of step times"
    return None


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete record; for a repeated (cell_id, repeat) the last one wins. A damaged
    line is a warning and skipped (a resumed run runs its cell again). Time statistics come
    from the raw step times where a record has them."""
    path = Path(run_dir) / RECORDS
    latest: dict[tuple[Any, Any], dict[str, Any]] = {}
    for record in load_jsonl(path, record_problem):
        latest[(record["cell_id"], record["repeat"])] = with_step_stats(record)
    _warn_newer(path, [r.get("schema") for r in latest.values()])
    return list(latest.values())


def _warn_newer(path: Path, schemas: Iterable[Any]) -> None:
    """One warning when ``path`` holds rows of a newer schema than this code knows: they are
    read by this schema's rules, and fields it does not know are carried along unread."""
    newer = [n for n in map(parse_number, schemas) if n is not None and n > SCHEMA_VERSION]
    if newer:
        print(f"warning: {path}: {len(newer)} row(s) of schema {max(newer):g}, newer than this "
              f"ampbench's {SCHEMA_VERSION}: read by schema {SCHEMA_VERSION}'s rules",
              file=sys.stderr)


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
    for field in FIELDS:
        if field not in frame.columns:
            frame[field] = None
    frame = with_costs(_with_cell_noise(frame, cell_noise), read_meta(run_dir))
    derived = CELL_NOISE + tuple(c for c in COST if c in frame.columns)
    extra = [c for c in frame.columns if c not in FIELDS + derived]
    frame = frame[list(FIELDS + derived) + extra]
    # Lists as one column each: reasons as names, step times exactly (repr reads back as is).
    for column, text in (("throttle_reasons", str), (STEP_TIMES, lambda t: repr(float(t)))):
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
         "nonfinite_steps": 0, "scaler_skipped_steps": 0, "max_batch": 0, "num_processes": 0,
         "fp8_converted": 0}
NON_NEGATIVE = (
    "step_ms_median", "step_ms_iqr", "step_ms_min", "samples_per_s", "tokens_per_s",
    "startup_s", *MEMORY, "flops_per_step", "achieved_tflops", "peak_tflops", "mfu_pct",
    "peak_fp8_tflops", "mfu_fp8_pct",
    "power_avg_w", "power_max_w", "idle_power_w", "energy_j", "joules_per_sample",
    "sm_clock_mhz_avg", "scaler_scale_final", "cell_samples_per_s",
    "cell_samples_per_s_err_pct", "process_spread_pct", "noise_pct", "host_ms_median", *COST,
)
SIGNED = ("loss_first", "loss_last", "energy_check_pct", "temp_max_c", "queued_ms_median")


def load_results(source: Path | str, strict: bool = True,
                 cell_noise: CellNoise | None = None) -> Any:
    """results.csv (or a baseline) as a DataFrame, from a run directory or a CSV path: the one
    reader that decides such a file is malformed (BadInput naming file, line and column; see
    ``read_csv``). ``strict=False``: a damaged line is a warning and skipped instead. A run
    directory's results.csv is derived first when missing or stale (``results_csv``; its noise
    columns by ``cell_noise``, see ``write_csv``). Status values come back stripped and
    lower-case; time statistics come from the raw step times where a row has them, and the
    noise columns from ``cell_noise`` when given (derived on read: a file saved without them,
    or by an older statistic, reads the same as one derived now)."""
    path = Path(source)
    if path.is_dir():
        path = results_csv(path, cell_noise)
    elif path.name == RESULTS and (path.parent / RECORDS).is_file():
        path = results_csv(path.parent, cell_noise)  # a run directory's results.csv, by path
    if not path.is_file():
        raise BadInput(f"{source}: no such run directory or results CSV")
    frame = read_csv(path, REQUIRED, WHOLE, NON_NEGATIVE, SIGNED, strict=strict)
    status = frame["status"].astype(str).str.strip().str.lower()
    unknown = ~status.isin(STATUSES)
    if unknown.any():
        row = int(unknown.to_numpy().argmax())
        raise BadInput(f"{path}: line {frame.attrs['lines'][row]}: unknown status "
                       f"'{frame['status'].iloc[row]}' (valid: {', '.join(STATUSES)})")
    frame["status"] = status
    if "schema" in frame.columns:
        _warn_newer(path, frame["schema"])
    frame = _upgrade(_with_raw_stats(frame, path))
    return frame if cell_noise is None else cell_noise(frame)


def _with_raw_stats(frame: Any, path: Path) -> Any:
    """``frame`` with STEP_STATS derived from each row's raw step times, where it has them;
    BadInput naming the line of a damaged list."""
    if STEP_TIMES not in frame.columns:
        return frame
    lines = frame.attrs["lines"]
    stats: list[dict[str, float] | None] = []
    for row, value in enumerate(frame[STEP_TIMES]):
        times = _split_times(value)
        if times is None:
            raise BadInput(f"{path}: line {lines[row]}: column {STEP_TIMES} holds "
                           f"'{str(value)[:40]}', not step times in ms separated by ';'")
        stats.append(step_stats(times) if times else None)
    has = [s is not None for s in stats]
    for column in STEP_STATS:
        values = [s[column] for s in stats if s is not None]
        frame[column] = frame[column].astype(float) if column in frame.columns else math.nan
        frame.loc[has, column] = values
    return frame


def _split_times(value: Any) -> list[float] | None:
    """A results.csv value of STEP_TIMES as numbers ([] when empty), None when damaged."""
    numbers = [parse_number(p) for p in (value.split(";") if isinstance(value, str) else [value])]
    if len(numbers) == 1 and numbers[0] is not None and math.isnan(numbers[0]):
        return []
    times = [n for n in numbers if n is not None and n >= 0]
    return times if len(times) == len(numbers) else None


def _upgrade(frame: Any) -> Any:
    """Rows of an older schema read as this one's. Before schema 5 an FP8 row's ``mfu_pct`` and
    ``peak_tflops`` were against the FP8 peak: they move to ``mfu_fp8_pct`` and
    ``peak_fp8_tflops``, and ``mfu_pct`` (against the bf16 peak) stays empty, flagged."""
    if "schema" not in frame.columns or "fp8_converted" not in frame.columns:
        return frame  # no FP8 row before schema 4
    import pandas as pd

    old = (pd.to_numeric(frame["schema"], errors="coerce") < 5) & frame["fp8_converted"].notna()
    if not old.any():
        return frame
    frame = frame.copy()
    for column in ("peak_tflops", "mfu_pct", "peak_fp8_tflops", "mfu_fp8_pct"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce") \
            if column in frame.columns else math.nan
    measured = old & frame["mfu_pct"].notna()
    frame.loc[old, ["mfu_fp8_pct", "peak_fp8_tflops"]] = \
        frame.loc[old, ["mfu_pct", "peak_tflops"]].to_numpy()
    frame.loc[old, ["mfu_pct", "peak_tflops"]] = math.nan
    if "mfu_flag" not in frame.columns:
        frame["mfu_flag"] = None
    frame["mfu_flag"] = frame["mfu_flag"].astype(object)
    frame.loc[measured, "mfu_flag"] = "recorded before schema 5: MFU against the FP8 peak only"
    return frame


_SPREAD_WARNING = 0.10  # IQR / median above this makes a number hard to trust


def record_line(record: dict[str, Any]) -> str:
    """One human-readable line for a record (stderr of a cell, progress of a run)."""
    size = f"T={record['seq_len']}" if record.get("seq_len") else f"{record.get('image_size')}px"
    head = f"{record['model']} {record['precision']} b={record['batch_size']} {size}"
    if (record.get("world_size") or 1) > 1:
        head += f" ws={record['world_size']}"
    if record["status"] != "ok":
        error = (record.get("error") or "").splitlines()
        return f"{head}: {record['status']}" + (f" ({error[-1][:160]})" if error else "")
    mem = record["peak_mem_reserved_gib"] or record["peak_rss_gib"]
    mem_kind = "reserved" if record["peak_mem_reserved_gib"] is not None else "rss"
    line = (f"{head}: ok {record['samples_per_s']:,.1f} samples/s, step "
            f"{record['step_ms_median']:.2f} ms (IQR {record['step_ms_iqr']:.2f}), "
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
