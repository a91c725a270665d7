"""The benchmark matrix as typed config: frozen dataclasses, named presets, TOML files.

    python -m bench run --preset cpu
    python -m bench run --matrix my.toml

matrix.py holds the types (ModelAxis, Matrix, Cell) and ``expand``; presets.py the named
matrices; files.py what comes from outside (TOML files, meta.json, command-line overrides),
checked. A preset is a function returning a Matrix; a TOML file (and meta.json's copy of a run's
matrix) maps onto the same dataclasses through ``from_dict``, which checks every key and type
and raises BadInput with one line naming the bad key and the file. torch-free: only the
model and policy registries (themselves torch-free) are imported; ``auto`` is told whether
CUDA is present (the run's device probe, bench/run/device.py, asks torch in a child).

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
    parity_strategy = ""    # e.g. "fsdp2:bf16/fp32": parity on the widest cell's ranks

    [models.gpt2-tiny]
    batch_sizes = [2, 4]
    seq_len = 64            # image_size for vision models; default: the model's

    [models.resnet-tiny]
    batch_sizes = [4]
"""

from __future__ import annotations

from bench.config.files import (
    LIMITS,
    MAX_PROCESSES,
    check_limit,
    from_dict,
    load,
    override,
    to_toml,
)
from bench.config.matrix import Cell, Matrix, ModelAxis, expand, index
from bench.config.presets import PRESETS, auto, cpu, gpu, gpu_quick, preset, quick

__all__ = ["LIMITS", "MAX_PROCESSES", "PRESETS", "Cell", "Matrix", "ModelAxis", "auto",
           "check_limit", "cpu", "expand", "from_dict", "gpu", "gpu_quick", "index", "load",
           "override", "preset", "quick", "to_toml"]
