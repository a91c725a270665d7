"""The world size ``node``: every GPU of the node a run is on (``--world-size 1,node``,
``world_size = [1, "node"]`` in a matrix file, the gpu-fsdp2 preset).

Only torch can count the GPUs, and the runner imports no torch: the device probe
(bench/run/device.py) counts them (torch's count, so under CUDA_VISIBLE_DEVICES the GPUs left
visible), and ``resolve`` makes ``node`` that number before the run directory is touched. Until
then the runner plans ``node`` as one GPU (PLANNED): enough to check the flags and to ask the
probe for the FLOPs of each rank's work, which do not depend on the number of ranks. Cells,
records and meta.json hold the number, so a cell's id is the one the number typed would give,
and a run continued from its meta.json keeps it: ``--world-size node`` there means the GPUs the
run recorded (``keep``), wherever it is resumed.

On a 1-GPU node ``node`` is 1, and every cell of it is a single process, which shares nothing:
the strategies collapse to ddp (bench/config/matrix.py, ``resolve_node``), and the sweep
measures each policy on the one GPU. torch-free.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from bench import BadInput
from bench.config import Cell, Matrix, matrix
from bench.config.matrix import NODE
from bench.run.device import Probe

PLANNED = 1  # what `node` stands for until the probe has counted the GPUs


def gpus(device: str | None, cuda: bool, device_count: int,
         where: str = "--world-size node") -> int:
    """What ``node`` is on a run whose child device is ``device``: ``device_count``, the CUDA
    GPUs the probe counted. BadInput naming ``where`` without CUDA, on another device or with
    no count: there is no node of GPUs to fill."""
    if not cuda:
        raise BadInput(f"{where}: no CUDA GPU here (node means every GPU of this node); give "
                       "a number of processes instead, e.g. --world-size 2")
    if device != "cuda":
        raise BadInput(f"{where}: counts this node's CUDA GPUs, and the run's device is "
                       f"{device}; use --device cuda")
    if device_count < 1:
        raise BadInput(f"{where}: no count of this node's GPUs (device_count "
                       f"{device_count}); give a number of processes instead")
    return device_count


def _count(env: dict[str, Any]) -> int:
    """The ``device_count`` of a fingerprint (a probe's env, or meta.json); 0 when absent."""
    count = env.get("device_count")
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def resolve(args: argparse.Namespace, mx: Matrix, planned: list[Cell],
            found: Probe) -> tuple[Matrix, list[Cell], Probe]:
    """``mx`` with ``node`` made the GPUs ``found`` counted, its cells (ids checked), and
    ``found`` with the FLOPs per step of each cell: those the probe counted for the
    ``planned`` cell of the same work (``Cell.work``), for --time-budget's estimates. A
    matrix without ``node`` comes back as it is, with ``planned`` and ``found``."""
    if NODE not in mx.world_size:
        return mx, planned, found
    where = ("--world-size node" if getattr(args, "world_size", None)
             else f"{getattr(args, 'matrix', None) or mx.name}: world_size \"node\"")
    device = found.checked_device() if found.cuda else found.device
    mx = matrix.resolve_node(mx, gpus(device, found.cuda, _count(found.env), where))
    cells = matrix.expand(mx)
    matrix.index(cells)
    counted = {c.work: found.flops_per_step[c.cell_id] for c in planned
               if c.cell_id in found.flops_per_step}
    flops = {**found.flops_per_step,
             **{c.cell_id: counted[c.work] for c in cells if c.work in counted}}
    return mx, cells, replace(found, flops_per_step=flops)


def keep(args: argparse.Namespace, nnodes: int, meta: dict[str, Any], where: str) -> None:
    """``node`` in --world-size on a run continued from its meta.json (``where``: the --resume
    or --out naming it): the GPUs the run recorded, written into ``args``, so that the run
    keeps its cells wherever it is resumed and the flag is checked against the run's as a
    number would be. ``nnodes``: the run's, unless --nnodes says otherwise."""
    sizes = getattr(args, "world_size", None)
    if not sizes or NODE not in sizes:
        return
    num_gpus = gpus(meta.get("device"), True, _count(meta), f"{where}: --world-size node")
    args.world_size = list(dict.fromkeys(num_gpus if w == NODE else w for w in sizes))
    if max(args.world_size) * (args.nnodes or nnodes) == 1:
        args.strategy = None  # one process shares nothing: the run kept ddp alone
