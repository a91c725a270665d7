"""The benchmark matrix as typed config: frozen dataclasses, named presets, TOML files.

    python -m bench run --preset cpu
    python -m bench run --matrix my.toml

A preset is a function returning a Matrix; a TOML file (and meta.json's copy of a run's
matrix) maps onto the same dataclasses through ``from_dict``, which checks every key and type
and raises BadInput with one line naming the bad key and the file. torch-free: only the
model and policy registries (themselves torch-free) are imported; ``auto`` alone asks torch
whether CUDA is present, lazily.

A TOML matrix::

    name = "mine"
    precisions = ["fp32", "bf16"]
    warmup = 2
    steps = 10
    repeats = 1
    calibration = 4         # extra processes measuring between-process noise (repeats < 3)
    device = "cpu"          # cpu | cuda | cuda:N | auto
    timeout_s = 300
    grad_accum = [1]
    compile = [false]
    compile_precisions = ["bf16"]   # with compile = [false, true]: the policies run compiled
    compile_only = []       # with compile = [false, true]: the policies that run compiled only
    world_size = [1]
    nnodes = 1
    parity = false
    parity_steps = 0        # training steps per parity run; 0: each model's own
    parity_seeds = 3

    [models.gpt2-tiny]
    batch_sizes = [2, 4]
    seq_len = 64            # image_size for vision models; default: the model's

    [models.resnet-tiny]
    batch_sizes = [4]
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import models
from bench import BadInput, precision
from bench.analysis import noise

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class ModelAxis:
    """One model of the matrix with its own batch sizes and input size (seq_len or image_size)."""

    name: str
    batch_sizes: tuple[int, ...]
    size: int | None = None  # None: the model's default size

    @property
    def spec(self) -> models.ModelSpec:
        return models.get(self.name)

    @property
    def resolved_size(self) -> int:
        return self.size or self.spec.default_size


@dataclass(frozen=True)
class Matrix:
    """Every axis of a sweep; ``bench.config.matrix.expand`` turns it into Cells."""

    models: tuple[ModelAxis, ...]
    precisions: tuple[str, ...] = ("fp32", "tf32", "fp16", "bf16")
    name: str = "custom"
    grad_accum: tuple[int, ...] = (1,)
    compile: tuple[bool, ...] = (False,)
    # The policies that also run compiled when ``compile`` holds true (gpu-quick: bf16 only).
    compile_precisions: tuple[str, ...] = precision.NAMES
    # Of those, the policies that run compiled only, no eager cells (gpu-quick: the FP8 ones).
    compile_only: tuple[str, ...] = ()
    world_size: tuple[int, ...] = (1,)
    nnodes: int = 1
    repeats: int = 1
    # Extra processes of a calibration cell that measure the machine's between-process noise
    # when repeats are too few to (bench/analysis/noise.py); 0: none.
    calibration: int = noise.CALIBRATION_PROCESSES
    warmup: int = 5
    steps: int = 20
    device: str = "auto"
    timeout_s: float = 900.0
    parity: bool = True
    parity_steps: int = 0  # training steps per parity run; 0: each model's own (bench/parity/)
    parity_seeds: int = 3  # seeds per policy; FP32's band needs at least 2

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (meta.json); ``from_dict`` reads it back."""
        data = asdict(self)
        data["models"] = {
            axis.name: {"batch_sizes": list(axis.batch_sizes),
                        axis.spec.size_arg: axis.resolved_size}
            for axis in self.models
        }
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


