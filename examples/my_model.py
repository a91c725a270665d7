"""A model of your own, benchmarked like the reference models: a small MLP classifier.

    ampbench run --models examples/my_model.py:tiny --precisions fp32,bf16 --device cpu
    ampbench parity --models examples/my_model.py:tiny --precisions fp32,bf16 --device cpu

ampbench reads SIZES and the upper-case settings below without running this file (the runner
imports no torch and runs no user code), then checks the module in a child process: build,
make_batch, loss and a backward, before any cell starts. docs/your-model.md is the contract.
The task is learnable, so accuracy parity has something to judge: each sample's class is the
argmax of a fixed random linear map ("the teacher") of its features.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

UNIT = "sample"  # "sequence" | "image" | "sample" (a fixed-size input: no size axis)
DEFAULT_BATCH_SIZE = 32
PARITY_LR = 3e-3  # accuracy parity's learning rate (default 1e-3)
# No flops_per_sample: ampbench counts the FLOPs of a training step with FlopCounterMode.


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 32
    hidden: int = 64  # multiples of 16: the FP8 policies convert these Linear layers
    num_layers: int = 2
    num_classes: int = 8


SIZES = {
    "tiny": MLPConfig(),
    "small": MLPConfig(in_features=256, hidden=1024, num_layers=4, num_classes=16),
}


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        widths = [cfg.in_features] + [cfg.hidden] * cfg.num_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))  # (B, hidden)
        return self.head(self.norm(x))  # (B, num_classes)


def build(config: MLPConfig) -> MLP:
    return MLP(config)


def make_batch(config: MLPConfig, batch_size: int, size: int | None,
               generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Features (B, in_features) from ``generator`` and their classes (B,) by the fixed
    teacher. ``size`` is None: a "sample" model has no size axis. CPU tensors."""
    teacher = torch.randn(config.in_features, config.num_classes,
                          generator=torch.Generator().manual_seed(0))
    features = torch.randn(batch_size, config.in_features, generator=generator)
    return features, (features @ teacher).argmax(dim=1)


def loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(model(inputs), targets)
