"""The parity stage, parent side: plan the runs, reuse finished ones, launch the children that
train the rest, and write parity.csv, parity_curves.csv and grad_hist.csv. torch-free.

A child (``python -m bench.parity.train``, bench/parity/train.py) first says what the runs are
on the device (``plan``); then one child per (model, policy) trains that pair's seeds, each
under the per-run timeout times its number of seeds, in a session of its own, and writes one
JSON result per seed to a path given here (bench/run/launch.py starts, times out and kills
it, as it does a cell). A seed whose child died first (a crash, an OOM, a kill, the timeout)
is a row with ``error`` saying so, and the other children go on. Each run, finished or
failed, is appended to ``parity_runs.jsonl`` as its child ends; a later stage into the same
directory reuses the finished ones and trains the failed and missing ones again.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from bench import BadInput, config, failures, paths, precision, store
from bench.parity import data
from bench.parity.sharing import Sharing, labels
from bench.parity.tasks import BROKEN, TASK_MODELS, spec_for, split_label, task_policies
from bench.parity.verdict import (
    COLUMNS,
    CURVE_COLUMNS,
    EXTRA_COLUMNS,
    HIST_COLUMNS,
    failed_row,
    judge,
)
from bench.run import launch, lock
from bench.strategy import check as refused_by
from models.external import BadReference

RUNS = "parity_runs.jsonl"  # one finished (model, precision, seed) run per line
SAMPLES = "parity_samples.csv"  # text each policy's model wrote (real text tasks, seed 0)
SAMPLE_COLUMNS = ("model", "precision", "seed", "prompt", "text")
DATA_FILES = "parity_data.json"  # the real-data files the runs read
DEFAULT_TIMEOUT_S = 600.0  # per run: generous, a full-size run on a GPU takes minutes
_CHILD = ("-m", "bench.parity.train")


class OutOfTime(Exception):
    """The time budget ran out before every parity run had finished.

    ``not_run`` names the runs not started (they are not recorded, so parity run again into
    the directory does them); ``path`` is the parity.csv written for the models whose runs
    all finished, or None when none did.
    """

    def __init__(self, not_run: list[str], path: Path | None) -> None:
        super().__init__(f"{len(not_run)} parity run(s) not started")
        self.not_run = not_run
        self.path = path


@dataclass(frozen=True)
class Plan:
    """What the plan child said the runs are on the device (bench/parity/train.py's plan)."""

    device: str  # handed to every run child: cpu, cuda:N
    device_type: str
    models: list[str]
    precisions: list[str]
    setups: dict[str, dict[str, Any]]  # model -> Setup fields
    unsupported: list[tuple[str, str, str]]  # (model, policy, why)
    device_count: int | None = None  # CUDA devices the child saw; None off CUDA


class _Run(NamedTuple):
    """One (model, precision, seed) of the stage; ``precision`` is the run's label
    (``bf16@fsdp2:bf16/fp32`` on several ranks, tasks.run_label)."""

    model: str
    precision: str
    seed: int
    setup: dict[str, Any]
    key: str  # what makes a finished run reusable
    ranks: int = 1  # torchrun processes that train it together

    @property
    def label(self) -> str:
        return f"{self.model} {self.precision} seed {self.seed}"


class _Finished(NamedTuple):
    """A run's outcome, as parity_runs.jsonl keeps it (``row["error"]`` set when it failed)."""

    row: dict[str, Any]
    curve: list[dict[str, Any]]
    hist: list[dict[str, Any]]
    wall_s: float | None  # None when not known


def run_parity(
    run_dir: Path | str, models: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None, steps: int | None = None, seeds: int = 3,
    device: str = "auto", time_left: Callable[[], float] | None = None,
    unknown_s: float = math.inf, timeout_s: float = DEFAULT_TIMEOUT_S,
    data_dir: Path | str | None = None, sharing: Sharing | None = None,
) -> Path:
    """Train every (model, precision, seed) in child processes, judge against FP32 and write
    parity.csv to run_dir; returns its path (parity_curves.csv and grad_hist.csv beside it).

    Policies the device cannot run are skipped with a note on stderr; runs already in
    run_dir's parity_runs.jsonl are reused. ``timeout_s`` bounds one run (a child training
    n seeds gets n times it). With ``time_left`` (seconds, asked before each run) no run
    starts that would not finish: the slowest finished run of the same model is its estimate,
    ``unknown_s`` when none has run; the first that does not fit stops the stage and
    OutOfTime says what is left. ``data_dir`` holds the user's data files (CIFAR-10, token
    ids: bench/parity/data.py), checked by size before anything runs; its tasks are added to
    the default models. ``sharing`` trains every policy on several ranks under a strategy
    (FSDP2 or DDP: the Sharing class), FP32 in one process beside them as the reference.
    """
    model_names, chosen = _validate(models, precisions, steps, seeds)
    folder = data.check_data_dir(data_dir) if data_dir is not None else None
    data.check_tasks(list(model_names or ()), folder)
    config.check_limit("steps", steps or 0, "command line")
    config.check_limit("seeds", seeds, "command line")
    if not timeout_s > 0:
        raise BadInput(f"timeout must be positive, got {timeout_s:g} s")
    run_dir = paths.output_dir(run_dir, "parity run directory")
    plan = ask_plan(device, model_names, chosen, bool(precisions), steps, timeout_s, folder)
    data.check_lengths(plan.setups, folder)
    if sharing is not None:
        sharing = sharing.checked(plan.device, plan.device_count,
                                  {m: plan.setups[m]["batch_size"] for m in plan.models})
    run_dir.mkdir(parents=True, exist_ok=True)
    with lock.lock(run_dir, "ampbench parity"):  # re-entrant: a runner may hold it already
        data.record(run_dir / DATA_FILES, plan.models, folder)
        return _run_all(run_dir, plan.models, plan.precisions, seeds, plan, time_left,
                        unknown_s, timeout_s, folder, sharing)


def _validate(models_: Sequence[str] | None, precisions: Sequence[str] | None,
              steps: int | None, seeds: int) -> tuple[list[str] | None, list[str]]:
    for name in models_ or ():
        try:
            spec_for(name)
        except BadReference as exc:  # a user's module: the line names its file
            raise BadInput(str(exc)) from None
        except ValueError as exc:
            raise BadInput(f"{exc}; parity tasks: {', '.join(TASK_MODELS)}") from None
    # By default not the pure-bf16 policies: judged on their own task (the low-lr one) when
    # named, not on every model of a default run (the CPU's minutes).
    chosen = list(precisions) if precisions else [n for n in precision.NAMES
                                                  if n not in precision.PURE_BF16]
    valid = (*precision.NAMES, BROKEN)
    for name in chosen:
        if name not in valid:
            raise BadInput(f"unknown precision '{name}'; valid: {', '.join(valid)}")
    if "fp32" not in chosen:
        chosen.insert(0, "fp32")  # the reference band is always measured
    if steps is not None and steps < 1:
        raise BadInput(f"steps must be at least 1, got {steps}")
    if seeds < 2:
        raise BadInput(f"seeds must be at least 2 (the FP32 band needs a spread), got {seeds}")
    return (list(models_) if models_ else None), chosen


def ask_plan(device: str, model_names: Sequence[str] | None, chosen: Sequence[str],
             keep_emulated: bool, steps: int | None, timeout_s: float,
             data_dir: data.DataDir | None = None) -> Plan:
    """Ask a child what the runs are on ``device`` (only torch knows); BadInput for a bad or
    absent device, RuntimeError when the child gave no answer."""
    argv = [sys.executable, *_CHILD, "plan", "--device", device, "--precisions",
            ",".join(chosen)]
    if model_names:
        argv += ["--models", ",".join(model_names)]
    if steps:
        argv += ["--steps", str(steps)]
    if keep_emulated:
        argv.append("--keep-emulated")
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir.path)]
    with tempfile.TemporaryDirectory(prefix="ampbench-parity-") as tmp:
        out = Path(tmp, "plan.json")
        ended = launch.run_child_process([*argv, "--out", str(out)], timeout_s,
                                         Path(tmp, "plan.stderr"))
        answer = launch.read_result(out)
    if answer is None:
        raise RuntimeError(f"parity: the device check failed: {child_error(ended, timeout_s)}")
    if "bad_input" in answer:
        raise BadInput(str(answer["bad_input"]))
    return Plan(answer["device"], answer["device_type"], answer["models"],
                answer["precisions"], answer["setups"],
                [tuple(item) for item in answer["unsupported"]],  # type: ignore[misc]
                answer.get("device_count"))


