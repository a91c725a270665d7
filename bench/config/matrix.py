"""Matrix -> cells: the product of every axis, in a run order that makes OOM skipping work.

``expand(matrix)`` returns frozen, hashable Cells; each has a stable ``cell_id`` (a short
sha256 of its key fields), the same in every run and Python process, so a resumed run finds
the cells it already finished. torch-free.
"""

from __future__ import annotations

import itertools

from bench.config import Cell, Matrix


def expand(matrix: Matrix) -> list[Cell]:
    """Every cell of ``matrix``; within a (model, policy, ...) group batch sizes ascend."""
    cells: list[Cell] = []
    for axis in matrix.models:
        size_field = axis.spec.size_arg  # seq_len | image_size
        for policy, accum, compiled, world in itertools.product(
            matrix.precisions, matrix.grad_accum, matrix.compile, matrix.world_size
        ):
            if compiled and policy not in matrix.compile_precisions:
                continue
            # Compiled only, when the matrix compiles at all (else such a policy runs eager).
            if not compiled and policy in matrix.compile_only and True in matrix.compile:
                continue
            # Ascending batches: an OOM at b lets the runner skip every larger batch of the group.
            for batch in sorted(set(axis.batch_sizes)):
                cells.append(Cell(
                    model=axis.name, precision=policy, batch_size=batch,
                    **{size_field: axis.resolved_size}, grad_accum=accum, compile=compiled,
                    world_size=world, nnodes=matrix.nnodes,
                ))
    return cells


def index(cells: list[Cell]) -> dict[str, Cell]:
    """cell_id -> cell; two cells sharing an id would be a bug in the key, so it raises."""
    by_id: dict[str, Cell] = {}
    for cell in cells:
        if by_id.setdefault(cell.cell_id, cell) != cell:
            raise ValueError(f"cell id collision: {cell} and {by_id[cell.cell_id]}")
    return by_id
