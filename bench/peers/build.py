"""The peer of each reference model: which library holds it (transformers or torchvision), that
library's version, the peer built at our config's sizes and dropout, and our weights copied into
it so that both compute the same function. The libraries are the optional extra ``peers``,
imported here only; torch is imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

import models
from bench import BadInput, precision

EXTRA_HINT = "pip install -e .[peers]"
# The library each family's peer comes from; resnet-tiny has no torchvision counterpart
# (torchvision's ResNets have a fixed stem width).
_LIBRARY = {"gpt": "transformers", "bert": "transformers", "resnet": "torchvision"}
_NO_PEER = {"resnet-tiny"}


class PeerMissing(Exception):
    """The peer's library is not installed or fails to import."""


def library(model: str) -> str:
    """The library that holds ``model``'s peer; BadInput for a model without one."""
    spec = models.get(model)
    if spec.name in _NO_PEER:
        raise BadInput(f"{model} has no peer (torchvision has no ResNet of its width)")
    return _LIBRARY[spec.family]


def check_library(model: str) -> None:
    """Import ``model``'s peer library; PeerMissing with one line naming the extra if it fails."""
    name = library(model)
    try:
        importlib.import_module(name)
    except Exception as exc:  # a broken binary (torchvision vs torch) raises more than ImportError
        first = (str(exc).splitlines() or [""])[0]
        why = "is not installed" if isinstance(exc, ModuleNotFoundError) else \
            f"fails to import ({type(exc).__name__}: {first})"
        raise PeerMissing(f"{model}'s peer needs {name}, which {why}; install the extra: "
                          f"{EXTRA_HINT}") from None


def describe_peer(model: str) -> tuple[str, str | None]:
    """(the peer's class or builder, its library's version or None where it does not import)."""
    family = models.get(model).family
    name = {"gpt": "transformers.GPT2LMHeadModel", "bert": "transformers.BertForMaskedLM"}.get(
        family, f"torchvision.models.{model}")
    try:
        version = importlib.import_module(library(model)).__version__
    except Exception:  # missing or broken: the row's status says which
        version = None
    return name, version


def build_peer(model: str) -> Any:
    """The peer of ``model`` at our config's sizes and dropout, freshly initialised."""
    check_library(model)
    # transformers imports torchao where it is installed (the fp8 extra), which logs a line
    # per prebuilt kernel library it cannot load: noise for a peer that uses none of them.
    with precision.quiet_torchao():
        return _build_peer(model)


def _build_peer(model: str) -> Any:
    spec = models.get(model)
    cfg = spec.config
    if spec.family == "gpt":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
            n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=cfg.vocab_size - 1,
            eos_token_id=cfg.vocab_size - 1, attn_implementation="sdpa"))
    if spec.family == "bert":
        from transformers import BertConfig, BertForMaskedLM

        # pad_token_id None: id 0 plays [MASK] in our batches and gets a gradient, as ours does.
        return BertForMaskedLM(BertConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, intermediate_size=cfg.intermediate,
            max_position_embeddings=cfg.max_positions, type_vocab_size=cfg.type_vocab_size,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
            layer_norm_eps=cfg.layer_norm_eps, pad_token_id=None, attn_implementation="sdpa"))
    import torchvision

    return getattr(torchvision.models, model)(weights=None)


def _gpt_names(ours: Any) -> dict[str, tuple[str, bool]]:
    """Our parameter name -> (the peer's, transposed?): HF's Conv1D stores (in, out)."""
    names = {}
    for name, _ in ours.named_parameters():
        peer = f"transformer.{name}"
        linear = name.endswith(".weight") and any(
            f".{layer}." in name for layer in ("c_attn", "c_proj", "c_fc"))
        names[name] = (peer, linear)
    return names


_BERT_LAYER = {"attn.proj": "attention.output.dense", "ln_1": "attention.output.LayerNorm",
               "fc": "intermediate.dense", "out": "output.dense", "ln_2": "output.LayerNorm"}
_BERT_TOP = {"wte": "bert.embeddings.word_embeddings", "wpe": "bert.embeddings.position_embeddings",
             "wtt": "bert.embeddings.token_type_embeddings", "ln_emb": "bert.embeddings.LayerNorm",
             "head": "cls.predictions.transform.dense",
             "ln_head": "cls.predictions.transform.LayerNorm"}


def _copy_bert(ours: Any, peer: Any) -> set[str]:
    """Copy our BERT's parameters into the peer; return the peer's names written."""
    targets = dict(peer.named_parameters())
    written = set()

    def put(name: str, value: Any) -> None:
        targets[name].copy_(value)
        written.add(name)

    for name, p in ours.named_parameters():
        if name == "decoder_bias":
            put("cls.predictions.bias", p)
        elif name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            module, _, kind = rest.rpartition(".")
            prefix = f"bert.encoder.layer.{i}"
            if module == "attn.qkv":  # one fused projection -> query, key, value
                for part, chunk in zip(("query", "key", "value"), p.chunk(3), strict=True):
                    put(f"{prefix}.attention.self.{part}.{kind}", chunk)
            else:
                put(f"{prefix}.{_BERT_LAYER[module]}.{kind}", p)
        else:
            module, _, kind = name.rpartition(".")
            put(f"{_BERT_TOP[module]}.{kind}", p)
    return written


def copy_weights(model: str, ours: Any, peer: Any) -> None:
    """Make ``peer`` compute what ``ours`` computes: every parameter of either is mapped, or
    ValueError names what is not."""
    import torch

    family = models.get(model).family
    with torch.no_grad():
        if family == "resnet":  # torchvision's names are ours, buffers included
            peer.load_state_dict(ours.state_dict(), strict=True)
            return
        targets = dict(peer.named_parameters())  # tied weights appear once
        if family == "gpt":
            written = set()
            params = dict(ours.named_parameters())
            for name, (peer_name, transposed) in _gpt_names(ours).items():
                value = params[name]
                targets[peer_name].copy_(value.t() if transposed else value)
                written.add(peer_name)
        else:
            written = _copy_bert(ours, peer)
    unmapped = sorted(set(targets) - written)
    if unmapped:
        raise ValueError(f"{model}: peer parameters not mapped from ours: {', '.join(unmapped)}")