def _planned(plan: Plan, model_names: Sequence[str], chosen: Sequence[str],
             seeds: int, data_dir: data.DataDir | None = None,
             sharing: Sharing | None = None) -> list[_Run]:
    """Every run in the order they train; the pairs the device cannot run are skipped here,
    with a note on stderr."""
    skipped = {(model, name): why for model, name, why in plan.unsupported}
    runs = []
    for model in model_names:
        for name, ranks in labels(task_policies(model, chosen), sharing):
            policy = split_label(name)[0]
            why = skipped.get((model, policy)) or (
                refused_by(sharing.strategy, policy) if sharing is not None and ranks else None)
            if why:
                print(f"parity: skipping {model} {name}: {why}", file=sys.stderr)
                continue
            setup = plan.setups[model]
            for seed in range(seeds):
                # The same key as when the parent built it from a Setup and a torch.device.
                # A user's model adds its source's hash: a changed file trains again.
                # A data-dir task adds its files' paths and sizes: other files train again.
                # Ranks add their count: a run on 4 ranks is not the run on 2.
                sha = spec_for(model).source_sha256
                files = data_dir.fingerprint(model) if data_dir is not None else []
                key = json.dumps([model, name, seed, setup, plan.device_type,
                                  *([sha] if sha else []), *([files] if files else []),
                                  *([{"ranks": ranks}] if ranks else [])])
                runs.append(_Run(model, name, seed, setup, key, ranks or 1))
    return runs


