"""A parity child process: trains one (model or task, policy)'s seeds and writes one JSON result
per seed, or tells the parent what the runs will be on its device.

    python -m bench.parity.train run --model gpt2-tiny --precision bf16 --seeds 0,1,2 \\
        --setup '{"batch_size": 16, ...}' --device cpu --out s0.json --out s1.json --out s2.json
    python -m bench.parity.train plan --device auto --precisions fp32,bf16 --out plan.json

The parent (bench/parity/stage.py) starts it with argv, under a timeout, in a session of its
own, and reads only the files it names: ``{"row", "curve", "hist", "elapsed_s"}`` per seed,
each written (atomically) as that seed ends, so a child that dies later loses only the seeds
it had not finished. An exception while training a seed (an OOM, say) is that seed's result
(a row with ``error``) and the next seed goes on. ``plan`` answers what only torch can tell:
the device ``--device`` resolves to (a bad one is ``bad_input``), so the default models,
whether a policy is emulated, the setups (their vocabulary comes from the model's config) and
the policies the device or model cannot run. Exit 0 when every seed trained (1 otherwise;
2 for a plan's bad input).

Training reuses the benchmark's one step (``bench.cell.train.Trainer.step``: autocast forward,
scaled backward, scaler step and update); only the resident batch is swapped before each step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import models
from bench import BadInput, precision, strategy
from bench.cell.dist import Ranks, process_group
from bench.parity import data, probes, tasks, updates
from bench.parity.tasks import Setup, Task, resolve_policy, run_label, spec_for
from bench.parity.verdict import COLUMNS, EXTRA_COLUMNS, failed_row
from bench.run import proctree

FAULT_ENV = "AMPBENCH_PARITY_FAULT"  # test-only failures, see _inject_fault
_ADAMW_EPS = 1e-8  # torch's default


@dataclass(frozen=True)
class _ShareOfStep(models.ModelSpec):
    """A model whose loss is one micro-batch's share of a larger optimizer step's mean loss."""

    share: float = 1.0

    def loss(self, model: Any, inputs: Any, targets: Any) -> Any:
        return super().loss(model, inputs, targets) * self.share


@dataclass
class _Log:
    """What a run records while it trains: curve samples, probes, histograms and counters."""

    model: str
    policy: str
    seed: int
    share: float  # the loss's scale (the underflow task): curves show the plain mean loss
    scaling: bool  # a GradScaler is on
    curve: list[dict[str, Any]] = field(default_factory=list)
    hist: list[dict[str, Any]] = field(default_factory=list)
    underflow: list[tuple[float, float]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    window: list[Any] = field(default_factory=list)  # losses since the last sample, unsynced
    nonfinite: int = 0
    skipped: int = 0
    window_skipped: int = 0
    first_skip: int | None = None

    def skip(self, step: int) -> None:
        """The scaler skipped ``step``'s update (it found inf/NaN gradients)."""
        self.skipped += 1
        self.window_skipped += 1
        self.first_skip = step if self.first_skip is None else self.first_skip

    def sample(self, step: int, scale: float | None, lost_frac: float | None = None) -> None:
        """One curve point: the mean training loss of the window ending at ``step``, and the
        share of its last step's updates that left their weight unchanged."""
        losses = _over_ranks(torch.stack(self.window).float()).cpu() / self.share
        self.nonfinite += int((~torch.isfinite(losses)).sum())
        self.curve.append({"model": self.model, "precision": self.policy, "seed": self.seed,
                           "step": step, "loss": float(losses.mean()), "scale": scale,
                           "skipped": self.window_skipped if self.scaling else None,
                           "time_s": sum(self.step_times), "lost_frac": lost_frac})
        self.window, self.window_skipped = [], 0


