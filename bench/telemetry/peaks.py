"""Dense peak TFLOP/s per device and math kind: the table MFU is measured against, the names
torch and the drivers give each device, and which peak a precision policy's MFU is against.
torch-free: the planner (bench/validate/plan.py) and the cell (bench/cell/flops.py) read it.

``device_key`` matches a device name in full against the table's rows (a MIG slice, a laptop
part or a cut-down export variant gets no row, never a neighbour's number); ``math_kind`` maps
a policy to fp32 | tf32 | fp16 | bf16; ``device_peak_tflops`` warns once for a peak it lacks.
"""

from __future__ import annotations

import logging
import re

from bench import precision

log = logging.getLogger(__name__)

# Dense (no 2:4 sparsity) peak TFLOP/s per GPU. NVIDIA datasheets print the tensor-core rows
# "with sparsity"; the dense figure is half of those. Sources:
#   H100 SXM / PCIe / NVL: "NVIDIA H100 Tensor Core GPU" datasheet; SXM: FP32 67,
#       TF32 989*, BF16/FP16 1,979*, FP8 3,958*; PCIe: 51 / 756* / 1,513* / 3,026*;
#       NVL: 60 / 835* / 1,671* / 3,341* (* = with sparsity). H100 whitepaper dense, SXM:
#       66.9 / 494.7 / 989.4 / 1,978.9.
#   H200 SXM / NVL: "NVIDIA H200 Tensor Core GPU" datasheet; SXM as H100 SXM, NVL as H100 NVL.
#   GH200: "NVIDIA GH200 Grace Hopper Superchip" datasheet, its H100 GPU: FP32 67, TF32 989*,
#       BF16/FP16 1,979*, FP8 3,958* (as H100 SXM).
#   H800 SXM / PCIe: "NVIDIA H800 Tensor Core GPU" datasheet: the export part cuts NVLink and
#       FP64, not these rates; SXM as H100 SXM (67 / 989* / 1,979* / 3,958*), PCIe as H100 PCIe.
#   A100 (SXM4 and PCIe, 40 and 80 GB): A100 datasheet: FP32 19.5, TF32 156, BF16/FP16 312
#       (dense; 312* / 624* with sparsity). No FP8.
#   L40S: L40S datasheet: FP32 91.6, TF32 183 (366*), BF16/FP16 362.05 (733*), FP8 733 (1,466*).
#   L4: L4 datasheet: FP32 30.3, TF32 120*, BF16/FP16 242*, FP8 485*.
#   A10: A10 datasheet: FP32 31.2, TF32 62.5 (125*), BF16/FP16 125 (250*). No FP8.
#   RTX 4090: Ada Lovelace architecture whitepaper, appendix: FP32 82.6, TF32 82.6,
#       FP16/BF16 with FP32 accumulate 165.2, FP8 with FP32 accumulate 330.3 (autocast and
#       torch._scaled_mm accumulate in FP32; the 330 / 660.6 TFLOP/s figures are FP16
#       accumulate, which PyTorch does not use).
#   B200: HGX B200 datasheet, per GPU: FP32 75, TF32 2.2 P*, FP16/BF16 4.5 P*, FP8 9 P*.
#       TF32 checked: 2.2 P is the sparse figure (the footnote covers every tensor row, and it
#       is half of FP16/BF16 as on every other part), so dense is 1.1 P, not 2.2 P.
# AMD Instinct datasheets print dense figures with the sparse ones beside them. The fp32 column
# is what the table means by it for NVIDIA too: the peak of the fastest units that do IEEE FP32
# math, which is what the fp32 policy runs on. NVIDIA's tensor cores cannot (hence "non-tensor"
# there); AMD's matrix cores can, and rocBLAS / hipBLASLt run FP32 GEMMs on them, so the AMD
# rows hold the "FP32 Matrix" figure (the vector figure would let MFU pass 100%). TF32 only
# where the matrix cores have it (CDNA3); a tf32 cell on CDNA2 gets no MFU.
#   MI300X: "AMD Instinct MI300X Accelerator" datasheet: FP32 vector 163.4, FP32 matrix 163.4,
#       TF32 653.7 (1,307.4 with sparsity), FP16/BF16 1,307.4 (2,614.9), FP8 2,614.9 (5,229.8).
#   MI325X: "AMD Instinct MI325X Accelerator" datasheet: the same compute as MI300X (163.4 /
#       163.4 / 653.7 / 1,307.4 / 2,614.9), more and faster memory.
#   MI250X: "AMD Instinct MI250X Accelerator" datasheet, per OAM module: FP32 vector 47.9,
#       FP32 matrix 95.7, FP16/BF16 383. No TF32, no FP8. The module is two GCDs, and ROCm and
#       torch see each GCD as one GPU (110 of the 220 CUs), so the row is half the module's.
#   MI210: "AMD Instinct MI210 Accelerator" datasheet: FP32 vector 22.6, FP32 matrix 45.3,
#       FP16/BF16 181.0. No TF32, no FP8 (one GCD: one GPU).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"fp32": 67.0, "tf32": 495.0, "fp16": 989.0, "bf16": 989.0, "fp8": 1979.0},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0, "fp8": 1513.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5, "bf16": 835.5, "fp8": 1670.5},
    "H200 SXM": {"fp32": 67.0, "tf32": 495.0, "fp16": 989.0, "bf16": 989.0, "fp8": 1979.0},
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5, "bf16": 835.5, "fp8": 1670.5},
    "GH200": {"fp32": 67.0, "tf32": 495.0, "fp16": 989.0, "bf16": 989.0, "fp8": 1979.0},
    "H800 SXM": {"fp32": 67.0, "tf32": 495.0, "fp16": 989.0, "bf16": 989.0, "fp8": 1979.0},
    "H800 PCIe": {"fp32": 51.0, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0, "fp8": 1513.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "fp16": 362.05, "bf16": 362.05, "fp8": 733.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "bf16": 121.0, "fp8": 242.5},
    "A10": {"fp32": 31.2, "tf32": 62.5, "fp16": 125.0, "bf16": 125.0},
    "RTX 4090": {"fp32": 82.6, "tf32": 82.6, "fp16": 165.2, "bf16": 165.2, "fp8": 330.3},
    "B200": {"fp32": 75.0, "tf32": 1100.0, "fp16": 2250.0, "bf16": 2250.0, "fp8": 4500.0},
    "MI300X": {"fp32": 163.4, "tf32": 653.7, "fp16": 1307.4, "bf16": 1307.4, "fp8": 2614.9},
    "MI325X": {"fp32": 163.4, "tf32": 653.7, "fp16": 1307.4, "bf16": 1307.4, "fp8": 2614.9},
    "MI250X GCD": {"fp32": 47.85, "fp16": 191.5, "bf16": 191.5},
    "MI210": {"fp32": 45.3, "fp16": 181.0, "bf16": 181.0},
}
KINDS = ("fp32", "tf32", "fp16", "bf16", "fp8")

