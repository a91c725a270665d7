"""The reference models and their registry: ``models.get(name)`` -> ModelSpec.

One readable file per family (resnet.py, bert.py, gpt.py), each with a config dataclass,
named SIZES, ``build``, ``make_batch``, ``loss`` and analytic ``flops_per_sample``.
This module imports no torch: the registry can validate names on a machine without it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """A named model: what it is (card fields) and how to build, feed and count it."""

    name: str
    family: str  # resnet | bert | gpt; also the module name
    unit: str  # "image" | "sequence"
    size_arg: str  # "image_size" | "seq_len": the input-size axis of the matrix
    default_size: int
    max_size: int | None  # longest sequence the model takes; None for images
    default_batch_size: int

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"models.{self.family}")

    @property
    def config(self) -> Any:
        return self.module.SIZES[self.name]

    def build(self) -> Any:
        """A freshly initialised nn.Module on the current default device."""
        return self.module.build(self.config)

    def make_batch(self, batch_size: int, size: int, device: Any = "cpu", seed: int = 0) -> Any:
        """(inputs, targets) for one synthetic micro-batch, seeded, on ``device``."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        inputs, targets = self.module.make_batch(self.config, batch_size, size, generator)
        return inputs.to(device), targets.to(device)

    def loss(self, model: Any, inputs: Any, targets: Any) -> Any:
        return self.module.loss(model, inputs, targets)

    def flops_per_sample(self, size: int) -> int:
        """Analytic training FLOPs (forward + backward) per sample at input size ``size``."""
        return self.module.flops_per_sample(self.config, size)

    def tokens_per_sample(self, size: int) -> int | None:
        return size if self.unit == "sequence" else None

    def check_size(self, size: int) -> str | None:
        """Why ``size`` is not a valid input size for this model, or None when it is."""
        if size < 1:
            return f"{self.size_arg} must be at least 1, got {size}"
        if self.max_size is not None and size > self.max_size:
            return (f"{self.size_arg} {size} is longer than {self.name}'s context of "
                    f"{self.max_size} tokens")
        if self.unit == "image" and size < 32:
            return f"image_size must be at least 32 for {self.name}, got {size}"
        return None


# Card fields are here (torch-free); tests check they agree with each family's SIZES.
_SPECS = (
    ModelSpec("resnet50", "resnet", "image", "image_size", 224, None, 64),
    ModelSpec("resnet18", "resnet", "image", "image_size", 224, None, 64),
    ModelSpec("resnet-tiny", "resnet", "image", "image_size", 32, None, 16),
    ModelSpec("bert-base", "bert", "sequence", "seq_len", 128, 512, 32),
    ModelSpec("bert-tiny", "bert", "sequence", "seq_len", 32, 128, 16),
    ModelSpec("gpt2-small", "gpt", "sequence", "seq_len", 1024, 1024, 8),
    ModelSpec("gpt2-tiny", "gpt", "sequence", "seq_len", 64, 128, 16),
)
REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}
NAMES: tuple[str, ...] = tuple(REGISTRY)


class UnknownModel(ValueError):
    pass


def get(name: str) -> ModelSpec:
    """The spec of model ``name``; an unknown name raises UnknownModel listing the valid ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModel(f"unknown model '{name}'; valid: {', '.join(NAMES)}") from None


def describe() -> list[dict[str, Any]]:
    """One row per model: name, family, parameters, FLOPs per sample, unit, default sizes."""
    import torch

    rows = []
    for spec in _SPECS:
        with torch.device("meta"):
            num_params = sum(p.numel() for p in spec.build().parameters())
        rows.append({
            "model": spec.name,
            "family": spec.family,
            "parameters": num_params,
            "GFLOPs/sample (train)": spec.flops_per_sample(spec.default_size) / 1e9,
            "unit": spec.unit,
            "default batch": spec.default_batch_size,
            "default size": f"{spec.size_arg}={spec.default_size}",
        })
    return rows


def main(args: Any = None) -> int:
    """`ampbench models`: the table of reference models."""
    from tabulate import tabulate

    print(tabulate(describe(), headers="keys", intfmt=",", floatfmt=".3f", tablefmt="github"))
    return 0
