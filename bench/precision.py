"""Precision policies: what each of fp32, tf32, fp16, bf16, fp16-noscale, fp8 and fp8-rowwise
switches on.

A Policy is data; the training step (bench/cell/train.py) has one code path and asks the policy for
its autocast context and its GradScaler. Parts a policy does not use simply do nothing
(``nullcontext()``, a disabled scaler), as in nanoGPT. torch is imported lazily, so names can be
validated without it. Master weights and optimizer state stay FP32 under every policy.

The FP8 policies swap the model's ``nn.Linear`` layers for torchao's ``Float8Linear``
(``prepare_model``; torchao is the optional extra ``.[fp8]``, imported only here and only for
them) and run everything else under bf16 autocast. Off CUDA they run in torchao's emulation
mode: right numerics for tests and parity, meaningless speed, and the record says so. A model
none of whose ``nn.Linear`` layers converts (ResNet's one classifier, 2048x1000) would run
nothing in FP8: ``unsupported_reason`` with the model says so, before anything is built.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

FP8_INSTALL = "pip install -e .[fp8]"
# torch._scaled_mm needs both dimensions of an FP8 weight to be multiples of 16; torchao would
# fail on the first step of a layer that is not, so such layers stay in bf16.
_FP8_MULTIPLE = 16
_FP8_CAPABILITY = (8, 9)  # Ada (sm_89), Hopper (sm_90), Blackwell: FP8 tensor cores
# ROCm GPUs whose FP8 matmuls torch._scaled_mm and torchao support: MI300 series (FNUZ
# formats), MI350 series and RDNA4 (OCP formats).
_FP8_HIP_ARCHS = ("gfx942", "gfx950", "gfx12")
_FP8_NAMES_SHOWN = 8  # layers named in a record or a reason before "and N more"


@dataclass(frozen=True)
class Policy:
    name: str
    autocast_dtype: str | None  # "float16" | "bfloat16" | None (no autocast)
    loss_scaling: bool  # dynamic GradScaler
    tf32: bool  # TF32 for FP32 matmuls and cuDNN convolutions (CUDA only)
    role: str
    fp8_recipe: str | None = None  # torchao float8 training recipe: "tensorwise" | "rowwise"

    def apply_backend_flags(self) -> None:
        """Set TF32 on or off for matmul AND cuDNN; call before building the model."""
        import torch

        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.allow_tf32 = self.tf32
        torch.set_float32_matmul_precision("high" if self.tf32 else "highest")

    def autocast(self, device_type: str) -> AbstractContextManager[Any]:
        """The forward's context: autocast to the policy's dtype, or nothing."""
        import torch

        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type, dtype=getattr(torch, self.autocast_dtype))

    def scaler(self, device_type: str) -> Any:
        """A GradScaler that is enabled only when the policy scales the loss."""
        import torch

        return torch.amp.GradScaler(device_type, enabled=self.loss_scaling)

    def prepare_model(self, model: Any) -> Any:
        """The model this policy trains: ``model`` itself, unless the policy converts layers.

        FP8 policies: the convertible ``nn.Linear`` layers of ``model`` (already on its
        device) become torchao ``Float8Linear``, in place; emulated unless on CUDA.
        """
        if self.fp8_recipe is None:
            return model
        with quiet_torchao():
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        emulate = self.emulated_on(next(model.parameters()).device.type)
        config = replace(Float8LinearConfig.from_recipe_name(self.fp8_recipe), emulate=emulate)
        return convert_to_float8_training(model, module_filter_fn=_fp8_convertible,
                                          config=config)

    def emulated_on(self, device_type: str) -> bool:
        """Whether this policy's low-precision math is emulated in software on such a device
        (FP8 off CUDA): right numerics, meaningless speed."""
        return self.fp8_recipe is not None and device_type != "cuda"

    def record_fields(self, model: Any) -> dict[str, Any]:
        """What the record says about the prepared ``model``: whether its low-precision math
        was emulated, and for FP8 how many ``nn.Linear`` layers were converted and which not."""
        if self.fp8_recipe is None:
            return {"emulated": False}
        from torch import nn
        from torchao.float8.float8_linear import Float8Linear

        converted, unconverted = 0, []
        for name, module in model.named_modules():
            if isinstance(module, Float8Linear):
                converted += 1
            elif isinstance(module, nn.Linear):
                unconverted.append(f"{name} ({module.in_features}x{module.out_features})")
        return {"emulated": self.emulated_on(next(model.parameters()).device.type),
                "fp8_converted": converted, "fp8_unconverted": _listed(unconverted) or "none"}

    def unsupported_reason(self, device: Any, model: Any = None) -> str | None:
        """Why this device (or, given its ``models.ModelSpec``, this model) cannot run the
        policy, or None when it can. Cheap: decided before anything is built on the device."""
        reason = self._device_reason(device)
        if reason is None and model is not None:
            reason = self.model_reason(model)
        return reason

    def model_reason(self, spec: Any) -> str | None:
        """Why this policy would not change ``spec``'s model, or None: for an FP8 policy, not
        one of its ``nn.Linear`` layers is convertible (nothing would run in FP8). Built on the
        meta device: no memory, no compute, milliseconds; any device, none needed."""
        if self.fp8_recipe is None:
            return None
        import torch
        from torch import nn

        try:
            with torch.device("meta"):
                net = spec.build()
        except Exception:
            if getattr(spec, "source", None) is None:
                raise
            net = spec.build()  # a user's model whose build the meta device cannot run
        linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
        if any(_fp8_convertible(m, name) for name, m in linears):
            return None
        if not linears:
            return f"{spec.name} has no Linear layer; nothing would run in FP8"
        names = _listed([f"{name} {m.in_features}x{m.out_features}" for name, m in linears])
        return (f"no Linear layer of {spec.name} is convertible to FP8 ({names}: both "
                f"dimensions must be multiples of {_FP8_MULTIPLE}); nothing would run in FP8")

    def _device_reason(self, device: Any) -> str | None:
        import torch

        if self.fp8_recipe is not None:
            reason = _fp8_unsupported_reason(device)
            if reason:
                return reason
        if device.type == "cuda":
            # Of ``device`` itself: torch.cuda.is_bf16_supported asks the current device.
            capability = torch.cuda.get_device_capability(device)
            native_bf16 = bool(torch.version.hip) or capability >= (8, 0)
            if self.autocast_dtype == "bfloat16" and not native_bf16:
                return f"{torch.cuda.get_device_name(device)} has no native bfloat16"
            if self.tf32 and capability < (8, 0):
                return f"{torch.cuda.get_device_name(device)} has no TF32 (needs Ampere or newer)"
        elif device.type == "cpu":
            dtype = getattr(torch, self.autocast_dtype) if self.autocast_dtype else None
            if dtype is not None and not torch.amp.is_autocast_available("cpu"):
                return "CPU autocast is not available in this torch build"
        else:
            return f"device type '{device.type}' is not supported"
        return None


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("fp32", None, False, False, "the true FP32 baseline (TF32 off)"),
        Policy("tf32", None, False, True, "FP32 with TF32 matmuls/convolutions"),
        Policy("fp16", "float16", True, False, "mixed precision with dynamic loss scaling"),
        Policy("bf16", "bfloat16", False, False, "mixed precision, FP32 range"),
        Policy("fp16-noscale", "float16", False, False, "ablation: FP16 without loss scaling"),
        Policy("fp8", "bfloat16", False, False,
               "torchao FP8 linears, tensorwise scales, bf16 autocast for the rest", "tensorwise"),
        Policy("fp8-rowwise", "bfloat16", False, False,
               "torchao FP8 linears, rowwise scales, bf16 autocast for the rest", "rowwise"),
    )
}
NAMES: tuple[str, ...] = tuple(POLICIES)


def get(name: str) -> Policy:
    """The policy called ``name``; an unknown name raises ValueError listing the valid ones."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown precision '{name}'; valid: {', '.join(NAMES)}") from None


