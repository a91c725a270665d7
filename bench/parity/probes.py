"""Where a run's gradients fall in FP16's range: log2 histograms and underflow fractions.

At a few probe steps a parity child (bench/parity/train.py) takes an extra, unscaled FP32
backward (``probe_gradients``, on a forked RNG so the training trajectory does not change) and
counts the weight gradients, and for FP32's seed 0 the gradients of every leaf module's
output too, by power of two (``Log2Histogram``): the rows of grad_hist.csv, and the
``underflow_frac`` / ``subnormal_frac`` of parity.csv. torch is imported inside the functions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

FP16_MIN_SUBNORMAL = 2.0**-24  # smaller magnitudes flush to zero in FP16
FP16_MIN_NORMAL = 2.0**-14  # smaller magnitudes are FP16 subnormals (fewer mantissa bits)


class Log2Histogram:
    """Gradient magnitudes by power of two: bin b counts the non-zero elements with
    2^b <= |g| < 2^(b+1); exact zeros are counted apart (non-finite values are left out)."""

    def __init__(self) -> None:
        self.bins: Counter[int] = Counter()
        self.zeros = 0

    def add(self, grad: Any) -> None:
        import torch

        mag = grad.detach().float().abs().flatten()
        mag = mag[torch.isfinite(mag)]
        nonzero = mag[mag > 0]
        self.zeros += mag.numel() - nonzero.numel()
        _, exponent = torch.frexp(nonzero)  # |g| = m * 2^e with 0.5 <= m < 1
        bins, counts = torch.unique(exponent - 1, return_counts=True)
        self.bins.update(dict(zip(bins.tolist(), counts.tolist(), strict=True)))

    def fp16_shares(self) -> tuple[float, float]:
        """(underflow, subnormal): the shares of the non-zero elements below 2^-24, which FP16
        flushes to zero, and in [2^-24, 2^-14), which it keeps only as subnormals. Exact zeros
        are left out: they are zero in every format and lose nothing."""
        nonzero = sum(self.bins.values())
        if nonzero == 0:
            return 0.0, 0.0
        under = sum(c for b, c in self.bins.items() if 2.0**b < FP16_MIN_SUBNORMAL)
        sub = sum(c for b, c in self.bins.items() if FP16_MIN_SUBNORMAL <= 2.0**b < FP16_MIN_NORMAL)
        return under / nonzero, sub / nonzero

    def rows(self, model: str, kind: str, step: int) -> list[dict[str, Any]]:
        """grad_hist.csv rows (HIST_COLUMNS), one per non-empty bin (one without a bin when
        every element was zero)."""
        bins = sorted(self.bins.items()) or [(None, 0)]
        return [{"model": model, "kind": kind, "step": step, "log2_bin": b, "count": c,
                 "zeros": self.zeros} for b, c in bins]


def fp16_underflow(grads: Sequence[Any]) -> tuple[float, float]:
    """(underflow_frac, subnormal_frac) of the non-zero elements of FP32 gradients ``grads``:
    see ``Log2Histogram.fp16_shares``."""
    histogram = Log2Histogram()
    for g in grads:
        if g is not None:
            histogram.add(g)
    return histogram.fp16_shares()


def probe_gradients(trainer: Any, inputs: Any, targets: Any,
                    activations: Log2Histogram | None = None) -> list[Any]:
    """Unscaled FP32 weight gradients at the current weights, without touching .grad or the
    RNG; with ``activations``, the gradient of every leaf module's output is counted there.
    Weights stored in bf16 (the bf16-pure policies) have no FP32 to probe in: their gradients
    are taken as they train, under the policy's autocast (which casts an image batch to them)."""
    from contextlib import nullcontext

    import torch

    def count_output_grad(module: Any, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(activations.add)  # type: ignore[union-attr]

    leaves = [m for m in trainer.model.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(count_output_grad) for m in leaves] \
        if activations is not None else []
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    own_dtype = trainer.policy.autocast(trainer.device.type) \
        if trainer.policy.param_dtype is not None else nullcontext()
    try:
        with torch.random.fork_rng(devices=devices), own_dtype:
            loss = trainer.spec.loss(trainer.model, inputs, targets)
            return list(torch.autograd.grad(loss, params, allow_unused=True))
    finally:
        for hook in hooks:
            hook.remove()


def probe(trainer: Any, model: str, step: int, with_histograms: bool,
          ) -> tuple[tuple[float, float], list[dict[str, Any]]]:
    """One probe on the trainer's resident batch: the FP16 (underflow, subnormal) shares of the
    weight gradients, and with ``with_histograms`` the grad_hist.csv rows of this step."""
    weights = Log2Histogram()
    activations = Log2Histogram() if with_histograms else None
    for grad in probe_gradients(trainer, trainer.inputs, trainer.targets, activations):
        if grad is not None:
            weights.add(grad)
    rows: list[dict[str, Any]] = []
    if activations is not None:
        rows = activations.rows(model, "activation", step) + weights.rows(model, "weight", step)
    return weights.fp16_shares(), rows
