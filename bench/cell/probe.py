"""The device probe: what the runner needs to know from torch, asked once in a child process,
so that the runner itself never imports torch (bench/run/device.py starts it).

    python -m bench.cell.probe --device auto < cells.json

stdin: a JSON list of cells (their key fields, ``Cell.key()``), possibly empty, or an object
``{"cells": [...], "models": [[reference, size], ...]}`` naming the models of the user's own
(models/external.py) to check. stdout: one JSON object:

- ``cuda``: whether torch sees a CUDA device (the ``auto`` preset, the GPU presets' check);
- ``device``: the device every cell gets (cpu, cuda, cuda:N), or null with ``error``, the
  one line saying why the device named is unknown or missing (BadInput's text);
- ``env``: the environment fingerprint on that device (bench/telemetry/env.py), the fields
  every record carries; ``cpu_model``: for meta.json;
- ``flops_per_step``: cell_id -> analytic training FLOPs of one optimizer step on one rank
  (models/), for each cell sent whose model the registry knows (--time-budget's estimates);
- ``unchanged``: cell_id -> why the cell's policy would leave its model as it is (FP8 on a
  model with no convertible Linear), for `ampbench validate`'s plan;
- ``model_problems``: reference -> the one line saying how its module breaks the contract
  (bench/cell/check.py), for each model sent that does; the runner stops there (exit 2).
  A module without ``flops_per_sample`` has its FLOPs counted on that check's step.

Exit 0 whenever it could answer, a bad device included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterable
from typing import Any

from bench import BadInput
from bench.config import Cell


def _device(name: str) -> str:
    """The device string the runner hands every child; BadInput for a bad or missing one."""
    from bench.cell.train import resolve_device

    device = resolve_device(name)
    # cuda stays cuda (each rank of a multi-process cell takes its local rank's GPU).
    return "cuda" if device.type == "cuda" and name in ("auto", "cuda") else str(device)


def flops_per_step(cells: Iterable[Cell],
                   counted: dict[tuple[str, int | None], float] | None = None,
                   ) -> dict[str, float]:
    """cell_id -> analytic training FLOPs of one optimizer step on one rank (``counted``: per
    sample of a user's (model, size), as its check counted them); a model the registry does
    not know and nothing counted has none."""
    import models

    flops: dict[str, float] = {}
    for cell in cells:
        try:
            spec = models.get(cell.model)
        except ValueError:
            continue
        size = cell.seq_len or cell.image_size or spec.default_size
        per_sample = (counted or {}).get((cell.model, size))
        if per_sample is None and spec.source is not None:
            continue
        if per_sample is None:
            per_sample = spec.flops_per_sample(size)
        flops[cell.cell_id] = float(per_sample * cell.batch_size * cell.grad_accum)
    return flops


def check_models(references: Iterable[tuple[str, int | None]],
                 ) -> tuple[dict[str, str], dict[tuple[str, int | None], float]]:
    """(reference -> its problem, (reference, size) -> FLOPs per sample) for the user's
    models at their sizes (bench/cell/check.py)."""
    import models
    from bench.cell.check import ModelProblem, check

    problems: dict[str, str] = {}
    counted: dict[tuple[str, int | None], float] = {}
    for name, size in references:
        try:
            counted[(name, size)] = check(models.get(name), size).flops_per_sample
        except (ModelProblem, ValueError) as exc:
            problems.setdefault(name, str(exc))
    return problems, counted


def unchanged(cells: Iterable[Cell]) -> dict[str, str]:
    """cell_id -> why the cell's policy would leave its model as it is (FP8 on a model with no
    convertible Linear): such a cell is an `unsupported` record in seconds."""
    import models
    from bench import precision

    reasons: dict[str, str] = {}
    for cell in cells:
        try:
            reason = precision.get(cell.precision).model_reason(models.get(cell.model))
        except ValueError:
            continue
        if reason:
            reasons[cell.cell_id] = reason
    return reasons


def answer(device_name: str, cells: Iterable[Cell],
           references: Iterable[tuple[str, int | None]] = ()) -> dict[str, Any]:
    """The probe's answer for ``device_name``, ``cells`` and the user's models
    ``references`` (see the module's docstring)."""
    import torch

    cells = list(cells)
    problems, counted = check_models(references)

    from bench.telemetry.env import cpu_model, fingerprint

    try:
        device, error = _device(device_name), None
    except BadInput as exc:
        device, error = None, str(exc)
    return {"cuda": torch.cuda.is_available(), "device": device, "error": error,
            "env": fingerprint(device) if device else None, "cpu_model": cpu_model(),
            "flops_per_step": flops_per_step(cells, counted),
            "unchanged": unchanged(c for c in cells if c.model not in problems),
            "model_problems": problems}


def _request(text: str) -> tuple[list[Cell], list[tuple[str, int | None]]]:
    """(cells, the user's models with their sizes) from stdin's JSON."""
    found = json.loads(text or "[]")
    if isinstance(found, list):
        found = {"cells": found}
    return ([Cell(**key) for key in found.get("cells", [])],
            [(name, size) for name, size in found.get("models", [])])


def main(argv: list[str] | None = None) -> int:
    """Read the cells on stdin, print the answer as one JSON line on stdout."""
    parser = argparse.ArgumentParser(prog="python -m bench.cell.probe",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    args = parser.parse_args(argv)
    cells, references = _request(sys.stdin.read())
    # Whatever a library (or a user's module) prints goes to stderr: stdout holds the answer.
    with contextlib.redirect_stdout(sys.stderr):
        result = answer(args.device, cells, references)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
