"""The plan of `ampbench validate`: what each step runs, what it is estimated to take on the
target GPU (or CPU), and what a call with a given budget does. Estimates are a priori
(``Costs``); validate.json records the measured wall times beside them."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import models
from bench import parity
from bench.config import Cell, Matrix, ModelAxis, matrix
from bench.run.device import Probe, probe
from bench.telemetry.peaks import KINDS, PEAK_TFLOPS, device_key, math_kind
from bench.validate.state import ENV_JSON, MATRICES, RUN, TESTS_XML

_MIN_START_S = 5.0  # no step starts with less than this left
ROOT = Path(__file__).resolve().parents[2]  # the checkout: tests/ and `python -m bench`


@dataclass(frozen=True)
class Costs:
    """A priori seconds and rates that the plan is built from."""

    env_s: float
    tests_s: float  # the whole GPU test selection
    tests_cap_s: float  # the most the tests may take: a hung test does not eat the budget
    process_s: float  # one cell process: interpreter, torch, device context, model, FLOP count
    compile_s: float  # torch.compile of one cell's forward and backward, empty cache
    parity_run_s: float  # one short parity run: model build, training, evaluation
    peers_start_s: float  # importing transformers and torchvision
    peers_pair_s: float  # one model and policy: both models built, checked and timed
    report_s: float
    # Achieved TFLOP/s by "family:kind" (else "kind"): what a step's FLOPs take.
    rates: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def step_s(self, model: str, kind: str, flops_per_step: float) -> float:
        spec = models.get(model)
        rate = self.rates.get(f"{spec.family}:{kind}") or self.rates[kind]
        return flops_per_step / (rate * 1e12)


# H100 SXM, eager PyTorch at public rates (bench/config/__init__.py, gpu_quick): fp32 ~45% of the 67
# TFLOP/s peak; TF32 ~60 (ResNet-50) and ~130 (transformers); fp16/bf16 ~75 and ~250. FP8 is
# planned at bf16's rate (math_kind): its gain is what the run measures, not what the
# plan assumes.
_H100_RATES = {"fp32": 30.0, "tf32": 130.0, "fp16": 250.0, "bf16": 250.0,
               "resnet:tf32": 60.0, "resnet:fp16": 75.0, "resnet:bf16": 75.0}
_H100 = "H100 SXM"
H100_COSTS = Costs(env_s=10, tests_s=150, tests_cap_s=240, process_s=8, compile_s=55,
                   parity_run_s=3.5, peers_start_s=15, peers_pair_s=10, report_s=20,
                   rates=_H100_RATES)
# Two shared cores, tiny models: start-up and Python dominate (measured on AMD EPYC here).
CPU_COSTS = Costs(env_s=8, tests_s=30, tests_cap_s=120, process_s=5, compile_s=60,
                  parity_run_s=3, peers_start_s=10, peers_pair_s=4, report_s=20,
                  rates={kind: 0.01 for kind in KINDS})


def gpu_costs(device_name: str) -> Costs:
    """The H100's costs with its rates scaled by this GPU's dense peaks (PEAK_TFLOPS);
    a GPU not in the table is planned at a third of an H100, and the plan says so."""
    key = device_key(device_name)
    if key is None:
        return replace(H100_COSTS, rates={k: v / 3 for k, v in _H100_RATES.items()},
                       note=f"'{device_name}' is not in the peak table: rates guessed at a "
                            "third of an H100's")
    peaks, h100 = PEAK_TFLOPS[key], PEAK_TFLOPS[_H100]
    rates = {}
    for name, rate in _H100_RATES.items():
        kind = name.rpartition(":")[2]
        # A GPU without TF32 (AMD CDNA2) runs tf32 as fp32.
        peak = peaks.get(kind) or peaks["fp32"]
        rates[name] = rate * peak / h100[kind]
    return replace(H100_COSTS, rates=rates)


@dataclass(frozen=True)
class Target:
    """The machine the plan is for."""

    device: str  # "cuda" | "cpu"
    name: str  # as the driver names it, or "cpu"
    costs: Costs
    fp8: str | None  # why the FP8 step cannot run, or None

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"


def _torchao_missing() -> str | None:
    return None if importlib.util.find_spec("torchao") is not None else (
        "torchao is not installed (carry its wheel: pip install --no-deps torchao-*.whl)")


def target_for(gpu_name: str | None) -> Target:
    """A Target for a GPU of that name, or for this machine's CPU when ``gpu_name`` is None."""
    if gpu_name is None:
        return Target("cpu", "cpu", CPU_COSTS, "FP8 off CUDA is emulated: its speed says nothing")
    key = device_key(gpu_name)
    fp8 = _torchao_missing()
    if fp8 is None and (key is None or "fp8" not in PEAK_TFLOPS[key]):
        fp8 = f"'{gpu_name}' has no FP8 tensor cores in the peak table"
    return Target("cuda", gpu_name, gpu_costs(gpu_name), fp8)


