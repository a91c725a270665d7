"""Reading files that may be damaged, with messages that say where: JSON lines and checked CSV.

A damaged entry of a file that can be read around (a torn or malformed JSON line, a CSV row
with the wrong number of fields in a lenient read) is one warning on stderr naming the file and
line, and skipped; a file that cannot be used is one BadInput line naming the file, line and
column. bench/store.py reads the run directory through these (records.jsonl, results.csv), and
the report and parity read their own files the same way. torch-free.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import BadInput


def warn(path: Path | str, line: int | str, why: str) -> None:
    """One line on stderr about a damaged entry of a file that is skipped, not fatal."""
    print(f"warning: {path}: line {line}: {why}; skipped", file=sys.stderr)


def load_jsonl(path: Path, problem: Callable[[Any], str | None],
               skipped: list[str] | None = None) -> list[Any]:
    """The entries of a JSON-lines file that ``problem`` finds nothing wrong with (it returns
    why an entry is damaged, or None); every damaged line is a warning naming it and skipped.
    A torn last line (no newline: a writer killed mid-line) is skipped without a warning: a
    resumed run ends it and runs its entry again. Given ``skipped``, it collects one line for
    each of both instead of the warnings, for a reader that says what it left out itself."""
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
            why = problem(entry)
        except UnicodeDecodeError:
            why = "not UTF-8 text"
        except ValueError:
            why = "not valid JSON"
        if not why:
            entries.append(entry)
        elif skipped is not None:
            skipped.append(f"{path}: line {number}: {why}; skipped")
        else:
            warn(path, number, why)
    if lines[-1].strip() and skipped is not None:
        skipped.append(f"{path}: line {len(lines)}: cut off (no newline at its end: the "
                       "writer was stopped mid-line)")
    return entries


def parse_number(value: Any) -> float | None:
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


def _records_of(path: Path, strict: bool
                ) -> tuple[list[str], list[list[str]], list[int], list[str]]:
    """(header, rows, first line of each row, why each damaged line was skipped) of a CSV
    file; a row whose field count is not the header's is damaged: BadInput when ``strict``,
    else a warning and skipped."""
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
    skipped: list[str] = []
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
            if last == text.count("\n") + 1 and not text.endswith("\n"):
                why = f"cut off ({why}, and no newline at its end: the writer was stopped)"
        elif any("\0" in field for field in row):
            why = "a NUL character"
        if why:
            where = f"{first}" if first == last else f"{first}-{last}"
            if strict:
                raise BadInput(f"{path}: not a readable CSV (Error tokenizing data at line "
                               f"{where}: {why})")
            warn(path, where, why)
            skipped.append(f"{path}: line {where}: {why}; skipped")
            continue
        rows.append(row)
        lines.append(first)
    if header is None:
        raise BadInput(f"{path}: empty, not a CSV with a header")
    return header, rows, lines, skipped


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
    header, rows, lines, skipped = _records_of(path, strict)
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
            number = parse_number(value)
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
    frame.attrs["problems"] = skipped  # what was read around (the report shows it)
    return frame


def truthy(value: Any) -> bool:
    """A flag read back from JSON or CSV: True, "True", "true", 1 -> True; NaN, "" -> False."""
    import pandas as pd

    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return not pd.isna(value) and bool(value)
