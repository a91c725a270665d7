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

The task (chain, class layout) and the held-out set are fixed; the run seed picks the initial
weights (``torch.manual_seed(seed)`` before ``build()``) and the training data order, so every
policy sees the same data and starts from the same weights as FP32 under the same seed. Training
reuses the benchmark's one step (``bench.cell.Trainer.step``: autocast forward, scaled
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
skipped step, the scale history (``scale`` column of parity_curves.csv), and the fraction of
non-zero FP32 gradient elements that FP16 without loss scaling would flush to zero
(``underflow_frac``: |g| < 2^-24) or keep only as subnormals (``subnormal_frac``:
2^-24 <= |g| < 2^-14), measured with an extra unscaled FP32 backward at a few probe steps
(on a forked RNG, so the probe does not change the training trajectory) and averaged.

The ``broken`` precision (parity only, not a benchmark policy) is a deliberately sabotaged
bf16 run whose optimizer steps use 100x the learning rate — the kind of bug (mis-scaled
updates) parity must catch; it is expected to FAIL.

Files in RUN_DIR: ``parity.csv`` (one row per model, precision and seed) and
``parity_curves.csv`` (model, precision, seed, step, loss, scale: the mean training loss of the
last ``sample_every`` steps, sampled outside any timed window). ``steps_to_target`` is the
first sampled step whose training loss is at or below the FP32 mean final training loss.
The CLI prints a verdict table and exits 1 when any policy FAILs (0 otherwise, 2 on bad input).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import models
from bench import BadInput, config, paths, precision, store

ABS_FLOOR = 0.03  # nats: eval-loss differences below this are never a failure
K_SIGMA = 3.0  # band half-width in FP32 seed-to-seed standard deviations
MAX_BAND_FRACTION = 0.10  # fp32_std above this fraction of the FP32 improvement: INCONCLUSIVE
FP16_MIN_SUBNORMAL = 2.0**-24  # smaller magnitudes flush to zero in FP16
FP16_MIN_NORMAL = 2.0**-14  # smaller magnitudes are FP16 subnormals (fewer mantissa bits)

COLUMNS = (
    "model", "precision", "seed", "steps", "eval_loss", "eval_accuracy", "optimal_loss",
    "steps_to_target", "nonfinite_steps", "scaler_skipped_steps", "underflow_frac",
    "subnormal_frac", "fp32_mean", "fp32_std", "delta", "tolerance", "verdict",
)
EXTRA_COLUMNS = ("scaler_first_skip_step", "scaler_scale_final", "initial_eval_loss",
                 "final_train_loss", "error")
CURVE_COLUMNS = ("model", "precision", "seed", "step", "loss", "scale")
VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")
_WORST_FIRST = ("FAIL", "INCONCLUSIVE", "PASS")
RUNS = "parity_runs.jsonl"  # one finished (model, precision, seed) run per line

BROKEN = "broken"  # parity-only sabotaged policy, see the module docstring
_BROKEN_LR_FACTOR = 100.0

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


