"""The low-precision formats of the FP8 family, through torchao: which ``nn.Linear`` layers a
recipe converts, the conversion itself, what the record says about it, and where a format
cannot run.

    float8 tensorwise | rowwise | rowwise, wgrad bf16   torchao.float8 (Float8Linear)
    mxfp8    torchao's MXFP8Linear (32-element blocks, e8m0 scales); native on compute
             capability 10.0+ (Blackwell), emulated in software on CPU
    nvfp4    torchao's NVFP4Linear (Triton kernels only): compute capability 10.0+, no CPU path

A layer converts when its in and out features are multiples of the format's block (16 for
float8, 32 for MXFP8, 128 for NVFP4) and, under the ``torchtitan`` filter (``fp8-filtered``),
it also lies inside the model's stack of blocks, not in its first or last block, and is not a
small GEMM by torchao's auto filter for its recipe (tensorwise: in <= 4096 and out <= 1024;
the thresholds torchao measured on H100). Everything else stays in bf16 under autocast.
torchao is the optional extra ``.[fp8]``; this module imports it only when asked to convert.
CHILD side: torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from torch import nn

# recipe -> (the format as the record names it, the block both dimensions must be a multiple of)
FORMATS: dict[str, tuple[str, int]] = {
    "tensorwise": ("float8 tensorwise", 16),
    "rowwise": ("float8 rowwise", 16),
    "rowwise_with_gw_hp": ("float8 rowwise, wgrad bf16", 16),
    "mxfp8": ("mxfp8", 32),
    "nvfp4": ("nvfp4", 128),
}
# Formats with their own tensor cores only on compute capability 10.0+ (Blackwell).
_BLACKWELL = ("mxfp8", "nvfp4")
_BLACKWELL_CAPABILITY = (10, 0)
FILTERS = ("dims", "torchtitan")
NAMES_SHOWN = 8  # layers named in a record or a reason before "and N more"

Keep = Callable[[Any, str], bool]  # (module, qualified name) -> convert it


def format_name(recipe: str) -> str:
    """How the record names ``recipe``'s format ("float8 rowwise, wgrad bf16", "mxfp8")."""
    return FORMATS[recipe][0]


def filter_rule(recipe: str, rule: str) -> str:
    """The filter a recipe applied, in words, for the record and the report."""
    text = f"in and out features multiples of {FORMATS[recipe][1]}"
    if rule == "torchtitan":
        text += ("; not in the first or last block, not outside the blocks (head), not a small "
                 "GEMM (torchao's auto filter)")
    return text


def _stack(model: Any) -> tuple[str, int] | None:
    """(qualified name, length) of the model's stack of blocks: its longest ``nn.ModuleList``
    holding ``nn.Linear`` layers; None for a model without one."""
    found = [(name, len(m)) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m)
             and any(isinstance(x, nn.Linear) for x in m.modules())]
    return max(found, key=lambda item: item[1]) if found else None


def why_not(recipe: str, rule: str, model: Any) -> Callable[[Any, str], str | None]:
    """A function (Linear, qualified name) -> why the layer stays bf16 ("" for its dims alone),
    or None when ``recipe`` under ``rule`` converts it."""
    multiple = FORMATS[recipe][1]
    stack = _stack(model) if rule == "torchtitan" else None
    small: Keep | None = None
    if rule == "torchtitan":
        from torchao.float8 import _auto_filter_for_recipe

        # torchao filters by its float8 recipes; the block formats take tensorwise's rule.
        base = recipe if recipe in ("tensorwise", "rowwise") else "tensorwise"
        small = _auto_filter_for_recipe(base, filter_fqns=[])

    def reason(module: Any, name: str) -> str | None:
        if module.in_features % multiple or module.out_features % multiple:
            return ""
        if rule != "torchtitan":
            return None
        if stack is None or not name.startswith(f"{stack[0]}."):
            return "outside the blocks"
        index = int(name[len(stack[0]) + 1:].split(".")[0])
        if index == 0:
            return "first block"
        if index == stack[1] - 1:
            return "last block"
        if small is not None and not small(module, name):
            return "small GEMM"
        return None

    return reason


