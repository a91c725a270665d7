"""`ampbench validate`: a GPU you have for minutes, spent in order of value, within a budget.

    PYTHONPATH=. python3 -m bench validate --out DIR --time-budget 9m
    python3 -m bench validate --out DIR --time-budget 9m --plan --gpu "H100 SXM"  # any machine

One command, for a box that is lent for a few minutes and has only what it came with (torch,
pandas, seaborn, tabulate, nvidia-ml-py, pytest; transformers and torchvision for the peers;
torchao only if its wheel was carried and installed on the same command line). Each step is a
child process of its own, its output in DIR/logs/, in this order:

1. ``env``: the environment and GPU state (``ampbench env --json`` -> DIR/env.json);
2. ``tests``: the GPU correctness tests (``pytest -m "gpu and not perf"``), capped;
3. ``sweep``: every model under fp32, bf16 and fp16 at one batch size (``ampbench run`` into
   DIR/run with the runner's own ``--time-budget``);
4. with time to spare only, each when its estimate fits beside what the essential steps after
   it need: ``tf32``, ``compile`` (bf16 under torch.compile), ``fp8`` (fp8 and fp8-rowwise
   compiled: needs torchao and an FP8 GPU) and ``batches`` (twice the batch, fp32 and bf16);
5. ``parity``: a short accuracy parity (2 seeds, the underflow task too) into DIR/run;
6. ``peers``: ours next to transformers' and torchvision's models (DIR/run/peers.csv);
7. ``report``: DIR/run/report.md and plots, for whatever finished.

Everything is written as it goes: DIR/validate.json (each step's state, estimate and wall
time, over every call) and DIR/VALIDATE.md (the same as a table to read) after every step,
and a sweep's records as each cell ends. A command killed by its time limit leaves what
finished; the same command again (a second lent call, DIR carried back) skips the steps that
are done, finishes a stopped sweep or parity where it stopped and runs what is left.

The estimates are a priori (``Costs``): process start-up, compile and parity-run costs and
achieved TFLOP/s per model family and math, for an H100 SXM from public eager-PyTorch rates
(bench/config's gpu_quick explains them), scaled by the peak table (bench/telemetry/peaks.py) for
other GPUs. VALIDATE.md puts each step's measured wall time beside its estimate, so the first
run on a GPU corrects them. Exit 0 when every planned step is done, 3 when the budget left
steps for another call (the command to run is printed), 1 when a step failed, 2 on bad input,
128+N when signal N stopped it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from bench import BadInput, paths
from bench.config import ModelAxis
from bench.run.lock import lock
from bench.run.signals import Stopped, stop_on_signals
from bench.validate.execute import BUDGET_EXIT, execute
from bench.validate.plan import (
    CPU_MODELS,
    GPU_MODELS,
    Step,
    Target,
    build_plan,
    detect,
    render_plan,
    schedule,
    target_for,
)
from bench.validate.state import ENV_JSON, LOGS, RUN, STATE, SUMMARY, load_state

__all__ = ["BUDGET_EXIT", "ENV_JSON", "LOGS", "RUN", "STATE", "SUMMARY", "Step", "build_plan",
           "main", "schedule", "target_for"]


def _axes(target: Target, names: Sequence[str] | None) -> tuple[ModelAxis, ...] | None:
    if not names:
        return None
    own = {a.name: a for a in (GPU_MODELS if target.gpu else CPU_MODELS)}
    chosen = []
    for name in names:
        if name not in own:
            # A model of the user's own has no a-priori cost to plan with: `run` measures it.
            raise BadInput(f"--models: '{name}' is not a model of this plan (valid: "
                           f"{', '.join(own)}); benchmark any other model, your own "
                           "included, with `ampbench run --models`")
        chosen.append(own[name])
    return tuple(chosen)


def _select(steps: list[Step], only: Sequence[str] | None,
            skip: Sequence[str] | None) -> list[Step]:
    known = [s.name for s in steps]
    for flag, names in (("--only", only), ("--skip", skip)):
        for name in names or ():
            if name not in known:
                raise BadInput(f"{flag}: unknown step '{name}'; valid: {', '.join(known)}")
    if only:
        return [s if s.name in only else replace(s, skip=s.skip or "not in --only")
                for s in steps]
    return [replace(s, skip=s.skip or "--skip") if s.name in (skip or ()) else s
            for s in steps]


def main(args: argparse.Namespace) -> int:
    """`ampbench validate`: the plan (``--plan``), or carry it out into --out."""
    from bench.cli_types import duration_s

    budget_s = duration_s(args.time_budget)
    if args.gpu and not args.plan:
        raise BadInput("--gpu names the GPU to plan for: it goes with --plan (a real run "
                       "plans for the GPU it finds)")
    target = target_for(args.gpu) if args.gpu else detect()
    out = Path(args.out)
    steps = _select(build_plan(target, out, _axes(target, args.models)), args.only, args.skip)
    done: frozenset[str] = frozenset()
    if (out / STATE).exists():
        done = frozenset(n for n, e in load_state(out)["steps"].items()
                         if e.get("status") == "done")
    if args.plan:
        print(render_plan(target, steps, budget_s, done))
        return 0
    out = paths.output_dir(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python3", "-m", "bench", "validate", *sys.argv[2:]]) \
        if sys.argv[1:2] == ["validate"] else "the same command"
    with lock(out, "ampbench validate"), stop_on_signals():
        print(render_plan(target, steps, budget_s, done), file=sys.stderr)
        try:
            return execute(steps, target, out, budget_s, command)
        except Stopped as stop:
            print(f"\nvalidate: stopped by {stop}; what finished is in {out}\n"
                  f"resume with: {command}", file=sys.stderr)
            return 128 + stop.signum
