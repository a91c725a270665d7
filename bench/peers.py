"""Peers: ampbench's reference models next to the ones people train, in one process.

    python -m bench peers --models gpt2-small,resnet50 --precisions fp32,bf16 --out peers.csv

Each model is paired with its peer (Hugging Face transformers' GPT2LMHeadModel and
BertForMaskedLM with SDPA attention, torchvision's resnet50 / resnet18), our weights are copied
into it, and the pair is compared: parameter counts, the largest logit difference and the loss
difference in eval mode on the same batch, then the same training step (bench/cell.py's Trainer:
one optimizer, scaler and autocast per policy) timed with steps interleaved ours/peer, so that
noise hits both alike. The peers' libraries are the optional extra ``peers``, imported here only.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import statistics
import sys
from dataclasses import dataclass
from typing import Any

import models
from bench import BadInput, config, precision
from bench.cell import Trainer, prepare, resolve_device
from bench.measure import GIB, StepTimer, peak_memory, reset_peak_memory, summarize

DEFAULT_MODELS = ("gpt2-small", "bert-base", "resnet50", "resnet18")
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


def build_peer(model: str) -> Any:
    """The peer of ``model`` at our config's sizes and dropout, freshly initialised."""
    check_library(model)
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


class _Logits:
    """Calls the peer and returns its logits tensor, as our models' forward does."""

    def __init__(self, peer: Any, family: str) -> None:
        self.peer, self.family = peer, family

    def __call__(self, inputs: Any) -> Any:
        if self.family == "resnet":
            return self.peer(inputs)
        return self.peer(input_ids=inputs).logits


def num_params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class Equivalence:
    params_ours: int
    params_peer: int
    logit_max_abs_diff: float
    loss_abs_diff: float


def compare(model: str, ours: Any, peer: Any, inputs: Any, targets: Any) -> Equivalence:
    """Parameter counts, max |logit difference| and |loss difference| in eval mode, FP32."""
    import torch

    spec = models.get(model)
    precision.get("fp32").apply_backend_flags()
    was_training = ours.training, peer.training
    ours.eval()
    peer.eval()
    try:
        with torch.no_grad():
            logits_ours = ours(inputs).float()
            logits_peer = _Logits(peer, spec.family)(inputs).float()
            loss_ours = spec.loss(ours, inputs, targets)
            loss_peer = spec.loss(_Logits(peer, spec.family), inputs, targets)
    finally:
        ours.train(was_training[0])
        peer.train(was_training[1])
    return Equivalence(num_params(ours), num_params(peer),
                       float((logits_ours - logits_peer).abs().max()),
                       float((loss_ours - loss_peer).abs()))


def _resident_bytes(trainer: Trainer) -> int:
    """Weights and optimizer state: what a trainer holds between steps."""
    tensors = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    for state in trainer.optimizer.state.values():
        tensors += [v for v in state.values() if hasattr(v, "element_size")]
    return sum(t.numel() * t.element_size() for t in tensors)


def _peer_trainer(ours: Trainer, peer: Any) -> Trainer:
    """The same training step around the peer: its own AdamW and scaler, our batch."""
    import torch

    device = ours.device
    peer = peer.to(device)
    if ours.memory_format == "channels_last":
        peer = peer.to(memory_format=torch.channels_last)
    peer.train()
    optimizer = torch.optim.AdamW(peer.parameters(), lr=1e-4, fused=device.type == "cuda")
    return Trainer(ours.spec, ours.policy, device, _Logits(peer, ours.spec.family), optimizer,
                   ours.policy.scaler(device.type), ours.inputs, ours.targets,
                   memory_format=ours.memory_format)


def _peak_step_gib(trainer: Trainer, other: Trainer) -> float | None:
    """Peak CUDA memory allocated in one step of ``trainer``, without what ``other`` holds."""
    device = trainer.device
    if device.type != "cuda":
        return None
    trainer.sync()
    reset_peak_memory(device)
    trainer.step()
    trainer.sync()
    return peak_memory(device)["peak_mem_allocated_gib"] - _resident_bytes(other) / GIB