def convert(model: Any, recipe: str, rule: str, emulate: bool) -> Any:
    """``model`` (on its device) with the layers ``recipe`` converts swapped in place for
    torchao's low-precision linears; ``emulate``: software math (off the format's hardware)."""

    reason = why_not(recipe, rule, model)

    def keep(module: Any, name: str) -> bool:
        return isinstance(module, nn.Linear) and reason(module, name) is None

    with quiet_torchao():
        if recipe in ("tensorwise", "rowwise", "rowwise_with_gw_hp"):
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training

            config = replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
            model = convert_to_float8_training(model, module_filter_fn=keep, config=config)
            from torchao.float8.float8_linear import Float8Linear

            for module in model.modules():
                if isinstance(module, Float8Linear):
                    module.register_forward_pre_hook(_autocast_input)
            return model
        from torchao.float8.float8_linear_utils import swap_linear_layers

        return swap_linear_layers(model, _from_linear(recipe, emulate), module_filter_fn=keep)


def _autocast_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Float8Linear casts its input to the autocast dtype under CUDA autocast only; off CUDA
    do the same, so the emulation reads bf16 activations as the GPU does (and the high-precision
    weight-gradient GEMM of rowwise_with_gw_hp gets operands of one dtype)."""
    import torch

    device = args[0].device.type
    if device != "cuda" and torch.is_autocast_enabled(device):
        return (args[0].to(torch.get_autocast_dtype(device)), *args[1:])
    return None


def _from_linear(recipe: str, emulate: bool) -> Callable[[Any], Any]:
    """torchao's constructor of ``recipe``'s linear from an ``nn.Linear`` (weights shared)."""
    from torchao.quantization.quantize_.common import KernelPreference

    if recipe == "nvfp4":
        from torchao.prototype.moe_training.nvfp4_training.nvfp4_training import NVFP4Linear

        return NVFP4Linear.from_linear
    layer = _mxfp8_linear()
    preference = KernelPreference.EMULATED if emulate else KernelPreference.AUTO

    def build(mod: Any) -> Any:
        new = layer(mod.in_features, mod.out_features, bias=mod.bias is not None,
                    device="meta", kernel_preference=preference)
        new.weight, new.bias = mod.weight, mod.bias
        return new

    return build


def _mxfp8_linear() -> type:
    """torchao's MXFP8Linear, its input and weight cast to the autocast dtype first (as
    Float8Linear's input is): the MX casts then read bf16 operands, as its kernels expect, and
    the emulated GEMM gets operands of one dtype; the weight's gradient reaches the FP32 master."""
    import torch
    from torchao.prototype.moe_training.mxfp8_linear import (
        MXFP8Linear,
        _to_mxfp8_then_scaled_mm,
    )

    class AutocastMXFP8Linear(MXFP8Linear):
        def forward(self, input: Any) -> Any:
            device, weight = input.device.type, self.weight
            if torch.is_autocast_enabled(device):
                dtype = torch.get_autocast_dtype(device)
                input, weight = input.to(dtype), weight.to(dtype)
            output = _to_mxfp8_then_scaled_mm(
                input, weight, kernel_preference=self.kernel_preference,
                scale_calculation_mode=self.scale_calculation_mode,
                wgrad_with_hp=self.wgrad_with_hp)
            return output if self.bias is None else output + self.bias.to(output.dtype)

    return AutocastMXFP8Linear


