"""Accuracy parity: does each reduced precision still reach FP32's accuracy?

    python -m bench parity                                  # tiny models on CPU, 5 policies
    python -m bench parity --models gpt2-tiny --precisions fp32,bf16,broken --seeds 3
    nox -s parity -- --device cuda                          # full-size models, more steps

Every model family trains on a learnable, deterministic task generated in-process (no
downloads), and is scored on a fixed held-out set:

- resnet: oriented gratings, one orientation per class, with random frequency, phase, per-channel
  contrast and noise; each image channel is normalised to mean 0 / std 1, so only spatial
  structure tells the classes apart. Metric: eval loss and accuracy.
- bert: masked-token prediction on sequences of a seeded sparse Markov chain (tokens shifted by
  one, id 0 is [MASK]). Metric: eval loss and masked-token accuracy.
- gpt: next-token prediction on the same kind of chain; its entropy rate (nats) is known
  exactly and written as ``optimal_loss``, the floor no model can beat.
- gpt2-tiny-underflow (a parity-only task name): gpt2-tiny on the gpt task, its loss taken as
  one micro-batch's share of a 2^19-token optimizer step (nanoGPT's GPT-2 recipe: 524,288
  tokens per step, the loss of each micro-batch divided by the step's token count), with
  AdamW's eps scaled by the same share. AdamW's update is invariant to that scale, so FP32 and
  BF16 train exactly as on the plain mean; FP16 is not: the gradients sit about 2^10 lower in
  its range, most of them below its normal floor and many below its smallest subnormal, where
  they flush to zero. It is the task where FP16 without loss scaling fails, for the reason it
  fails in large-batch language-model training.

The task (chain, class layout) and the held-out set are fixed; the run seed picks the initial
weights (``torch.manual_seed(seed)`` before ``build()``) and the training data order, so every
policy sees the same data and starts from the same weights as FP32 under the same seed. Training
reuses the benchmark's one step (``bench.cell.main.Trainer.step``: autocast forward, scaled
backward, scaler step and update); only the resident batch is swapped before each step.

Verdict per (model, policy), on the mean final eval loss over seeds:

- ``delta = mean(policy) - mean(fp32)``;
  ``tolerance = max(ABS_FLOOR, K_SIGMA * fp32_std)`` (sample std over the FP32 seeds);
- FAIL when any seed saw a non-finite training or eval loss, or ``|delta| > tolerance``;
- INCONCLUSIVE when the FP32 band is too wide to judge: ``fp32_std > MAX_BAND_FRACTION *
  (initial eval loss - fp32_mean)`` (or FP32 did not improve at all), or when a run crashed
  (an OOM, say: its ``error`` column says why) so that a policy, or FP32's band, lacks seeds;
- PASS otherwise. FP32's own rows are judged by the same rule (delta 0), so they read PASS
  unless FP32 itself was non-finite (FAIL) or too noisy (INCONCLUSIVE).

A run that crashes is recorded and the others go on. Each finished run is appended to
``parity_runs.jsonl`` in RUN_DIR (flushed and fsynced) as it ends; running parity again into
the same directory reuses the runs already there (same model, precision, seed, setup and
device), so an interrupted parity stage resumes where it stopped.

Health telemetry per run: non-finite training steps, GradScaler skipped steps and the first
skipped step, the scale history (``scale`` and ``skipped`` columns of parity_curves.csv), and
the fraction of non-zero FP32 weight-gradient elements that FP16 without loss scaling would
flush to zero (``underflow_frac``: |g| < 2^-24) or keep only as subnormals
(``subnormal_frac``: 2^-24 <= |g| < 2^-14), measured with an extra unscaled FP32 backward at a
few probe steps (on a forked RNG, so the probe does not change the training trajectory) and
averaged. At the same probes the FP32 run of seed 0 also histograms the magnitudes of its
weight gradients and of its activation gradients (the gradients of every leaf module's output)
by power of two: ``grad_hist.csv``, the data of the figure that shows where gradients fall in
FP16's range.

Time to accuracy (MLPerf's measure): each training step is timed (synchronised on CUDA; the
batch's generation, probes, sampling and evaluation are outside the clock). ``train_time_s``
is their sum and ``step_time_ms`` their median; ``time_to_target_s`` is the training time up
to ``steps_to_target``, the first sampled step whose training loss is at or below the target.
The target is FP32's mean final training loss plus the parity tolerance (the band within which
parity calls two losses equal; MLPerf's targets, too, sit just short of the reference's
converged quality), and never below the worst FP32 seed's final loss, so every FP32 run
reaches it: the mean alone would leave half the FP32 seeds "not reached", and a curve still
falling at its end would reach it only at the last step. A policy that is faster per step but
needs more steps shows it there.

The ``broken`` precision (parity only, not a benchmark policy) is a deliberately sabotaged
bf16 run whose optimizer steps use 100x the learning rate — the kind of bug (mis-scaled
updates) parity must catch; it is expected to FAIL.

Files in RUN_DIR: ``parity.csv`` (one row per model, precision and seed),
``parity_curves.csv`` (model, precision, seed, step, loss, scale, skipped, time_s: the mean
training loss of the last ``sample_every`` steps, the scaler's scale, the scaler-skipped steps
among them and the training time so far) and ``grad_hist.csv`` (model, kind, step, log2_bin,
count, zeros; kind ``activation`` or ``weight``; bin b counts the non-zero elements with
2^b <= |g| < 2^(b+1), ``zeros`` the exact zeros of that model, kind and step).
The CLI prints a verdict table and exits 1 when any policy FAILs (0 otherwise, 2 on bad input).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import models
from bench import BadInput, config, paths, precision, store

ABS_FLOOR = 0.03  # nats: eval-loss differences below this are never a failure
K_SIGMA = 3.0  # band half-width in FP32 seed-to-seed standard deviations
MAX_BAND_FRACTION = 0.10  # fp32_std above this fraction of the FP32 improvement: INCONCLUSIVE
FP16_MIN_SUBNORMAL = 2.0**-24  # smaller magnitudes flush to zero in FP16
FP16_MIN_NORMAL = 2.0**-14  # smaller magnitudes are FP16 subnormals (fewer mantissa bits)

COLUMNS = (
    "model", "precision", "seed", "steps", "eval_loss", "eval_accuracy", "optimal_loss",
    "steps_to_target", "time_to_target_s", "nonfinite_steps", "scaler_skipped_steps",
    "underflow_frac", "subnormal_frac", "fp32_mean", "fp32_std", "delta", "tolerance", "verdict",
)
EXTRA_COLUMNS = ("scaler_first_skip_step", "scaler_scale_final", "initial_eval_loss",
                 "final_train_loss", "train_time_s", "step_time_ms", "error")
CURVE_COLUMNS = ("model", "precision", "seed", "step", "loss", "scale", "skipped", "time_s")
HIST_COLUMNS = ("model", "kind", "step", "log2_bin", "count", "zeros")
VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")
_WORST_FIRST = ("FAIL", "INCONCLUSIVE", "PASS")
RUNS = "parity_runs.jsonl"  # one finished (model, precision, seed) run per line

BROKEN = "broken"  # parity-only sabotaged policy, see the module docstring
_BROKEN_LR_FACTOR = 100.0

# Parity-only tasks: a name of their own and the reference model they train.
UNDERFLOW = "gpt2-tiny-underflow"
_TASK_MODELS = {UNDERFLOW: "gpt2-tiny"}
NANOGPT_STEP_TOKENS = 2**19  # nanoGPT's GPT-2 (124M) recipe: 524,288 tokens per optimizer step
_ADAMW_EPS = 1e-8  # torch's default

_TASK_SEED = 1234  # fixes the task itself (chain, gratings): the same for every run seed
_EVAL_SEED = 987_654  # fixes the held-out set


@dataclass(frozen=True)
class Setup:
    """How one model trains for parity: batch, input size, steps, lr, task size, sampling."""

    batch_size: int
    size: int  # image_size or seq_len
    steps: int
    lr: float
    num_states: int = 64  # Markov chain states (bert/gpt) or classes (resnet)
    successors: int = 4  # non-zero transitions per chain state
    sample_every: int = 10
    eval_batches: int = 4
    # Tokens of the optimizer step the loss is averaged over (sequence models); None: the
    # micro-batch's own. Larger than the micro-batch, it puts the gradients lower in FP16's range.
    step_tokens: int | None = None


# Tiny models: sized so 3 models x 5 policies x 3 seeds run in about 5 minutes on 2 CPU cores.
CPU_SETUPS: dict[str, Setup] = {
    "resnet-tiny": Setup(batch_size=32, size=32, steps=60, lr=3e-3, num_states=6),
    "bert-tiny": Setup(batch_size=16, size=32, steps=120, lr=3e-3, num_states=16, successors=2),
    "gpt2-tiny": Setup(batch_size=16, size=32, steps=120, lr=3e-3),
    # 60 steps, half of gpt2-tiny's: the task asks only whether FP16's range loses the
    # gradients, which shows from the first steps (fp16-noscale 1.3 nats off, tolerance 0.06),
    # and its FP16 runs are the slowest on a CPU without FP16 matmuls (the cpu preset's budget).
    UNDERFLOW: Setup(batch_size=16, size=32, steps=60, lr=3e-3, step_tokens=NANOGPT_STEP_TOKENS),
}
GPU_SETUPS: dict[str, Setup] = {
    "resnet50": Setup(batch_size=64, size=128, steps=600, lr=1e-3, num_states=10,
                      sample_every=20, eval_batches=8),
    "bert-base": Setup(batch_size=32, size=128, steps=600, lr=2e-4, num_states=1024,
                       successors=4, sample_every=20, eval_batches=8),
    "gpt2-small": Setup(batch_size=16, size=256, steps=600, lr=3e-4, num_states=1024,
                        successors=4, sample_every=20, eval_batches=8),
}
_FAMILY_DEFAULTS = {
    "resnet": Setup(batch_size=32, size=32, steps=300, lr=1e-3, num_states=10),
    "bert": Setup(batch_size=32, size=64, steps=300, lr=3e-4),
    "gpt": Setup(batch_size=16, size=64, steps=300, lr=3e-4),
}


def setup_for(name: str, steps: int | None = None) -> Setup:
    """The parity setup of a model or task: its tuned one, else its family's default."""
    spec = _spec(name)
    setup = CPU_SETUPS.get(name) or GPU_SETUPS.get(name) or _FAMILY_DEFAULTS[spec.family]
    if spec.family != "resnet":
        setup = replace(setup, num_states=min(setup.num_states, spec.config.vocab_size - 1),
                        size=min(setup.size, spec.max_size or setup.size))
    else:
        setup = replace(setup, num_states=min(setup.num_states, spec.config.num_classes))
    return replace(setup, steps=steps) if steps else setup


