"""Run directories and the record schema: records.jsonl is the truth, results.csv is derived.

A run directory holds ``meta.json`` (environment and matrix), ``records.jsonl`` (one JSON
record per finished cell and repeat, appended with flush + fsync) and ``results.csv``.
torch-free: analysis (report, gate) reads these files on any machine.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from bench import BadInput

SCHEMA_VERSION = 5  # 2: calibration and the per-cell noise columns; 3: host timing,
# memory_format, wall_s, throttle_shares/power_capped/power_scope, throttled = thermal/hw only;
# 4: emulated, fp8_converted, fp8_unconverted; 5: peak_fp8_tflops, mfu_fp8_pct, mfu_flag, and an
# FP8 row's mfu_pct is against the bf16 peak (it was against the FP8 peak: see _upgrade)

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
    # whose power it is: "gpu", or "shared_gpu" for a MIG instance (bench/telemetry/power.py).
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
FIELDS: tuple[str, ...] = (
    IDENTITY + STATUS + TIMING + MEMORY + COMPUTE + POWER + NUMERICS + CONVERSION + ENVIRONMENT
)

# Derived into results.csv from all of a cell's processes (the same on each of its rows): the
# cell's throughput (median over its ok processes), that value's relative standard error, the
# spread between its processes and the per-process noise used, with where that came from
# (bench/analysis/noise.py).
CELL_NOISE = ("num_processes", "cell_samples_per_s", "cell_samples_per_s_err_pct",
              "process_spread_pct", "noise_pct", "noise_source")

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


def warn(path: Path | str, line: int | str, why: str) -> None:
    """One line on stderr about a damaged entry of a file that is skipped, not fatal."""
    print(f"warning: {path}: line {line}: {why}; skipped", file=sys.stderr)


def load_jsonl(path: Path, problem: Callable[[Any], str | None]) -> list[Any]:
    """The entries of a JSON-lines file that ``problem`` finds nothing wrong with (it returns
    why an entry is damaged, or None); every damaged line is a warning naming it and skipped.
    A torn last line (no newline: a writer killed mid-line) is skipped silently."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise BadInput(f"{path}: cannot read it ({exc.strerror})") from None
    entries = []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines[:-1], 1):  # the last piece has no newline: torn
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            warn(path, number, "not UTF-8 text")
            continue
        except ValueError:
            warn(path, number, "not valid JSON")
            continue
        why = problem(entry)
        if why:
            warn(path, number, why)
            continue
        entries.append(entry)
    return entries


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
    return None


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete record; for a repeated (cell_id, repeat) the last one wins. A damaged
    line is a warning and skipped (a resumed run runs its cell again)."""
    latest: dict[tuple[Any, Any], dict[str, Any]] = {}
    for record in load_jsonl(Path(run_dir) / RECORDS, record_problem):
        latest[(record["cell_id"], record["repeat"])] = record
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
    frame = _with_costs(_with_cell_noise(frame), read_meta(run_dir))
    derived = CELL_NOISE + tuple(c for c in COST if c in frame.columns)
    extra = [c for c in frame.columns if c not in FIELDS + derived]
    frame = frame[list(FIELDS + derived) + extra]
    if "throttle_reasons" in frame.columns:
        frame["throttle_reasons"] = frame["throttle_reasons"].map(
            lambda v: ";".join(v) if isinstance(v, list) else v
        )
    path = run_dir / RESULTS
    tmp = path.with_suffix(".csv.tmp")
    try:
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a runner stopped mid-write leaves no stray file
    return path


def _with_cell_noise(frame: Any) -> Any:
    """``frame`` with the CELL_NOISE columns: each cell's samples/s over all its processes."""
    import pandas as pd

    from bench.analysis import noise

    frame = frame.copy()
    for column in CELL_NOISE:
        frame[column] = None
    if frame.empty:
        return frame
    ok = frame[frame["status"] == "ok"]
    cells = {tuple(rows.index): rows.to_dict("records")
             for _, rows in ok.groupby(list(KEY), dropna=False, sort=False)}
    estimates, _ = noise.cell_estimates(cells, "samples_per_s")
    for index, est in estimates.items():
        spread = noise.own_spread(noise.finite(r["samples_per_s"] for r in cells[index]))
        frame.loc[list(index), list(CELL_NOISE)] = [
            est.n, est.value, _finite_or_none(est.error * 100),
            None if spread is None else spread * 100, _finite_or_none(est.spread * 100),
            est.source]
    return frame.astype({c: "object" for c in CELL_NOISE}).where(pd.notna(frame), None)


