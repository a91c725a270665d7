"""The reference models and their registry: ``models.get(name)`` -> ModelSpec.

One readable file per family (resnet.py, bert.py, gpt.py, llama.py), each with a config dataclass,
named SIZES, ``build``, ``make_batch``, ``loss`` and analytic ``flops_per_sample``.
A user's module of the same shape is named by reference (``path/to/my_model.py:small``,
``my_pkg.my_model:small``, ``hf:DIR``): models/external.py reads its card without running it.
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
    family: str  # resnet | bert | gpt | llama (the module name); external | hf: a reference
    unit: str  # "image" | "sequence" | "sample"
    # "image_size" | "seq_len": the input-size axis of the matrix; None: a fixed-size input
    size_arg: str | None
    default_size: int | None  # None only without a size axis (make_batch gets None)
    max_size: int | None  # longest sequence the model takes; None for images
    default_batch_size: int
    size: str = ""  # the key of the module's SIZES; the reference models': their name
    source: str | None = None  # a reference's file (absolute), module name or hf: text
    source_sha256: str | None = None  # of the file's bytes (hf: of its config), in every record

    def __post_init__(self) -> None:
        if not self.size:
            object.__setattr__(self, "size", self.name)

    @property
    def module(self) -> ModuleType:
        if self.source is not None:
            from models import external

            return external.load(self)
        return importlib.import_module(f"models.{self.family}")

    @property
    def config(self) -> Any:
        if self.source is not None:
            from models import external

            return external.config(self)
        return self.module.SIZES[self.size]

    def build(self) -> Any:
        """A freshly initialised nn.Module on the current default device."""
        return self.module.build(self.config)

    def make_batch(self, batch_size: int, size: int | None, device: Any = "cpu",
                   seed: int = 0) -> Any:
        """(inputs, targets) for one synthetic micro-batch, seeded, on ``device``; each a
        tensor, or a tuple or dict of them."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        inputs, targets = self.module.make_batch(self.config, batch_size, size, generator)
        return to_device(inputs, device), to_device(targets, device)

    def loss(self, model: Any, inputs: Any, targets: Any) -> Any:
        return self.module.loss(model, inputs, targets)

    @property
    def counts_flops(self) -> bool:
        """Whether the module counts its own FLOPs (``flops_per_sample``): the reference models
        do; a user's module may, else FlopCounterMode counts them (bench/cell/flops.py)."""
        return callable(getattr(self.module, "flops_per_sample", None))

    def flops_per_sample(self, size: int | None) -> int:
        """Analytic training FLOPs (forward + backward) per sample at input size ``size``."""
        return self.module.flops_per_sample(self.config, size)

    def tokens_per_sample(self, size: int | None) -> int | None:
        return size if self.unit == "sequence" and self.size_arg == "seq_len" else None

    def check_size(self, size: int) -> str | None:
        """Why ``size`` is not a valid input size for this model, or None when it is."""
        if self.size_arg is None:
            return None
        if size < 1:
            return f"{self.size_arg} must be at least 1, got {size}"
        if self.max_size is not None and size > self.max_size:
            return (f"{self.size_arg} {size} is longer than {self.name}'s context of "
                    f"{self.max_size} tokens")
        if self.source is None and self.unit == "image" and size < 32:
            return f"image_size must be at least 32 for {self.name}, got {size}"
        return None


def to_device(batch: Any, device: Any) -> Any:
    """``batch`` (a tensor, or a tuple, list or dict of them) on ``device``."""
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(value, device) for value in batch)
    return batch.to(device)


# Card fields are here (torch-free); tests check they agree with each family's SIZES.
_SPECS = (
    ModelSpec("resnet50", "resnet", "image", "image_size", 224, None, 64),
    ModelSpec("resnet18", "resnet", "image", "image_size", 224, None, 64),
    ModelSpec("resnet-tiny", "resnet", "image", "image_size", 32, None, 16),
    ModelSpec("bert-base", "bert", "sequence", "seq_len", 128, 512, 32),
    ModelSpec("bert-tiny", "bert", "sequence", "seq_len", 32, 128, 16),
    ModelSpec("gpt2-small", "gpt", "sequence", "seq_len", 1024, 1024, 8),
    ModelSpec("gpt2-tiny", "gpt", "sequence", "seq_len", 64, 128, 16),
    ModelSpec("llama-small", "llama", "sequence", "seq_len", 1024, 2048, 8),
    ModelSpec("llama-1b", "llama", "sequence", "seq_len", 2048, 131072, 4),
    ModelSpec("llama-tiny", "llama", "sequence", "seq_len", 64, 128, 16),
)
REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}
NAMES: tuple[str, ...] = tuple(REGISTRY)


class UnknownModel(ValueError):
    pass


def get(name: str) -> ModelSpec:
    """The spec of model ``name``: a registry name, or a reference to a user's module
    (``PATH.py:SIZE``, ``package.module:SIZE``, ``hf:DIR``; models/external.py reads it
    without running it). An unknown name raises UnknownModel listing the valid ones, a bad
    reference one line naming the file and the problem."""
    if name in REGISTRY:
        return REGISTRY[name]
    from models import external

    if external.is_reference(name):
        return external.parse(name)
    raise UnknownModel(f"unknown model '{name}'; valid: {', '.join(NAMES)}, or a module of "
                       "your own: PATH.py:SIZE, package.module:SIZE, hf:DIR")


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