@dataclass(frozen=True)
class Cell:
    """One point of the matrix; ``cell_id`` hashes its key fields, stable across processes."""

    model: str
    precision: str
    batch_size: int
    seq_len: int | None = None
    image_size: int | None = None
    grad_accum: int = 1
    compile: bool = False
    world_size: int = 1
    nnodes: int = 1

    def key(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def num_processes(self) -> int:
        """Ranks of the cell's torchrun job: its world size in torch.distributed's sense."""
        return self.world_size * self.nnodes

    @property
    def cell_id(self) -> str:
        # sha256 of canonical JSON, not hash(): the id must not change between processes.
        text = json.dumps(self.key(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def group(self) -> tuple[Any, ...]:
        """Everything but the batch size: an OOM at batch b skips larger batches of the group."""
        return (self.model, self.precision, self.seq_len, self.image_size, self.grad_accum,
                self.compile, self.world_size, self.nnodes)

    def label(self) -> str:
        size = f"T={self.seq_len}" if self.seq_len else f"{self.image_size}px"
        extra = "".join([
            f" ga={self.grad_accum}" if self.grad_accum != 1 else "",
            " compile" if self.compile else "",
            f" ws={self.world_size}x{self.nnodes}" if self.num_processes > 1 else "",
        ])
        return f"{self.model} {self.precision} b={self.batch_size} {size}{extra}"


# ---------------------------------------------------------------- presets


def gpu() -> Matrix:
    """The GPU sweep: full-size reference models, the four main policies and the two FP8 ones,
    eager and torch.compile (what people train with today).

    FP8 is meant to run compiled: torch.compile fuses torchao's amax, scale and cast kernels
    around each FP8 matmul, which eager runs one by one; the eager FP8 cells show that cost.
    The FP8 cells need torchao (``pip install -e .[fp8]``) and compute capability 8.9+;
    without either they are ``unsupported`` records and the sweep goes on.
    """
    return Matrix(
        name="gpu",
        models=(
            ModelAxis("resnet50", (32, 64, 128, 256), 224),
            ModelAxis("bert-base", (16, 32, 64, 128), 128),
            ModelAxis("gpt2-small", (4, 8, 16, 32), 1024),
        ),
        precisions=("fp32", "tf32", "fp16", "bf16", "fp8", "fp8-rowwise"),
        compile=(False, True),
        device="cuda", warmup=10, steps=50, timeout_s=900.0, parity=True,
    )


def cpu() -> Matrix:
    """Tiny models, small batches, fp32, tf32, fp16 and bf16: 24 cells, then parity, in about
    five minutes on 2 cores.

    The fp16-noscale ablation is judged where its question is live, in parity's underflow
    task (bench/parity/__init__.py, task_policies): on the tiny tasks it passes trivially (their
    gradients are large), and its FP16 runs are the slowest on a CPU without FP16 matmuls
    (7x fp32's steps on AMD EPYC), which this preset's six minutes cannot afford twice.
    Not FP8: off CUDA torchao only emulates it, slowly, and emulated speed says nothing
    (``--precisions fp8`` runs it anyway, for its numerics)."""
    return Matrix(
        name="cpu",
        models=(
            ModelAxis("resnet-tiny", (4, 8), 32),
            ModelAxis("bert-tiny", (4, 8), 32),
            ModelAxis("gpt2-tiny", (4, 8), 64),
        ),
        precisions=("fp32", "tf32", "fp16", "bf16"),
        device="cpu", warmup=5, steps=30, timeout_s=300.0, parity=True,
    )


def gpu_quick() -> Matrix:
    """A complete GPU run in about 14 minutes (two or three `--time-budget 9m` commands): the
    full-size models at one realistic batch each under fp32, tf32, fp16 and bf16, bf16 also
    under torch.compile, fp8 and fp8-rowwise under torch.compile only, a short parity.

    Batches are per-GPU batches people train with, and each fits in fp32 on a 40 GB GPU:
    ResNet-50 256 at 224 px (NVIDIA DeepLearningExamples' per-GPU batch), BERT-base 64 at
    sequence 128 (a phase-1 pre-training micro-batch), GPT-2 small 16 at 1024 tokens
    (nanoGPT's 124M recipe uses 12). Parity trains 2 seeds x 40 steps (the gpu preset: 3 x
    600): enough to see the path work and a gross divergence, not a fine verdict.

    Estimate for an H100 SXM, to be confirmed by the first GPU run (README, "Validate on a new
    GPU box"). Training FLOPs per step (models/): ResNet-50 6.3 T, BERT-base 5.5 T, GPT-2 small
    14.0 T. At public eager-PyTorch rates (fp32 ~30 TFLOP/s, 45% of the 67 peak; tf32 ~60 for
    ResNet-50 and ~130 for the transformers; fp16 and bf16 ~75 for ResNet-50, about 3,000
    images/s, and ~250 for the transformers) a step takes 0.47 s (GPT-2 small fp32) down to
    0.02 s (BERT-base bf16), and the 25 steps of each process train for ~50 s in all. Per
    process ~8 s more (Python, torch and CUDA start, model build, FLOP count, cuDNN autotuning):
    ~135 s for 17 processes (15 cells, 2 calibration). Compiling forward and backward with an
    empty inductor cache: ~165 s for the three bf16 compiled cells. Parity: 24 runs (3 models x
    4 policies x 2 seeds) in ~85 s, mostly model builds, evaluation and batches made on the
    CPU. Runner start and report ~15 s. Total ~7.5 minutes; compile time is the least certain
    part. ``timeout_s`` (180 s) is what ``--time-budget`` allows the first cell, the first
    compiled cell and the first torchrun cell; later ones are estimated from those
    (bench/run/sweep.py, estimate_s).

    FP8 (an estimate, not yet measured anywhere): 6 compiled cells at ~55 s of compiling and
    ~8 s of start-up each, ~6.5 minutes, and 12 more parity runs (eager), ~45 s: ~14.5 minutes
    in all, 23 processes. Without torchao the FP8 cells are `unsupported` records in seconds.
    Parity's underflow task adds 12 runs of gpt2-tiny (fp32, fp16, fp16-noscale, bf16 and the
    two FP8 policies, 2 seeds, 60 steps): seconds on a GPU.
    """
    return Matrix(
        name="gpu-quick",
        models=(
            ModelAxis("resnet50", (256,), 224),
            ModelAxis("bert-base", (64,), 128),
            ModelAxis("gpt2-small", (16,), 1024),
        ),
        # fp8 and fp8-rowwise only compiled: torch.compile is how FP8 is meant to run fast
        # (it fuses torchao's scale and cast kernels); they need torchao (a wheel carried to
        # the box) and compute capability 8.9+, else they are `unsupported` records.
        precisions=("fp32", "tf32", "fp16", "bf16", "fp8", "fp8-rowwise"),
        compile=(False, True), compile_precisions=("bf16", "fp8", "fp8-rowwise"),
        compile_only=("fp8", "fp8-rowwise"),
        device="cuda", warmup=5, steps=20, timeout_s=180.0, calibration=2,
        parity=True, parity_steps=40, parity_seeds=2,
    )


def quick() -> Matrix:
    """A handful of tiny cells for smoke tests."""
    return Matrix(
        name="quick",
        models=(ModelAxis("gpt2-tiny", (2,), 64), ModelAxis("resnet-tiny", (2,), 32)),
        precisions=("fp32", "bf16"),
        device="cpu", warmup=1, steps=3, timeout_s=120.0, parity=False, calibration=0,
    )


def auto() -> Matrix:
    """gpu where CUDA is available, cpu otherwise."""
    import torch  # only 'auto' needs to know the hardware

    return gpu() if torch.cuda.is_available() else cpu()


PRESETS: dict[str, Callable[[], Matrix]] = {"gpu": gpu, "gpu-quick": gpu_quick, "cpu": cpu,
                                            "quick": quick, "auto": auto}


def preset(name: str) -> Matrix:
    """The preset called ``name``; unknown names raise BadInput listing the valid ones."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise BadInput(f"unknown preset '{name}'; valid: {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------- TOML / dict -> Matrix

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
    """``value`` converted to ``kind`` (int, pos-int, float, bool, str, list[...], list0[...]:
    a list that may be empty) or BadInput."""
    def bad(expected: str) -> BadInput:
        return BadInput(f"{source}: '{key}' must be {expected}, got {value!r}")

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
    "compile": "list[bool]", "world_size": "list[pos-int]", "nnodes": "pos-int",
    "repeats": "pos-int", "calibration": "int", "warmup": "int", "steps": "pos-int",
    "device": "str",
    "timeout_s": "float", "parity": "bool", "compile_precisions": "list[str]",
    "compile_only": "list0[str]",
    "parity_steps": "int", "parity_seeds": "pos-int",
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
    other = "image_size" if spec.size_arg == "seq_len" else "seq_len"
    if other in table:
        raise BadInput(f"{source}: 'models.{name}.{other}' does not apply to {name} "
                       f"(a {spec.unit} model takes {spec.size_arg})")
    batch_sizes = (_check(table["batch_sizes"], "list[pos-int]", f"models.{name}.batch_sizes",
                          source) if "batch_sizes" in table else (spec.default_batch_size,))
    size = None
    if spec.size_arg in table:
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
    if values.get("parity_seeds", 2) < 2:
        raise BadInput(f"{source}: 'parity_seeds' must be at least 2 (FP32's band needs a "
                       f"spread), got {values['parity_seeds']}")
    return _check_size(Matrix(**values), source)


def _check_size(matrix: Matrix, source: str) -> Matrix:
    """``matrix`` unless its sweep would start more than MAX_PROCESSES cell processes."""
    num_cells = (sum(len(axis.batch_sizes) for axis in matrix.models) * len(matrix.precisions)
                 * len(matrix.grad_accum) * len(matrix.compile) * len(matrix.world_size))
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
        lines.append(f"\n[models.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- CLI overrides


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
    (steps, warmup, repeats, calibration, device, timeout_s, world_size, nnodes).
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
    for size in batch_sizes or ():
        check_limit("batch_sizes", size, "command line")
    return _check_size(replace(matrix, **changes), "command line")


__all__ = ["PRESETS", "Cell", "Matrix", "ModelAxis", "from_dict", "load", "override", "preset",
           "to_toml"]
