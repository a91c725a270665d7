"""Precision policies: what each of fp32, tf32, fp16, bf16, fp16-noscale, fp8, fp8-rowwise and
the pure-bf16 ones switches on.

A Policy is data; the training step (bench/cell/train.py) has one code path and asks the policy for
its autocast context and its GradScaler. Parts a policy does not use simply do nothing
(``nullcontext()``, a disabled scaler), as in nanoGPT. torch is imported lazily, so names can be
validated without it. Master weights and optimizer state stay FP32 under every policy but
the pure-bf16 ones.

bf16-pure, bf16-pure-sr and bf16-pure-kahan convert the model's parameters to bf16
(``prepare_model``) and train them with ``BF16AdamW`` (``optimizer``; bench/cell/bf16_adamw.py):
gradients and AdamW state are bf16 too, and the update is written into the weights to the
nearest bf16, with stochastic rounding, or Kahan-compensated. bf16 autocast stays on for
them: on bf16 weights its matmul casts are no-ops, and it casts float inputs (images) to the
weights' dtype and keeps the ops it runs in FP32 (losses, softmax) there.

The FP8 family (fp8, fp8-rowwise, fp8-rowwise-gw-hp, fp8-filtered, mxfp8, nvfp4) swaps the
model's ``nn.Linear`` layers for torchao's low-precision linears (``prepare_model``;
bench/cell/low_precision.py says which layers each recipe and filter converts; torchao is the
optional extra ``.[fp8]``, imported only for them) and runs everything else under bf16
autocast. Off CUDA they run in torchao's emulation mode (nvfp4 has none: unsupported there):
right numerics for tests and parity, meaningless speed, and the record says so. A model none of
whose ``nn.Linear`` layers converts (ResNet's one classifier, 2048x1000) would run nothing in
FP8: ``unsupported_reason`` with the model says so, before anything is built.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

FP8_INSTALL = "pip install -e .[fp8]"
_FP8_CAPABILITY = (8, 9)  # Ada (sm_89), Hopper (sm_90), Blackwell: FP8 tensor cores
# ROCm GPUs whose FP8 matmuls torch._scaled_mm and torchao support: MI300 series (FNUZ
# formats), MI350 series and RDNA4 (OCP formats).
_FP8_HIP_ARCHS = ("gfx942", "gfx950", "gfx12")


@dataclass(frozen=True)
class Policy:
    name: str
    autocast_dtype: str | None  # "float16" | "bfloat16" | None (no autocast)
    loss_scaling: bool  # dynamic GradScaler
    tf32: bool  # TF32 for FP32 matmuls and cuDNN convolutions (CUDA only)
    role: str
    # The FP8 family's recipe (bench/cell/low_precision.py): torchao float8 "tensorwise" |
    # "rowwise" | "rowwise_with_gw_hp", or the MX formats "mxfp8" | "nvfp4"; and which layers
    # it converts: "dims" (every Linear whose dimensions the format takes) | "torchtitan"
    # (also first/last block, head and small GEMMs left in bf16).
    fp8_recipe: str | None = None
    fp8_filter: str = "dims"
    # Where the weights live. None: FP32 parameters (the master copy) and FP32 AdamW state.
    # "bfloat16": parameters, gradients and AdamW state all in bf16, no FP32 copy, the update
    # written into the weights by ``update_rounding``: "nearest" | "stochastic" | "kahan"
    # (bench/cell/bf16_adamw.py).
    param_dtype: str | None = None
    update_rounding: str = "nearest"

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
        if self.param_dtype is not None:
            import torch

            return model.to(getattr(torch, self.param_dtype))
        if self.fp8_recipe is None:
            return model
        from bench.cell import low_precision

        emulate = self.emulated_on(next(model.parameters()).device.type)
        return low_precision.convert(model, self.fp8_recipe, self.fp8_filter, emulate)

    def optimizer(self, params: Any, **hyper: Any) -> Any:
        """AdamW over ``params`` with ``hyper`` (lr, eps, weight_decay, fused ...): torch's for
        FP32 weights, the pure-bf16 AdamW with the policy's rounding for bf16 ones."""
        if self.param_dtype is None:
            import torch

            return torch.optim.AdamW(params, **hyper)
        from bench.cell.bf16_adamw import BF16AdamW

        hyper.pop("fused", None)  # one readable loop, no fused kernel
        return BF16AdamW(params, rounding=self.update_rounding, **hyper)

    def emulated_on(self, device_type: str) -> bool:
        """Whether this policy's low-precision math is emulated in software on such a device
        (FP8 off CUDA): right numerics, meaningless speed."""
        return self.fp8_recipe is not None and device_type != "cuda"

    def record_fields(self, model: Any) -> dict[str, Any]:
        """What the record says about the prepared ``model``: whether its low-precision math
        was emulated, and for the FP8 family how many ``nn.Linear`` layers were converted, which
        not and why, the format and the filter rule (bench/cell/low_precision.py)."""
        if self.fp8_recipe is None:
            return {"emulated": False}
        from bench.cell import low_precision

        return {"emulated": self.emulated_on(next(model.parameters()).device.type),
                **low_precision.record_fields(model, self.fp8_recipe, self.fp8_filter)}

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

        from bench.cell import low_precision

        try:
            with torch.device("meta"):
                net = spec.build()
        except Exception:
            if getattr(spec, "source", None) is None:
                raise
            net = spec.build()  # a user's model whose build the meta device cannot run
        return low_precision.nothing_converted(self.fp8_recipe, self.fp8_filter, net, spec.name)

    def _device_reason(self, device: Any) -> str | None:
        import torch

        if self.fp8_recipe is not None:
            reason = _fp8_unsupported_reason(device, self.fp8_recipe)
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
        Policy("fp8-rowwise-gw-hp", "bfloat16", False, False,
               "fp8-rowwise with the weight gradient's GEMM in bf16 (torchao's most accurate)",
               "rowwise_with_gw_hp"),
        Policy("fp8-filtered", "bfloat16", False, False,
               "fp8 (tensorwise) on the middle blocks' large GEMMs only (torchtitan's filter)",
               "tensorwise", fp8_filter="torchtitan"),
        Policy("mxfp8", "bfloat16", False, False,
               "torchao MXFP8 linears (32-element blocks, e8m0 scales): Blackwell", "mxfp8"),
        Policy("nvfp4", "bfloat16", False, False,
               "torchao NVFP4 linears (16-element blocks, FP8 scales): Blackwell", "nvfp4"),
        Policy("bf16-pure", "bfloat16", False, False,
               "bf16 weights, gradients and AdamW state, no FP32 master copy",
               param_dtype="bfloat16"),
        Policy("bf16-pure-sr", "bfloat16", False, False,
               "bf16-pure, the update written with stochastic rounding",
               param_dtype="bfloat16", update_rounding="stochastic"),
        Policy("bf16-pure-kahan", "bfloat16", False, False,
               "bf16-pure, the update Kahan-compensated (a bf16 buffer per weight)",
               param_dtype="bfloat16", update_rounding="kahan"),
    )
}
NAMES: tuple[str, ...] = tuple(POLICIES)
# The policies that hold their weights in bf16 (no FP32 master): judged on parity's low-lr task.
PURE_BF16: tuple[str, ...] = tuple(n for n, p in POLICIES.items() if p.param_dtype == "bfloat16")
# Ablations: policies that exist to show a failure (FP16 without loss scaling overflows and
# underflows), so non-finite losses are their finding, not a fault (bench/analysis/numerics.py).
ABLATIONS: tuple[str, ...] = ("fp16-noscale",)


def get(name: str) -> Policy:
    """The policy called ``name``; an unknown name raises ValueError listing the valid ones."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown precision '{name}'; valid: {', '.join(NAMES)}") from None


def _fp8_unsupported_reason(device: Any, recipe: str = "tensorwise") -> str | None:
    """Why ``device`` cannot train in ``recipe``'s format through torchao, or None (CPU:
    emulated, but for nvfp4)."""
    import torch

    from bench.cell.low_precision import quiet_torchao

    try:
        with quiet_torchao():
            import torchao.float8  # noqa: F401
    except Exception as exc:  # absent, or built for another torch: either way no FP8 here
        problem = "".join(str(exc).splitlines()[:1]) or type(exc).__name__
        label = recipe.upper() if recipe in ("mxfp8", "nvfp4") else "FP8"
        return f"{label} needs torchao ({problem}); install it with: {FP8_INSTALL}"
    from bench.cell import low_precision

    reason = low_precision.hardware_reason(recipe, device)
    if reason or device.type != "cuda":
        return reason
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
