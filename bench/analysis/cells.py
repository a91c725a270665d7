"""Rows -> cells, the one place: which rows of records.jsonl or results.csv are one cell.

A cell is what ``store.KEY`` names (model, precision, batch_size, seq_len, image_size,
grad_accum, compile, world_size, strategy), optionally on one ``device_name``. Its repeats and
the extra processes of a calibration cell are the same cell; a max-batch search row is not a
cell of the sweep. Key values are compared in one spelling, whatever wrote them: ``64``,
``64.0`` and ``"64"`` are 64; ``True``, ``"true"`` and ``1`` are true; an empty ``grad_accum``,
``world_size`` or ``compile`` (a hand-written CSV) reads as 1, 1 and false, an empty
``strategy`` (one process, or a row from before schema 8) as ddp; an empty
``seq_len`` or ``image_size`` is None. The runner's summary, results.csv's noise columns, the
report and the gate all group through here, on dicts (records) or on a DataFrame (results.csv).
torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from bench import store, strategy

if TYPE_CHECKING:
    import pandas as pd

UNKNOWN_DEVICE = "unknown device"
# What an empty key field means (a hand-written CSV leaves them out).
DEFAULTS: dict[str, Any] = {"grad_accum": 1, "world_size": 1, "compile": False,
                            "strategy": strategy.DEFAULT}
_WHOLE = ("batch_size", "seq_len", "image_size", "grad_accum", "world_size")


class CellKey(NamedTuple):
    """A cell's identity: store.KEY in one spelling, and its device when matched by device."""

    model: str
    precision: str
    batch_size: int | None
    seq_len: int | None
    image_size: int | None
    grad_accum: int
    compile: bool
    world_size: int
    strategy: str  # bench/strategy.py's canonical name; ddp for one process or an older row
    device_name: str | None = None  # None: not part of the key


def _missing(value: Any) -> bool:
    """None, NaN, pandas' NA or blank text."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    try:
        return bool(value != value)  # only NaN (and NaT) differ from themselves
    except TypeError:  # pandas.NA has no truth value
        return True


def _whole(value: Any) -> Any:
    """64, 64.0, "64" and "64.0" as 64; another number as a float; text as stripped text."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value).strip()
    return int(number) if number.is_integer() else number


def canonical(column: str, value: Any) -> Any:
    """One key field's value in the one spelling cells are compared in."""
    if _missing(value):
        return DEFAULTS.get(column)
    if column == "compile":
        return store.truthy(value)
    if column in _WHOLE:
        return _whole(value)
    if column == "strategy":
        return strategy.of_record({"strategy": value})
    return str(value).strip()


def device_name(value: Any) -> str:
    """A row's device name as the gate and baselines compare it ("unknown device" if empty)."""
    return UNKNOWN_DEVICE if _missing(value) else str(value).strip()


def cell_key(row: Mapping[str, Any], with_device: bool = False) -> CellKey:
    """The cell ``row`` (a record or a results.csv row) belongs to; with its device name when
    ``with_device``."""
    values = [canonical(column, row.get(column)) for column in store.KEY]
    device = device_name(row.get("device_name")) if with_device else None
    return CellKey(*values, device_name=device)


def is_search(row: Mapping[str, Any]) -> bool:
    """A max-batch search row (``--find-max-batch``): flagged, or at least carries its result."""
    return store.truthy(row.get("max_batch_search")) or not _missing(row.get("max_batch"))


def group(rows: Iterable[Mapping[str, Any]], *, with_device: bool = False,
          searches: bool = False) -> dict[CellKey, list[Mapping[str, Any]]]:
    """Rows by cell, cells in the order first seen, rows in theirs; max-batch search rows are
    left out unless ``searches``."""
    cells: dict[CellKey, list[Mapping[str, Any]]] = {}
    for row in rows:
        if searches or not is_search(row):
            cells.setdefault(cell_key(row, with_device), []).append(row)
    return cells


def group_frame(frame: pd.DataFrame, *, with_device: bool = False,
                searches: bool = False) -> dict[CellKey, pd.DataFrame]:
    """``group`` for a results frame: each cell's rows as a sub-frame (index kept)."""
    positions: dict[CellKey, list[int]] = {}
    for position, row in enumerate(frame.to_dict("records")):
        if searches or not is_search(row):
            positions.setdefault(cell_key(row, with_device), []).append(position)
    return {key: frame.iloc[rows] for key, rows in positions.items()}


def _sortable(value: Any) -> tuple[int, Any]:
    if value is None:
        return (0, 0)
    if isinstance(value, int | float):
        return (1, value)
    return (2, str(value))


def sort_key(key: CellKey) -> tuple[tuple[int, Any], ...]:
    """Orders keys field by field, numbers as numbers (b=8 before b=16), None first."""
    return tuple(_sortable(value) for value in key)


def label(key: CellKey) -> str:
    """A cell as people read it: ``resnet50 bf16 b=64 img=224 ga=2 compile ws=2``."""
    parts = [key.model, key.precision, f"b={key.batch_size}"]
    if key.seq_len:
        parts.append(f"seq={key.seq_len}")
    if key.image_size:
        parts.append(f"img={key.image_size}")
    if key.grad_accum != 1:
        parts.append(f"ga={key.grad_accum}")
    if key.compile:
        parts.append("compile")
    if key.world_size != 1:
        parts.append(f"ws={key.world_size}")
    if key.strategy != strategy.DEFAULT:
        parts.append(key.strategy)
    return " ".join(parts)