# --------------------------------------------------------------------------------------------
# Tasks


class MarkovChain:
    """A sparse random Markov chain: each state has ``successors`` next states, random weights.

    A ring edge s -> s+1 makes the chain irreducible, so its stationary distribution is unique
    and its entropy rate sum_s pi(s) H(P[s]) is the exact optimal next-token loss.
    """

    def __init__(self, num_states: int, successors: int, seed: int) -> None:
        import numpy as np

        rng = np.random.default_rng(seed)
        n = num_states
        trans = np.zeros((n, n))
        for s in range(n):
            others = rng.choice([t for t in range(n) if t != (s + 1) % n],
                                size=min(successors, n) - 1, replace=False)
            nxt = np.concatenate([[(s + 1) % n], others]).astype(int)
            trans[s, nxt] = rng.dirichlet(np.ones(len(nxt)))
        values, vectors = np.linalg.eig(trans.T)
        pi = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
        pi = np.abs(pi) / np.abs(pi).sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            row_entropy = -np.where(trans > 0, trans * np.log(trans), 0.0).sum(axis=1)
        self.trans = trans
        self.stationary = pi
        self.entropy_rate = float(pi @ row_entropy)

    def sample(self, batch_size: int, length: int, generator: Any) -> Any:
        """(B, length) state ids; the first state is drawn from the stationary distribution."""
        import torch

        trans = torch.as_tensor(self.trans, dtype=torch.float64)
        state = torch.multinomial(torch.as_tensor(self.stationary).expand(batch_size, -1), 1,
                                  generator=generator)
        out = [state]
        for _ in range(length - 1):
            state = torch.multinomial(trans[state.squeeze(1)], 1, generator=generator)
            out.append(state)
        return torch.cat(out, dim=1)