# Prices a run was given (``--price-per-hour``, ``--price-per-kwh``, USD), kept in meta.json so
# that results.csv and a later ``report`` price the run the same way.
PRICES = ("price_per_hour", "price_per_kwh")
# Derived into results.csv only when the run has a price: an empty column would read as "cost
# not measured", and a run without one keeps the columns it always had. ``usd_per_1m_samples``
# is the cell's (from ``cell_samples_per_s``, the same on each of its rows) with that value's
# relative standard error; ``energy_usd_per_1m_samples`` is the row's own measured energy.
COST = ("usd_per_1m_samples", "usd_per_1m_samples_err_pct", "energy_usd_per_1m_samples")


def check_price(value: Any, name: str) -> float:
    """``value`` as a price in USD (a finite number above 0), or BadInput naming ``name``."""
    number = _parse_number(value) if not isinstance(value, str) or value.strip() else None
    if number is None or not math.isfinite(number) or number <= 0:
        raise BadInput(f"{name}: expected a price in USD above 0, got '{value}'")
    return number


def prices(meta: dict[str, Any], given: dict[str, Any] | None = None) -> dict[str, float]:
    """The PRICES that meta.json records, each replaced by the one in ``given`` (a flag's
    value, None where not given), all checked: BadInput naming the damaged one."""
    given = {key: value for key, value in (given or {}).items() if value is not None}
    found = {key: check_price(meta[key], f"{META} {key}") for key in PRICES
             if key not in given and meta.get(key) is not None}
    found.update({key: check_price(value, f"--{key.replace('_', '-')}")
                  for key, value in given.items()})
    return found


def usd_per_1m_samples(price_per_hour: float, world_size: Any, samples_per_s: Any) -> float:
    """What a million samples cost on ``world_size`` devices at ``price_per_hour`` each."""
    rate, devices = _parse_number(samples_per_s), _parse_number(world_size)
    devices = devices if devices is not None and math.isfinite(devices) else 1.0
    if rate is None or not rate > 0 or not math.isfinite(rate):
        return math.nan
    return price_per_hour * devices / 3600.0 / rate * 1e6


def energy_usd_per_1m_samples(price_per_kwh: float, joules_per_sample: Any) -> float:
    """The measured energy of a million samples at ``price_per_kwh`` (NaN where unmeasured)."""
    joules = _parse_number(joules_per_sample)
    if joules is None or not math.isfinite(joules) or joules < 0:
        return math.nan
    return price_per_kwh * joules * 1e6 / 3.6e6


def _with_costs(frame: Any, meta: dict[str, Any]) -> Any:
    """``frame`` with the COST columns its run's prices allow (none without a price)."""
    given = prices(meta)
    frame = frame.copy()
    if "price_per_hour" in given:
        frame["usd_per_1m_samples"] = [
            _finite_or_none(usd_per_1m_samples(given["price_per_hour"], ws, sps))
            for ws, sps in zip(frame["world_size"], frame["cell_samples_per_s"], strict=True)]
        # Cost is inversely proportional to throughput: the same relative error.
        frame["usd_per_1m_samples_err_pct"] = frame["cell_samples_per_s_err_pct"].where(
            frame["usd_per_1m_samples"].notna(), None)
    if "price_per_kwh" in given:
        frame["energy_usd_per_1m_samples"] = [
            _finite_or_none(energy_usd_per_1m_samples(given["price_per_kwh"], j))
            for j in frame["joules_per_sample"]]
    return frame


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # unknown noise: an empty cell, not inf


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