def _pairs(runs: list[_Run]) -> Iterator[list[_Run]]:
    """The runs in consecutive groups of one (model, precision): what one child trains."""
    group: list[_Run] = []
    for run in runs:
        if group and (run.model, run.precision) != (group[0].model, group[0].precision):
            yield group
            group = []
        group.append(run)
    if group:
        yield group


def _run_all(run_dir: Path, model_names: Sequence[str], chosen: Sequence[str], seeds: int,
             plan: Plan, time_left: Callable[[], float] | None = None,
             unknown_s: float = math.inf, timeout_s: float = DEFAULT_TIMEOUT_S,
             data_dir: data.DataDir | None = None, sharing: Sharing | None = None) -> Path:
    """Train the runs not finished before, pair by pair in children, within the time left;
    write the tables (OutOfTime when runs are left)."""
    finished = _load_runs(run_dir)
    # Wall time of finished runs per model, earlier stages' included: the time budget's guide.
    walls: dict[str, list[float]] = {}
    for run in finished.values():
        if run.wall_s is not None:
            walls.setdefault(run.row["model"], []).append(run.wall_s)
    runs = _planned(plan, model_names, chosen, seeds, data_dir, sharing)
    place = {run.key: i for i, run in enumerate(runs, 1)}
    done: dict[str, _Finished] = {}
    not_run: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ampbench-parity-") as tmp:
        for number, group in enumerate(_pairs(runs)):
            todo = [run for run in group if run.key not in finished]
            fit = _fitting(todo, walls, not_run, time_left, unknown_s)
            not_run += [run.label for run in todo[len(fit):]]  # not recorded: a resume runs it
            trained = _train_pair(fit, plan.device, Path(tmp), number, timeout_s,
                                  data_dir) if fit else {}
            for run in group:
                if run.key in finished:
                    done[run.key] = finished[run.key]
                    note = "done before, kept"
                elif run.key in trained:
                    done[run.key] = trained[run.key]
                    note = _record(run_dir, run, trained[run.key], walls)
                else:
                    continue
                print(f"parity [{place[run.key]}/{len(runs)}] {run.label}: {note}",
                      file=sys.stderr)
    outcomes = [done[run.key] for run in runs if run.key in done]
    return _write(run_dir, outcomes, not_run)