class Task:
    """Batches of one family's parity task: ``batch(generator)`` -> (inputs, targets) on CPU."""

    def __init__(self, spec: models.ModelSpec, setup: Setup) -> None:
        self.spec = spec
        self.setup = setup
        self.chain = (MarkovChain(setup.num_states, setup.successors, _TASK_SEED)
                      if spec.family in ("bert", "gpt") else None)

    @property
    def optimal_loss(self) -> float | None:
        return self.chain.entropy_rate if self.spec.family == "gpt" and self.chain else None

    def batch(self, generator: Any) -> tuple[Any, Any]:
        family, setup = self.spec.family, self.setup
        if family == "resnet":
            return _gratings(setup.batch_size, setup.size, setup.num_states, generator)
        assert self.chain is not None
        if family == "gpt":
            states = self.chain.sample(setup.batch_size, setup.size + 1, generator)
            return states[:, :-1].contiguous(), states[:, 1:].contiguous()
        return _mask(self.chain.sample(setup.batch_size, setup.size, generator) + 1,
                     self.spec.config.mask_prob, generator)


def _gratings(batch_size: int, size: int, num_classes: int, generator: Any) -> tuple[Any, Any]:
    """Oriented sine gratings (class = orientation), per-channel normalised: (B,3,H,W), (B,)."""
    import torch

    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    theta = labels.double() * math.pi / num_classes
    freq = 2.0 + 3.0 * torch.rand(batch_size, generator=generator, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(batch_size, generator=generator, dtype=torch.float64)
    coords = torch.arange(size, dtype=torch.float64) / size
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    along = (x[None] * torch.cos(theta)[:, None, None] + y[None] * torch.sin(theta)[:, None, None])
    wave = torch.sin(2 * math.pi * freq[:, None, None] * along + phase[:, None, None])
    contrast = 0.5 + torch.rand(batch_size, 3, 1, 1, generator=generator, dtype=torch.float64)
    images = contrast * wave[:, None] + 0.5 * torch.randn(
        batch_size, 3, size, size, generator=generator, dtype=torch.float64)
    # Mean colour and contrast carry no class information once each channel is standardised.
    images = images - images.mean(dim=(2, 3), keepdim=True)
    images = images / images.std(dim=(2, 3), keepdim=True)
    return images.float(), labels


def _mask(tokens: Any, mask_prob: float, generator: Any) -> tuple[Any, Any]:
    import torch

    masked = torch.rand(tokens.shape, generator=generator) < mask_prob
    masked[:, 0] = True  # at least one target per sequence
    return tokens.masked_fill(masked, 0), tokens.masked_fill(~masked, -100)


# --------------------------------------------------------------------------------------------
# Numerics telemetry


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


def _probe_gradients(trainer: Any, inputs: Any, targets: Any,
                     activations: Log2Histogram | None = None) -> list[Any]:
    """Unscaled FP32 weight gradients at the current weights, without touching .grad or the
    RNG; with ``activations``, the gradient of every leaf module's output is counted there."""
    import torch

    def count_output_grad(module: Any, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(activations.add)  # type: ignore[union-attr]

    leaves = [m for m in trainer.model.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(count_output_grad) for m in leaves] \
        if activations is not None else []
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            loss = trainer.spec.loss(trainer.model, inputs, targets)
            return list(torch.autograd.grad(loss, params, allow_unused=True))
    finally:
        for hook in hooks:
            hook.remove()


# --------------------------------------------------------------------------------------------
# Training one (model, policy, seed)


def _resolve_policy(name: str) -> tuple[precision.Policy, float]:
    """(policy, lr factor) for a parity precision name; ``broken`` is the sabotaged bf16."""
    if name == BROKEN:
        return replace(precision.get("bf16"), name=BROKEN,
                       role="sabotaged: bf16 with 100x learning rate"), _BROKEN_LR_FACTOR
    return precision.get(name), 1.0


def _evaluate(trainer: Any, batches: Sequence[tuple[Any, Any]]) -> tuple[float, float]:
    """Mean eval loss and accuracy (over all targets that count) on the held-out batches."""
    import torch
    import torch.nn.functional as F

    model = trainer.model
    model.eval()
    total_loss = correct = count = 0.0
    with torch.no_grad(), trainer.policy.autocast(trainer.device.type):
        for inputs, targets in batches:
            logits = model(inputs).float()
            logits = logits.reshape(-1, logits.size(-1))
            flat = targets.reshape(-1)
            keep = flat != -100
            total_loss += float(F.cross_entropy(logits[keep], flat[keep], reduction="sum"))
            correct += float((logits[keep].argmax(-1) == flat[keep]).sum())
            count += float(keep.sum())
    model.train()
    return total_loss / count, correct / count


@dataclass(frozen=True)
class _ShareOfStep(models.ModelSpec):
    """A model whose loss is one micro-batch's share of a larger optimizer step's mean loss."""

    share: float = 1.0

    def loss(self, model: Any, inputs: Any, targets: Any) -> Any:
        return super().loss(model, inputs, targets) * self.share


def train_one(
    model_name: str, policy_name: str, seed: int, setup: Setup, device: Any,
    *, policy: precision.Policy | None = None, lr_factor: float = 1.0,
    eval_set: Sequence[tuple[Any, Any]] | None = None, task: Task | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Train one (model or task, policy, seed); return its parity row (before verdicts), its
    curve rows and its grad_hist.csv rows (only FP32's seed 0 has them)."""
    import torch

    from bench.cell.main import Trainer

    spec = _spec(model_name)
    if policy is None:
        policy, lr_factor = _resolve_policy(policy_name)
    task = task or Task(spec, setup)
    if eval_set is None:
        eval_set = _eval_set(task, device)
    share = setup.batch_size * setup.size / setup.step_tokens if setup.step_tokens else 1.0
    policy.apply_backend_flags()
    torch.manual_seed(seed)
    net = policy.prepare_model(spec.build().to(device))
    # eps scaled with the loss: AdamW's update is then the same as for the plain mean.
    optimizer = torch.optim.AdamW(net.parameters(), lr=setup.lr * lr_factor, weight_decay=0.0,
                                  eps=_ADAMW_EPS * share)
    trained_spec = _ShareOfStep(**asdict(spec), share=share) if share != 1.0 else spec
    trainer = Trainer(trained_spec, policy, device, net, optimizer, policy.scaler(device.type),
                      None, None)
    data = torch.Generator().manual_seed(seed)
    initial_eval_loss, _ = _evaluate(trainer, eval_set)

    scaling = trainer.scaler.is_enabled()
    probes = {0, setup.steps // 2, setup.steps - 1}
    histograms = policy_name == "fp32" and seed == 0
    underflow: list[tuple[float, float]] = []
    hist: list[dict[str, Any]] = []
    window: list[Any] = []
    curve: list[dict[str, Any]] = []
    step_times: list[float] = []
    nonfinite = skipped = window_skipped = 0
    first_skip: int | None = None
    for step in range(setup.steps):
        inputs, targets = task.batch(data)
        trainer.inputs, trainer.targets = inputs.to(device), targets.to(device)
        if step in probes:
            weights = Log2Histogram()
            activations = Log2Histogram() if histograms else None
            for grad in _probe_gradients(trainer, trainer.inputs, trainer.targets, activations):
                if grad is not None:
                    weights.add(grad)
            underflow.append(weights.fp16_shares())
            if activations is not None:
                hist += activations.rows(model_name, "activation", step)
                hist += weights.rows(model_name, "weight", step)
        scale_before = trainer.scaler.get_scale() if scaling else None
        trainer.sync()
        started = time.perf_counter()
        window.append(trainer.step())
        trainer.sync()
        step_times.append(time.perf_counter() - started)
        if scaling and trainer.scaler.get_scale() < scale_before:  # backoff = inf/NaN found
            skipped += 1
            window_skipped += 1
            first_skip = step if first_skip is None else first_skip
        if (step + 1) % setup.sample_every == 0 or step + 1 == setup.steps:
            losses = torch.stack(window).float().cpu() / share
            nonfinite += int((~torch.isfinite(losses)).sum())
            curve.append({"model": model_name, "precision": policy_name, "seed": seed,
                          "step": step + 1, "loss": float(losses.mean()),
                          "scale": trainer.scaler.get_scale() if scaling else None,
                          "skipped": window_skipped if scaling else None,
                          "time_s": sum(step_times)})
            window, window_skipped = [], 0
    eval_loss, eval_accuracy = _evaluate(trainer, eval_set)
    if not math.isfinite(eval_loss):
        nonfinite += 1
    row = dict.fromkeys(COLUMNS + EXTRA_COLUMNS)
    row.update(
        model=model_name, precision=policy_name, seed=seed, steps=setup.steps,
        eval_loss=eval_loss, eval_accuracy=eval_accuracy, optimal_loss=task.optimal_loss,
        nonfinite_steps=nonfinite, scaler_skipped_steps=skipped if scaling else None,
        underflow_frac=sum(u for u, _ in underflow) / len(underflow),
        subnormal_frac=sum(s for _, s in underflow) / len(underflow),
        scaler_first_skip_step=first_skip,
        scaler_scale_final=trainer.scaler.get_scale() if scaling else None,
        initial_eval_loss=initial_eval_loss, final_train_loss=curve[-1]["loss"],
        train_time_s=sum(step_times), step_time_ms=1e3 * statistics.median(step_times),
    )
    return row, curve, hist


def _eval_set(task: Task, device: Any) -> list[tuple[Any, Any]]:
    import torch

    generator = torch.Generator().manual_seed(_EVAL_SEED)
    return [tuple(t.to(device) for t in task.batch(generator))  # type: ignore[misc]
            for _ in range(task.setup.eval_batches)]


# --------------------------------------------------------------------------------------------
# Verdicts


def judge(frame: Any) -> Any:
    """Fill fp32_mean, fp32_std, delta, tolerance, verdict and steps_to_target per model.

    ``frame`` has one row per (model, precision, seed) with eval_loss, nonfinite_steps,
    initial_eval_loss, final_train_loss, ``error`` (set for a run that crashed) and (for
    steps_to_target and time_to_target_s) a ``curve`` list of (step, loss, time_s) triples;
    it is returned with those columns filled.
    """
    import pandas as pd

    frame = frame.copy()
    if "error" not in frame:
        frame["error"] = None
    for col in ("fp32_mean", "fp32_std", "delta", "tolerance"):
        frame[col] = float("nan")
    frame["verdict"] = None
    for col in ("steps_to_target", "time_to_target_s"):
        frame[col] = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    crashed = frame["error"].notna()
    for model, rows in frame.groupby("model", sort=False):
        ref = rows[rows["precision"] == "fp32"]
        if ref.empty:
            raise BadInput(f"parity for {model} needs fp32 runs as the reference band")
        ref = ref[~crashed[ref.index]]
        ref_loss = ref["eval_loss"].astype(float)
        fp32_mean = float(ref_loss.mean(skipna=False)) if len(ref) else math.nan
        fp32_std = float(ref_loss.std(ddof=1)) if len(ref) > 1 else math.nan
        tolerance = max(ABS_FLOOR, K_SIGMA * fp32_std) if math.isfinite(fp32_std) else math.nan
        improvement = float(ref["initial_eval_loss"].astype(float).mean()) - fp32_mean
        too_wide = (not math.isfinite(fp32_std) or not improvement > 0
                    or fp32_std > MAX_BAND_FRACTION * improvement)
        finals = ref["final_train_loss"].astype(float)  # the target: see the module docstring
        target = max(finals.max(), finals.mean() + tolerance) if len(ref) else math.nan
        for _, group in rows.groupby("precision", sort=False):
            ran = group[~crashed[group.index]]
            mean = float(ran["eval_loss"].astype(float).mean(skipna=False)) if len(ran) \
                else math.nan
            delta = mean - fp32_mean
            nonfinite = bool((ran["nonfinite_steps"].astype(float) > 0).any()) or (
                len(ran) > 0 and not math.isfinite(mean))
            verdict = _verdict(delta, tolerance, too_wide or len(ran) < len(group), nonfinite)
            frame.loc[group.index, ["fp32_mean", "fp32_std", "delta", "tolerance"]] = [
                fp32_mean, fp32_std, delta, tolerance]
            frame.loc[group.index, "verdict"] = verdict
            if "curve" in frame:
                for idx in ran.index:
                    reached = _reached(frame.at[idx, "curve"], target)
                    if reached is not None:
                        frame.at[idx, "steps_to_target"], frame.at[idx, "time_to_target_s"] = \
                            reached
    return frame


def worst_verdict(verdicts: Iterable[str]) -> str | None:
    """The verdict that speaks for several seeds: FAIL over INCONCLUSIVE over PASS."""
    seen = set(verdicts)
    return next((v for v in _WORST_FIRST if v in seen), None)


def _verdict(delta: float, tolerance: float, cannot_judge: bool, nonfinite: bool) -> str:
    """FAIL on a non-finite loss whatever else; INCONCLUSIVE when the band or the runs do not
    allow a judgement; else PASS within the tolerance."""
    if nonfinite:
        return "FAIL"
    if cannot_judge:
        return "INCONCLUSIVE"
    return "PASS" if abs(delta) <= tolerance else "FAIL"


def _reached(curve: Sequence[tuple[int, float, float | None]],
             target: float) -> tuple[int, float | None] | None:
    """(step, training time) of the first sample whose training loss is at or below
    ``target``, else None."""
    if not math.isfinite(target):
        return None
    return next(((step, time_s) for step, loss, time_s in curve if loss <= target), None)


# --------------------------------------------------------------------------------------------
# Entry points


def default_models(device: Any) -> list[str]:
    """The full-size models on CUDA, the tiny ones on CPU; the underflow task on both."""
    return [*GPU_SETUPS, UNDERFLOW] if device.type == "cuda" else list(CPU_SETUPS)


def tasks_for(precisions: Iterable[str]) -> list[str]:
    """The parity-only tasks a run adds to its models: the underflow task whenever it measures
    an FP16 policy, whose loss scaling that task puts to the test (with the fp16-noscale
    ablation beside it, see task_policies)."""
    return [UNDERFLOW] if {"fp16", "fp16-noscale"} & set(precisions) else []


def _validate(models_: Sequence[str] | None, precisions: Sequence[str] | None,
              steps: int | None, seeds: int) -> tuple[list[str] | None, list[str]]:
    for name in models_ or ():
        try:
            _spec(name)
        except ValueError as exc:
            raise BadInput(f"{exc}; parity tasks: {', '.join(_TASK_MODELS)}") from None
    chosen = list(precisions) if precisions else list(precision.NAMES)
    valid = (*precision.NAMES, BROKEN)
    for name in chosen:
        if name not in valid:
            raise BadInput(f"unknown precision '{name}'; valid: {', '.join(valid)}")
    if "fp32" not in chosen:
        chosen.insert(0, "fp32")  # the reference band is always measured
    if steps is not None and steps < 1:
        raise BadInput(f"steps must be at least 1, got {steps}")
    if seeds < 2:
        raise BadInput(f"seeds must be at least 2 (the FP32 band needs a spread), got {seeds}")
    return (list(models_) if models_ else None), chosen


def task_policies(model: str, precisions: Sequence[str]) -> list[str]:
    """The policies parity trains on ``model``: ``precisions``, except that the underflow task
    always judges the fp16-noscale ablation (the question it exists for, asked or not) and
    leaves tf32 out (TF32 does not touch FP16's range: on that task it is fp32's twin)."""
    if model != UNDERFLOW:
        return list(precisions)
    names = {n for n in precisions if n != "tf32"} | {"fp16-noscale"}
    return [n for n in (*precision.NAMES, BROKEN) if n in names]


def _runs(model_names: Sequence[str], precisions: Sequence[str],
          seeds: int) -> Iterator[tuple[str, str, int]]:
    for model in model_names:
        for name in task_policies(model, precisions):
            for seed in range(seeds):
                yield model, name, seed


class OutOfTime(Exception):
    """The time budget ran out before every parity run had finished.

    ``not_run`` names the runs not started (they are not recorded, so parity run again into
    the directory does them); ``path`` is the parity.csv written for the models whose runs
    all finished, or None when none did.
    """

    def __init__(self, not_run: list[str], path: Path | None) -> None:
        super().__init__(f"{len(not_run)} parity run(s) not started")
        self.not_run = not_run
        self.path = path


def run_parity(
    run_dir: Path | str, models: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None, steps: int | None = None, seeds: int = 3,
    device: str = "auto", time_left: Callable[[], float] | None = None,
    unknown_s: float = math.inf,
) -> Path:
    """Train every (model, precision, seed), judge against FP32 and write parity.csv to run_dir.

    Also writes parity_curves.csv; returns the parity.csv path. Policies a device cannot run
    are skipped with a note on stderr; runs already in run_dir's parity_runs.jsonl are reused.
    With ``time_left`` (seconds, asked before each run) no run starts that would not finish:
    the slowest finished run of the same model is its estimate, ``unknown_s`` when none has
    run; the first that does not fit stops the stage and OutOfTime says what is left.
    """
    from bench.cell.main import resolve_device
    from bench.cell.timing import use_device

    model_names, chosen = _validate(models, precisions, steps, seeds)
    config.check_limit("steps", steps or 0, "command line")
    config.check_limit("seeds", seeds, "command line")
    dev = resolve_device(device)
    use_device(dev)  # cuda:N's own stream and context, as a cell's
    model_names = model_names or default_models(dev)
    if not precisions:  # by default no emulated policy (FP8 off CUDA): slow, and no news
        chosen = [n for n in chosen if not _resolve_policy(n)[0].emulated_on(dev.type)]
    run_dir = paths.output_dir(run_dir, "parity run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    with paths.lock(run_dir, "ampbench parity"):  # re-entrant: a runner may hold it already
        return _run_all(run_dir, model_names, chosen, seeds, steps, dev, time_left, unknown_s)


def _run_all(run_dir: Path, model_names: Sequence[str], chosen: Sequence[str], seeds: int,
             steps: int | None, dev: Any, time_left: Callable[[], float] | None = None,
             unknown_s: float = math.inf) -> Path:
    import sys

    import pandas as pd
    import torch

    if dev.type == "cpu" and os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(min(4, os.cpu_count() or 1))  # tiny models gain nothing past ~4

    finished = _load_runs(run_dir)
    # Wall time of finished runs per model, earlier stages' included: the time budget's guide.
    walls: dict[str, list[float]] = {}
    for run in finished.values():
        if run.wall_s is not None:
            walls.setdefault(run.row["model"], []).append(run.wall_s)
    not_run: list[str] = []
    plan = []
    for model_name, name, seed in _runs(model_names, chosen, seeds):
        policy, lr_factor = _resolve_policy(name)
        reason = policy.unsupported_reason(dev, _spec(model_name))
        if reason:
            if seed == 0:
                print(f"parity: skipping {model_name} {name}: {reason}", file=sys.stderr)
            continue
        plan.append((model_name, name, seed, policy, lr_factor))
    rows, curves, hists = [], [], []
    tasks: dict[str, tuple[Setup, Task, list[tuple[Any, Any]]]] = {}
    for i, (model_name, name, seed, policy, lr_factor) in enumerate(plan, 1):
        setup = setup_for(model_name, steps)
        key = _run_key(model_name, name, seed, setup, dev)
        progress = f"parity [{i}/{len(plan)}] {model_name} {name} seed {seed}"
        if key in finished:
            row, curve, hist = finished[key].row, finished[key].curve, finished[key].hist
            print(f"{progress}: done before, kept", file=sys.stderr)
        elif time_left is not None and (not_run or max(
                walls.get(model_name) or [unknown_s]) > time_left()):
            not_run.append(f"{model_name} {name} seed {seed}")  # not recorded: a resume runs it
            continue
        else:
            if model_name not in tasks:
                task = Task(_spec(model_name), setup)
                tasks[model_name] = (setup, task, _eval_set(task, dev))
            _, task, eval_set = tasks[model_name]
            started = time.perf_counter()
            try:
                row, curve, hist = train_one(model_name, name, seed, setup, dev, policy=policy,
                                             lr_factor=lr_factor, eval_set=eval_set, task=task)
                done = (f"eval loss {row['eval_loss']:.4f} acc {row['eval_accuracy']:.3f} "
                        f"({time.perf_counter() - started:.1f} s)")
            except Exception as exc:  # an OOM, a crash: recorded, the other runs go on
                row, curve, hist = _crashed(model_name, name, seed, setup, exc), [], []
                done = f"crashed ({row['error']})"
            wall_s = round(time.perf_counter() - started, 3)
            if row.get("error") is None:
                walls.setdefault(model_name, []).append(wall_s)
            store.append(run_dir, {"key": key, "row": row, "curve": curve, "hist": hist,
                                   "wall_s": wall_s}, RUNS)
            print(f"{progress}: {done}", file=sys.stderr)
        rows.append({**row, "curve": [(c["step"], c["loss"], c.get("time_s")) for c in curve]})
        curves.extend(curve)
        hists.extend(hist)

    if not_run:  # judge only the models whose runs all finished: no band from part of one
        left = {label.split(" ", 1)[0] for label in not_run}
        rows = [r for r in rows if r["model"] not in left]
        curves = [c for c in curves if c["model"] not in left]
        hists = [h for h in hists if h["model"] not in left]
        if not rows:
            raise OutOfTime(not_run, None)
    frame = judge(pd.DataFrame(rows, columns=[*COLUMNS, *EXTRA_COLUMNS, "curve"]))
    frame = frame.drop(columns=["curve"])[list(COLUMNS) + list(EXTRA_COLUMNS)]
    for col in ("steps_to_target", "scaler_skipped_steps", "scaler_first_skip_step"):
        frame[col] = frame[col].astype("Int64")  # integers with gaps, not 60.0 / NaN
    path = run_dir / "parity.csv"
    frame.to_csv(path, index=False)
    for name, table, columns in (("parity_curves.csv", curves, CURVE_COLUMNS),
                                  ("grad_hist.csv", hists, HIST_COLUMNS)):
        written = pd.DataFrame(table, columns=list(columns))
        for col in ("skipped", "log2_bin"):
            if col in written:
                written[col] = written[col].astype("Int64")
        written.to_csv(run_dir / name, index=False)
    if not_run:
        raise OutOfTime(not_run, path)
    return path


def _run_key(model: str, precision_name: str, seed: int, setup: Setup, device: Any) -> str:
    """What makes a finished run reusable: the same model, policy, seed, setup and device."""
    return json.dumps([model, precision_name, seed, asdict(setup), device.type])


def _crashed(model: str, precision_name: str, seed: int, setup: Setup,
             exc: Exception) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS + EXTRA_COLUMNS)
    text = "".join(traceback.format_exception_only(exc)).strip()
    row.update(model=model, precision=precision_name, seed=seed, steps=setup.steps,
               eval_loss=math.nan, error=text.splitlines()[-1][:300])
    return row


class _Finished(NamedTuple):
    """A run of an earlier parity stage, as parity_runs.jsonl keeps it."""

    row: dict[str, Any]
    curve: list[dict[str, Any]]
    hist: list[dict[str, Any]]
    wall_s: float | None  # None when not known


def _load_runs(run_dir: Path) -> dict[str, _Finished]:
    """Finished runs of an earlier parity stage in run_dir (a crashed run is tried again); a
    damaged line is a warning and skipped (its run is trained again)."""
    runs: dict[str, _Finished] = {}
    for entry in store.load_jsonl(run_dir / RUNS, _run_problem):
        if entry["row"].get("error") is None:
            wall_s = entry.get("wall_s")
            known = isinstance(wall_s, int | float) and not isinstance(wall_s, bool)
            runs[entry["key"]] = _Finished(entry["row"], entry["curve"], entry.get("hist") or [],
                                           wall_s if known else None)
    return runs


def _run_problem(entry: Any) -> str | None:
    """Why a line of parity_runs.jsonl cannot be reused (None when it can)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
        return "not a parity run (no key)"
    row, curve, hist = entry.get("row"), entry.get("curve"), entry.get("hist", [])
    if not isinstance(row, dict) or not isinstance(curve, list):
        return "not a parity run (no row or curve)"
    if not isinstance(hist, list) or not all(isinstance(h, dict) for h in hist):
        return "a gradient histogram that is not a list of rows"
    for column in ("eval_loss", "eval_accuracy"):
        value = row.get(column)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            return f"{column} {value!r} is not a number"
    for point in curve:
        if not isinstance(point, dict) or not all(
                isinstance(point.get(k), int | float) and not isinstance(point.get(k), bool)
                for k in ("step", "loss")):
            return "a curve point without a numeric step and loss"
    return None


def _spec(name: str) -> models.ModelSpec:
    """The model a parity model or task name trains."""
    return models.get(_TASK_MODELS.get(name, name))


def summarize(frame: Any) -> str:
    """A tabulate table of verdicts: one line per (model, precision)."""
    from tabulate import tabulate

    agg = frame.groupby(["model", "precision"], sort=False).agg(
        eval_loss=("eval_loss", "mean"), eval_accuracy=("eval_accuracy", "mean"),
        optimal_loss=("optimal_loss", "first"), delta=("delta", "first"),
        tolerance=("tolerance", "first"),
        skipped=("scaler_skipped_steps", lambda s: s.sum(min_count=1)),  # empty: no scaler
        underflow_frac=("underflow_frac", "mean"), verdict=("verdict", "first"),
    ).reset_index()
    agg = agg.rename(columns={"eval_loss": "eval loss", "eval_accuracy": "accuracy",
                              "optimal_loss": "optimum", "delta": "change vs fp32",
                              "skipped": "scaler skips", "underflow_frac": "fp16 underflow"})
    # Empty, not 'nan', where a column does not apply (no optimum, no scaler).
    return tabulate(agg.astype(object).where(agg.notna(), None), headers="keys",
                    showindex=False, floatfmt=".4g", tablefmt="github", missingval="")


def verdict_table(path: Path | str) -> str:
    """parity.csv's verdicts under a title: the end of `ampbench parity` and of the parity
    stage of `ampbench run`."""
    import pandas as pd

    return ("Accuracy parity against fp32 (means over seeds; PASS within tolerance):\n"
            + summarize(pd.read_csv(path)))


# What `parity --time-budget` allows a run of a model none of whose runs has finished yet:
# a short parity run takes seconds (tiny models on a CPU, full-size ones on a GPU).
FIRST_RUN_S = 60.0
BUDGET_EXIT = 3  # stopped by --time-budget, the resume command printed (as `ampbench run`)


def _time_left(budget: str) -> Callable[[], float]:
    """Seconds left of ``budget`` (25m, 540s ...), counted from now."""
    from bench.cli import duration_s

    deadline = time.monotonic() + duration_s(budget)
    return lambda: deadline - time.monotonic()


def _resume_command(args: argparse.Namespace, out: Path) -> str:
    """The same command into the same directory: its finished runs are reused."""
    import shlex

    argv = ["python", "-m", "bench", "parity", "--out", str(out), "--seeds", str(args.seeds),
            "--device", args.device, "--time-budget", args.time_budget]
    for flag, value in (("--models", args.models), ("--precisions", args.precisions),
                        ("--steps", args.steps)):
        if value:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return shlex.join(argv)


def main(args: argparse.Namespace) -> int:
    """`ampbench parity`: exit 0 when every policy passes or is inconclusive, 1 on any FAIL,
    3 when --time-budget stopped it (the resume command printed)."""
    import pandas as pd

    out = Path(args.out) if args.out else Path("results", "runs", "parity-" + datetime.now(
        timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    time_left = _time_left(args.time_budget) if getattr(args, "time_budget", None) else None
    try:
        path = run_parity(out, models=args.models, precisions=args.precisions, steps=args.steps,
                          seeds=args.seeds, device=args.device, time_left=time_left,
                          unknown_s=FIRST_RUN_S)
    except OutOfTime as stop:
        if stop.path is not None:
            print(verdict_table(stop.path))
        print(f"\nampbench parity: --time-budget {args.time_budget} is spent: "
              f"{len(stop.not_run)} run(s) not started; the models whose runs all finished are "
              f"judged\nresume with: {_resume_command(args, out)}", file=sys.stderr)
        return BUDGET_EXIT
    frame = pd.read_csv(path)
    print(verdict_table(path))
    print(f"\nwrote {path}, {path.with_name('parity_curves.csv')} and "
          f"{path.with_name('grad_hist.csv')}")
    return 1 if (frame["verdict"] == "FAIL").any() else 0
