"""The check of a model of the user's own (models/external.py) before anything is measured.

The parent read the module's card without running it; here, in a process that trains (the
run's device probe, a cell, a parity plan), the module runs: it must import, define SIZES (a
dict holding the size), ``build``, ``make_batch`` and ``loss``; ``build(config)`` must return
an ``nn.Module``; ``make_batch(config, 2, size, generator)`` a pair (inputs, targets), each a
tensor or a tuple, list or dict of tensors, on the CPU; and ``loss`` a scalar floating tensor
whose backward runs. The forward and backward run on the meta device (no memory, no compute:
a 1B-parameter model checks in seconds), on the CPU where the meta device cannot run the
model; FlopCounterMode counts that step's FLOPs on the way, for a module without its own
``flops_per_sample``. A problem is one line naming the file, which the caller turns into
BadInput (exit 2) before any cell starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import models
from models import external

_CHECK_BATCH = 2  # samples of the checked batch: BatchNorm needs more than one


class ModelProblem(Exception):
    """What is wrong with a user's module: one line that names its file."""


@dataclass(frozen=True)
class Checked:
    """A module that passed: its training FLOPs per sample (its own count, or FlopCounterMode's
    on the checked step)."""

    flops_per_sample: float


def check(spec: models.ModelSpec, size: int | None) -> Checked:
    """Run ``spec``'s module once at input size ``size``; ModelProblem (one line naming the
    file) when it breaks the contract (docs/your-model.md)."""
    where = spec.source
    try:
        module = spec.module
    except Exception as exc:
        raise ModelProblem(f"{where}: cannot import it: {_exc_line(exc)}") from None
    _check_names(module, spec, where)
    try:
        config = spec.config
    except Exception as exc:
        raise ModelProblem(f"{where}: its config for '{spec.size}' failed: "
                           f"{_exc_line(exc)}") from None
    try:
        flops = _step(spec, module, config, size, "meta")
    except ModelProblem as problem:
        if problem.__cause__ is None:  # a wrong kind of thing: the same on any device
            raise
        # A call that raised: maybe an op the meta device lacks, or a .item(): the CPU decides.
        flops = _step(spec, module, config, size, "cpu")
    if spec.counts_flops:
        return Checked(float(_call(where, "flops_per_sample(config, size)",
                                   module.flops_per_sample, config, size)))
    return Checked(flops / _CHECK_BATCH)


def _check_names(module: Any, spec: models.ModelSpec, where: str | None) -> None:
    needed = external.REQUIRED if spec.family != "hf" else external.REQUIRED[1:]
    missing = [name for name in needed if not hasattr(module, name)]
    if missing:
        raise ModelProblem(f"{where}: defines no {', '.join(missing)} (a model module defines "
                           "SIZES, build, make_batch and loss: docs/your-model.md)")
    if spec.family != "hf":
        if not isinstance(module.SIZES, dict):
            raise ModelProblem(f"{where}: SIZES is a {type(module.SIZES).__name__}, not a "
                               "dict of named configs")
        if spec.size not in module.SIZES:
            raise ModelProblem(f"{where}: no size '{spec.size}' in SIZES; sizes: "
                               f"{', '.join(map(str, module.SIZES))}")
    for name in ("build", "make_batch", "loss"):
        if not callable(getattr(module, name)):
            raise ModelProblem(f"{where}: {name} is a {type(getattr(module, name)).__name__}, "
                               "not a function")


def _step(spec: models.ModelSpec, module: Any, config: Any, size: int | None,
          device: str) -> float:
    """Build, make a batch, take the loss and its backward on ``device``; the FLOPs counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    where = spec.source
    torch.manual_seed(0)
    with torch.device(device):
        model = _call(where, "build(config)", module.build, config)
    if not isinstance(model, torch.nn.Module):
        raise ModelProblem(f"{where}: build(config) returned a {_kind(model)}, not a "
                           "torch.nn.Module")
    batch = _call(where, f"make_batch(config, {_CHECK_BATCH}, {size}, generator)",
                  module.make_batch, config, _CHECK_BATCH, size,
                  torch.Generator().manual_seed(0))
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise ModelProblem(f"{where}: make_batch returned a {_kind(batch)}, not a pair "
                           "(inputs, targets)")
    for what, part in zip(("inputs", "targets"), batch, strict=True):
        problem = _tensors_problem(part)
        if problem:
            raise ModelProblem(f"{where}: make_batch's {what}: {problem}")
    inputs, targets = (models.to_device(part, device) for part in batch)
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss = _call(where, "loss(model, inputs, targets)", module.loss, model, inputs,
                     targets)
        if not isinstance(loss, torch.Tensor):
            raise ModelProblem(f"{where}: loss returned a {_kind(loss)}, not a scalar tensor")
        if loss.dim() != 0:
            raise ModelProblem(f"{where}: loss returned a tensor of shape "
                               f"{tuple(loss.shape)}, not a scalar (0-dim) tensor")
        if not loss.is_floating_point():
            raise ModelProblem(f"{where}: loss returned a {loss.dtype} tensor, not a floating "
                               "one")
        if not loss.requires_grad:
            raise ModelProblem(f"{where}: loss has no gradient (it does not depend on the "
                               "model's parameters)")
        _call(where, "the loss's backward()", loss.backward)
    return float(counter.get_total_flops())


def _tensors_problem(part: Any) -> str | None:
    """Why ``part`` is not a tensor or a tuple, list or dict of tensors on the CPU."""
    import torch

    if isinstance(part, dict):
        values = list(part.values())
    elif isinstance(part, tuple | list):
        values = list(part)
    else:
        values = [part]
    wrong = [v for v in values if not isinstance(v, torch.Tensor)]
    if wrong or not values:
        shown = type(part).__name__
        if wrong and wrong[0] is not part:
            shown += f" of {type(wrong[0]).__name__}"
        elif not values:
            shown = f"empty {shown}"
        return f"a {shown}, not a tensor or a tuple or dict of tensors"
    elsewhere = [v for v in values if v.device.type != "cpu"]
    if elsewhere:
        return f"on {elsewhere[0].device}, not the CPU (the cell moves the batch)"
    return None


def _call(where: str | None, what: str, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``; ModelProblem naming ``what`` when it raises."""
    try:
        return function(*args)
    except ModelProblem:
        raise
    except Exception as exc:
        raise ModelProblem(f"{where}: {what} raised {_exc_line(exc)}") from exc


def _kind(value: Any) -> str:
    if isinstance(value, list | tuple) and value:
        return f"{type(value).__name__} of {type(value[0]).__name__}"
    return type(value).__name__


def _exc_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
