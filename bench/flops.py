"""FLOPs per training step, device peak TFLOP/s and MFU.

``count_training_flops`` runs one forward + backward on the meta device under
``torch.utils.flop_counter.FlopCounterMode``: exact for the code that runs, no real compute,
no memory. torch is imported lazily so the peak table is usable without it.

MFU (model FLOPs utilization) = achieved FLOP/s / the device's dense peak for the policy's
math: the FP32 (non-tensor) peak for ``fp32``, the TF32 tensor peak for ``tf32``, the FP16/BF16
tensor peak (FP32 accumulate) for the autocast policies. An unknown device, a CPU included,
gets no MFU (and one warning), never a guessed number; ``--peak-tflops`` supplies one.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from bench import precision

log = logging.getLogger(__name__)

# Dense (no 2:4 sparsity) peak TFLOP/s per GPU. NVIDIA datasheets print the tensor-core rows
# "with sparsity"; the dense figure is half of those. Sources:
#   H100 SXM / PCIe / NVL: "NVIDIA H100 Tensor Core GPU" datasheet; SXM: FP32 67,
#       TF32 989*, BF16/FP16 1,979*; PCIe: 51 / 756* / 1,513*; NVL: 60 / 835* / 1,671*
#       (* = with sparsity). H100 whitepaper dense: SXM 66.9 / 494.7 / 989.4.
#   H200 SXM / NVL: "NVIDIA H200 Tensor Core GPU" datasheet; SXM as H100 SXM, NVL as H100 NVL.
#   A100 (SXM4 and PCIe, 40 and 80 GB): A100 datasheet: FP32 19.5, TF32 156, BF16/FP16 312
#       (dense; 312* / 624* with sparsity).
#   L40S: L40S datasheet: FP32 91.6, TF32 183 (366*), BF16/FP16 362.05 (733*).
#   L4: L4 datasheet: FP32 30.3, TF32 120*, BF16/FP16 242*.
#   A10: A10 datasheet: FP32 31.2, TF32 62.5 (125*), BF16/FP16 125 (250*).
#   RTX 4090: Ada Lovelace architecture whitepaper, appendix: FP32 82.6, TF32 82.6,
#       FP16/BF16 with FP32 accumulate 165.2 (autocast accumulates in FP32; the 330 TFLOP/s
#       figure is FP16 accumulate, which PyTorch does not use).
#   B200: HGX B200 datasheet, per GPU: FP32 75, TF32 2.2 P*, FP16/BF16 4.5 P*.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"fp32": 67.0, "tf32": 495.0, "fp16": 989.0, "bf16": 989.0},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5, "bf16": 835.5},
    "H200 SXM": {"fp32": 67.0, "tf32": 495.0, "fp16": 989.0, "bf16": 989.0},
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5, "bf16": 835.5},
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "fp16": 362.05, "bf16": 362.05},
    "L4": {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "bf16": 121.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "fp16": 125.0, "bf16": 125.0},
    "RTX 4090": {"fp32": 82.6, "tf32": 82.6, "fp16": 165.2, "bf16": 165.2},
    "B200": {"fp32": 75.0, "tf32": 1100.0, "fp16": 2250.0, "bf16": 2250.0},
}

# torch.cuda.get_device_name strings (lower-cased, spaces collapsed), matched in full: a MIG
# slice ("... MIG 1g.10gb"), a laptop part or a cut-down export variant has another peak, so a
# name that is not listed gets no MFU rather than a neighbour's number.
_NAMES: tuple[tuple[str, str], ...] = (
    (r"nvidia h100 80gb hbm3", "H100 SXM"),
    (r"nvidia h100( 80gb)? pcie", "H100 PCIe"),
    (r"nvidia h100 nvl", "H100 NVL"),
    (r"nvidia h200", "H200 SXM"),
    (r"nvidia h200 nvl", "H200 NVL"),
    (r"nvidia a100-(sxm4|pcie)-(40|80)gb|nvidia a100 (40|80)gb pcie", "A100"),
    (r"nvidia l40s", "L40S"),
    (r"nvidia l4", "L4"),
    (r"nvidia a10", "A10"),
    (r"nvidia geforce rtx 4090", "RTX 4090"),
    (r"nvidia b200", "B200"),
)

_warned: set[str] = set()


def device_key(device_name: str) -> str | None:
    """The PEAK_TFLOPS row for a torch device name, or None when it is not in the table."""
    name = " ".join(device_name.lower().split())
    for pattern, key in _NAMES:
        if re.fullmatch(pattern, name):
            return key
    return None


def math_kind(policy_name: str) -> str:
    """Which peak a policy runs against: fp32 | tf32 | fp16 | bf16 (fp16-noscale is fp16)."""
    policy = precision.get(policy_name)  # an unknown name raises ValueError
    if policy.autocast_dtype == "bfloat16":
        return "bf16"
    if policy.autocast_dtype == "float16":
        return "fp16"
    return "tf32" if policy.tf32 else "fp32"


def peak_tflops(device_name: str, precision_name: str) -> float | None:
    """Dense peak TFLOP/s of ``device_name`` for a policy; None (and one warning) if unknown."""
    kind = math_kind(precision_name)
    key = device_key(device_name)
    if key is None:
        if device_name not in _warned:
            _warned.add(device_name)
            log.warning("MFU: no dense peak TFLOP/s known for '%s'; mfu_pct stays empty "
                        "(pass --peak-tflops to give one)", device_name)
        return None
    return PEAK_TFLOPS[key][kind]


def mfu_pct(flops_per_step: float | None, step_s: float | None,
            peak: float | None) -> float | None:
    """Model FLOPs utilization in percent of ``peak`` TFLOP/s; None when anything is missing."""
    if not flops_per_step or not step_s or not peak or step_s <= 0 or peak <= 0:
        return None
    return 100.0 * flops_per_step / step_s / (peak * 1e12)


def mfu_fields(flops_per_step: float | None, step_s: float | None, device_name: str,
               precision_name: str, override: float | None = None) -> dict[str, Any]:
    """The record's ``peak_tflops`` and ``mfu_pct``; ``override`` (--peak-tflops) wins."""
    peak = override if override is not None else peak_tflops(device_name, precision_name)
    return {"peak_tflops": peak, "mfu_pct": mfu_pct(flops_per_step, step_s, peak)}


def count_training_flops(spec: Any, batch_size: int, size: int) -> int:
    """FLOPs of one forward + backward of ``spec``'s model on one micro-batch (meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = spec.build()
    model.train()
    inputs, targets = spec.make_batch(batch_size, size, device="meta")
    with FlopCounterMode(display=False) as counter:
        loss = spec.loss(model, inputs, targets)
        loss.backward()
    return int(counter.get_total_flops())