def _over_ranks(values: Any) -> Any:
    """``values`` averaged over the ranks of a run on several (each trained its share of the
    batch, so the batch's loss is their mean); as they are in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def _my_share(batch: Any, ranks: Ranks | None) -> Any:
    """This rank's slice of a batch (a tensor, or a tuple, list or dict of them) on several
    ranks: the batch split evenly along its first dimension (the stage checked that it
    divides), so the ranks together train the whole batch of a one-process run."""
    if ranks is None:
        return batch
    if isinstance(batch, dict):
        return {key: _my_share(value, ranks) for key, value in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_my_share(value, ranks) for value in batch)
    if batch.shape[0] % ranks.world_size:
        raise ValueError(f"a batch of {batch.shape[0]} does not split over "
                         f"{ranks.world_size} ranks")
    return batch.tensor_split(ranks.world_size)[ranks.rank]


def evaluate(trainer: Any, batches: Sequence[tuple[Any, Any]]) -> tuple[float, float | None]:
    """Mean eval loss and accuracy (over all targets that count) on the held-out batches; a
    user's model (no logits known to us): the mean of its own loss, no accuracy."""
    import torch.nn.functional as F

    model = trainer.model
    if trainer.spec.source is not None:
        return _evaluate_own_loss(trainer, batches), None
    model.eval()
    total_loss = correct = count = 0.0
    with torch.no_grad(), trainer.policy.autocast(trainer.device.type):
        for inputs, targets in batches:
            logits = model(inputs).float()
            logits = logits.reshape(-1, logits.size(-1))
            flat = targets.reshape(-1)
            keep = flat != -100
            total_loss += float(F.cross_entropy(logits[keep], flat[keep], reduction="sum"))
            correct += float((logits[keep].argmax(-1) == flat[keep]).sum())
            count += float(keep.sum())
    model.train()
    return total_loss / count, correct / count


def _evaluate_own_loss(trainer: Any, batches: Sequence[tuple[Any, Any]]) -> float:
    """The mean of the module's loss over the held-out batches (the model in eval mode)."""
    model = trainer.model
    model.eval()
    with torch.no_grad(), trainer.policy.autocast(trainer.device.type):
        losses = [float(trainer.spec.loss(model, inputs, targets).float())
                  for inputs, targets in batches]
    model.train()
    return sum(losses) / len(losses)


def _trainer(spec: models.ModelSpec, policy: precision.Policy, seed: int, setup: Setup,
             device: Any, lr_factor: float, share: float,
             shared: strategy.Strategy | None = None) -> Any:
    """The run's model (initial weights from ``seed``, the same on every rank), AdamW and
    scaler in a Trainer; on several ranks the model shared as ``shared`` says (FSDP2 shards
    under its MixedPrecisionPolicy, or DDP replicas) before the optimizer sees it."""
    from bench.cell.train import Trainer

    policy.apply_backend_flags()
    torch.manual_seed(seed)
    net = policy.prepare_model(spec.build().to(device))
    scaler = policy.scaler(device.type)
    if shared is not None and shared.kind == "fsdp2":
        from bench.cell import fsdp

        net = fsdp.shard(net, shared)
        scaler = fsdp.scaler(device.type, policy.loss_scaling)
    elif shared is not None:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda"
                                      else None)
    # eps scaled with the loss: AdamW's update is then the same as for the plain mean.
    optimizer = policy.optimizer(net.parameters(), lr=setup.lr * lr_factor, weight_decay=0.0,
                                 eps=_ADAMW_EPS * share)
    trained_spec = _ShareOfStep(**asdict(spec), share=share) if share != 1.0 else spec
    return Trainer(trained_spec, policy, device, net, optimizer, scaler, None, None)