# Device names as torch and nvidia-smi print them, normalised (``_normalise``: lower case,
# dashes as spaces, no "NVIDIA"), matched in full: a MIG slice ("... MIG 1g.10gb"), a laptop
# part or a cut-down export variant has another peak, so a name that is not listed gets no MFU
# rather than a neighbour's number.
_NAMES: tuple[tuple[str, str], ...] = (
    (r"h100( sxm5?)? 80gb( hbm3)?|h100 sxm5?", "H100 SXM"),
    (r"h100( 80gb)? pcie", "H100 PCIe"),
    (r"h100 nvl( 94gb)?", "H100 NVL"),
    (r"h200( sxm5?)?( 141gb)?( hbm3e)?", "H200 SXM"),
    (r"h200 nvl( 141gb)?", "H200 NVL"),
    (r"gh200( \d+gb?)?( hbm3e?)?", "GH200"),  # "GH200 480GB", "GH200 144G HBM3e"
    (r"h800( sxm5?)?( 80gb)?( hbm3)?", "H800 SXM"),
    (r"h800( 80gb)? pcie", "H800 PCIe"),
    (r"a100( sxm4?| pcie)? (40|80)gb( pcie)?", "A100"),
    (r"l40s", "L40S"),
    (r"l4", "L4"),
    (r"a10", "A10"),
    (r"geforce rtx 4090", "RTX 4090"),
    (r"b200", "B200"),
    # As ROCm prints them ("AMD Instinct MI300X"), also as a virtual function (SR-IOV, "VF")
    # or with its form factor ("OAM"), which have the whole GPU's peak. Not matched: MI300A,
    # MI308X (other parts), and "MI250X/MI250", the name ROCm gives a GCD of either part: an
    # MI250 GCD has 104 CUs, not 110. A GPU in a compute partition mode (CPX, DPX) keeps the
    # whole GPU's name; `ampbench env` warns about that.
    (r"(amd )?(instinct )?mi300x( vf| oam)?", "MI300X"),
    (r"(amd )?(instinct )?mi325x( vf| oam)?", "MI325X"),
    (r"(amd )?(instinct )?mi250x", "MI250X GCD"),
    (r"(amd )?(instinct )?mi210", "MI210"),
)

