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
- gpt and llama: next-token prediction on the same kind of chain; its entropy rate (nats) is
  known exactly and written as ``optimal_loss``, the floor no model can beat.
- gpt2-tiny-underflow (a parity-only task name): gpt2-tiny on the gpt task, its loss taken as
  one micro-batch's share of a 2^19-token optimizer step (nanoGPT's GPT-2 recipe: 524,288
  tokens per step, the loss of each micro-batch divided by the step's token count), with
  AdamW's eps scaled by the same share. AdamW's update is invariant to that scale, so FP32 and
  BF16 train exactly as on the plain mean; FP16 is not: the gradients sit about 2^10 lower in
  its range, most of them below its normal floor and many below its smallest subnormal, where
  they flush to zero. It is the task where FP16 without loss scaling fails, for the reason it
  fails in large-batch language-model training.
- gpt2-tiny-lowlr (a parity-only task name): gpt2-tiny on the gpt task at a small learning
  rate (3e-5, 200 steps, batch 8), judging the policies that hold their weights in bf16
  (bf16-pure, bf16-pure-sr, bf16-pure-kahan) beside fp32 and bf16 autocast. AdamW's updates,
  about the learning rate, fall below half a bf16 spacing of most weights (2^-9 |w| and less):
  rounded to nearest they are lost and bf16-pure stalls (FAIL), while stochastic rounding and
  Kahan summation keep them (PASS). Its curves carry ``lost_frac`` (bench/parity/updates.py).
  Run only when named (``--models gpt2-tiny-lowlr``) or when a run measures a bf16-pure
  policy, not by the cpu preset.