# Tiny models: sized so 3 models x 5 policies x 3 seeds run in about 5 minutes on 2 CPU cores.
CPU_SETUPS: dict[str, Setup] = {
    "resnet-tiny": Setup(batch_size=32, size=32, steps=60, lr=3e-3, num_states=6),
    "bert-tiny": Setup(batch_size=16, size=32, steps=120, lr=3e-3, num_states=16, successors=2),
    "gpt2-tiny": Setup(batch_size=16, size=32, steps=120, lr=3e-3),
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


def setup_for(spec: models.ModelSpec, steps: int | None = None) -> Setup:
    """The parity setup of a model: its tuned one, else its family's default."""
    setup = CPU_SETUPS.get(spec.name) or GPU_SETUPS.get(spec.name) or _FAMILY_DEFAULTS[spec.family]
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


def fp16_underflow(grads: Sequence[Any]) -> tuple[float, float]:
    """(underflow_frac, subnormal_frac) of the non-zero elements of FP32 gradients ``grads``.

    underflow: |g| < 2^-24 (flushes to zero in FP16); subnormal: 2^-24 <= |g| < 2^-14.
    Exact zeros are left out: they are zero in every format and lose nothing.
    """
    import torch

    nonzero = under = sub = 0
    for g in grads:
        if g is None:
            continue
        mag = g.detach().float().abs()
        mag = mag[torch.isfinite(mag) & (mag > 0)]
        nonzero += mag.numel()
        under += int((mag < FP16_MIN_SUBNORMAL).sum())
        sub += int(((mag >= FP16_MIN_SUBNORMAL) & (mag < FP16_MIN_NORMAL)).sum())
    if nonzero == 0:
        return 0.0, 0.0
    return under / nonzero, sub / nonzero


def _probe_gradients(trainer: Any, inputs: Any, targets: Any) -> tuple[float, float]:
    """Unscaled FP32 gradients at the current weights, without touching .grad or the RNG."""
    import torch

    params = [p for p in trainer.model.parameters() if p.requires_grad]
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        loss = trainer.spec.loss(trainer.model, inputs, targets)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return fp16_underflow(grads)


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


def train_one(
    model_name: str, policy_name: str, seed: int, setup: Setup, device: Any,
    *, policy: precision.Policy | None = None, lr_factor: float = 1.0,
    eval_set: Sequence[tuple[Any, Any]] | None = None, task: Task | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train one (model, policy, seed); return its parity row (before verdicts) and curve rows."""
    import torch

    from bench.cell import Trainer

    spec = models.get(model_name)
    if policy is None:
        policy, lr_factor = _resolve_policy(policy_name)
    task = task or Task(spec, setup)
    if eval_set is None:
        eval_set = _eval_set(task, device)
    policy.apply_backend_flags()
    torch.manual_seed(seed)
    net = policy.prepare_model(spec.build().to(device))
    optimizer = torch.optim.AdamW(net.parameters(), lr=setup.lr * lr_factor, weight_decay=0.0)
    trainer = Trainer(spec, policy, device, net, optimizer, policy.scaler(device.type), None, None)
    data = torch.Generator().manual_seed(seed)
    initial_eval_loss, _ = _evaluate(trainer, eval_set)

    scaling = trainer.scaler.is_enabled()
    probes = {0, setup.steps // 2, setup.steps - 1}
    underflow: list[tuple[float, float]] = []
    window: list[Any] = []
    curve: list[dict[str, Any]] = []
    nonfinite = skipped = 0
    first_skip: int | None = None
    for step in range(setup.steps):
        inputs, targets = task.batch(data)
        trainer.inputs, trainer.targets = inputs.to(device), targets.to(device)
        if step in probes:
            underflow.append(_probe_gradients(trainer, trainer.inputs, trainer.targets))
        scale_before = trainer.scaler.get_scale() if scaling else None
        window.append(trainer.step())
        if scaling and trainer.scaler.get_scale() < scale_before:  # backoff = inf/NaN found
            skipped += 1
            first_skip = step if first_skip is None else first_skip
        if (step + 1) % setup.sample_every == 0 or step + 1 == setup.steps:
            losses = torch.stack(window).float().cpu()
            nonfinite += int((~torch.isfinite(losses)).sum())
            curve.append({"model": spec.name, "precision": policy_name, "seed": seed,
                          "step": step + 1, "loss": float(losses.mean()),
                          "scale": trainer.scaler.get_scale() if scaling else None})
            window = []
    eval_loss, eval_accuracy = _evaluate(trainer, eval_set)
    if not math.isfinite(eval_loss):
        nonfinite += 1
    row = dict.fromkeys(COLUMNS + EXTRA_COLUMNS)
    row.update(
        model=spec.name, precision=policy_name, seed=seed, steps=setup.steps,
        eval_loss=eval_loss, eval_accuracy=eval_accuracy, optimal_loss=task.optimal_loss,
        nonfinite_steps=nonfinite, scaler_skipped_steps=skipped if scaling else None,
        underflow_frac=sum(u for u, _ in underflow) / len(underflow),
        subnormal_frac=sum(s for _, s in underflow) / len(underflow),
        scaler_first_skip_step=first_skip,
        scaler_scale_final=trainer.scaler.get_scale() if scaling else None,
        initial_eval_loss=initial_eval_loss, final_train_loss=curve[-1]["loss"],
    )
    return row, curve


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
    steps_to_target) a ``curve`` list of (step, loss) pairs; it is returned with those
    columns filled.
    """
    import pandas as pd

    frame = frame.copy()
    if "error" not in frame:
        frame["error"] = None
    for col in ("fp32_mean", "fp32_std", "delta", "tolerance"):
        frame[col] = float("nan")
    frame["verdict"] = None
    frame["steps_to_target"] = pd.Series([None] * len(frame), index=frame.index, dtype=object)
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
        target = float(ref["final_train_loss"].astype(float).mean()) if len(ref) else math.nan
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
                    frame.at[idx, "steps_to_target"] = _steps_to(frame.at[idx, "curve"], target)
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


def _steps_to(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """First sampled step whose training loss is at or below ``target``, else None."""
    if not math.isfinite(target):
        return None
    return next((step for step, loss in curve if loss <= target), None)


# --------------------------------------------------------------------------------------------
# Entry points


def default_models(device: Any) -> list[str]:
    return list(GPU_SETUPS if device.type == "cuda" else CPU_SETUPS)


def _validate(models_: Sequence[str] | None, precisions: Sequence[str] | None,
              steps: int | None, seeds: int) -> tuple[list[str] | None, list[str]]:
    for name in models_ or ():
        try:
            models.get(name)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
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


def _runs(model_names: Sequence[str], precisions: Sequence[str],
          seeds: int) -> Iterator[tuple[str, str, int]]:
    for model in model_names:
        for name in precisions:
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
    from bench.cell import resolve_device

    model_names, chosen = _validate(models, precisions, steps, seeds)
    config.check_limit("steps", steps or 0, "command line")
    config.check_limit("seeds", seeds, "command line")
    dev = resolve_device(device)
    if dev.type == "cuda":
        import torch

        torch.cuda.set_device(dev)  # cuda:N's own stream and context, as a cell does
    model_names = model_names or default_models(dev)
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
    for row, _, wall_s in finished.values():
        if wall_s is not None:
            walls.setdefault(row["model"], []).append(wall_s)
    not_run: list[str] = []
    plan = []
    for model_name, name, seed in _runs(model_names, chosen, seeds):
        policy, lr_factor = _resolve_policy(name)
        reason = policy.unsupported_reason(dev)
        if reason:
            if seed == 0:
                print(f"parity: skipping {model_name} {name}: {reason}", file=sys.stderr)
            continue
        plan.append((model_name, name, seed, policy, lr_factor))
    rows, curves = [], []
    tasks: dict[str, tuple[Setup, Task, list[tuple[Any, Any]]]] = {}
    for i, (model_name, name, seed, policy, lr_factor) in enumerate(plan, 1):
        setup = setup_for(_spec(model_name), steps)  # `models` the argument shadows the package
        key = _run_key(model_name, name, seed, setup, dev)
        progress = f"parity [{i}/{len(plan)}] {model_name} {name} seed {seed}"
        if key in finished:
            row, curve, _ = finished[key]
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
                row, curve = train_one(model_name, name, seed, setup, dev, policy=policy,
                                       lr_factor=lr_factor, eval_set=eval_set, task=task)
                done = (f"eval loss {row['eval_loss']:.4f} acc {row['eval_accuracy']:.3f} "
                        f"({time.perf_counter() - started:.1f} s)")
            except Exception as exc:  # an OOM, a crash: recorded, the other runs go on
                row, curve = _crashed(model_name, name, seed, setup, exc), []
                done = f"crashed ({row['error']})"
            wall_s = round(time.perf_counter() - started, 3)
            if row.get("error") is None:
                walls.setdefault(model_name, []).append(wall_s)
            store.append(run_dir, {"key": key, "row": row, "curve": curve, "wall_s": wall_s},
                         RUNS)
            print(f"{progress}: {done}", file=sys.stderr)
        rows.append({**row, "curve": [(c["step"], c["loss"]) for c in curve]})
        curves.extend(curve)

    if not_run:  # judge only the models whose runs all finished: no band from part of one
        left = {label.split(" ", 1)[0] for label in not_run}
        rows = [r for r in rows if r["model"] not in left]
        curves = [c for c in curves if c["model"] not in left]
        if not rows:
            raise OutOfTime(not_run, None)
    frame = judge(pd.DataFrame(rows, columns=[*COLUMNS, *EXTRA_COLUMNS, "curve"]))
    frame = frame.drop(columns=["curve"])[list(COLUMNS) + list(EXTRA_COLUMNS)]
    for col in ("steps_to_target", "scaler_skipped_steps", "scaler_first_skip_step"):
        frame[col] = frame[col].astype("Int64")  # integers with gaps, not 60.0 / NaN
    path = run_dir / "parity.csv"
    frame.to_csv(path, index=False)
    pd.DataFrame(curves, columns=list(CURVE_COLUMNS)).to_csv(run_dir / "parity_curves.csv",
                                                             index=False)
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


def _load_runs(
    run_dir: Path,
) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]], float | None]]:
    """Finished runs of an earlier parity stage in run_dir, with their wall time when known (a
    crashed run is tried again); a damaged line is a warning and skipped (its run is trained
    again)."""
    runs: dict[str, tuple[dict[str, Any], list[dict[str, Any]], float | None]] = {}
    for entry in store.load_jsonl(run_dir / RUNS, _run_problem):
        if entry["row"].get("error") is None:
            wall_s = entry.get("wall_s")
            known = isinstance(wall_s, int | float) and not isinstance(wall_s, bool)
            runs[entry["key"]] = (entry["row"], entry["curve"], wall_s if known else None)
    return runs


def _run_problem(entry: Any) -> str | None:
    """Why a line of parity_runs.jsonl cannot be reused (None when it can)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
        return "not a parity run (no key)"
    row, curve = entry.get("row"), entry.get("curve")
    if not isinstance(row, dict) or not isinstance(curve, list):
        return "not a parity run (no row or curve)"
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
    return models.get(name)


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


def main(args: argparse.Namespace) -> int:
    """`ampbench parity`: exit 0 when every policy passes or is inconclusive, 1 on any FAIL."""
    import pandas as pd

    out = Path(args.out) if args.out else Path("results", "runs", "parity-" + datetime.now(
        timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    path = run_parity(out, models=args.models, precisions=args.precisions, steps=args.steps,
                      seeds=args.seeds, device=args.device)
    frame = pd.read_csv(path)
    print(verdict_table(path))
    print(f"\nwrote {path} and {path.with_name('parity_curves.csv')}")
    return 1 if (frame["verdict"] == "FAIL").any() else 0