def _train(trainer: Any, task: Task, setup: Setup, log: _Log, histograms: bool,
           ranks: Ranks | None = None) -> None:
    """``setup.steps`` timed training steps on the task's batches (data order from the seed;
    on several ranks each trains its slice of every batch), probing the gradients at the
    first, middle and last step (in one process only: a probe's extra backward would
    reduce the gradients between the ranks)."""
    data = torch.Generator().manual_seed(log.seed)
    probe_steps = {0, setup.steps // 2, setup.steps - 1} if ranks is None else set()
    for step in range(setup.steps):
        inputs, targets = task.batch(data)
        trainer.inputs = models.to_device(_my_share(inputs, ranks), trainer.device)
        trainer.targets = models.to_device(_my_share(targets, ranks), trainer.device)
        if step in probe_steps:
            shares, rows = probes.probe(trainer, log.model, step, histograms)
            log.underflow.append(shares)
            log.hist += rows
        scale_before = trainer.scaler.get_scale() if log.scaling else None
        sampled = (step + 1) % setup.sample_every == 0 or step + 1 == setup.steps
        weights = updates.snapshot(trainer.optimizer) if sampled else []
        trainer.sync()
        started = time.perf_counter()
        log.window.append(trainer.step())
        trainer.sync()
        log.step_times.append(time.perf_counter() - started)
        skipped = log.scaling and trainer.scaler.get_scale() < scale_before  # inf/NaN found
        if skipped:
            log.skip(step)
        if sampled:
            lost = None if skipped else updates.lost_share(trainer.optimizer, weights)
            log.sample(step + 1, trainer.scaler.get_scale() if log.scaling else None, lost)


def train_one(
    model_name: str, policy_name: str, seed: int, setup: Setup, device: Any,
    *, policy: precision.Policy | None = None, lr_factor: float = 1.0,
    eval_set: Sequence[tuple[Any, Any]] | None = None, task: Task | None = None,
    shared: strategy.Strategy | None = None, ranks: Ranks | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Train one (model or task, policy, seed); return its parity row (before verdicts), its
    curve rows and its grad_hist.csv rows (only FP32's seed 0 has them). Under torchrun
    (``ranks``) the model is shared as ``shared`` says and the row's precision is
    ``policy@strategy``; every rank returns the same row, rank 0 writes it."""
    spec = spec_for(model_name, setup)
    if policy is None:
        policy, lr_factor = resolve_policy(policy_name)
    task = task or make_task(model_name, setup, None)
    held_out = eval_set if eval_set is not None else tasks.eval_set(task, device)
    # The loss's share of the optimizer step: a rank's micro-batch is 1/world of the batch,
    # and the ranks' gradients are averaged, so the share is that of the whole batch.
    share = setup.batch_size * setup.size / setup.step_tokens if setup.step_tokens else 1.0
    trainer = _trainer(spec, policy, seed, setup, device, lr_factor, share,
                       shared if ranks is not None else None)
    initial_eval_loss, _ = evaluate(trainer, held_out)
    label = run_label(policy_name, shared.name if ranks is not None and shared else None)
    log = _Log(model_name, label, seed, share, trainer.scaler.is_enabled())
    _train(trainer, task, setup, log, histograms=label == "fp32" and seed == 0, ranks=ranks)
    eval_loss, eval_accuracy = evaluate(trainer, held_out)
    if not math.isfinite(eval_loss):
        log.nonfinite += 1
    row = dict.fromkeys(COLUMNS + EXTRA_COLUMNS)
    probed = len(log.underflow) or math.nan  # no probes on several ranks: NaN shares
    row.update(
        model=model_name, precision=label, seed=seed, steps=setup.steps,
        eval_loss=eval_loss, eval_accuracy=eval_accuracy, optimal_loss=task.optimal_loss,
        nonfinite_steps=log.nonfinite, scaler_skipped_steps=log.skipped if log.scaling else None,
        underflow_frac=sum(u for u, _ in log.underflow) / probed,
        subnormal_frac=sum(s for _, s in log.underflow) / probed,
        scaler_first_skip_step=log.first_skip,
        scaler_scale_final=trainer.scaler.get_scale() if log.scaling else None,
        initial_eval_loss=initial_eval_loss, final_train_loss=log.curve[-1]["loss"],
        train_time_s=sum(log.step_times), step_time_ms=1e3 * statistics.median(log.step_times),
        batch_size=setup.batch_size, strategy=label.partition(tasks.STRATEGY_MARK)[2] or None,
        ranks=ranks.world_size if ranks is not None else 1,
    )
    if seed == 0 and hasattr(task, "sample"):  # real text: what the policy's model writes
        row.update(sample_prompt=data.SAMPLE_PROMPT, sample_text=task.sample(trainer))
    return row, log.curve, log.hist


def make_task(name: str, setup: Setup, data_dir: data.DataDir | None) -> Any:
    """The task ``name`` trains on: real data (bench/parity/data.py) or a generated one."""
    spec = spec_for(name, setup)
    if name in data.TASK_MODELS:
        return data.make_task(name, spec, setup, data_dir)
    return Task(spec, setup)


# --------------------------------------------------------------------------------------------
# The child's two requests


def plan(device: str, model_names: Sequence[str] | None, chosen: Sequence[str],
         keep_emulated: bool, steps: int | None,
         data_dir: data.DataDir | None = None) -> dict[str, Any]:
    """What the runs will be on ``device``: the device string for the run children, the
    models (the default ones for its type when none are named), the policies (emulated ones
    left out unless ``keep_emulated``), each model's setup, and the (model, policy) pairs the
    device or model cannot run, with why. BadInput for a bad or absent device."""
    from bench.cell.train import resolve_device

    dev = resolve_device(device)
    names = list(model_names) if model_names else [
        *tasks.default_models(dev.type), *(data_dir.tasks() if data_dir else [])]
    _check_own_models(names)
    if not keep_emulated:  # by default no emulated policy (FP8 off CUDA): slow, and no news
        chosen = [n for n in chosen if not resolve_policy(n)[0].emulated_on(dev.type)]
    unsupported = []
    for model in names:
        for name in tasks.task_policies(model, chosen):
            reason = resolve_policy(name)[0].unsupported_reason(dev, spec_for(model))
            if reason:
                unsupported.append([model, name, reason])
    return {"device": str(dev), "device_type": dev.type, "models": names,
            "device_count": torch.cuda.device_count() if dev.type == "cuda" else None,
            "precisions": list(chosen), "unsupported": unsupported,
            "setups": {m: asdict(tasks.setup_for(m, steps, data_dir)) for m in names}}


def _check_own_models(names: Sequence[str]) -> None:
    """BadInput (one line naming the file) for a user's module that breaks the contract."""
    from bench.cell.check import ModelProblem, check

    for name in names:
        spec = spec_for(name)
        if spec.source is not None:
            try:
                check(spec, spec.default_size)
            except ModelProblem as exc:
                raise BadInput(str(exc)) from None


def _prepare_device(name: str, ranks: Ranks | None = None) -> Any:
    """The run's torch.device (a rank's: cuda:LOCAL_RANK), made current before anything
    touches CUDA (as in a cell)."""
    from bench.cell.timing import use_device
    from bench.cell.train import resolve_device

    dev = resolve_device(name, ranks)
    use_device(dev)  # cuda:N's own stream and context
    if dev.type == "cpu" and os.environ.get("OMP_NUM_THREADS") is None:
        # Tiny models gain nothing past ~4 threads; ranks on one CPU share its cores.
        world = ranks.world_size if ranks is not None else 1
        torch.set_num_threads(max(1, min(4, (os.cpu_count() or 1) // world)))
    return dev


def _train_seeds(dev: Any, args: argparse.Namespace, ranks: Ranks | None = None) -> int:
    """Train each of ``args.seeds`` in turn and write its result to its ``--out`` path (rank
    0's, on several ranks). A seed that fails on several ranks ends the child: its peers
    may be waiting in a collective it will never join (torchrun stops them)."""
    from bench.cell.train import is_oom

    setup = Setup(**json.loads(args.setup))
    policy, lr_factor = resolve_policy(args.precision)
    shared = strategy.parse(args.strategy) if args.strategy else None
    label = run_label(args.precision, shared.name if shared else None)
    task = make_task(args.model, setup, _data_dir(args))
    held_out = tasks.eval_set(task, dev)
    failed = 0
    for seed, out in zip(args.seeds, args.out, strict=True):
        started = time.perf_counter()
        try:
            _inject_fault(args.model, label, seed)
            row, curve, hist = train_one(args.model, args.precision, seed, setup, dev,
                                         policy=policy, lr_factor=lr_factor, eval_set=held_out,
                                         task=task, shared=shared, ranks=ranks)
        except Exception as exc:  # an OOM, a crash: this seed's result, the next seed goes on
            text = "".join(traceback.format_exception_only(exc)).strip()
            error = f"oom: {text.splitlines()[-1]}" if is_oom(exc) else text
            row, curve, hist = failed_row(args.model, label, seed, setup.steps, error), [], []
            failed += 1
            if ranks is not None:
                error = f"rank {ranks.rank}: {error}"
                row["error"] = error[-300:]
        if ranks is None or ranks.rank == 0 or row.get("error"):
            _write_json(Path(out), {"row": row, "curve": curve, "hist": hist,
                                    "elapsed_s": time.perf_counter() - started})
        if failed and ranks is not None:
            raise SystemExit(f"parity: {args.model} {label} seed {seed} failed: {error}")
    return 1 if failed else 0


def _data_dir(args: argparse.Namespace) -> data.DataDir | None:
    """The checked --data-dir the parent passed on (BadInput if its files changed since)."""
    return data.check_data_dir(args.data_dir) if args.data_dir else None


def _write_json(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` whole or not at all: a child killed mid-write leaves no half file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, allow_nan=True), encoding="utf-8")
    os.replace(tmp, path)


def _inject_fault(model: str, precision_name: str, seed: int) -> None:
    """Test-only failures, so the parent's handling can be tested on CPU; unset in normal use.

    AMPBENCH_PARITY_FAULT="model:precision:seed=raise|oom|kill|hang[,...]" makes that seed
    raise (a RuntimeError, or a CUDA OOM: the child records it and goes on), SIGKILL its
    process or hang (the parent records those from outside).
    """
    faults = os.environ.get(FAULT_ENV, "")
    if not faults:
        return
    actions = dict(item.strip().rpartition("=")[::2] for item in faults.split(",") if "=" in item)
    action = actions.get(f"{model}:{precision_name}:{seed}")
    here = f"{model} {precision_name} seed {seed}"
    if action == "raise":
        raise RuntimeError(f"injected fault in {here}")
    if action == "oom":
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected fault in {here})")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "hang":
        time.sleep(3600)


def _parser() -> argparse.ArgumentParser:
    def names(text: str) -> list[str]:
        return [n for n in text.split(",") if n]

    parser = argparse.ArgumentParser(prog="python -m bench.parity.train", description=__doc__)
    sub = parser.add_subparsers(dest="request", required=True)
    run = sub.add_parser("run", help="train the seeds of one (model, policy)")
    run.add_argument("--model", required=True)
    run.add_argument("--precision", required=True)
    run.add_argument("--seeds", type=lambda t: [int(s) for s in names(t)], required=True)
    run.add_argument("--setup", required=True, help="the Setup's fields as JSON")
    run.add_argument("--device", required=True)
    run.add_argument("--out", action="append", required=True, help="one per seed, in order")
    run.add_argument("--data-dir", help="the user's data files (bench/parity/data.py)")
    run.add_argument("--strategy", help="under torchrun: how the ranks share the model "
                     "(bench/strategy.py)")
    ask = sub.add_parser("plan", help="what the runs will be on --device")
    ask.add_argument("--device", required=True)
    ask.add_argument("--models", type=names)
    ask.add_argument("--precisions", type=names, required=True)
    ask.add_argument("--keep-emulated", action="store_true")
    ask.add_argument("--steps", type=int)
    ask.add_argument("--out", required=True)
    ask.add_argument("--data-dir", help="the user's data files (bench/parity/data.py)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The child's entry: ``run`` or ``plan`` as argv says, its result written to ``--out``."""
    # First: a child never outlives its parent or its timeout, even a hung one.
    proctree.watch_from_env()
    args = _parser().parse_args(argv)
    if args.request == "plan":
        try:
            result = plan(args.device, args.models, args.precisions, args.keep_emulated,
                          args.steps, _data_dir(args))
        except BadInput as exc:
            result = {"bad_input": str(exc)}
        _write_json(Path(args.out), result)
        return 2 if "bad_input" in result else 0
    if len(args.out) != len(args.seeds):
        raise SystemExit(f"{len(args.seeds)} seeds need as many --out paths, got {len(args.out)}")
    ranks = Ranks.from_env()
    if args.strategy and ranks is None:
        raise SystemExit(f"--strategy {args.strategy}: run the child under torchrun")
    dev = _prepare_device(args.device, ranks)
    with process_group(dev, ranks):
        return _train_seeds(dev, args, ranks)


if __name__ == "__main__":
    sys.exit(main())