def detect() -> Target:
    """This machine: its first GPU as NVML sees it (no torch needed), else its CPU."""
    from bench.telemetry.nvml import open_nvml

    try:
        nvml = open_nvml()
    except RuntimeError:
        return target_for(None)
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        index = int(visible) if visible.isdigit() else 0
        if nvml.nvmlDeviceGetCount() <= index:
            return target_for(None)
        name = nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(index))
        return target_for(name.decode() if isinstance(name, bytes) else str(name))
    except Exception:  # a driver that answers nothing useful: plan for the CPU
        return target_for(None)
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


# The models at one realistic batch each (gpu-quick's: bench/config/__init__.py says why these).
GPU_MODELS = (ModelAxis("resnet50", (256,), 224), ModelAxis("bert-base", (64,), 128),
              ModelAxis("gpt2-small", (16,), 1024))
CPU_MODELS = (ModelAxis("resnet-tiny", (8,), 32), ModelAxis("bert-tiny", (8,), 32),
              ModelAxis("gpt2-tiny", (8,), 64))


@dataclass(frozen=True)
class Step:
    """One child process of the plan."""

    name: str
    what: str
    argv: tuple[str, ...]
    estimate_s: float
    essential: bool = True  # optional steps run only with time to spare
    budgeted: bool = False  # the command takes --time-budget (a sweep, parity)
    cap_s: float = math.inf  # the most the step may take, whatever is left
    done_codes: tuple[int, ...] = (0,)  # exit codes that mean "finished" (results are data)
    stdout: str | None = None  # a file under DIR for the step's stdout, else its log
    skip: str | None = None  # why the step is not in this plan
    matrix: Matrix | None = None  # a sweep's matrix, written to DIR/matrices/<name>.toml


def _python(*args: str) -> tuple[str, ...]:
    return (sys.executable, *args)


def _sweep_matrix(target: Target, axes: Sequence[ModelAxis], name: str, precisions: Sequence[str],
                  compiled: bool = False, calibration: int = 0) -> Matrix:
    gpu = target.gpu
    return Matrix(
        name=f"validate-{name}", models=tuple(axes), precisions=tuple(precisions),
        compile=(True,) if compiled else (False,),
        compile_precisions=tuple(precisions),
        warmup=5 if gpu else 2, steps=20 if gpu else 10, device=target.device,
        timeout_s=180.0 if gpu else 120.0, calibration=calibration, parity=False)


def sweep_estimate_s(mx: Matrix, costs: Costs, facts: Probe) -> float:
    """Seconds for a sweep step: per process start-up, compile and its training steps, the
    FLOPs per step and the cells left unsupported from the device probe (``facts``)."""
    each = []
    for cell in matrix.expand(mx):
        if cell.cell_id in facts.unchanged:  # an `unsupported` record in seconds
            each.append(costs.process_s)
            continue
        work = facts.flops_per_step[cell.cell_id]
        each.append(costs.process_s + (costs.compile_s if cell.compile else 0.0)
                    + (mx.warmup + mx.steps) * costs.step_s(cell.model,
                                                            math_kind(cell.precision), work))
    # The runner's calibration processes run the first cell again (bench/run/sweep.py, plan).
    return sum(each) + (mx.calibration * each[0] if each else 0.0)


