"""Peers: ampbench's reference models next to the ones people train, in one process.

    python -m bench peers --models gpt2-small,resnet50 --precisions fp32,bf16 --out peers.csv
    python -m bench peers --out-dir results/runs/RUN_ID      # writes RUN_DIR/peers.csv

Each model is paired with its peer (Hugging Face transformers' GPT2LMHeadModel, BertForMaskedLM
and LlamaForCausalLM with SDPA attention, torchvision's resnet50 / resnet18), our weights are copied
into it, and the pair is compared: parameter counts, the largest logit difference in eval mode
and in train mode (the same RNG seed before each forward, so dropout draws the same masks;
ResNet's BatchNorm uses the batch's statistics) and the loss difference in eval mode on the same
batch, then the same training step (bench/cell/train.py's Trainer: one optimizer, scaler and
autocast per policy) timed with steps interleaved ours/peer, so that noise hits both alike. One
CSV row per (model, policy), COLUMNS below, the environment on every row. The peers' libraries
are the optional extra ``peers``, imported only by bench/peers/build.py (which peer, building
it, copying our weights into it); this module compares, races and writes the CSV.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import models
from bench import BadInput, config, precision, store
from bench.cell.timing import (
    GIB,
    StepTimer,
    peak_memory,
    reset_peak_memory,
    summarize,
    use_device,
)
from bench.cell.train import Trainer, is_oom, prepare, resolve_device
from bench.peers.build import (
    PeerMissing,
    build_peer,
    check_library,
    copy_weights,
    describe_peer,
    library,
)
from bench.run.lock import lock
from bench.telemetry.env import fingerprint

DEFAULT_MODELS = ("gpt2-small", "bert-base", "llama-small", "resnet50", "resnet18")
MIN_SPREAD_STEPS = 2  # timed steps that have a spread (IQR); one step has none
PEERS_CSV = store.PEERS  # its name in a run directory (--out-dir RUN_DIR)


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
    logit_max_abs_diff: float  # eval mode
    logit_max_abs_diff_train: float  # train mode, the same seed before each forward
    loss_abs_diff: float  # eval mode


@contextlib.contextmanager
def _untouched(*modules: Any) -> Any:
    """Restore each module's mode and buffers (BatchNorm's running statistics) afterwards."""
    import torch

    saved = [(m.training, [(b, b.clone()) for b in m.buffers()]) for m in modules]
    try:
        yield
    finally:
        for m, (training, buffers) in zip(modules, saved, strict=True):
            m.train(training)
            with torch.no_grad():
                for buffer, value in buffers:
                    buffer.copy_(value)


def compare(model: str, ours: Any, peer: Any, inputs: Any, targets: Any,
            seed: int = 0) -> Equivalence:
    """Parameter counts, max |logit difference| in eval and train mode and |loss difference| in
    eval mode, FP32; the models are left as they were."""
    import torch

    spec = models.get(model)
    peer_logits = _Logits(peer, spec.family)
    precision.get("fp32").apply_backend_flags()
    with _untouched(ours, peer), torch.no_grad():
        ours.train()
        peer.train()
        torch.manual_seed(seed)
        train_ours = ours(inputs).float()
        torch.manual_seed(seed)
        train_peer = peer_logits(inputs).float()
        ours.eval()
        peer.eval()
        logits_ours = ours(inputs).float()
        logits_peer = peer_logits(inputs).float()
        loss_ours = spec.loss(ours, inputs, targets)
        loss_peer = spec.loss(peer_logits, inputs, targets)
    return Equivalence(num_params(ours), num_params(peer),
                       float((logits_ours - logits_peer).abs().max()),
                       float((train_ours - train_peer).abs().max()),
                       float((loss_ours - loss_peer).abs()))


def compare_fresh(model: str, batch_size: int, size: int, device: Any = "cpu",
                  seed: int = 0) -> Equivalence:
    """Build ``model`` and its peer as a cell would (seeded, unconverted by any policy), copy
    the weights and compare them on one synthetic batch."""
    import torch

    spec = models.get(model)
    torch.manual_seed(seed)
    ours = spec.build().to(device)
    peer = build_peer(model)
    copy_weights(model, ours, peer)
    inputs, targets = spec.make_batch(batch_size, size, device=device, seed=seed)
    return compare(model, ours, peer.to(device), inputs, targets, seed)


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
    peer = ours.policy.prepare_model(peer.to(device))  # FP8 converts the peer's layers too
    if ours.memory_format == "channels_last":
        peer = peer.to(memory_format=torch.channels_last)
    peer.train()
    optimizer = ours.policy.optimizer(peer.parameters(), lr=1e-4, fused=device.type == "cuda")
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
        # One pair has no spread: empty, not an IQR of 0 (the table and the report say why).
        "ratio_ours_per_peer_iqr": ratio["step_ms_iqr"] if steps >= MIN_SPREAD_STEPS else None,
        "ours_peak_mem_allocated_gib": mem_ours,
        "peer_peak_mem_allocated_gib": mem_peer,
    }


# One row per (model, policy); the report reads RUN_DIR/peers.csv by these names.
RESULT = ("model", "precision", "status", "peer", "peer_version", "batch_size", "seq_len",
          "image_size", "warmup_steps", "timed_steps", "params_ours", "params_peer",
          "logit_max_abs_diff", "logit_max_abs_diff_train", "loss_abs_diff",
          "ours_step_ms_median", "peer_step_ms_median", "ratio_ours_per_peer_median",
          "ratio_ours_per_peer_iqr", "ours_peak_mem_allocated_gib", "peer_peak_mem_allocated_gib")
COLUMNS = RESULT + store.ENVIRONMENT
# What the table on stdout shows (the CSV has every column).
_TABLE = ("model", "precision", "status", "params_ours", "params_peer", "logit_max_abs_diff",
          "logit_max_abs_diff_train", "loss_abs_diff", "ours_step_ms_median",
          "peer_step_ms_median", "ratio_ours_per_peer_median", "ratio_ours_per_peer_iqr",
          "ours_peak_mem_allocated_gib", "peer_peak_mem_allocated_gib")


def _blank_row(model: str, precision_name: str | None, environment: dict[str, Any]
               ) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    peer, version = describe_peer(model)
    row.update(environment, model=model, precision=precision_name, peer=peer,
               peer_version=version)
    return row


def run_model(model: str, policies: list[str], batch_size: int | None, size: int | None,
              device: Any, warmup: int, steps: int, seed: int = 0,
              environment: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per policy for ``model``: equivalence (once, in FP32 before any policy touches
    the models: the same on every row), then the race."""
    spec = models.get(model)
    batch_size = batch_size or spec.default_batch_size
    size = size or spec.default_size
    rows = []
    equivalence = None
    for name in policies:
        row = _blank_row(model, name, environment or {})
        row.update({"batch_size": batch_size, spec.size_arg: size, "warmup_steps": warmup,
                    "timed_steps": steps})
        reason = precision.get(name).unsupported_reason(device, spec)
        if reason:
            row["status"] = f"unsupported: {reason}"
            rows.append(row)
            continue
        try:
            if equivalence is None:
                equivalence = compare_fresh(model, batch_size, size, device, seed)
            row.update(vars(equivalence))
            row.update(_race_fresh(model, name, batch_size, size, device, warmup, steps, seed))
            row["status"] = "ok"
        except Exception as exc:  # one failing pair (an OOM, say) never ends the others' rows
            row["status"] = f"{'oom' if is_oom(exc) else 'error'}: {_first_line(exc)}"
            print(f"peers: {model} {name}: {row['status']}", file=sys.stderr)
        finally:
            _free(device)
        rows.append(row)
    return rows


