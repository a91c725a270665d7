"""The matrix and its cells: typed axes (ModelAxis, Matrix), one point of the product (Cell)
with a stable id, and ``expand``, the product in a run order that makes OOM skipping work.

``expand(matrix)`` returns frozen, hashable Cells; each has a stable ``cell_id`` (a short
sha256 of its key fields), the same in every run and Python process, so a resumed run finds
the cells it already finished. torch-free.

A world size may be NODE, ``"node"``: every GPU of the node the run is on, which only the
run's device probe can count. The runner resolves it (``resolve_node``) before it expands the
matrix or writes meta.json, so cells, records and a resumed run hold the number.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import models
from bench import precision
from bench.analysis import noise
from bench.strategy import DEFAULT as DEFAULT_STRATEGY

# The world size "every GPU of this node" (--world-size 1,node; world_size = [1, "node"]).
NODE = "node"


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
    def resolved_size(self) -> int | None:
        """The input size of its cells; None for a model without a size axis."""
        return (self.size or self.spec.default_size) if self.spec.size_arg else None


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
    # Processes per node; NODE: every GPU of this node, resolved by the runner (resolve_node).
    world_size: tuple[int | str, ...] = (1,)
    nnodes: int = 1
    # How a cell of several processes shares its model (bench/strategy.py): ddp, fsdp2,
    # fsdp2:PARAM/REDUCE; single-process cells run the model alone, whatever this says.
    strategies: tuple[str, ...] = (DEFAULT_STRATEGY,)
    repeats: int = 1
    # Extra processes of a calibration cell that measure the machine's between-process noise
    # when repeats are too few to (bench/analysis/noise.py); 0: none.
    calibration: int = noise.CALIBRATION_PROCESSES
    warmup: int = 5
    steps: int = 20
    device: str = "auto"
    # One node's GPUs that run cells side by side (all, or indices 0,1,3: `run --devices`,
    # bench/run/slots.py); "": one cell at a time on ``device``.
    devices: str = ""
    timeout_s: float = 900.0
    parity: bool = True
    parity_steps: int = 0  # training steps per parity run; 0: each model's own (bench/parity/)
    parity_seeds: int = 3  # seeds per policy; FP32's band needs at least 2
    # Parity-only tasks the parity stage adds to the matrix's models (gpt2-tiny-shakespeare)
    parity_tasks: tuple[str, ...] = ()
    # Parity on several ranks (bench/parity/sharing.py): every policy trained under this
    # strategy on as many ranks as the widest cell, judged against FP32 in one process; "":
    # every parity run in one process.
    parity_strategy: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (meta.json); ``from_dict`` reads it back."""
        data = asdict(self)
        data["models"] = {
            axis.name: {"batch_sizes": list(axis.batch_sizes),
                        **({axis.spec.size_arg: axis.resolved_size} if axis.spec.size_arg
                           else {})}
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
    strategy: str = DEFAULT_STRATEGY  # canonical (bench/strategy.py)

    def key(self) -> dict[str, Any]:
        key = asdict(self)
        if self.strategy == DEFAULT_STRATEGY:
            del key["strategy"]  # cells from before the strategy axis keep their ids
        return key

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
    def work(self) -> tuple[Any, ...]:
        """What one rank trains, whatever the number of ranks and how they share the model:
        a rank's analytic FLOPs per step depend on nothing else (bench/cell/probe.py)."""
        return (self.model, self.precision, self.batch_size, self.seq_len, self.image_size,
                self.grad_accum, self.compile)

    @property
    def group(self) -> tuple[Any, ...]:
        """Everything but the batch size: an OOM at batch b skips larger batches of the group."""
        return (self.model, self.precision, self.seq_len, self.image_size, self.grad_accum,
                self.compile, self.world_size, self.nnodes, self.strategy)

    def label(self) -> str:
        # A model with a fixed-size input (a user's, UNIT "sample") has no size to show.
        size = f" T={self.seq_len}" if self.seq_len else \
            f" {self.image_size}px" if self.image_size else ""
        extra = "".join([
            f" ga={self.grad_accum}" if self.grad_accum != 1 else "",
            " compile" if self.compile else "",
            f" ws={self.world_size}x{self.nnodes}" if self.num_processes > 1 else "",
            f" {self.strategy}" if self.strategy != DEFAULT_STRATEGY else "",
        ])
        return f"{self.model} {self.precision} b={self.batch_size}{size}{extra}"


def resolve_node(matrix: Matrix, num_gpus: int) -> Matrix:
    """``matrix`` with its world size NODE made ``num_gpus``, the GPUs of the node the run is
    on (a number already there is kept once: 1,node on one GPU is 1). When that leaves every
    cell one process (a 1-GPU node), the strategies become ddp alone: a single process shares
    nothing, so expand would give each policy's one cell all the same, and meta.json's matrix
    then reads back (a matrix of single processes refuses other strategies)."""
    if NODE not in matrix.world_size:
        return matrix
    sizes = tuple(dict.fromkeys(num_gpus if w == NODE else w for w in matrix.world_size))
    resolved = replace(matrix, world_size=sizes)
    if max(int(w) for w in sizes) * matrix.nnodes == 1:
        resolved = replace(resolved, strategies=(DEFAULT_STRATEGY,))
    return resolved


def expand(matrix: Matrix) -> list[Cell]:
    """Every cell of ``matrix``; within a (model, policy, ...) group batch sizes ascend.
    Its world sizes must be numbers: the runner resolves NODE first (``resolve_node``)."""
    if NODE in matrix.world_size:
        raise ValueError(f"world size {NODE!r} is resolved before the matrix is expanded "
                         "(resolve_node, once the device probe has counted the GPUs)")
    cells: list[Cell] = []
    for axis in matrix.models:
        size_field = axis.spec.size_arg  # seq_len | image_size | None: a fixed-size input
        sized = {size_field: axis.resolved_size} if size_field else {}
        for policy, accum, compiled, world, shared in itertools.product(
            matrix.precisions, matrix.grad_accum, matrix.compile, matrix.world_size,
            matrix.strategies,
        ):
            # One process shares nothing: its cell is the default strategy's, once.
            if world * matrix.nnodes == 1 and shared != matrix.strategies[0]:
                continue
            shared = shared if world * matrix.nnodes > 1 else DEFAULT_STRATEGY
            if compiled and policy not in matrix.compile_precisions:
                continue
            # Compiled only, when the matrix compiles at all (else such a policy runs eager).
            if not compiled and policy in matrix.compile_only and True in matrix.compile:
                continue
            # Ascending batches: an OOM at b lets the runner skip every larger batch of the group.
            for batch in sorted(set(axis.batch_sizes)):
                cells.append(Cell(
                    model=axis.name, precision=policy, batch_size=batch,
                    **sized, grad_accum=accum, compile=compiled,
                    world_size=world, nnodes=matrix.nnodes, strategy=shared,
                ))
    return cells


def index(cells: list[Cell]) -> dict[str, Cell]:
    """cell_id -> cell; two cells sharing an id would be a bug in the key, so it raises."""
    by_id: dict[str, Cell] = {}
    for cell in cells:
        if by_id.setdefault(cell.cell_id, cell) != cell:
            raise ValueError(f"cell id collision: {cell} and {by_id[cell.cell_id]}")
    return by_id