_warned: set[tuple[str, str | None]] = set()


def _normalise(device_name: str) -> str:
    """The name in lower case, dashes as spaces, without the leading "NVIDIA" every GPU in the
    table has ("NVIDIA A100-SXM4-80GB" -> "a100 sxm4 80gb"): drivers and tools differ there."""
    words = re.sub(r"[-_\s]+", " ", device_name.lower()).split()
    return " ".join(words[1:] if words[:1] == ["nvidia"] else words)


def device_key(device_name: str) -> str | None:
    """The PEAK_TFLOPS row for a torch device name, or None when it is not in the table."""
    name = _normalise(device_name)
    for pattern, key in _NAMES:
        if re.fullmatch(pattern, name):
            return key
    return None


def math_kind(policy_name: str) -> str:
    """Which peak a policy's ``mfu_pct`` is against: fp32 | tf32 | fp16 | bf16 (fp16-noscale is
    fp16; the FP8 policies are bf16, their autocast dtype, so their MFU compares with bf16's)."""
    policy = precision.get(policy_name)  # an unknown name raises ValueError
    if policy.autocast_dtype == "bfloat16":
        return "bf16"
    if policy.autocast_dtype == "float16":
        return "fp16"
    return "tf32" if policy.tf32 else "fp32"


def device_peak_tflops(device_name: str, kind: str) -> float | None:
    """Dense peak TFLOP/s of ``device_name`` for one of KINDS; None (and one warning) when the
    device is unknown or has no such peak (FP8 before Hopper and Ada)."""
    if kind not in KINDS:
        raise ValueError(f"unknown math kind '{kind}'; valid: {', '.join(KINDS)}")
    key = device_key(device_name)
    peak = PEAK_TFLOPS[key].get(kind) if key is not None else None
    warned = (device_name, None if key is None else kind)  # an unknown device: one warning
    if peak is None and warned not in _warned:
        _warned.add(warned)
        log.warning("MFU: no dense peak TFLOP/s known for %s; its MFU stays empty "
                    "(pass --peak-tflops to give one)", missing_peak(device_name, kind))
    return peak


def missing_peak(device_name: str, kind: str) -> str:
    """What has no peak: 'fp8 on A100' for a known device, the device's name for another."""
    key = device_key(device_name)
    return f"{kind} on {key}" if key is not None else f"'{device_name}'"


def peak_tflops(device_name: str, precision_name: str) -> float | None:
    """Dense peak TFLOP/s of ``device_name`` that a policy's ``mfu_pct`` is against; None (and
    one warning) if unknown."""
    return device_peak_tflops(device_name, math_kind(precision_name))