def _race_fresh(model: str, name: str, batch_size: int, size: int, device: Any, warmup: int,
                steps: int, seed: int) -> dict[str, Any]:
    """Build our trainer under policy ``name`` and the peer with our weights, and race them."""
    ours = prepare(model, name, batch_size, size, device=device, seed=seed)
    peer_module = build_peer(model)
    copy_weights(model, ours.model, peer_module)
    return race(ours, _peer_trainer(ours, peer_module), warmup, steps)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def _free(device: Any) -> None:
    """Give a pair's memory back before the next pair is built (after an OOM above all)."""
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


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


def write_csv(rows: list[dict[str, Any]], path: Path | str) -> Path:
    """Write the rows with COLUMNS to ``path`` (atomically replaced, parents created)."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def main(args: argparse.Namespace) -> int:
    """`ampbench peers`: the table of ours vs the peers; exit 2 for a missing explicit peer,
    1 when a pair failed (its row says why; the other pairs still ran)."""
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
    use_device(device)  # before anything touches CUDA: cuda:N's stream, allocator and context
    if args.out_dir is None:
        return _run(args, chosen, policies, missing, device, args.out)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    # One process per run directory: not beside a runner timing in the same place.
    with lock(args.out_dir, "ampbench peers"):
        return _run(args, chosen, policies, missing, device, Path(args.out_dir) / PEERS_CSV)


def _run(args: argparse.Namespace, chosen: list[str], policies: list[str],
         missing: dict[str, str], device: Any, out: Path | str | None) -> int:
    from tabulate import tabulate

    environment = {k: v for k, v in fingerprint(str(device)).items() if k in store.ENVIRONMENT}
    rows = []
    for model in chosen:
        if model in missing:
            rows.append({**_blank_row(model, None, environment),
                         "status": f"skipped: {missing[model]}"})
        else:
            print(f"peers: {model} under {', '.join(policies)}", file=sys.stderr, flush=True)
            size = getattr(args, models.get(model).size_arg)
            rows.extend(run_model(model, policies, args.batch_size, size, device, args.warmup,
                                  args.steps, environment=environment))
        if out:  # after every model: an interrupted run keeps the models it finished
            write_csv(rows, out)
    table = [{k: ("n/a" if row[k] is None and k.endswith(("_gib", "_iqr")) and row["status"] == "ok"
                  else row[k]) for k in _TABLE} for row in rows]
    print(tabulate(table, headers="keys", intfmt=",", floatfmt=".4g", tablefmt="github"))
    if args.steps < MIN_SPREAD_STEPS:
        print(f"ratio_ours_per_peer_iqr is empty: {args.steps} timed step has no spread; "
              f"--steps 5 or more measures one")
    for line in missing.values():
        print(line, file=sys.stderr)
    return 1 if any(row["status"].startswith(("oom", "error")) for row in rows) else 0