def converted_types() -> tuple[type, ...]:
    """The linear classes torchao's recipes put in a model (the installed ones)."""
    from torchao.float8.float8_linear import Float8Linear
    from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear

    types: list[type] = [Float8Linear, MXFP8Linear]
    try:
        from torchao.prototype.moe_training.nvfp4_training.nvfp4_training import NVFP4Linear
    except ImportError:  # its Triton kernels are absent (a CPU build): nothing is NVFP4 here
        pass
    else:
        types.append(NVFP4Linear)
    return tuple(types)


def listed(names: list[str]) -> str:
    """The first few of ``names``, comma-separated, then "and N more"."""
    text = ", ".join(names[:NAMES_SHOWN])
    if len(names) > NAMES_SHOWN:
        text += f" and {len(names) - NAMES_SHOWN} more"
    return text


def record_fields(model: Any, recipe: str, rule: str) -> dict[str, Any]:
    """What the record says about the converted ``model``: the layers in the format, those left
    in bf16 by name and why ("h.0.attn.c_attn (64x192: first block)"), the format and the rule."""
    reason = why_not(recipe, rule, model)
    lowp = converted_types()
    converted, unconverted = 0, []
    for name, module in model.named_modules():
        if isinstance(module, lowp):
            converted += 1
        elif isinstance(module, nn.Linear):
            why = reason(module, name)
            unconverted.append(f"{name} ({module.in_features}x{module.out_features}"
                               f"{': ' + why if why else ''})")
    return {"fp8_converted": converted, "fp8_unconverted": listed(unconverted) or "none",
            "fp8_num_unconverted": len(unconverted), "low_precision_format": format_name(recipe),
            "low_precision_filter": filter_rule(recipe, rule)}


def nothing_converted(recipe: str, rule: str, model: Any, model_name: str) -> str | None:
    """Why ``recipe`` under ``rule`` would convert no layer of ``model`` (built anywhere, the
    meta device included), or None when it converts one."""
    reason = why_not(recipe, rule, model)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    why = {name: reason(m, name) for name, m in linears}
    if any(w is None for w in why.values()):
        return None
    label = "FP8" if recipe in ("tensorwise", "rowwise", "rowwise_with_gw_hp") else recipe.upper()
    if not linears:
        return f"{model_name} has no Linear layer; nothing would run in {label}"
    names = listed([f"{name} {m.in_features}x{m.out_features}"
                    + (f": {why[name]}" if why[name] else "") for name, m in linears])
    if rule == "torchtitan":
        return (f"no Linear layer of {model_name} passes the {label} filter ({names}); "
                f"nothing would run in {label}")
    return (f"no Linear layer of {model_name} is convertible to {label} ({names}: both "
            f"dimensions must be multiples of {FORMATS[recipe][1]}); nothing would run in {label}")


def hardware_reason(recipe: str, device: Any) -> str | None:
    """Why ``device`` has no path for the Blackwell formats (MXFP8, NVFP4), or None. CPU: MXFP8
    runs emulated (torchao's EMULATED kernels); NVFP4's kernels are Triton, CUDA only."""
    import torch

    if recipe not in _BLACKWELL:
        return None
    if device.type != "cuda":
        if recipe == "nvfp4":
            return ("nvfp4 needs CUDA: torchao's NVFP4 training runs Triton kernels only, with "
                    "no emulation off the GPU")
        return None
    if torch.version.hip:
        return f"{recipe} needs an NVIDIA GPU of compute capability 10.0+ (this is ROCm)"
    capability = torch.cuda.get_device_capability(device)
    if capability < _BLACKWELL_CAPABILITY:
        return (f"{recipe} needs compute capability 10.0+ (this GPU, "
                f"{torch.cuda.get_device_name(device)}: {capability[0]}.{capability[1]})")
    return None


@contextmanager
def quiet_torchao() -> Iterator[None]:
    """Importing torchao logs a warning per prebuilt kernel library it cannot load (CUDA
    libraries absent on a CPU machine, MX kernels): kernels FP8 training does not use."""
    quieted = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quieted]
    for logger in quieted:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(quieted, levels, strict=True):
            logger.setLevel(level)
