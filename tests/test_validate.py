"""`ampbench validate`: the plan fits a lent GPU's minutes, a killed call leaves a readable
directory, and the same command resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import validate
from bench.cli import main

H100 = "NVIDIA H100 80GB HBM3"
NINE_MINUTES_S = 540.0
ESSENTIAL = ("env", "tests", "sweep", "parity", "peers", "report")
# A small CPU validate: one tiny model, the sweep and the report (tests and parity are tested
# elsewhere; here it is the orchestration).
SMALL = ["--only", "env,sweep,report", "--models", "gpt2-tiny"]


def _plan(gpu: str, out: Path) -> list[validate.Step]:
    return validate.build_plan(validate.target_for(gpu), out)


def test_the_h100_plan_fits_nine_minutes_with_every_essential_step(tmp_path):
    decisions = validate.schedule(_plan(H100, tmp_path), NINE_MINUTES_S)
    spent = {step.name: spend for step, spend, _ in decisions}
    assert sum(s for s in spent.values() if s is not None) <= NINE_MINUTES_S
    for name in ESSENTIAL:  # each whole, not cut short
        step = next(s for s, _, _ in decisions if s.name == name)
        assert spent[name] == pytest.approx(step.estimate_s), name
    # The sweep comes before anything optional, and parity, peers and the report after it.
    names = [s.name for s, _, _ in decisions]
    assert names.index("sweep") < names.index("tf32") < names.index("parity")


def test_optional_steps_wait_for_time_to_spare_and_essential_ones_do_not(tmp_path):
    steps = _plan(H100, tmp_path)
    short = {s.name: note for s, _, note in validate.schedule(steps, 300.0)}
    assert short["compile"].startswith("no time to spare")
    assert short["tf32"].startswith("no time to spare")
    assert short["sweep"].startswith("runs")
    long = {s.name: spend for s, spend, _ in validate.schedule(steps, 3600.0)}
    assert all(long[name] is not None for name in ("tf32", "compile", "batches"))


def test_steps_done_in_an_earlier_call_are_not_planned_again(tmp_path):
    steps = _plan(H100, tmp_path)
    done = frozenset({"env", "tests", "sweep", "parity", "peers"})
    notes = {s.name: note for s, _, note in validate.schedule(steps, NINE_MINUTES_S, done)}
    assert notes["sweep"] == "done in an earlier call"
    assert notes["compile"] == "runs"  # the second call has time for what the first had not


def test_the_plan_scales_with_the_gpu_and_says_when_it_guesses(tmp_path):
    h100 = sum(s.estimate_s for s in _plan(H100, tmp_path) if s.name == "sweep")
    a100 = sum(s.estimate_s for s in _plan("NVIDIA A100-SXM4-80GB", tmp_path)
               if s.name == "sweep")
    assert a100 > h100  # a slower GPU, by its peak table row
    unknown = validate.target_for("NVIDIA Imaginary 9000")
    assert "not in the peak table" in unknown.costs.note
    assert unknown.fp8 is not None  # no FP8 planned on a GPU whose FP8 peak is unknown


def test_plan_mode_prints_the_steps_and_the_total_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["validate", "--out", str(out), "--time-budget", "9m", "--plan",
                 "--gpu", H100]) == 0
    text = capsys.readouterr().out
    for name in (*ESSENTIAL, "tf32", "compile", "fp8", "batches"):
        assert f"| {name} " in text
    total = float(text.split("total: ")[1].split(" s")[0])
    assert 0 < total <= NINE_MINUTES_S
    assert not out.exists()


@pytest.mark.parametrize("argv, problem", [
    (["--gpu", H100], "--gpu names the GPU to plan for"),
    (["--only", "sweep,nap"], "unknown step 'nap'"),
    (["--models", "gpt2-small"], "'gpt2-small' is not a model of this plan"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, problem):
    code = main(["validate", "--out", str(tmp_path / "v"), "--time-budget", "1m", *argv])
    err = capsys.readouterr().err
    assert code == 2 and problem in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "v" / validate.STATE).exists()


def _validate(out: Path, env: dict[str, str], budget: str = "5m",
              **kwargs) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench", "validate", "--out", str(out), "--time-budget", budget,
         *SMALL], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _records(out: Path) -> list[dict]:
    path = out / validate.RUN / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_gone(find, text: str, timeout_s: float = 60.0) -> None:
    """Until no process mentions ``text`` (the killed call's sweep cleaning up)."""
    deadline = time.monotonic() + timeout_s
    while find(text) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not find(text), f"processes still running on {text} after {timeout_s} s"


def test_a_killed_call_leaves_a_readable_directory_and_the_same_command_resumes(
        tmp_path, cli_env, processes_mentioning):
    out = tmp_path / "gpu-run"
    # The bf16 cell hangs: the call is killed (SIGKILL, as a lent machine's limit does) while
    # the sweep is under way, two cells recorded.
    proc = _validate(out, {**cli_env, "AMPBENCH_FAULT": "gpt2-tiny:bf16:8=hang"})
    deadline = time.monotonic() + 240
    while len(_records(out)) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert len(_records(out)) >= 2, proc.communicate()[1][-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    # The sweep got SIGTERM from the kernel when its parent died: it kills its cells and goes.
    _wait_gone(processes_mentioning, str(out))

    state = json.loads((out / validate.STATE).read_text())
    assert state["steps"]["env"]["status"] == "done"
    assert state["steps"]["sweep"]["status"] == "running"  # as it was when killed
    summary = (out / validate.SUMMARY).read_text()
    assert "| sweep " in summary and "running" in summary
    assert json.loads((out / validate.ENV_JSON).read_text())  # the environment is there
    kept = {(r["cell_id"], r["repeat"]) for r in _records(out) if r["status"] == "ok"}

    # The same command again: env is not run twice, the sweep finishes, every cell once.
    again = _validate(out, cli_env)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-3000:]
    assert "env: done in an earlier call" in stderr
    records = _records(out)
    keys = [(r["cell_id"], r["repeat"]) for r in records]
    assert kept <= set(keys)
    assert len([k for k in keys if k in kept]) == len(kept)  # nothing finished ran again
    assert {r["precision"] for r in records if r["status"] == "ok"} == {"fp32", "bf16", "fp16"}
    state = json.loads((out / validate.STATE).read_text())
    assert [state["steps"][n]["status"] for n in ("env", "sweep", "report")] == ["done"] * 3
    assert len(state["calls"]) == 2
    assert (out / validate.RUN / "report.md").exists()
    assert (out / validate.LOGS / "01-env.log").read_text().count("$ ") == 1

    # Once more: nothing left, nothing runs, not even the report.
    third = _validate(out, cli_env)
    _, stderr = third.communicate(timeout=120)
    assert third.returncode == 0, stderr[-3000:]
    assert "report: done in an earlier call" in stderr
    assert len(_records(out)) == len(records)


def test_a_budget_too_short_for_the_sweep_exits_3_with_the_command_to_run_again(
        tmp_path, cli_env):
    out = tmp_path / "v"
    proc = _validate(out, cli_env, budget="40s")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == validate.BUDGET_EXIT, stderr[-3000:]
    state = json.loads((out / validate.STATE).read_text())
    assert state["steps"]["env"]["status"] == "done"
    assert state["steps"]["sweep"]["status"] != "done"
    assert "resume with: python3 -m bench validate" in stderr
    assert "--time-budget 40s" in stderr


def test_the_plan_imports_no_torch(tmp_path, cli_env):
    # FLOPs and FP8's unconverted models come from the device probe, a child of its own.
    code = ("import sys\nsys.modules['torch'] = None\nfrom bench.cli import main\n"
            f"sys.exit(main(['validate', '--out', {str(tmp_path / 'v')!r}, '--time-budget', "
            f"'9m', '--plan', '--gpu', {H100!r}]))")
    done = subprocess.run([sys.executable, "-c", code], env=cli_env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| sweep " in done.stdout and "total: " in done.stdout