def _fitting(todo: list[_Run], walls: dict[str, list[float]], not_run: list[str],
             time_left: Callable[[], float] | None, unknown_s: float) -> list[_Run]:
    """The first runs of ``todo`` that the time left can finish, one after the other; none
    once a run did not fit (``not_run``)."""
    if time_left is None:
        return todo
    fit: list[_Run] = []
    for run in todo:
        estimate = max(walls.get(run.model) or [unknown_s])
        if not_run or (len(fit) + 1) * estimate > time_left():
            break
        fit.append(run)
    return fit


def _record(run_dir: Path, run: _Run, outcome: _Finished, walls: dict[str, list[float]]) -> str:
    """Append a run's outcome to parity_runs.jsonl; returns its progress note."""
    row = outcome.row
    store.append(run_dir, {"key": run.key, "row": row, "curve": outcome.curve,
                           "hist": outcome.hist, "wall_s": outcome.wall_s}, RUNS)
    if row.get("error") is not None:
        return f"crashed ({row['error']})"
    if outcome.wall_s is not None:
        walls.setdefault(run.model, []).append(outcome.wall_s)
    # A user's model has no accuracy (its loss alone is known): none is shown.
    accuracy = row.get("eval_accuracy")
    acc = f" acc {accuracy:.3f}" if accuracy is not None else ""
    return f"eval loss {row['eval_loss']:.4f}{acc} ({outcome.wall_s or 0:.1f} s)"


def _train_pair(runs: list[_Run], device: str, workdir: Path, number: int,
                timeout_s: float, data_dir: data.DataDir | None = None) -> dict[str, _Finished]:
    """Train ``runs`` (seeds of one model and policy) in one child; an outcome for every run,
    a failed row for each seed the child left no result for. Never raises for a failed child;
    an error launching it is every run's error."""
    first = runs[0]
    outs = [workdir / f"{number}-seed{run.seed}.json" for run in runs]
    policy, shared = split_label(first.precision)
    argv = [sys.executable, *_CHILD, "run", "--model", first.model, "--precision",
            policy, "--seeds", ",".join(str(run.seed) for run in runs),
            "--setup", json.dumps(first.setup), "--device", device]
    for out in outs:
        argv += ["--out", str(out)]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir.path)]
    if shared is not None:  # its ranks under torchrun, on a free port of their own
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(first.ranks), *argv[1:], "--strategy", shared]
    child_timeout = timeout_s * len(runs)
    try:
        ended = launch.run_child_process(argv, child_timeout, workdir / f"{number}.stderr")
    except Exception as exc:  # it could not start (no memory to fork, ...): every run's row
        return {run.key: _failed(run, f"{type(exc).__name__}: {exc}") for run in runs}
    results = [launch.read_result(out) for out in outs]
    problems = [_run_problem({"key": run.key, **result}) if result else "no result"
                for run, result in zip(runs, results, strict=True)]
    good = [r for r, why in zip(results, problems, strict=True) if r is not None and not why]
    # The child's start-up (torch, the task) shared among the runs it finished.
    elapsed = sum(_seconds(r.get("elapsed_s")) for r in good)
    startup_s = max(0.0, ended.wall_s - elapsed) / max(1, len(good))
    error = child_error(ended, child_timeout)
    outcomes = {}
    for run, result, why in zip(runs, results, problems, strict=True):
        if result is None or why:
            text = error if result is None else f"damaged result ({why}); {error}"
            outcomes[run.key] = _failed(run, text)
        else:
            wall_s = round(_seconds(result.get("elapsed_s")) + startup_s, 3)
            outcomes[run.key] = _Finished(result["row"], result["curve"],
                                          result.get("hist") or [], wall_s)
    return outcomes


def _seconds(value: Any) -> float:
    known = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    return float(value) if known else 0.0


def _failed(run: _Run, error: str) -> _Finished:
    return _Finished(failed_row(run.model, run.precision, run.seed, run.setup["steps"], error),
                     [], [], None)


