"""Models from outside the registry: a user's module named by reference, read without running it.

    --models path/to/my_model.py:small      # a file, then a size of its SIZES
    --models my_pkg.my_model:small          # an importable module
    --models hf:path/to/dir                 # a Hugging Face config directory (models/hf.py)

A user's module has the shape of a family file here (gpt.py, resnet.py): ``SIZES`` (named
configs), ``build(config)``, ``make_batch(config, batch_size, size, generator)`` and
``loss(model, inputs, targets)``; optionally ``UNIT`` ("sequence" | "image" | "sample"),
``SIZE_ARG`` ("seq_len" | "image_size" | None: the matrix axis its size is; by default the
unit's, none for "sample"), ``DEFAULT_SIZE``, ``MAX_SIZE``, ``DEFAULT_BATCH_SIZE``,
``PARITY_LR`` and ``flops_per_sample(config, size)``. docs/your-model.md is the contract.

``parse`` turns a reference into a ModelSpec without importing the module: the parent side is
torch-free and runs no user code, so the card (unit, size axis, default sizes, the names of
SIZES) is read from the source with ``ast``, and its sha256 goes into every record. For a
module name ``importlib.util.find_spec`` finds its file; for ``pkg.mod`` that imports the
package ``pkg`` (its ``__init__``), which Python's import system cannot avoid. ``load`` runs
the module, in the processes that train (bench/cell/check.py checks what it returns).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import models

HF_PREFIX = "hf:"
# What each unit's size is on the matrix: a sequence's length or an image's side; none for a
# sample of fixed shape.
UNIT_SIZE_ARGS: dict[str, str | None] = {"sequence": "seq_len", "image": "image_size",
                                         "sample": None}
DEFAULT_UNIT = "sample"
DEFAULT_BATCH_SIZE = 16
REQUIRED = ("SIZES", "build", "make_batch", "loss")
_OPTIONAL = ("UNIT", "SIZE_ARG", "DEFAULT_SIZE", "MAX_SIZE", "DEFAULT_BATCH_SIZE")
_FORMS = "PATH.py:SIZE, package.module:SIZE or hf:DIR"


class BadReference(models.UnknownModel):
    """A reference that names no usable module: one line naming the file and the problem."""


def is_reference(name: str) -> bool:
    """Whether ``name`` names a model outside the registry (a file, a module, hf:)."""
    return ":" in name or name.endswith(".py")


def parse(name: str) -> models.ModelSpec:
    """The ModelSpec of reference ``name``, read torch-free; BadReference (one line) when the
    module cannot be found or read, lacks SIZES or the size, or has a bad card value."""
    if name.startswith(HF_PREFIX):
        return _parse_hf(name)
    target, colon, size = name.rpartition(":")
    if not colon:
        target, size = name, ""
    if not target:
        raise BadReference(f"model '{name}': name a module before the size ({_FORMS})")
    is_file = target.endswith(".py") or os.sep in target or "/" in target
    path = Path(target) if is_file else _module_file(target)
    card = read_card(path)
    sizes = card.get("SIZES")
    if not size:
        some = f"; sizes: {', '.join(sizes)}" if sizes else ""
        raise BadReference(f"{path}: name a size after a colon ({target}:SIZE){some}")
    if sizes is not None and size not in sizes:
        raise BadReference(f"{path}: no size '{size}' in SIZES; sizes: {', '.join(sizes)}")
    unit = card.get("UNIT", DEFAULT_UNIT)
    return models.ModelSpec(
        name, "external", unit, card.get("SIZE_ARG", UNIT_SIZE_ARGS[unit]),
        card.get("DEFAULT_SIZE"), card.get("MAX_SIZE"),
        card.get("DEFAULT_BATCH_SIZE", DEFAULT_BATCH_SIZE), size=size,
        source=str(path.resolve()) if is_file else target, source_sha256=card["sha256"])


def _module_file(module: str) -> Path:
    """The source file of importable module ``module``, found without running it (its parent
    packages are imported: Python finds a submodule through them)."""
    if not all(part.isidentifier() for part in module.split(".")):
        raise BadReference(f"model '{module}': not a file (PATH.py) nor a module name "
                           f"({_FORMS})")
    _with_cwd_on_path()
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise BadReference(f"module {module}: cannot be found ({_one_line(exc)})") from None
    if found is None or not found.origin or not found.origin.endswith(".py"):
        raise BadReference(f"module {module}: no such module with a .py source on the path "
                           "(run from its directory, or put it on PYTHONPATH)")
    return Path(found.origin)


def _with_cwd_on_path() -> None:
    """The working directory on sys.path, as ``python -m`` puts it there: the `ampbench`
    script and its children then find the same modules."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def read_card(path: Path) -> dict[str, Any]:
    """The card of module file ``path``, read with ``ast``: SIZES's names (a tuple, or None
    when SIZES is not a dict display: the child checks it), the optional names' literal
    values, checked, and ``sha256`` of the file's bytes. BadReference naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadReference(f"{path}: cannot read the model file ({exc.strerror})") from None
    try:
        tree = ast.parse(data, filename=str(path))
    except SyntaxError as exc:
        raise BadReference(f"{path}: line {exc.lineno}: syntax error ({exc.msg})") from None
    except ValueError as exc:  # null bytes
        raise BadReference(f"{path}: not Python source ({exc})") from None
    values = _top_level(tree)
    card: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest()}
    if "SIZES" not in values:
        raise BadReference(f"{path}: defines no SIZES (a dict of named configs, "
                           "SIZES = {\"small\": ...})")
    card["SIZES"] = _size_names(values["SIZES"], path)
    for name in _OPTIONAL:
        if name in values:
            try:
                card[name] = ast.literal_eval(values[name])
            except ValueError:
                raise BadReference(f"{path}: {name} must be a literal value") from None
    _check_card(card, path)
    return card


def _top_level(tree: ast.Module) -> dict[str, ast.expr]:
    """Module-level ``NAME = value`` (and annotated) assignments: the last one wins."""
    values: dict[str, ast.expr] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    values[target.id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and node.value is not None:
            values[node.target.id] = node.value
    return values


def _size_names(node: ast.expr, path: Path) -> tuple[str, ...] | None:
    """The keys of a SIZES dict display (or ``dict(k=...)``); None for anything computed."""
    if isinstance(node, ast.List | ast.Tuple | ast.Set | ast.Constant | ast.ListComp
                  | ast.SetComp | ast.GeneratorExp):
        raise BadReference(f"{path}: SIZES must be a dict of named configs, not a "
                           f"{type(node).__name__.lower()}")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and node.func.id == "dict" and not node.args:
        keys = [k.arg for k in node.keywords]
        return tuple(keys) if None not in keys else None
    if not isinstance(node, ast.Dict):
        return None
    if not all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys):
        raise BadReference(f"{path}: SIZES's keys must be strings (the sizes' names)")
    if not node.keys:
        raise BadReference(f"{path}: SIZES is empty; name at least one size")
    return tuple(k.value for k in node.keys)  # type: ignore[union-attr]


def _check_card(card: dict[str, Any], path: Path) -> None:
    unit = card.get("UNIT", DEFAULT_UNIT)
    if unit not in UNIT_SIZE_ARGS:
        raise BadReference(f"{path}: UNIT {unit!r} is not one of {', '.join(UNIT_SIZE_ARGS)}")
    size_arg = card.get("SIZE_ARG", UNIT_SIZE_ARGS[unit])
    if size_arg not in ("seq_len", "image_size", None):
        raise BadReference(f"{path}: SIZE_ARG {size_arg!r} is not seq_len, image_size or None")
    for name in ("DEFAULT_SIZE", "MAX_SIZE", "DEFAULT_BATCH_SIZE"):
        value = card.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise BadReference(f"{path}: {name} must be a whole number of at least 1, "
                               f"got {value!r}")
    if size_arg is not None and card.get("DEFAULT_SIZE") is None:
        raise BadReference(f"{path}: SIZE_ARG {size_arg} needs DEFAULT_SIZE (the {size_arg} "
                           "a cell takes unless the matrix says)")
    if card.get("MAX_SIZE") and card.get("DEFAULT_SIZE") and card["DEFAULT_SIZE"] > \
            card["MAX_SIZE"]:
        raise BadReference(f"{path}: DEFAULT_SIZE {card['DEFAULT_SIZE']} is above MAX_SIZE "
                           f"{card['MAX_SIZE']}")


def _parse_hf(name: str) -> models.ModelSpec:
    """An hf: reference's spec, from models/hf.py's torch-free card of its config."""
    from models import hf

    try:
        ref = hf.parse(name)
        card = hf.card(ref)
    except ValueError as exc:
        raise BadReference(_one_line(exc)) from None
    return models.ModelSpec(
        ref.name, "hf", card["unit"], card["size_arg"], card["default_size"],
        card["max_size"], card["default_batch_size"], size=ref.name, source=ref.name,
        source_sha256=card["config_sha256"])


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# ------------------------------------------------------------------------ in the child


_LOADED: dict[tuple[str, str | None], ModuleType] = {}


def load(spec: models.ModelSpec) -> ModuleType:
    """The module behind ``spec`` (a reference), run once per process and source hash."""
    assert spec.source is not None
    key = (spec.source, spec.source_sha256)
    if key not in _LOADED:
        _LOADED[key] = _import(spec)
    return _LOADED[key]


def _import(spec: models.ModelSpec) -> ModuleType:
    if spec.family == "hf":
        return importlib.import_module("models.hf")
    source = str(spec.source)
    if not source.endswith(".py"):
        _with_cwd_on_path()
        return importlib.import_module(source)
    # A name of its own per file: two files both called model.py are two modules.
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    name = f"ampbench_user_{Path(source).stem}_{digest}"
    found = importlib.util.spec_from_file_location(name, source)
    assert found is not None and found.loader is not None
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        found.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def config(spec: models.ModelSpec) -> Any:
    """The config ``spec`` names: SIZES[size], or an hf: reference's Config."""
    module = load(spec)
    if spec.family == "hf":
        return module.config(module.parse(str(spec.source)))
    return module.SIZES[spec.size]
