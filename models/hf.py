"""Hugging Face models from their config.json, offline: ``--models hf:DIR[:KEY=VALUE...]``.

DIR is a directory holding a config.json, or a hub name (``org/name``) whose config.json is in
the local Hugging Face cache (put it there with ``hf download org/name config.json``). The model
is transformers' ``AutoModelFor<task>.from_config``: random weights, nothing downloaded, the task
picked from the config's ``architectures`` (causal LM, masked LM, image classification).
``:KEY=VALUE`` overrides a field of config.json, typed by the JSON value it replaces, e.g.
``hf:path/to/llama:num_hidden_layers=2`` for a CPU try.

``parse``, ``card`` and ``config`` import neither torch nor transformers (the parent side
validates names with them); ``build``, ``make_batch`` and ``loss`` run in the child.
transformers is the optional extra ``hf``. There is no ``flops_per_sample``: FLOPs of these
models are counted by torch's FlopCounterMode.

Sizes: a sequence model takes ``seq_len`` up to its ``max_position_embeddings``; an image model
takes square images of side ``image_size``. A ViT is built for its config's ``image_size``;
``loss`` passes ``interpolate_pos_encoding=True`` at any other side (where the model's forward
takes it), so the position embeddings are interpolated to the new grid of patches.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HF_PREFIX = "hf:"
MISSING_TRANSFORMERS = "transformers is not installed: pip install -e '.[hf]'"

# Architecture class-name endings -> task. "WithLMHeadModel" is T5's old encoder-decoder name.
_TASK_SUFFIXES = (("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"),
                  ("ForMaskedLM", "masked-lm"), ("ForImageClassification", "image-classification"))
_AUTO_CLASS = {"causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM",
               "image-classification": "AutoModelForImageClassification"}
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?\Z")
_KINDS = {int: "an integer", float: "a number", list: "a JSON list", dict: "a JSON object"}
_MASK_FRACTION = 0.15  # BERT's share of masked positions
_SUCCESSOR_STEPS = (1, 7, 31, 127)  # a token's possible successors: itself plus one of these
_PATTERN_SEED = 1234  # the class patterns of synthetic images, the same in every batch
DEFAULT_BATCH_SIZE = 8
_DEFAULT_SEQ_LEN = 128
_DEFAULT_IMAGE_SIZE = 224  # transformers' default where a config names no image_size


@dataclass(frozen=True)
class Reference:
    """A parsed ``hf:DIR[:KEY=VALUE...]``."""

    source: str  # the directory (or hub name) as given
    overrides: tuple[tuple[str, str], ...] = ()  # in the order given, values as text

    @property
    def name(self) -> str:
        return HF_PREFIX + self.source + "".join(f":{k}={v}" for k, v in self.overrides)


@dataclass(frozen=True)
class Config:
    """What build and make_batch need: the reference and its card."""

    ref: Reference
    card: dict[str, Any]


def parse(text: str) -> Reference:
    """``hf:DIR[:KEY=VALUE...]`` -> Reference; ValueError with one line on bad syntax."""
    if not text.startswith(HF_PREFIX):
        raise ValueError(f"{text!r} is not a Hugging Face reference: it must start with "
                         f"{HF_PREFIX!r} (hf:DIR[:KEY=VALUE...])")
    source, *parts = text[len(HF_PREFIX):].split(":")
    if not source:
        raise ValueError(f"{text!r} names no directory or hub name after {HF_PREFIX!r}")
    overrides = []
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not _KEY.match(key):
            raise ValueError(f"{text!r}: override {part!r} is not KEY=VALUE "
                             "(a config.json field name, '=', a value)")
        if key in dict(overrides):
            raise ValueError(f"{text!r}: override {key!r} is given twice")
        overrides.append((key, value))
    return Reference(source, tuple(overrides))


def _hub_cache() -> Path:
    """huggingface_hub's cache directory, from the same variables it reads."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")).expanduser() / "hub"


def _config_path(source: str) -> Path:
    """The config.json of a directory, or of a hub name's cached snapshot (never downloads)."""
    directory = Path(source).expanduser()
    if directory.is_dir():
        path = directory / "config.json"
        if not path.is_file():
            raise ValueError(f"hf:{source}: {path} does not exist (the directory holds no "
                             "config.json)")
        return path
    if directory.exists():
        raise ValueError(f"hf:{source}: {source} is not a directory")
    if not _HUB_NAME.match(source):
        raise ValueError(f"hf:{source}: no such directory {source}")
    cache = _hub_cache()
    repo = cache / ("models--" + source.replace("/", "--"))
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except OSError:
        commit = ""
    path = repo / "snapshots" / commit / "config.json"
    if not commit or not path.is_file():
        raise ValueError(f"hf:{source}: neither a directory nor a hub model cached in {cache} "
                         f"(cache its config with `hf download {source} config.json`)")
    return path


