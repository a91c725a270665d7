"""FLOPs per training step and MFU against the device's peak (bench/telemetry/peaks.py).

``count_training_flops`` runs one forward + backward on the meta device under
``torch.utils.flop_counter.FlopCounterMode``: exact for the code that runs, no real compute,
no memory. torch is imported lazily so MFU arithmetic is usable without it.

MFU (model FLOPs utilization) = achieved FLOP/s / a dense spec peak. ``mfu_pct`` is against the
peak every policy of its kind can be compared on: the full-precision FP32 peak for ``fp32``
(NVIDIA: non-tensor; AMD: see the table), the TF32 tensor peak for ``tf32``, and the FP16/BF16
tensor peak (FP32 accumulate; the same figure on every listed part) for every autocast policy,
fp16, bf16, fp16-noscale and the FP8 ones alike: an FP8 cell's MFU then reads beside bf16's, and
above it only if FP8 made the step faster. FP8 policies also get ``mfu_fp8_pct`` against the FP8
tensor peak (FP32 accumulate), the ceiling of their mixed FP8/BF16 math. ``mfu_flag`` says why
an MFU is empty: no peak for the device (a CPU included; never a guessed number,
``--peak-tflops`` supplies one), or above 100% of the policy's ceiling (the FP8 peak for FP8
policies), which no real run reaches: the FLOP count or the peak is wrong, so the value is
kept only in the flag's text, never in a column a table or plot would print.
"""

from __future__ import annotations

from typing import Any

from bench import precision, store
from bench.telemetry.peaks import device_peak_tflops, math_kind, missing_peak, peak_tflops


def mfu_pct(flops_per_step: float | None, step_s: float | None,
            peak: float | None) -> float | None:
    """Model FLOPs utilization in percent of ``peak`` TFLOP/s; None when anything is missing."""
    if not flops_per_step or not step_s or not peak or step_s <= 0 or peak <= 0:
        return None
    return 100.0 * flops_per_step / step_s / (peak * 1e12)


def mfu_fields(flops_per_step: float | None, step_s: float | None, device_name: str,
               precision_name: str, override: float | None = None) -> dict[str, Any]:
    """The record's MFU fields: ``peak_tflops`` and ``mfu_pct`` against the policy's comparable
    peak (``override``, --peak-tflops, wins), for FP8 policies ``peak_fp8_tflops`` and
    ``mfu_fp8_pct`` against the FP8 peak, and ``mfu_flag`` ("" or why an MFU is empty)."""
    kind = math_kind(precision_name)
    peak = override if override is not None else peak_tflops(device_name, precision_name)
    fields: dict[str, Any] = {"peak_tflops": peak,
                              "mfu_pct": mfu_pct(flops_per_step, step_s, peak),
                              "peak_fp8_tflops": None, "mfu_fp8_pct": None}
    flags = [] if peak is not None else [f"no peak for {missing_peak(device_name, kind)}"]
    ceiling = (kind, peak, fields["mfu_pct"])
    if precision.get(precision_name).fp8_recipe is not None:
        fp8 = device_peak_tflops(device_name, "fp8")
        fields.update(peak_fp8_tflops=fp8, mfu_fp8_pct=mfu_pct(flops_per_step, step_s, fp8))
        if fp8 is not None:
            ceiling = ("fp8", fp8, fields["mfu_fp8_pct"])
        elif f"no peak for {missing_peak(device_name, 'fp8')}" not in flags:
            flags.append(f"no peak for {missing_peak(device_name, 'fp8')}")
    # FP8 beyond the bf16 peak is a finding; beyond the FP8 peak, or any other policy beyond its
    # own, no run can be: the value goes into the flag, no column holds it.
    what, limit, value = ceiling
    if value is not None and value > 100.0:
        flags.append(f"{store.MFU_ABOVE_100}: {value:.1f}% of the {what} peak ({limit:g} TFLOP/s)")
        fields.update(mfu_pct=None, mfu_fp8_pct=None)
    fields["mfu_flag"] = "; ".join(flags)
    return fields


def count_training_flops(spec: Any, batch_size: int, size: int | None) -> int:
    """FLOPs of one forward + backward of ``spec``'s model on one micro-batch (meta device).

    A model of the user's own (``spec.source``) with its own ``flops_per_sample`` is counted by
    it; one the meta device cannot run (an op it lacks, a ``.item()``) on the CPU instead."""
    if spec.source is None:
        return _count(spec, batch_size, size, "meta")
    if spec.counts_flops:
        return int(spec.flops_per_sample(size) * batch_size)
    try:
        return _count(spec, batch_size, size, "meta")
    except Exception:
        return _count(spec, batch_size, size, "cpu")


def _count(spec: Any, batch_size: int, size: int | None, device: str) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device(device):
        model = spec.build()
    model.train()
    inputs, targets = spec.make_batch(batch_size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        loss = spec.loss(model, inputs, targets)
        loss.backward()
    return int(counter.get_total_flops())