@functools.lru_cache(maxsize=8)
def _facts(cells: tuple[Cell, ...]) -> Probe:
    """What torch knows of the plan's cells, from the device probe (a child: validate itself
    never imports torch); the FLOPs do not depend on the device, so the CPU answers."""
    return probe("cpu", cells)


def build_plan(target: Target, out: Path, axes: Sequence[ModelAxis] | None = None) -> list[Step]:
    """Every step for ``target``, in the order they run; ``axes``: the models (default:
    the target's)."""
    costs, gpu = target.costs, target.gpu
    axes = tuple(axes or (GPU_MODELS if gpu else CPU_MODELS))
    run_dir = out / RUN
    tests = ROOT / "tests"
    return [
        Step("env", "environment and GPU state -> env.json",
             _python("-m", "bench", "env", "--json"), costs.env_s, stdout=ENV_JSON),
        Step("tests", 'GPU correctness tests: pytest -m "gpu and not perf"',
             _python("-m", "pytest", str(tests), "-m", "gpu and not perf", "-q", "-p",
                     "no:cacheprovider", "--junitxml", str(out / TESTS_XML)),
             costs.tests_s, cap_s=costs.tests_cap_s, done_codes=(0, 1, 5),
             skip=None if tests.is_dir() else "no tests/ beside the package (an installed copy)"),
        *_sweeps(target, axes, out),
        _parity(target, [a.name for a in axes], run_dir),
        _peers(target, [a.name for a in axes], run_dir),
        Step("report", "report.md and plots for what finished",
             _python("-m", "bench", "report", str(run_dir)), costs.report_s),
    ]


def _sweeps(target: Target, axes: tuple[ModelAxis, ...], out: Path) -> list[Step]:
    """The sweep steps: the essential one first, then the optional ones in order of value."""
    gpu = target.gpu
    double = tuple(replace(a, batch_sizes=tuple(2 * b for b in a.batch_sizes)) for a in axes)
    sweeps = [
        ("sweep", "every model under fp32, bf16, fp16 at one batch",
         _sweep_matrix(target, axes, "sweep", ("fp32", "bf16", "fp16"), calibration=2), True,
         None),
        ("tf32", "every model under tf32",
         _sweep_matrix(target, axes, "tf32", ("tf32",)), False,
         None if gpu else "tf32 on a CPU is fp32"),
        ("compile", "bf16 under torch.compile",
         _sweep_matrix(target, axes, "compile", ("bf16",), compiled=True), False,
         None if gpu else "compiling on a CPU takes minutes and says nothing of a GPU"),
        ("fp8", "fp8 and fp8-rowwise under torch.compile",
         _sweep_matrix(target, axes, "fp8", ("fp8", "fp8-rowwise"), compiled=True), False,
         target.fp8),
        ("batches", "twice the batch under fp32 and bf16",
         _sweep_matrix(target, double, "batches", ("fp32", "bf16")), False, None),
    ]
    facts = _facts(tuple(c for _, _, mx, _, _ in sweeps for c in matrix.expand(mx)))
    return [Step(name, what, _python("-m", "bench", "run", "--matrix",
                                     str(out / MATRICES / f"{name}.toml"), "--out",
                                     str(out / RUN), "--no-parity", "--no-report"),
                 sweep_estimate_s(mx, target.costs, facts), essential=essential, budgeted=True,
                 skip=skip, matrix=mx)
            for name, what, mx, essential, skip in sweeps]


