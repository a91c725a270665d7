"""results.csv's rows as a reader takes them: each process once, statistics from the raw step
times, the meaning of older schemas, and, for a lenient reader, no infinite measurement.
``bench.store.load_results`` applies these; each part of a file it reads around is a problem
noted in ``frame.attrs["problems"]`` (and a warning on stderr), which the report and the gate
show. torch-free.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import BadInput
from bench.readers import parse_number


def problem(frame: Any, text: str) -> None:
    """Note a damaged part of the file that was read around: the report and the gate show it."""
    frame.attrs["problems"] = [*frame.attrs.get("problems", []), text]
    print(f"warning: {text}", file=sys.stderr)


def lines_text(lines: Sequence[int]) -> str:
    more = f" and {len(lines) - 5} more" if len(lines) > 5 else ""
    return f"line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines[:5]))}{more}"


def without_duplicates(frame: Any, path: Path, identity: Sequence[str]) -> Any:
    """``frame`` with each process once: rows with the same run, cell and repeat (every column
    alike where the file has no repeat column) are one process written twice, and counted
    twice they would narrow the noise band. The last one is kept, as in records.jsonl."""
    columns = [c for c in identity if c in frame.columns] if "repeat" in frame.columns \
        else list(frame.columns)
    twice = frame.duplicated(subset=columns, keep="last").to_numpy()
    if not twice.any():
        return frame
    lines = frame.attrs["lines"]
    dropped = [line for line, dup in zip(lines, twice, strict=True) if dup]
    problems = frame.attrs.get("problems", [])
    frame = frame[~twice].reset_index(drop=True)
    frame.attrs.update(lines=[line for line, dup in zip(lines, twice, strict=True) if not dup],
                       problems=problems)
    problem(frame, f"{path}: {lines_text(dropped)} repeat a later row's run, cell and repeat "
                    "(the same process twice): each process is counted once, its last row kept")
    return frame


def without_nonfinite(frame: Any, path: Path, measurements: Sequence[str],
                      always: Sequence[str]) -> Any:
    """``frame`` with the infinite measurements of ok rows left empty, and a problem noted for
    them and for ok rows without the measurements every ok row has: what a lenient reader
    (the report) can still give a correct answer without."""
    import pandas as pd

    ok = (frame["status"] == "ok").to_numpy()
    for column in [c for c in measurements if c in frame.columns]:
        values = pd.to_numeric(frame[column], errors="coerce")
        infinite = ok & values.isin([math.inf, -math.inf]).to_numpy()
        empty = ok & values.isna().to_numpy() & (column in always)
        if not (infinite | empty).any():
            continue
        lines = [line for line, bad in zip(frame.attrs["lines"], infinite | empty, strict=True)
                 if bad]
        frame[column] = values.where(~infinite)
        problem(frame, f"{path}: {lines_text(lines)}: ok row(s) without a finite {column} "
                        "(NaN, inf or empty); left out of every statistic of it")
    return frame


def with_raw_stats(frame: Any, path: Path, column: str,
                   stats_of: Callable[[list[float]], dict[str, float]]) -> Any:
    """``frame`` with the statistics ``stats_of`` derives from each row's raw step times (in
    ``column``, ';'-joined), where it has them; BadInput naming the line of a damaged list."""
    if column not in frame.columns:
        return frame
    lines = frame.attrs["lines"]
    stats: list[dict[str, float] | None] = []
    for row, value in enumerate(frame[column]):
        times = _split_times(value)
        if times is None:
            raise BadInput(f"{path}: line {lines[row]}: column {column} holds "
                           f"'{str(value)[:40]}', not step times in ms separated by ';'")
        stats.append(stats_of(times) if times else None)
    has = [s is not None for s in stats]
    for name in next((list(s) for s in stats if s is not None), []):
        values = [s[name] for s in stats if s is not None]
        frame[name] = frame[name].astype(float) if name in frame.columns else math.nan
        frame.loc[has, name] = values
    return frame


def _split_times(value: Any) -> list[float] | None:
    """A results.csv value of raw step times as numbers ([] when empty), None when damaged."""
    numbers = [parse_number(p) for p in (value.split(";") if isinstance(value, str) else [value])]
    if len(numbers) == 1 and numbers[0] is not None and math.isnan(numbers[0]):
        return []
    times = [n for n in numbers if n is not None and 0 <= n < math.inf]
    return times if len(times) == len(numbers) else None


def upgrade(frame: Any) -> Any:
    """Rows of an older schema read as this one's. Before schema 5 an FP8 row's ``mfu_pct`` and
    ``peak_tflops`` were against the FP8 peak: they move to ``mfu_fp8_pct`` and
    ``peak_fp8_tflops``, and ``mfu_pct`` (against the bf16 peak) stays empty, flagged. Before
    schema 8 a row's numerics counts covered its warmup and timed steps: ``num_steps_counted``
    is their sum."""
    return _fp8_mfu(_steps_counted(frame))


def _steps_counted(frame: Any) -> Any:
    if not {"schema", "warmup_steps", "timed_steps"} <= set(frame.columns):
        return frame
    import pandas as pd

    def number(column: str) -> Any:
        return pd.to_numeric(frame[column], errors="coerce") if column in frame.columns \
            else pd.Series(math.nan, index=frame.index)

    counted = number("num_steps_counted")
    old = (number("schema") < 8) & counted.isna() & number("nonfinite_steps").notna()
    if not old.any():
        return frame
    frame = frame.copy()
    frame["num_steps_counted"] = counted.where(
        ~old, number("warmup_steps") + number("timed_steps"))
    return frame


def _fp8_mfu(frame: Any) -> Any:
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
