"""Parity's learnable tasks: what each model trains on, for how long, and under which policies.

The task (Markov chain, class layout) and the held-out set are fixed by their own seeds; the
run seed picks the initial weights and the training data order (bench/parity/train.py). The
names, setups and policy lists are torch-free (the parent side plans with them); torch is
imported only inside the functions that make data, which run in a parity child.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import models
from bench import precision
from bench.parity import data

BROKEN = "broken"  # parity-only sabotaged policy: bf16 whose optimizer steps use 100x the lr
_BROKEN_LR_FACTOR = 100.0

# Parity-only tasks: a name of their own and the reference model they train.
UNDERFLOW = "gpt2-tiny-underflow"
LOWLR = "gpt2-tiny-lowlr"  # bf16 weights: updates below half a bf16 spacing (setup below)
TASK_MODELS = {UNDERFLOW: "gpt2-tiny", LOWLR: "gpt2-tiny",
               **data.TASK_MODELS}  # real data: bench/parity/data.py
# What the low-lr task judges, whatever was asked: the pure-bf16 policies against FP32 and
# bf16 autocast (FP32 masters, the same update in FP32).
LOWLR_POLICIES = ("fp32", "bf16", *precision.PURE_BF16)
# Families that predict the next token (the chain's own task); bert predicts masked ones.
CAUSAL = ("gpt", "llama")
NANOGPT_STEP_TOKENS = 2**19  # nanoGPT's GPT-2 (124M) recipe: 524,288 tokens per optimizer step

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


# Tiny models: sized so the cpu preset's parity (4 models x 3 policies x 3 seeds, and the
# underflow task's 4 x 3) runs in about 5 minutes on 2 CPU cores.
CPU_SETUPS: dict[str, Setup] = {
    "resnet-tiny": Setup(batch_size=32, size=32, steps=60, lr=3e-3, num_states=6),
    "bert-tiny": Setup(batch_size=16, size=32, steps=120, lr=3e-3, num_states=16, successors=2),
    "gpt2-tiny": Setup(batch_size=16, size=32, steps=120, lr=3e-3),
    "llama-tiny": Setup(batch_size=16, size=32, steps=120, lr=3e-3),  # gpt2-tiny's
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
    "llama-small": Setup(batch_size=16, size=256, steps=600, lr=3e-4, num_states=1024,
                         successors=4, sample_every=20, eval_batches=8),
    # Tiny Shakespeare at the character level (bench/parity/data.py), more steps than on CPU.
    "gpt2-small-shakespeare": Setup(batch_size=16, size=256, steps=600, lr=3e-4,
                                    sample_every=20, eval_batches=8),
}
# Tuned setups of models no default list trains: parity runs them when named (--models).
NAMED_SETUPS: dict[str, Setup] = {
    # bf16 weights at a small lr (docs/parity.md): bf16-pure +0.37 nats (FAIL), -sr and -kahan
    # within 0.002 (PASS); 5 policies x 3 seeds took 8.8 min on 2 shared cores (2026-12-07).
    LOWLR: Setup(batch_size=8, size=32, steps=200, lr=3e-5, sample_every=10),
    # Real data (bench/parity/data.py); num_states is set to the data's vocabulary or classes.
    "gpt2-tiny-shakespeare": Setup(batch_size=32, size=64, steps=200, lr=3e-3,
                                   sample_every=20),
    "llama-tiny-shakespeare": Setup(batch_size=32, size=64, steps=200, lr=3e-3,
                                    sample_every=20),
    "resnet-tiny-cifar10": Setup(batch_size=64, size=32, steps=200, lr=3e-3, sample_every=20),
    "gpt2-tiny-tokens": Setup(batch_size=32, size=64, steps=300, lr=3e-3, sample_every=20),
    "llama-tiny-tokens": Setup(batch_size=32, size=64, steps=300, lr=3e-3, sample_every=20),
}
_FAMILY_DEFAULTS = {
    "resnet": Setup(batch_size=32, size=32, steps=300, lr=1e-3, num_states=10),
    "bert": Setup(batch_size=32, size=64, steps=300, lr=3e-4),
    "gpt": Setup(batch_size=16, size=64, steps=300, lr=3e-4),
    "llama": Setup(batch_size=16, size=64, steps=300, lr=3e-4),
}


# A model of the user's own (models/external.py) trains on its own make_batch's data: a seeded
# stream for training, batches of other fixed seeds held out; CPU-sized like the tiny models'.
EXTERNAL_STEPS = 100
EXTERNAL_LR = 1e-3  # unless the module says PARITY_LR


def _external_setup(spec: models.ModelSpec) -> Setup:
    """A user's model's setup: its card's default batch and size, its PARITY_LR if it has one."""
    lr = getattr(spec.module, "PARITY_LR", EXTERNAL_LR)
    return Setup(batch_size=spec.default_batch_size, size=spec.default_size or 0,
                 steps=EXTERNAL_STEPS, lr=float(lr))


def spec_for(name: str, setup: Setup | None = None) -> models.ModelSpec:
    """The model a parity model or task name trains; with its ``setup``, a real-data task's
    model has the data's vocabulary or classes (``num_states``)."""
    spec = models.get(TASK_MODELS.get(name, name))
    return data.resized(spec, setup.num_states) if setup and name in data.TASK_MODELS else spec