def _fp8_convertible(module: Any, name: str) -> bool:
    """torchao's module_filter_fn: a Linear whose weight _scaled_mm can take."""
    return module.in_features % _FP8_MULTIPLE == 0 and module.out_features % _FP8_MULTIPLE == 0


def _listed(names: list[str]) -> str:
    """The first few of ``names``, comma-separated, then "and N more"."""
    text = ", ".join(names[:_FP8_NAMES_SHOWN])
    if len(names) > _FP8_NAMES_SHOWN:
        text += f" and {len(names) - _FP8_NAMES_SHOWN} more"
    return text


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


def _fp8_unsupported_reason(device: Any) -> str | None:
    """Why ``device`` cannot train in FP8 through torchao, or None (CPU: emulated)."""
    import torch

    try:
        with quiet_torchao():
            import torchao.float8  # noqa: F401
    except Exception as exc:  # absent, or built for another torch: either way no FP8 here
        problem = "".join(str(exc).splitlines()[:1]) or type(exc).__name__
        return f"FP8 needs torchao ({problem}); install it with: {FP8_INSTALL}"
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if torch.version.hip:
        arch = torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
        if not arch.startswith(_FP8_HIP_ARCHS):
            return f"{name} ({arch}) has no FP8 matmuls that torchao supports"
        return None
    capability = torch.cuda.get_device_capability(device)
    if capability < _FP8_CAPABILITY:
        return (f"{name} has no FP8 tensor cores (compute capability "
                f"{capability[0]}.{capability[1]}; FP8 needs 8.9 or newer: Ada, Hopper, Blackwell)")
    return None