def _typed(ref: Reference, key: str, text: str, current: Any) -> Any:
    """An override's text as the JSON type of the value it replaces."""
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        value = json.loads(text)  # null, a list or an object in config.json
        if current is not None and not isinstance(value, type(current)):
            raise ValueError(text)
        return value
    except ValueError:
        if current is None:
            return text  # a null field set to a bare word
        kind = "true or false" if isinstance(current, bool) else _KINDS[type(current)]
        raise ValueError(f"{ref.name}: override {key}={text!r} is not {kind} like its value "
                         f"{json.dumps(current)} in config.json") from None


def _settings(ref: Reference) -> tuple[Path, str, dict[str, Any]]:
    """config.json's path, its text, and its fields with the overrides applied."""
    path = _config_path(ref.source)
    try:
        text = path.read_text()
        settings = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{ref.name}: cannot read {path}: {exc}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{ref.name}: {path} holds no JSON object")
    for key, value in ref.overrides:
        if key not in settings:
            raise ValueError(f"{ref.name}: unknown override {key!r}: {path} has no field {key!r}")
        settings[key] = _typed(ref, key, value, settings[key])
    layer_types = settings.get("layer_types")
    overridden = dict(ref.overrides)
    if isinstance(layer_types, list) and layer_types and "num_hidden_layers" in overridden \
            and "layer_types" not in overridden:
        # transformers checks len(layer_types) == num_hidden_layers: keep the pattern, cut/cycled
        num_layers = int(settings["num_hidden_layers"])
        settings["layer_types"] = [layer_types[i % len(layer_types)] for i in range(num_layers)]
    return path, text, settings


def _task(ref: Reference, path: Path, settings: dict[str, Any]) -> tuple[str, str]:
    """(architecture, task) from the config's ``architectures``."""
    architectures = settings.get("architectures")
    if not isinstance(architectures, list) or not architectures \
            or not isinstance(architectures[0], str):
        raise ValueError(f"{ref.name}: {path} has no `architectures` list naming the model class")
    architecture = architectures[0]
    for suffix, task in _TASK_SUFFIXES:
        if architecture.endswith(suffix) and not architecture.endswith("WithLMHeadModel"):
            return architecture, task
    raise ValueError(f"{ref.name}: {path} names architecture {architecture}, which is not a "
                     "causal LM, masked LM or image classifier (the tasks hf: models support)")


def card(ref: Reference) -> dict[str, Any]:
    """The model's card fields, from config.json alone (no torch, no transformers)."""
    path, text, settings = _settings(ref)
    architecture, task = _task(ref, path, settings)
    if task == "image-classification":
        side = settings.get("image_size", _DEFAULT_IMAGE_SIZE)
        default_size = int(side[0] if isinstance(side, list) else side)
        unit, size_arg, max_size = "image", "image_size", None
    else:
        context = settings.get("max_position_embeddings", settings.get("n_positions"))
        max_size = int(context) if isinstance(context, int) and context > 0 else None
        default_size = min(_DEFAULT_SEQ_LEN, max_size or _DEFAULT_SEQ_LEN)
        unit, size_arg = "sequence", "seq_len"
    typed = [[key, settings[key]] for key, _ in ref.overrides]
    digest = hashlib.sha256(text.encode() + json.dumps(typed).encode()).hexdigest()
    return {"task": task, "unit": unit, "size_arg": size_arg, "default_size": default_size,
            "max_size": max_size, "default_batch_size": DEFAULT_BATCH_SIZE,
            "config_sha256": digest, "architecture": architecture}


