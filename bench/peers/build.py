"""The peer of each reference model: which library holds it (transformers or torchvision), that
library's version, the peer built at our config's sizes and dropout, and our weights copied into
it so that both compute the same function. The libraries are the optional extra ``peers``,
imported here only; torch is imported lazily.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from typing import Any

import models
from bench import BadInput

EXTRA_HINT = "pip install -e .[peers]"
# The library each family's peer comes from; resnet-tiny has no torchvision counterpart
# (torchvision's ResNets have a fixed stem width).
_LIBRARY = {"gpt": "transformers", "bert": "transformers", "llama": "transformers",
            "resnet": "torchvision"}
_NO_PEER = {"resnet-tiny"}


class PeerMissing(Exception):
    """The peer's library is not installed or fails to import."""


def library(model: str) -> str:
    """The library that holds ``model``'s peer; BadInput for a model without one."""
    spec = models.get(model)
    if spec.name in _NO_PEER:
        raise BadInput(f"{model} has no peer (torchvision has no ResNet of its width)")
    if spec.family not in _LIBRARY:  # a model of the user's own (an hf: one is transformers')
        raise BadInput(f"{model} has no peer: peers pairs the reference models with "
                       "transformers' and torchvision's; your model runs in `ampbench run`")
    return _LIBRARY[spec.family]


_BROKEN: dict[str, str] = {}  # an installed library that fails to import -> why


def _broken_torchvision() -> str | None:
    """Why the installed torchvision fails to import; None where it imports or is absent.
    A broken one (PyPI's torchvision beside a torch built elsewhere: its C++ operators such as
    torchvision::nms do not exist there) is then hidden from transformers, which would
    otherwise import it for image processing and fail on every model ("Could not import
    module 'GPT2LMHeadModel'"): the language models' peers need no torchvision."""
    if "torchvision" not in _BROKEN:
        try:
            found = importlib.util.find_spec("torchvision") is not None
            if found:
                importlib.import_module("torchvision")
        except Exception as exc:  # a broken binary raises more than ImportError
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            _BROKEN["torchvision"] = f"{type(exc).__name__}: {first}"
            for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
                del sys.modules[name]
            sys.modules["torchvision"] = None  # type: ignore[assignment]  # taken as absent
        else:
            return None
    return _BROKEN["torchvision"]


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_library(model: str) -> None:
    """Import ``model``'s peer library; PeerMissing with one line naming the extra if it fails,
    or, for a torchvision that is installed but broken, naming it and the fix."""
    name = library(model)
    broken = _broken_torchvision()  # first: before transformers looks for torchvision
    if broken and name == "torchvision":
        raise PeerMissing(
            f"{model}'s peer needs torchvision, which is installed but fails to import "
            f"({broken}): a torchvision built for another torch than this torch "
            f"{_torch_version()}; fix: install the torchvision built for this torch (from the "
            "index this torch came from) or uninstall torchvision; the transformers peers "
            "need no torchvision and run without it")
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
    name = {"gpt": "transformers.GPT2LMHeadModel", "bert": "transformers.BertForMaskedLM",
            "llama": "transformers.LlamaForCausalLM"}.get(family, f"torchvision.models.{model}")
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
    from bench.cell.low_precision import quiet_torchao

    with quiet_torchao():
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
    if spec.family == "llama":
        return llama_peer(cfg)
    import torchvision

    return getattr(torchvision.models, model)(weights=None)


def llama_peer(cfg: Any) -> Any:
    """transformers' LlamaForCausalLM with SDPA attention at the sizes of ``cfg`` (any
    models.llama.LlamaConfig, not only a registered one), freshly initialised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = cfg.rope_scaling
    # rope_theta and rope_scaling: the names transformers 4.x takes; 5.x still accepts them.
    scaling = None if s is None else {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_seq_len}
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=scaling,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa"))


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


# Our (Meta's) module names -> transformers' LlamaForCausalLM's; the layouts are the same.
_LLAMA_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}
_LLAMA_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def llama_name(name: str) -> str:
    """The peer's name of our Llama parameter ``name``."""
    module, _, kind = name.rpartition(".")
    if module.startswith("layers."):
        _, i, rest = module.split(".", 2)
        return f"model.layers.{i}.{_LLAMA_LAYER[rest]}.{kind}"
    return f"{_LLAMA_TOP[module]}.{kind}"


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
        elif family == "llama":
            names = {llama_name(name): p for name, p in ours.named_parameters()}
            extra = sorted(set(names) - set(targets))  # ours untied, the peer's head tied
            if extra:
                raise ValueError(f"{model}: our parameters the peer lacks: {', '.join(extra)}")
            for peer_name, value in names.items():
                targets[peer_name].copy_(value)
            written = set(names)
        else:
            written = _copy_bert(ours, peer)
    unmapped = sorted(set(targets) - written)
    if unmapped:
        raise ValueError(f"{model}: peer parameters not mapped from ours: {', '.join(unmapped)}")