def _parity(target: Target, names: list[str], run_dir: Path) -> Step:
    """A short parity of the models and the underflow task, fp32 against fp16 and bf16."""
    policies = ("fp32", "fp16", "bf16")
    parity_models = [*names, *parity.tasks_for(policies)]
    seeds, num_steps = 2, (40 if target.gpu else 30)
    num_runs = sum(len(parity.task_policies(m, policies)) for m in parity_models) * seeds
    return Step(
        "parity", f"short accuracy parity: {seeds} seeds x {num_steps} steps, {num_runs} runs",
        _python("-m", "bench", "parity", "--out", str(run_dir), "--models",
                ",".join(parity_models), "--precisions", ",".join(policies), "--steps",
                str(num_steps), "--seeds", str(seeds), "--device", target.device),
        num_runs * target.costs.parity_run_s, budgeted=True, done_codes=(0, 1))


def _peers(target: Target, names: list[str], run_dir: Path) -> Step:
    policies = ("fp32", "bf16")
    return Step(
        "peers", "ours next to transformers' and torchvision's models -> peers.csv",
        _python("-m", "bench", "peers", "--models", ",".join(names), "--precisions",
                ",".join(policies), "--device", target.device, "--steps",
                "20" if target.gpu else "10", "--warmup", "5" if target.gpu else "2",
                "--out-dir", str(run_dir)),
        target.costs.peers_start_s + len(names) * len(policies) * target.costs.peers_pair_s,
        done_codes=(0, 1))


def later_need_s(steps: Sequence[Step], index: int, done: set[str]) -> float:
    """What the essential steps after ``index`` still need."""
    return sum(s.estimate_s for s in steps[index + 1:]
               if s.essential and s.skip is None and s.name not in done)


def allotted_s(steps: Sequence[Step], index: int, left_s: float, done: set[str]) -> float | None:
    """Seconds step ``index`` may take with ``left_s`` left, or None when it must not start:
    an essential step may use all but the report's share, an optional one only what the
    essential steps after it leave, and only when its estimate fits in that."""
    step = steps[index]
    if step.essential:
        report = next((s for s in steps[index + 1:] if s.name == "report"), None)
        allot = left_s - (report.estimate_s if report is not None else 0.0)
    else:
        allot = left_s - later_need_s(steps, index, done)
        if step.estimate_s > allot:
            return None
    allot = min(allot, step.cap_s)
    return allot if allot >= _MIN_START_S else None


def schedule(steps: Sequence[Step], budget_s: float,
             done: frozenset[str] = frozenset()) -> list[tuple[Step, float | None, str]]:
    """What a call with ``budget_s`` does by the plan's own estimates: per step, the seconds
    it spends (None: it does not run) and why."""
    decisions: list[tuple[Step, float | None, str]] = []
    left = budget_s
    for i, step in enumerate(steps):
        if step.skip is not None:
            decisions.append((step, None, f"not planned: {step.skip}"))
            continue
        if step.name in done:
            decisions.append((step, None, "done in an earlier call"))
            continue
        allot = allotted_s(steps, i, left, set(done))
        if allot is None:
            decisions.append((step, None, "no time left: the next call" if step.essential
                              else "no time to spare: the next call"))
            continue
        spend = min(step.estimate_s, allot)
        left -= spend
        decisions.append((step, spend, "runs" if spend >= step.estimate_s
                          else f"runs, cut at {allot:.0f} s"))
    return decisions


def render_plan(target: Target, steps: Sequence[Step], budget_s: float,
                done: frozenset[str] = frozenset()) -> str:
    """The plan as a table: each step, its estimate and whether it fits, and the total."""
    from tabulate import tabulate

    decisions = schedule(steps, budget_s, done)
    rows = [[step.name, step.what, "" if step.skip or step.name in done
             else f"{step.estimate_s:.0f}", note] for step, _, note in decisions]
    total = sum(spend for _, spend, _ in decisions if spend is not None)
    lines = [f"ampbench validate plan for {target.name} ({target.device}), budget "
             f"{budget_s:.0f} s",
             tabulate(rows, headers=["step", "what", "estimate s", "in this call"],
                      tablefmt="github"),
             f"total: {total:.0f} s of {budget_s:.0f} s"]
    if target.costs.note:
        lines.append(f"note: {target.costs.note}")
    return "\n".join(lines)