def child_error(ended: launch.Ended, timeout_s: float) -> str:
    """One line saying how a child that left no result ended: ``timeout after 300 s``,
    ``killed by signal SIGKILL``, ``exit code 1: <its last line>``; ``oom: ...`` when its
    stderr says it ran out of memory."""
    if ended.timed_out:
        return f"timeout after {timeout_s:g} s"
    lines = [line.strip() for line in ended.stderr.splitlines() if line.strip()]
    if ended.returncode < 0:  # its last words are not why: something killed it
        text = launch.exit_text(ended.returncode)
    else:
        text = launch.exit_text(ended.returncode) + (f": {lines[-1]}" if lines else "")
    return f"oom: {text}" if failures.is_oom(ended.stderr) else text


def _write(run_dir: Path, outcomes: list[_Finished], not_run: list[str]) -> Path:
    """parity.csv (judged), parity_curves.csv and grad_hist.csv of the models whose runs all
    finished; OutOfTime after writing them when runs are left."""
    import pandas as pd

    if not_run:  # judge only the models whose runs all finished: no band from part of one
        left = {label.split(" ", 1)[0] for label in not_run}
        outcomes = [o for o in outcomes if o.row["model"] not in left]
        if not outcomes:
            raise OutOfTime(not_run, None)
    rows = [{**o.row, "curve": [(c["step"], c["loss"], c.get("time_s")) for c in o.curve]}
            for o in outcomes]
    frame = judge(pd.DataFrame(rows, columns=[*COLUMNS, *EXTRA_COLUMNS, "curve"]))
    frame = frame.drop(columns=["curve"])[list(COLUMNS) + list(EXTRA_COLUMNS)]
    for col in ("steps_to_target", "scaler_skipped_steps", "scaler_first_skip_step"):
        frame[col] = frame[col].astype("Int64")  # integers with gaps, not 60.0 / NaN
    path = run_dir / "parity.csv"
    frame.to_csv(path, index=False)
    for name, table, columns in (
            ("parity_curves.csv", [c for o in outcomes for c in o.curve], CURVE_COLUMNS),
            ("grad_hist.csv", [h for o in outcomes for h in o.hist], HIST_COLUMNS)):
        written = pd.DataFrame(table, columns=list(columns))
        for col in ("skipped", "log2_bin"):
            if col in written:
                written[col] = written[col].astype("Int64")
        written.to_csv(run_dir / name, index=False)
    samples = [{"model": o.row["model"], "precision": o.row["precision"], "seed": o.row["seed"],
                "prompt": o.row["sample_prompt"], "text": o.row["sample_text"]}
               for o in outcomes if isinstance(o.row.get("sample_text"), str)]
    pd.DataFrame(samples, columns=list(SAMPLE_COLUMNS)).to_csv(run_dir / SAMPLES, index=False)
    if not_run:
        raise OutOfTime(not_run, path)
    return path


def _load_runs(run_dir: Path) -> dict[str, _Finished]:
    """Finished runs of an earlier parity stage in run_dir (a crashed run is tried again); a
    damaged line is a warning and skipped (its run is trained again)."""
    runs: dict[str, _Finished] = {}
    for entry in store.load_jsonl(run_dir / RUNS, _run_problem):
        if entry["row"].get("error") is None:
            wall_s = entry.get("wall_s")
            known = isinstance(wall_s, int | float) and not isinstance(wall_s, bool)
            runs[entry["key"]] = _Finished(entry["row"], entry["curve"], entry.get("hist") or [],
                                           wall_s if known else None)
    return runs


def _run_problem(entry: Any) -> str | None:
    """Why a parity run (a line of parity_runs.jsonl, a child's result) cannot be used (None
    when it can)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
        return "not a parity run (no key)"
    row, curve, hist = entry.get("row"), entry.get("curve"), entry.get("hist", [])
    if not isinstance(row, dict) or not isinstance(curve, list):
        return "not a parity run (no row or curve)"
    if not isinstance(hist, list) or not all(isinstance(h, dict) for h in hist):
        return "a gradient histogram that is not a list of rows"
    for column in ("eval_loss", "eval_accuracy"):
        value = row.get(column)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            return f"{column} {value!r} is not a number"
    for point in curve:
        if not isinstance(point, dict) or not all(
                isinstance(point.get(k), int | float) and not isinstance(point.get(k), bool)
                for k in ("step", "loss")):
            return "a curve point without a numeric step and loss"
    return None
