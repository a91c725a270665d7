"""A matrix from outside, checked field by field: TOML files, meta.json's copy of a run's matrix
(``from_dict``), the command line's overrides (``override``), and the TOML a matrix is written
as (``to_toml``). Any bad key, type, name or count raises BadInput with one line naming it and
the file. torch-free."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import models
from bench import BadInput, precision, strategy
from bench.config.matrix import NODE, Matrix, ModelAxis
from bench.run import slots

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_MODEL_KEYS = ("batch_sizes", "seq_len", "image_size")

# Upper bounds of counts and sizes: past these a value is a typo that would exhaust memory
# (a billion repeats) or never end, not a measurement. Keyed by the last part of the key.
LIMITS: dict[str, float] = {
    "repeats": 1000, "calibration": 1000, "warmup": 1_000_000, "steps": 1_000_000,
    "batch_sizes": 1 << 20, "batch_size": 1 << 20, "grad_accum": 65536, "world_size": 4096,
    "nnodes": 4096, "timeout_s": 7 * 24 * 3600.0, "seq_len": 1 << 20, "image_size": 16384,
    "seeds": 1000, "parity_steps": 1_000_000, "parity_seeds": 1000,
}
MAX_PROCESSES = 100_000  # cell processes in one sweep (cells x repeats)


def check_limit(key: str, value: float, source: str) -> None:
    """BadInput when ``value`` is past the limit for ``key`` (LIMITS)."""
    limit = LIMITS.get(key.rsplit(".", 1)[-1])
    if limit is not None and value > limit:
        raise BadInput(f"{source}: '{key}' must be at most {limit:g}, got {value}")


def _check(value: Any, kind: str, key: str, source: str) -> Any:
    """``value`` converted to ``kind`` (int, pos-int, float, bool, str, world: a pos-int or
    NODE, list[...], list0[...]: a list that may be empty) or BadInput."""
    def bad(expected: str) -> BadInput:
        return BadInput(f"{source}: '{key}' must be {expected}, got {value!r}")

    if kind == "world":  # processes per node, or every GPU of this node (resolved by the runner)
        if isinstance(value, str) and value != NODE:
            raise bad(f"a whole number or {NODE!r}")
        return value if value == NODE else _check(value, "pos-int", key, source)

    if kind.startswith(("list[", "list0[")) and kind.endswith("]"):
        inner = kind[kind.index("[") + 1:-1]
        empty_ok = kind.startswith("list0[")
        if not isinstance(value, list) or not (value or empty_ok):
            raise bad(f"a {'' if empty_ok else 'non-empty '}list of {inner}")
        return tuple(_check(v, inner, key, source) for v in value)
    if kind in ("int", "pos-int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
        low = 1 if kind == "pos-int" else 0
        if value < low:
            raise bad(f"at least {low}")
        check_limit(key, value, source)
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value > 0):
            raise bad("a positive number")
        check_limit(key, value, source)
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise AssertionError(kind)


_TOP: dict[str, str] = {
    "name": "str", "precisions": "list[str]", "grad_accum": "list[pos-int]",
    "compile": "list[bool]", "world_size": "list[world]", "nnodes": "pos-int",
    "strategies": "list[str]", "repeats": "pos-int", "calibration": "int", "warmup": "int",
    "steps": "pos-int",
    "device": "str", "devices": "str",
    "timeout_s": "float", "parity": "bool", "compile_precisions": "list[str]",
    "compile_only": "list0[str]",
    "parity_steps": "int", "parity_seeds": "pos-int", "parity_tasks": "list0[str]",
    "parity_strategy": "str",
}


def _model_axis(name: str, table: Any, source: str) -> ModelAxis:
    try:
        spec = models.get(name)
    except ValueError as exc:
        raise BadInput(f"{source}: models.{name}: {exc}") from None
    if not isinstance(table, dict):
        raise BadInput(f"{source}: 'models.{name}' must be a table with batch_sizes")
    for key in table:
        if key not in _MODEL_KEYS:
            raise BadInput(f"{source}: unknown key 'models.{name}.{key}'; "
                           f"valid: {', '.join(_MODEL_KEYS)}")
    for other in ("seq_len", "image_size"):
        if other != spec.size_arg and other in table:
            takes = spec.size_arg or "a fixed-size input"
            raise BadInput(f"{source}: 'models.{name}.{other}' does not apply to {name} "
                           f"(a {spec.unit} model takes {takes})")
    batch_sizes = (_check(table["batch_sizes"], "list[pos-int]", f"models.{name}.batch_sizes",
                          source) if "batch_sizes" in table else (spec.default_batch_size,))
    size = None
    if spec.size_arg is not None and spec.size_arg in table:
        size = _check(table[spec.size_arg], "pos-int", f"models.{name}.{spec.size_arg}", source)
        problem = spec.check_size(size)
        if problem:
            raise BadInput(f"{source}: models.{name}: {problem}")
    return ModelAxis(name, tuple(sorted(set(batch_sizes))), size or spec.default_size)


def from_dict(data: dict[str, Any], source: str = "matrix") -> Matrix:
    """Validate a TOML-shaped dict field by field and build the Matrix (BadInput on any error)."""
    if not isinstance(data, dict):
        raise BadInput(f"{source}: a matrix must be a table, got {type(data).__name__}")
    for key in data:
        if key != "models" and key not in _TOP:
            raise BadInput(f"{source}: unknown key '{key}'; valid: models, {', '.join(_TOP)}")
    if "models" not in data:
        raise BadInput(f"{source}: missing 'models' (a table per model with batch_sizes)")
    if not isinstance(data["models"], dict) or not data["models"]:
        raise BadInput(f"{source}: 'models' must be a non-empty table of models")
    values: dict[str, Any] = {
        "models": tuple(_model_axis(n, t, source) for n, t in data["models"].items())
    }
    for key, kind in _TOP.items():
        if key in data:
            values[key] = _check(data[key], kind, key, source)
    for key in ("precisions", "compile_precisions", "compile_only"):
        for name in values.get(key, ()):
            if name not in precision.NAMES:
                raise BadInput(f"{source}: {key}: unknown precision '{name}'; "
                               f"valid: {', '.join(precision.NAMES)}")
    if "strategies" in values:
        values["strategies"] = _strategies(values["strategies"], f"{source}: strategies")
    if values.get("parity_strategy"):
        values["parity_strategy"] = _strategies([values["parity_strategy"]],
                                                f"{source}: parity_strategy")[0]
    if values.get("devices"):
        values["devices"] = slots.check_devices(values["devices"], f"{source}: devices")
    from bench.parity.tasks import TASK_MODELS  # torch-free: the parity tasks' names

    for name in values.get("parity_tasks", ()):
        if name not in TASK_MODELS:
            raise BadInput(f"{source}: parity_tasks: unknown parity task '{name}'; "
                           f"valid: {', '.join(TASK_MODELS)}")
    if values.get("parity_seeds", 2) < 2:
        raise BadInput(f"{source}: 'parity_seeds' must be at least 2 (FP32's band needs a "
                       f"spread), got {values['parity_seeds']}")
    return _check_size(Matrix(**values), source)


def _strategies(names: Sequence[str], where: str) -> tuple[str, ...]:
    """``names`` in their canonical spellings, each once (BadInput naming a bad one)."""
    try:
        return tuple(dict.fromkeys(strategy.canonical(name) for name in names))
    except ValueError as exc:
        raise BadInput(f"{where}: {exc}") from None


def _check_size(matrix: Matrix, source: str) -> Matrix:
    """``matrix`` unless its sweep would start more than MAX_PROCESSES cell processes, or it
    asks for a strategy no cell of it has several processes to apply to."""
    shared = [name for name in matrix.strategies if name != strategy.DEFAULT]
    # NODE may be several GPUs: only the runner's probe can tell (a 1-GPU node: resolve_node).
    if shared and NODE not in matrix.world_size and max(matrix.world_size) * matrix.nnodes == 1:
        raise BadInput(f"{source}: strategy {shared[0]} shares a model between processes, but "
                       "every cell is one process; add world sizes above 1 (--world-size 2)")
    num_cells = (sum(len(axis.batch_sizes) for axis in matrix.models) * len(matrix.precisions)
                 * len(matrix.grad_accum) * len(matrix.compile) * len(matrix.world_size)
                 * len(matrix.strategies))
    num_processes = num_cells * matrix.repeats + matrix.calibration
    if num_processes > MAX_PROCESSES:
        raise BadInput(f"{source}: {num_cells} cells x {matrix.repeats} repeat(s) is "
                       f"{num_processes} processes; at most {MAX_PROCESSES} in one run")
    return matrix


def load(path: str | Path) -> Matrix:
    """Read a matrix TOML file; a missing, malformed or invalid file raises BadInput."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise BadInput(f"{path}: cannot read matrix file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise BadInput(f"{path}: line {line}: not UTF-8 text (TOML is UTF-8)") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{path}: not valid TOML ({exc})") from None
    return from_dict(data, str(path))