def _parse_number(value: Any) -> float | None:
    """``value`` as a float (NaN for empty), or None when it is not a number."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    if not text:
        return math.nan
    if "_" in text:  # float() takes 1_000, pandas and a spreadsheet do not
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _records_of(path: Path, strict: bool) -> tuple[list[str], list[list[str]], list[int]]:
    """(header, rows, first line of each row) of a CSV file; a row whose field count is not
    the header's is damaged: BadInput when ``strict``, else a warning and skipped."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise BadInput(f"{path}: line {line}: not UTF-8 text") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read it ({exc.strerror})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    last = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # pragma: no cover - the lenient reader rarely refuses
            raise BadInput(f"{path}: line {reader.line_num}: not a readable CSV ({exc})") from None
        first, last = last + 1, reader.line_num
        if not row:
            continue
        if header is None:
            header = row
            continue
        why = None
        if len(row) != len(header):
            why = f"{len(row)} fields, the header has {len(header)}"
        elif any("\0" in field for field in row):
            why = "a NUL character"
        if why:
            where = f"{first}" if first == last else f"{first}-{last}"
            if strict:
                raise BadInput(f"{path}: not a readable CSV (Error tokenizing data at line "
                               f"{where}: {why})")
            warn(path, where, why)
            continue
        rows.append(row)
        lines.append(first)
    if header is None:
        raise BadInput(f"{path}: empty, not a CSV with a header")
    return header, rows, lines


def read_csv(path: Path | str, required: Sequence[str] = (), whole: dict[str, int] | None = None,
             non_negative: Sequence[str] = (), signed: Sequence[str] = (),
             strict: bool = True) -> Any:
    """A CSV file as a DataFrame, checked: BadInput naming the file, line and column for a
    missing column, an empty required value, text in a number column (``whole``: column ->
    least value; ``non_negative``; ``signed``) or a negative value where none can be. A
    damaged line (wrong number of fields) is BadInput when ``strict``, else a warning and
    skipped. Numbers may be empty (NaN) or infinite; what that means is the caller's call."""
    import pandas as pd

    path = Path(path)
    header, rows, lines = _records_of(path, strict)
    missing = [c for c in required if c not in header]
    if missing:
        raise BadInput(f"{path}: missing column(s) {', '.join(missing)}")
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    try:
        frame = pd.read_csv(io.StringIO(buffer.getvalue()))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"{path}: not a readable CSV ({reason})") from None

    def bad(row: int, column: str, why: str) -> BadInput:
        return BadInput(f"{path}: line {lines[row]}: column {column} {why}")

    for column in required:
        empty = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if empty.any():
            raise bad(int(empty.to_numpy().argmax()), column, "is empty")
    whole = whole or {}
    for column in [*whole, *non_negative, *signed]:
        if column not in frame.columns:
            continue
        values = []
        for row, value in enumerate(frame[column]):
            number = _parse_number(value)
            if number is None:
                raise bad(row, column, f"holds '{value}', not a number")
            if column in whole and not math.isnan(number) and not number.is_integer():
                raise bad(row, column, f"holds '{value}', not a whole number")
            least = whole.get(column, 0 if column in non_negative else None)
            if least is not None and number < least:
                raise bad(row, column, f"holds {value}, below {least}")
            values.append(number)
        if frame[column].dtype == object and column not in whole:
            frame[column] = values
    frame.attrs["lines"] = lines  # the file's line of each row, for messages
    return frame


def load_results(source: Path | str, strict: bool = True) -> Any:
    """results.csv (or a baseline) as a DataFrame, from a run directory or a CSV path: the one
    reader that decides such a file is malformed (BadInput naming file, line and column; see
    ``read_csv``). ``strict=False``: a damaged line is a warning and skipped instead. Status
    values come back stripped and lower-case."""
    path = Path(source)
    if path.is_dir():
        csv_path = path / RESULTS
        if not csv_path.exists() and (path / RECORDS).exists():
            write_csv(path)
        path = csv_path
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
    return _upgrade(frame)


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