def setup_for(name: str, steps: int | None = None,
              data_dir: data.DataDir | None = None) -> Setup:
    """The parity setup of a model or task: its tuned one, else its family's default.

    Reads the model's vocabulary or classes, so it imports the model's module (torch): the
    parent asks a child for setups (bench/parity/train.py's plan).
    """
    spec = spec_for(name)
    if spec.source is not None:
        setup = _external_setup(spec)
        return replace(setup, steps=steps) if steps else setup
    setup = (CPU_SETUPS.get(name) or GPU_SETUPS.get(name) or NAMED_SETUPS.get(name)
             or _FAMILY_DEFAULTS[spec.family])
    if spec.family != "resnet":
        setup = replace(setup, num_states=min(setup.num_states, spec.config.vocab_size - 1),
                        size=min(setup.size, spec.max_size or setup.size))
    else:
        setup = replace(setup, num_states=min(setup.num_states, spec.config.num_classes))
    if name in data.TASK_MODELS:  # the data's own vocabulary or classes (data_dir: read here)
        setup = replace(setup, num_states=data.classes(name, data_dir))
    return replace(setup, steps=steps) if steps else setup


def resolve_policy(name: str) -> tuple[precision.Policy, float]:
    """(policy, lr factor) for a parity precision name; ``broken`` is the sabotaged bf16."""
    if name == BROKEN:
        return replace(precision.get("bf16"), name=BROKEN,
                       role="sabotaged: bf16 with 100x learning rate"), _BROKEN_LR_FACTOR
    return precision.get(name), 1.0


STRATEGY_MARK = "@"  # bf16@fsdp2:bf16/fp32: a policy trained under a strategy (parity.csv)


def run_label(policy: str, strategy: str | None) -> str:
    """parity.csv's ``precision`` for ``policy`` trained under ``strategy`` (a canonical
    bench/strategy.py name): the policy's own name in one process, ``policy@strategy`` on
    several ranks, judged against FP32 in one process like any other row."""
    return f"{policy}{STRATEGY_MARK}{strategy}" if strategy else policy


def split_label(label: str) -> tuple[str, str | None]:
    """(policy, strategy or None) of a ``run_label``."""
    policy, mark, strategy = label.partition(STRATEGY_MARK)
    return policy, (strategy if mark else None)


def default_models(device_type: str) -> list[str]:
    """The full-size models on CUDA, the tiny ones on CPU; the underflow task on both."""
    return [*GPU_SETUPS, UNDERFLOW] if device_type == "cuda" else list(CPU_SETUPS)


def tasks_for(precisions: Iterable[str]) -> list[str]:
    """The parity-only tasks a run adds to its models: the underflow task whenever it measures
    an FP16 policy, whose loss scaling that task puts to the test (with the fp16-noscale
    ablation beside it, see task_policies); the low-lr task whenever it measures a pure-bf16
    policy, whose update rounding that task puts to the test."""
    asked = set(precisions)
    return ([UNDERFLOW] if {"fp16", "fp16-noscale"} & asked else []) + (
        [LOWLR] if set(precision.PURE_BF16) & asked else [])


def task_policies(model: str, precisions: Sequence[str]) -> list[str]:
    """The policies parity trains on ``model``: ``precisions``, except that the underflow task
    always judges the fp16-noscale ablation (the question it exists for, asked or not) and
    leaves tf32 out (TF32 does not touch FP16's range: on that task it is fp32's twin); the
    low-lr task judges LOWLR_POLICIES."""
    if model == LOWLR:
        return list(LOWLR_POLICIES)
    if model != UNDERFLOW:
        return list(precisions)
    names = {n for n in precisions if n != "tf32"} | {"fp16-noscale"}
    return [n for n in (*precision.NAMES, BROKEN) if n in names]


# --------------------------------------------------------------------------------------------
# Data (torch, in the child)


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
                      if spec.family in ("bert", *CAUSAL) else None)

    @property
    def optimal_loss(self) -> float | None:
        return self.chain.entropy_rate if self.spec.family in CAUSAL and self.chain else None

    def batch(self, generator: Any) -> tuple[Any, Any]:
        family, setup = self.spec.family, self.setup
        if self.spec.source is not None:  # a user's model: its own make_batch's data
            size = setup.size if self.spec.size_arg else self.spec.default_size
            return self.spec.module.make_batch(self.spec.config, setup.batch_size, size,
                                               generator)
        if family == "resnet":
            return gratings(setup.batch_size, setup.size, setup.num_states, generator)
        assert self.chain is not None
        if family in CAUSAL:
            states = self.chain.sample(setup.batch_size, setup.size + 1, generator)
            return states[:, :-1].contiguous(), states[:, 1:].contiguous()
        return _mask(self.chain.sample(setup.batch_size, setup.size, generator) + 1,
                     self.spec.config.mask_prob, generator)


def gratings(batch_size: int, size: int, num_classes: int, generator: Any) -> tuple[Any, Any]:
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


def eval_set(task: Task, device: Any) -> list[tuple[Any, Any]]:
    """The task's fixed held-out batches, on ``device``: the same for every seed and policy."""
    import torch

    if hasattr(task, "held_out"):  # real data: its validation split (bench/parity/data.py)
        return task.held_out(device)
    generator = torch.Generator().manual_seed(_EVAL_SEED)
    return [tuple(models.to_device(t, device) for t in task.batch(generator))  # type: ignore[misc]
            for _ in range(task.setup.eval_batches)]