def to_toml(matrix: Matrix) -> str:
    """A matrix as a TOML file that ``load`` reads back (`ampbench run --matrix` takes it)."""
    data = matrix.to_dict()
    lines = [f"{key} = {json.dumps(value)}" for key, value in data.items() if key != "models"]
    for name, table in data["models"].items():
        # A model of your own (path/to/model.py:small) is a quoted key; a registry name is bare.
        key = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)
        lines.append(f"\n[models.{key}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"



def override(
    matrix: Matrix,
    *,
    models_: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
    batch_sizes: Sequence[int] | None = None,
    **scalars: Any,
) -> Matrix:
    """The matrix with command-line overrides applied (None leaves an axis as it is).

    ``models_`` keeps a listed model's axis from the matrix or adds it with its default size;
    ``batch_sizes`` replaces every model's batch sizes; ``scalars`` are Matrix fields
    (steps, warmup, repeats, calibration, device, timeout_s, world_size, nnodes, strategies).
    """
    for flag, given in (("--models", models_), ("--precisions", precisions),
                        ("--batch-sizes", batch_sizes)):
        if given is not None and not given:
            raise BadInput(f"{flag}: an empty list; name at least one")
    axes = {axis.name: axis for axis in matrix.models}
    if models_ is not None:
        chosen = []
        for name in models_:
            try:
                spec = models.get(name)
            except ValueError as exc:
                raise BadInput(str(exc)) from None
            chosen.append(axes.get(name) or ModelAxis(name, (spec.default_batch_size,),
                                                      spec.default_size))
        matrix = replace(matrix, models=tuple(chosen))
    if precisions is not None:
        for name in precisions:
            if name not in precision.NAMES:
                raise BadInput(f"unknown precision '{name}'; valid: {', '.join(precision.NAMES)}")
        matrix = replace(matrix, precisions=tuple(precisions))
    if batch_sizes is not None:
        sizes = tuple(sorted(set(batch_sizes)))
        matrix = replace(matrix, models=tuple(replace(a, batch_sizes=sizes)
                                              for a in matrix.models))
    known = {f.name for f in fields(Matrix)}
    changes = {k: (tuple(v) if isinstance(v, list) else v)
               for k, v in scalars.items() if v is not None}
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f"not Matrix fields: {sorted(unknown)}")
    for key, value in changes.items():
        for number in value if isinstance(value, tuple) else (value,):
            if isinstance(number, int | float) and not isinstance(number, bool):
                check_limit(key, number, "command line")
    if "strategies" in changes:
        changes["strategies"] = _strategies(changes["strategies"], "--strategy")
    for size in batch_sizes or ():
        check_limit("batch_sizes", size, "command line")
    return _check_size(replace(matrix, **changes), "command line")