Real data (bench/parity/data.py), each a task of its own name: Tiny Shakespeare at the
character level, shipped and sha256-checked (``gpt2-tiny-shakespeare``,
``llama-tiny-shakespeare``, ``gpt2-small-shakespeare``: eval loss in nats per character on the
last 10%, and the text each policy's seed 0 writes at the end), and with ``--data-dir`` the
user's CIFAR-10 binary files (``resnet-tiny-cifar10``) and nanoGPT token files
(``gpt2-tiny-tokens``, ``llama-tiny-tokens``), checked by size before anything trains.

On several ranks (``--strategy fsdp2:bf16/fp32 --ranks 2``, a matrix's ``parity_strategy``;
bench/parity/sharing.py): every policy, FP32 too, trains on torchrun's ranks sharing the model
(FSDP2 shards under the strategy's MixedPrecisionPolicy, or DDP), each rank its slice of every
batch, so the ranks train the one-process batch; rows read ``bf16@fsdp2:bf16/fp32`` (columns
``strategy`` and ``ranks``) and are judged against FP32 in one process. No gradient probes
there (an extra backward would reduce gradients between the ranks).

The task (chain, class layout) and the held-out set are fixed; the run seed picks the initial
weights (``torch.manual_seed(seed)`` before ``build()``) and the training data order, so every
policy sees the same data and starts from the same weights as FP32 under the same seed. Training
reuses the benchmark's one step (``bench.cell.train.Trainer.step``: autocast forward, scaled
backward, scaler step and update); only the resident batch is swapped before each step.

Verdict per (model, policy), on the mean final eval loss over seeds (bench/parity/verdict.py):

- ``delta = mean(policy) - mean(fp32)``;
  ``tolerance = max(ABS_FLOOR, K_SIGMA * fp32_std)`` (sample std over the FP32 seeds);
- FAIL when any seed saw a non-finite training or eval loss, or ``|delta| > tolerance``;
- INCONCLUSIVE when the FP32 band is too wide to judge: ``fp32_std > MAX_BAND_FRACTION *
  (initial eval loss - fp32_mean)`` (or FP32 did not improve at all), or when a run crashed
  (an OOM, say: its ``error`` column says why) so that a policy, or FP32's band, lacks seeds;
- PASS otherwise. FP32's own rows are judged by the same rule (delta 0), so they read PASS
  unless FP32 itself was non-finite (FAIL) or too noisy (INCONCLUSIVE).

Training runs in child processes, as the benchmark's cells do: this process (the stage,
torch-free) asks one child what the runs are on the device, then starts one child per (model,
policy), ``python -m bench.parity.train``, which trains that pair's seeds and writes one JSON
result per seed to a path the stage gives it. Each child runs in a session of its own under
a timeout (``timeout_s`` per run, 600 s unless said: the run's matrix passes its own), and
its whole process tree is killed when the timeout passes. A run that fails is a row, never a
lost stage: an exception while training (an OOM, say) is written by the child itself
(``error`` "oom: ..." or the exception's line) and its next seed goes on; a child that dies
(``killed by signal SIGKILL``, ``exit code 1: ...``) or hangs (``timeout after 1800 s``)
leaves rows with that error for the seeds it had not finished, and the other children go on.
Each run is appended to ``parity_runs.jsonl`` in RUN_DIR (flushed and fsynced) as its child
ends; running parity again into the same directory reuses the finished runs there (same
model, precision, seed, setup and device) and trains the failed and missing ones again, so
an interrupted parity stage resumes where it stopped.

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
``parity_curves.csv`` (model, precision, seed, step, loss, scale, skipped, time_s, lost_frac:
the mean training loss of the last ``sample_every`` steps, the scaler's scale, the
scaler-skipped steps among them, the training time so far, and the share of the last step's
non-zero updates that left their weight unchanged) and ``grad_hist.csv`` (model, kind, step,
log2_bin, count, zeros; kind ``activation`` or ``weight``; bin b counts the non-zero elements with
2^b <= |g| < 2^(b+1), ``zeros`` the exact zeros of that model, kind and step).
The CLI prints a verdict table and exits 1 when any policy FAILs (0 otherwise, 2 on bad input).

``parity_samples.csv`` (model, precision, seed, prompt, text: the generated text of the real
text tasks) and ``parity_data.json`` (the real-data files read, with sizes) when real data ran.

The package, by job: ``tasks.py`` (the tasks, their data and setups, which policies each
judges), ``sharing.py`` (which runs train on several ranks, checked; torch-free), ``data.py``
(real data: Tiny Shakespeare, --data-dir's files), ``probes.py`` (gradient histograms, FP16
underflow), ``train.py`` (the child: trains one (model, policy)'s seeds, or plans),
``verdict.py`` (parity.csv's columns and verdicts, torch-free), ``convergence.py``
(MLPerf-style steps and seconds to the target over seeds, and the test of "slower than fp32";
torch-free) and ``stage.py`` (the parent: plans, reuses, launches, writes). This module
re-exports their entry points and holds the `ampbench parity` command; like the stage, it
imports no torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from bench.parity.sharing import Sharing
from bench.parity.stage import DEFAULT_TIMEOUT_S, RUNS, OutOfTime, run_parity
from bench.parity.tasks import (
    BROKEN,
    CPU_SETUPS,
    GPU_SETUPS,
    LOWLR,
    NANOGPT_STEP_TOKENS,
    UNDERFLOW,
    Setup,
    default_models,
    setup_for,
    task_policies,
    tasks_for,
)
from bench.parity.verdict import (
    ABS_FLOOR,
    COLUMNS,
    CURVE_COLUMNS,
    EXTRA_COLUMNS,
    HIST_COLUMNS,
    K_SIGMA,
    MAX_BAND_FRACTION,
    VERDICTS,
    judge,
    summarize,
    target_loss,
    verdict_table,
    worst_verdict,
)

__all__ = [
    "ABS_FLOOR",
    "BROKEN",
    "COLUMNS",
    "CPU_SETUPS",
    "CURVE_COLUMNS",
    "DEFAULT_TIMEOUT_S",
    "EXTRA_COLUMNS",
    "GPU_SETUPS",
    "HIST_COLUMNS",
    "K_SIGMA",
    "LOWLR",
    "MAX_BAND_FRACTION",
    "NANOGPT_STEP_TOKENS",
    "RUNS",
    "UNDERFLOW",
    "VERDICTS",
    "OutOfTime",
    "Setup",
    "Sharing",
    "default_models",
    "judge",
    "main",
    "run_parity",
    "setup_for",
    "summarize",
    "target_loss",
    "task_policies",
    "tasks_for",
    "verdict_table",
    "worst_verdict",
]

# What `parity --time-budget` allows a run of a model none of whose runs has finished yet:
# a short parity run takes seconds (tiny models on a CPU, full-size ones on a GPU).
FIRST_RUN_S = 60.0
BUDGET_EXIT = 3  # stopped by --time-budget, the resume command printed (as `ampbench run`)


def _time_left(budget: str) -> Callable[[], float]:
    """Seconds left of ``budget`` (25m, 540s ...), counted from now."""
    from bench.cli_types import duration_s

    deadline = time.monotonic() + duration_s(budget)
    return lambda: deadline - time.monotonic()


def _resume_command(args: argparse.Namespace, out: Path) -> str:
    """The same command into the same directory: its finished runs are reused."""
    import shlex

    argv = ["python", "-m", "bench", "parity", "--out", str(out), "--seeds", str(args.seeds),
            "--device", args.device, "--time-budget", args.time_budget]
    for flag, value in (("--models", args.models), ("--precisions", args.precisions),
                        ("--steps", args.steps),
                        ("--data-dir", getattr(args, "data_dir", None)),
                        ("--strategy", getattr(args, "strategy", None))):
        if value:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    if getattr(args, "strategy", None):
        argv += ["--ranks", str(args.ranks)]
    return shlex.join(argv)


def main(args: argparse.Namespace) -> int:
    """`ampbench parity`: exit 0 when every policy passes or is inconclusive, 1 on any FAIL,
    3 when --time-budget stopped it (the resume command printed)."""
    import pandas as pd

    out = Path(args.out) if args.out else Path("results", "runs", "parity-" + datetime.now(
        timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    time_left = _time_left(args.time_budget) if getattr(args, "time_budget", None) else None
    sharing = Sharing.parse(args.strategy, args.ranks) if getattr(args, "strategy", None) \
        else None
    try:
        path = run_parity(out, models=args.models, precisions=args.precisions, steps=args.steps,
                          seeds=args.seeds, device=args.device, time_left=time_left,
                          unknown_s=FIRST_RUN_S, data_dir=getattr(args, "data_dir", None),
                          sharing=sharing)
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