def race(ours: Trainer, peer: Trainer, warmup: int, steps: int) -> dict[str, Any]:
    """Time the two trainers' steps interleaved (which goes first alternates) and measure
    each one's peak memory; the ratio ours/peer is taken per pair, so slow phases cancel."""
    for _ in range(warmup):
        ours.step()
        peer.step()
    ours.sync()
    mem_ours, mem_peer = _peak_step_gib(ours, peer), _peak_step_gib(peer, ours)
    timers = StepTimer(ours.device, steps), StepTimer(ours.device, steps)
    pair = (ours, peer)
    for i in range(steps):  # the timed window: no host sync in here
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            timers[k].start(i)
            pair[k].step()
            timers[k].stop(i)
    ours.sync()
    times_ours, times_peer = timers[0].times_ms(), timers[1].times_ms()
    ratios = [a / b for a, b in zip(times_ours, times_peer, strict=True)]
    ratio = summarize(ratios)
    return {
        "ours_step_ms_median": statistics.median(times_ours),
        "peer_step_ms_median": statistics.median(times_peer),
        "ratio_ours_per_peer_median": ratio["step_ms_median"],
        "ratio_ours_per_peer_iqr": ratio["step_ms_iqr"],
        "ours_peak_mem_allocated_gib": mem_ours,
        "peer_peak_mem_allocated_gib": mem_peer,
    }


COLUMNS = ("model", "precision", "status", "params_ours", "params_peer", "logit_max_abs_diff",
           "loss_abs_diff", "ours_step_ms_median", "peer_step_ms_median",
           "ratio_ours_per_peer_median", "ratio_ours_per_peer_iqr",
           "ours_peak_mem_allocated_gib", "peer_peak_mem_allocated_gib")


def run_model(model: str, policies: list[str], batch_size: int | None, size: int | None,
              device: Any, warmup: int, steps: int, seed: int = 0) -> list[dict[str, Any]]:
    """One row per policy for ``model``: equivalence (the same for all), then the race."""
    spec = models.get(model)
    batch_size = batch_size or spec.default_batch_size
    rows = []
    equivalence = None
    for name in policies:
        row: dict[str, Any] = dict.fromkeys(COLUMNS)
        row.update(model=model, precision=name)
        reason = precision.get(name).unsupported_reason(device)
        if reason:
            row["status"] = f"unsupported: {reason}"
            rows.append(row)
            continue
        ours = prepare(model, name, batch_size, size, device=device, seed=seed)
        peer_module = build_peer(model)
        copy_weights(model, ours.model, peer_module)
        peer = _peer_trainer(ours, peer_module)
        if equivalence is None:
            equivalence = compare(model, ours.model, peer_module, ours.inputs, ours.targets)
            precision.get(name).apply_backend_flags()
        row.update(vars(equivalence))
        row.update(race(ours, peer, warmup, steps))
        row["status"] = "ok"
        rows.append(row)
    return rows


def _validate(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Check names and sizes before anything is built; return (models, policies)."""
    for key in ("steps", "warmup", "batch_size", "seq_len", "image_size"):
        value = getattr(args, key)
        if value is not None:
            config.check_limit(key, value, "command line")
    chosen = args.models or list(DEFAULT_MODELS)
    for model in chosen:
        try:
            spec = models.get(model)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        library(model)
        size = getattr(args, spec.size_arg)  # --seq-len for the language models only
        problem = spec.check_size(size) if size is not None else None
        if problem:
            raise BadInput(problem)
    for name in args.precisions:
        try:
            precision.get(name)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    return chosen, args.precisions


def main(args: argparse.Namespace) -> int:
    """`ampbench peers`: the table of ours vs the peers; exit 2 for a missing explicit peer."""
    from tabulate import tabulate

    chosen, policies = _validate(args)
    missing = {}
    for model in chosen:
        try:
            check_library(model)
        except PeerMissing as exc:
            if args.models:  # asked for by name: it must run
                raise BadInput(str(exc)) from None
            missing[model] = str(exc)
    device = resolve_device(args.device)
    rows = []
    for model in chosen:
        if model in missing:
            rows.append({**dict.fromkeys(COLUMNS), "model": model,
                         "status": f"skipped: {missing[model]}"})
            continue
        spec = models.get(model)
        size = getattr(args, spec.size_arg)
        rows.extend(run_model(model, policies, args.batch_size, size, device, args.warmup,
                              args.steps))
    if args.out:
        with open(args.out, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    table = [{k: ("n/a" if v is None and k.endswith("_gib") and row["status"] == "ok" else v)
              for k, v in row.items()} for row in rows]
    print(tabulate(table, headers="keys", intfmt=",", floatfmt=".4g", tablefmt="github"))
    if missing:
        for line in missing.values():
            print(line, file=sys.stderr)
    return 0
