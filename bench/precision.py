"""Precision policies: what each of fp32, tf32, fp16, bf16 and fp16-noscale switches on.

A Policy is data; the training step (bench/cell.py) has one code path and asks the policy for
its autocast context and its GradScaler. Parts a policy does not use simply do nothing
(``nullcontext()``, a disabled scaler), as in nanoGPT. torch is imported lazily, so names can be
validated without it. Master weights and optimizer state stay FP32 under every policy.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Policy:
    name: str
    autocast_dtype: str | None  # "float16" | "bfloat16" | None (no autocast)
    loss_scaling: bool  # dynamic GradScaler
    tf32: bool  # TF32 for FP32 matmuls and cuDNN convolutions (CUDA only)
    role: str

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
        """The model this policy trains: ``model`` itself, unless the policy converts layers."""
        return model

    def unsupported_reason(self, device: Any) -> str | None:
        """Why this device cannot run the policy, or None when it can."""
        import torch

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
    )
}
NAMES: tuple[str, ...] = tuple(POLICIES)


def get(name: str) -> Policy:
    """The policy called ``name``; an unknown name raises ValueError listing the valid ones."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown precision '{name}'; valid: {', '.join(NAMES)}") from None