def config(ref: Reference) -> Config:
    """The Config of a reference; ValueError with one line when its config.json does not fit."""
    return Config(ref, card(ref))


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError(MISSING_TRANSFORMERS) from None
    return transformers


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (transformers' run over several)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return (text or type(exc).__name__)[:400]


def _hf_config(cfg: Config) -> Any:
    """transformers' config object, the overrides applied before its __init__ derives fields
    from them (Llama's head_dim from hidden_size, say)."""
    transformers = _transformers()
    path, _, settings = _settings(cfg.ref)
    # Weights in the default dtype (float32): the precision policy, not the checkpoint's
    # storage dtype, decides what the benchmark computes in.
    settings = {k: v for k, v in settings.items() if k not in ("torch_dtype", "dtype")}
    try:
        base = transformers.AutoConfig.from_pretrained(str(path.parent), local_files_only=True)
        return type(base).from_dict(settings)
    except ImportError:
        raise
    except Exception as exc:  # transformers' own checks raise several kinds
        raise ValueError(f"{cfg.ref.name}: transformers {transformers.__version__} rejects "
                         f"{path}: {_one_line(exc)}") from None


def build(cfg: Config) -> Any:
    """A randomly initialised transformers model for the config, on the default device."""
    transformers = _transformers()
    hf_config = _hf_config(cfg)
    auto = getattr(transformers, _AUTO_CLASS[cfg.card["task"]])
    try:
        return auto.from_config(hf_config, attn_implementation="sdpa")
    except ValueError:  # no SDPA for this architecture (or no such model: eager says which)
        pass
    try:
        return auto.from_config(hf_config, attn_implementation="eager")
    except ValueError as exc:
        raise ValueError(f"{cfg.ref.name}: transformers {transformers.__version__} cannot "
                         f"build {cfg.card['architecture']}: {_one_line(exc)}") from None


def _image_batch(hf_config: Any, batch_size: int, size: int, generator: Any) -> tuple[Any, Any]:
    """Labels, and images that carry them: each class's fixed pattern (the same in every batch)
    under unit noise, so that training has something to learn and parity something to judge."""
    import torch

    num_labels = hf_config.num_labels
    if getattr(hf_config, "problem_type", None) == "multi_label_classification":
        labels = (torch.rand(batch_size, num_labels, generator=generator) < 0.5).float()
        weights = labels
    elif num_labels == 1:  # transformers takes one label as regression
        labels = torch.randn(batch_size, generator=generator)
        weights = labels[:, None]
    else:
        labels = torch.randint(0, num_labels, (batch_size,), generator=generator)
        weights = torch.nn.functional.one_hot(labels, num_labels).float()
    shape = (hf_config.num_channels, size, size)
    patterns = torch.randn(max(num_labels, 1), *shape,
                           generator=torch.Generator().manual_seed(_PATTERN_SEED))
    pixels = torch.randn(batch_size, *shape, generator=generator)
    return pixels + torch.einsum("bk,kchw->bchw", weights, patterns), labels


def _token_stream(vocab_size: int, batch_size: int, size: int, generator: Any) -> Any:
    """Token ids where each next token is the last plus one of ``_SUCCESSOR_STEPS`` (mod the
    vocabulary), chosen uniformly: a source with an entropy of log(4) nats per token that a
    model can learn, unlike uniform ids, so that parity's FP32 runs improve and can judge."""
    import torch

    steps = torch.tensor(_SUCCESSOR_STEPS) % vocab_size
    start = torch.randint(0, vocab_size, (batch_size, 1), generator=generator)
    choice = torch.randint(0, len(_SUCCESSOR_STEPS), (batch_size, size - 1), generator=generator)
    return torch.cat([start, start + steps[choice].cumsum(dim=1)], dim=1) % vocab_size


def make_batch(cfg: Config, batch_size: int, size: int, generator: Any) -> tuple[Any, Any]:
    """One synthetic batch on the CPU: (token ids, targets) of length ``size`` for a language
    model, (pixel values, labels) of side ``size`` for an image classifier."""
    import torch

    hf_config = _hf_config(cfg)
    task = cfg.card["task"]
    if task == "image-classification":
        return _image_batch(hf_config, batch_size, size, generator)
    ids = _token_stream(hf_config.vocab_size, batch_size, size, generator)
    if task == "causal-lm":
        return ids, ids.clone()  # the model shifts the labels itself
    # The same number of masked positions in every row, at least one: a loss over no position
    # would be NaN.
    num_masked = max(1, round(_MASK_FRACTION * size))
    order = torch.rand(batch_size, size, generator=generator).argsort(dim=1)
    masked = torch.zeros(batch_size, size, dtype=torch.bool)
    masked.scatter_(1, order[:, :num_masked], True)
    targets = torch.where(masked, ids, torch.full_like(ids, -100))
    mask_token_id = getattr(hf_config, "mask_token_id", None)
    inputs = ids.masked_fill(masked, mask_token_id) if mask_token_id is not None else ids
    return inputs, targets


def loss(model: Any, inputs: Any, targets: Any) -> Any:
    """The model's own training loss (transformers shifts a causal LM's labels)."""
    if inputs.is_floating_point():  # pixel values
        kwargs = {}
        side = getattr(model.config, "image_size", inputs.shape[-1])
        side = side[0] if isinstance(side, list | tuple) else side
        if inputs.shape[-1] != side \
                and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
            kwargs["interpolate_pos_encoding"] = True  # a ViT at another side than it was built for
        return model(pixel_values=inputs, labels=targets, **kwargs).loss
    return model(input_ids=inputs, labels=targets).loss
