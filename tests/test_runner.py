import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pandas as pd
import pytest

import models
from bench import BadInput, store
from bench.cli import main
from bench.config import Cell
from bench.run import budget, command, console, device, launch, sweep
from bench.run.signals import Stopped, stop_on_signals

# One timed step, no warmup, the tiniest model: a cell is mostly child start-up.
FAST = ["--preset", "quick", "--models", "gpt2-tiny", "--steps", "1", "--warmup", "0",
        "--no-parity", "--no-report"]


def _records(run_dir):
    return {(r["precision"], r["batch_size"]): r for r in store.load_records(run_dir)}


def _lines(run_dir):
    return (run_dir / store.RECORDS).read_text().splitlines()


def test_classify_a_child_that_left_no_record():
    oom = "Traceback\ntorch.OutOfMemoryError: CUDA out of memory."
    assert launch.classify(1, oom)[0] == "oom"
    status, error = launch.classify(-9, "")
    assert status == "error" and "SIGKILL" in error
    status, error = launch.classify(1, "line\n" * 20 + "RuntimeError: boom\n")
    assert status == "error" and error.endswith("RuntimeError: boom") and error.count("\n") <= 6


def test_failures_are_data_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AMPBENCH_FAULT", "gpt2-tiny:fp32:1=raise,gpt2-tiny:fp32:2=kill,"
                       "gpt2-tiny:fp32:3=hang,gpt2-tiny:bf16:2=oom")
    out = tmp_path / "run"
    code = main(["run", *FAST, "--precisions", "fp32,bf16", "--batch-sizes", "1,2,3,4",
                 "--timeout", "12", "--out", str(out)])
    assert code == 0
    got = _records(out)
    status = {key: r["status"] for key, r in got.items()}
    assert status == {
        ("fp32", 1): "error", ("fp32", 2): "error", ("fp32", 3): "timeout", ("fp32", 4): "ok",
        ("bf16", 1): "ok", ("bf16", 2): "oom", ("bf16", 3): "skipped", ("bf16", 4): "skipped",
    }
    assert "injected fault in gpt2-tiny:fp32:1" in got[("fp32", 1)]["error"]
    assert "SIGKILL" in got[("fp32", 2)]["error"]
    assert "12 s" in got[("fp32", 3)]["error"]
    assert "out of memory" in got[("bf16", 2)]["error"]
    assert "batch 2" in got[("bf16", 3)]["error"]
    # Parent-made records carry the schema and the environment too.
    assert all(list(r)[: len(store.FIELDS)] == list(store.FIELDS) for r in got.values())
    meta = json.loads((out / store.META).read_text())
    assert {r["run_id"] for r in got.values()} == {meta["run_id"]}
    assert got[("fp32", 3)]["machine_id"] == meta["machine_id"]
    csv = pd.read_csv(out / store.RESULTS)
    assert len(csv) == 8 and list(csv.columns[: len(store.FIELDS)]) == list(store.FIELDS)
    assert meta["matrix"]["precisions"] == ["fp32", "bf16"] and meta["machine_id"]
    captured = capsys.readouterr()
    assert "gpt2-tiny bf16 b=2 T=64: oom" in captured.err
    assert "gpt2-tiny: samples/s (speedup over fp32; * beyond the noise)" in captured.out

    # Running again into the same directory repeats only the failed cells.
    monkeypatch.setenv("AMPBENCH_FAULT", "")
    before = {k: r["timestamp"] for k, r in got.items() if r["status"] in sweep.DONE}
    assert main(["run", *FAST, "--precisions", "fp32,bf16", "--batch-sizes", "1,2,3,4",
                 "--timeout", "12", "--out", str(out)]) == 0
    again = _records(out)
    assert {k: r["status"] for k, r in again.items()} == dict.fromkeys(status, "ok") | {
        ("bf16", 3): "skipped", ("bf16", 4): "skipped"}
    assert {k: again[k]["timestamp"] for k in before} == before
    assert len(_lines(out)) == 8 + 4  # the four failures ran again, nothing else


def test_resume_after_the_parent_is_killed(tmp_path, cli_env):
    out = tmp_path / "run"
    env = {**cli_env, "TMPDIR": str(tmp_path)}  # where the orphaned child leaves its files
    argv = [sys.executable, "-m", "bench", "run", *FAST, "--precisions", "fp32",
            "--batch-sizes", "1,2,3", "--out", str(out)]
    parent = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and parent.poll() is None:
        if (out / store.RECORDS).exists() and _lines(out):
            break
        time.sleep(0.05)
    assert parent.poll() is None, "the sweep ended before it could be killed"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    first = store.load_records(out)
    assert 1 <= len(first) < 3

    proc = subprocess.run([sys.executable, "-m", "bench", "run", "--resume", str(out),
                           "--no-parity", "--no-report"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = store.load_records(out)
    assert sorted(r["batch_size"] for r in records) == [1, 2, 3]
    assert all(r["status"] == "ok" for r in records)
    assert len(_lines(out)) == 3  # no duplicate row, no finished cell run twice
    kept = {r["cell_id"]: r["timestamp"] for r in records}
    assert all(kept[r["cell_id"]] == r["timestamp"] for r in first)
    assert len(pd.read_csv(out / store.RESULTS)) == 3


def test_ctrl_c_kills_the_child_and_says_how_to_resume(tmp_path, cli_env, processes_mentioning):
    out = tmp_path / "run"
    env = {**cli_env, "AMPBENCH_FAULT": "gpt2-tiny:fp32:1=hang"}
    parent = subprocess.Popen([sys.executable, "-m", "bench", "run", *FAST, "--precisions",
                               "fp32", "--batch-sizes", "1", "--out", str(out)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out / store.META).exists():
        time.sleep(0.05)
    time.sleep(1.0)  # let the child start
    parent.send_signal(signal.SIGINT)
    _, err = parent.communicate(timeout=60)
    assert parent.returncode == 130
    assert f"resume with: python -m bench run --resume {out}" in err
    assert store.load_records(out) == []
    assert not processes_mentioning(str(out)), "the hanging child outlived Ctrl-C"



def test_find_max_batch_under_an_injected_memory_ceiling(tmp_path, monkeypatch):
    monkeypatch.setenv("AMPBENCH_FAULT_MAX_BATCH", "3")
    out = tmp_path / "run"
    code = main(["run", *FAST, "--precisions", "fp32", "--batch-sizes", "1",
                 "--find-max-batch", "--out", str(out)])
    assert code == 0
    [record] = store.load_records(out)
    assert record["max_batch_search"] is True and record["max_batch"] == 3
    assert record["status"] == "ok" and record["batch_size"] == 3
    csv = pd.read_csv(out / store.RESULTS)
    assert csv.loc[0, "max_batch"] == 3 and bool(csv.loc[0, "max_batch_search"])


def test_resume_needs_a_run_directory(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def _start_runner(tmp_path, cli_env, fault, *extra, out=None):
    """A runner in a session of its own (its group can be killed), children's files and so
    their command lines under tmp_path."""
    out = out or tmp_path / "run"
    env = {**cli_env, "TMPDIR": str(tmp_path), "AMPBENCH_FAULT": fault}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", *FAST, "--out", str(out),
                             *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, out


def _wait_for_cell(proc, tmp_path, processes_mentioning, records=0, out=None):
    """Until the runner's child (a hanging cell) is running, after ``records`` records."""
    out = out or tmp_path / "run"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        done = len(_lines(out)) if (out / store.RECORDS).exists() else 0
        if done >= records and processes_mentioning(str(tmp_path / "ampbench-cells-")):
            time.sleep(0.5)  # past its start-up: it hangs now
            return
        time.sleep(0.05)
    raise AssertionError("the runner never started its hanging cell")


def _gone(find, text, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not find(text):
            return True
        time.sleep(0.1)
    return False


def test_killing_the_runners_group_leaves_no_cell_behind(tmp_path, cli_env,
                                                         processes_mentioning):
    proc, out = _start_runner(tmp_path, cli_env, "gpt2-tiny:fp32:1=hang", "--precisions",
                              "fp32", "--batch-sizes", "1", "--timeout", "60")
    _wait_for_cell(proc, tmp_path, processes_mentioning)
    os.killpg(proc.pid, signal.SIGKILL)  # what kill -9 -PGID, an OOM killer or a CI kill does
    proc.communicate()
    assert _gone(processes_mentioning, str(tmp_path)), "a cell outlived its killed runner"
    assert store.load_records(out) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_the_run_like_ctrl_c(tmp_path, cli_env, processes_mentioning,
                                                     sig):
    out = tmp_path / "my run"  # the resume command quotes it
    proc, _ = _start_runner(tmp_path, cli_env, "gpt2-tiny:fp32:2=hang", "--precisions", "fp32",
                            "--batch-sizes", "1,2", "--timeout", "60", out=out)
    _wait_for_cell(proc, tmp_path, processes_mentioning, records=1, out=out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig
    command = err.split("resume with: ", 1)[1].strip()
    assert shlex.split(command) == [
        "python", "-m", "bench", "run", "--resume", str(out), "--models", "gpt2-tiny",
        "--precisions", "fp32", "--batch-sizes", "1,2", "--steps", "1", "--warmup", "0",
        "--timeout", "60.0", "--no-parity", "--no-report"]
    assert f"stopped by {sig.name}; 1 finished cell(s) kept" in err
    assert not processes_mentioning(str(tmp_path)), "a cell outlived its stopped runner"
    assert not list(tmp_path.glob("ampbench-cells-*")), "the children's directory stayed"
    assert [r["batch_size"] for r in store.load_records(out)] == [1]


def test_one_runner_per_run_directory(tmp_path, cli_env, processes_mentioning, capsys):
    proc, out = _start_runner(tmp_path, cli_env, "gpt2-tiny:fp32:1=hang", "--precisions",
                              "fp32", "--batch-sizes", "1", "--timeout", "60")
    try:
        _wait_for_cell(proc, tmp_path, processes_mentioning)
        in_use = f"{out} is in use by another ampbench process (pid {proc.pid}, ampbench run)"
        for argv in (["run", *FAST, "--out", str(out)], ["run", "--resume", str(out)],
                     ["parity", "--out", str(out), "--device", "cpu"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert in_use in err and len(err.strip().splitlines()) == 1, err
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    # The killed runner's lock is stale: a resume takes it over and finishes the run.
    assert main(["run", "--resume", str(out), "--no-parity", "--no-report"]) == 0
    assert [r["status"] for r in store.load_records(out)] == ["ok"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--models", ""], "argument --models: expected a comma-separated list, got ''"),
    (["--batch-sizes", ""], "argument --batch-sizes: expected a comma-separated list"),
    (["--precisions", ","], "argument --precisions: expected a comma-separated list, got ','"),
    (["--repeats", "1000000000"], "'repeats' must be at most 1000, got 1000000000"),
    (["--steps", "99999999"], "'steps' must be at most 1e+06"),
    (["--batch-sizes", "1,99999999"], "'batch_sizes' must be at most"),
    (["--world-size", "100000"], "'world_size' must be at most 4096"),
    (["--timeout", "inf"], "argument --timeout: must be a finite number"),
    (["--timeout", "1e9"], "'timeout_s' must be at most 604800"),
    (["--batch-sizes", ",".join(map(str, range(1, 61))), "--repeats", "1000"],
     "120 cells x 1000 repeat(s) is 120000 processes; at most 100000 in one run"),
])
def test_empty_lists_and_absurd_counts_are_one_line_before_anything_runs(tmp_path, capsys,
                                                                        flags, message):
    out = tmp_path / "run"
    try:
        code = main(["run", *FAST, "--out", str(out), *flags])
    except SystemExit as exc:  # argparse's own: usage errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_damaged_records_are_warnings_and_their_cells_run_again(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", *FAST, "--precisions", "fp32", "--batch-sizes", "1,2", "--out", str(out)]
    assert main(argv) == 0
    one, two = _lines(out)
    (out / store.RECORDS).write_text("\n".join(
        [one, "42", '{"foo": 1}', two[:50], one.replace('"ok"', '"fast"'), ""]))
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--no-parity", "--no-report"]) == 0
    err = capsys.readouterr().err
    path = out / store.RECORDS
    assert f"warning: {path}: line 2: not a record but int 42; skipped" in err
    assert f"warning: {path}: line 3: no cell_id; skipped" in err
    assert f"warning: {path}: line 4: not valid JSON; skipped" in err
    assert f"warning: {path}: line 5: status 'fast' is not one of" in err
    assert "Traceback" not in err
    assert sorted(r["batch_size"] for r in store.load_records(out)) == [1, 2]
    assert len(_lines(out)) == 5 + 1  # the lost cell ran again, nothing else


def test_damaged_meta_is_a_warning_and_one_line_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *FAST, "--precisions", "fp32", "--batch-sizes", "1", "--out",
                 str(out)]) == 0
    run_id = store.load_records(out)[0]["run_id"]
    (out / store.META).write_text("[1, 2]")
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"warning: {out / store.META}: line 1: not a JSON object but list; skipped" in err
    assert "meta.json holds no matrix; finish the run with --out" in err
    # With the matrix named again it finishes, under the run id its records carry.
    assert main(["run", *FAST, "--precisions", "fp32", "--batch-sizes", "1", "--out",
                 str(out)]) == 0
    assert json.loads((out / store.META).read_text())["run_id"] == run_id
    assert len(_lines(out)) == 1


def test_a_bad_device_or_timeout_is_one_line_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *FAST, "--device", "tpu", "--out", str(out)]) == 2
    assert "unknown device 'tpu'; valid: cpu, cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main(["run", *FAST, "--timeout", "-1", "--out", str(out)])
    assert stopped.value.code == 2
    assert "argument --timeout: must be above 0, got -1" in capsys.readouterr().err
    assert not out.exists()


def test_repeats_interleave_and_a_calibration_cell_brackets_the_sweep():
    from bench.config import Cell

    a, b = Cell("gpt2-tiny", "fp32", 1), Cell("gpt2-tiny", "bf16", 1)
    assert [(c.precision, r, cal) for c, r, cal in sweep.plan([a, b], 3)] == [
        ("fp32", 0, False), ("bf16", 0, False), ("fp32", 1, False), ("bf16", 1, False),
        ("fp32", 2, False), ("bf16", 2, False)]  # enough repeats: no calibration
    assert [(c.precision, r, cal) for c, r, cal in sweep.plan([a, b], 1, calibration=4)] == [
        ("fp32", 1, True), ("fp32", 2, True), ("fp32", 0, False), ("bf16", 0, False),
        ("fp32", 3, True), ("fp32", 4, True)]
    assert len(sweep.plan([a, b], 1, calibration=0)) == 2
    # Torchrun cells only (cpu-fsdp2, gpu-fsdp2): the first one-node cell calibrates, never a
    # multi-node one.
    wide = Cell("gpt2-tiny", "fp32", 1, world_size=2, strategy="fsdp2")
    nodes = Cell("gpt2-tiny", "fp32", 1, world_size=2, nnodes=2)
    assert [(c, cal) for c, _, cal in sweep.plan([nodes, wide], 1, calibration=2)] == [
        (wide, True), (nodes, False), (wide, False), (wide, True)]
    assert len(sweep.plan([nodes], 1, calibration=2)) == 1


def test_a_single_repeat_run_measures_its_noise_on_a_calibration_cell(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *FAST, "--precisions", "fp32,bf16", "--batch-sizes", "1",
                 "--calibration", "2", "--out", str(out)]) == 0
    csv = pd.read_csv(out / store.RESULTS)
    calibration = csv[csv["calibration"]]
    assert len(csv) == 4 and len(calibration) == 2
    assert set(calibration["precision"]) == {"fp32"}
    fp32 = csv[csv["precision"] == "fp32"]
    assert set(fp32["num_processes"]) == {3} and fp32["process_spread_pct"].notna().all()
    bf16 = csv[csv["precision"] == "bf16"].iloc[0]
    assert bf16["num_processes"] == 1 and bf16["noise_source"] == "calibration"
    assert bf16["noise_pct"] == pytest.approx(fp32["process_spread_pct"].iloc[0])
    meta = json.loads((out / store.META).read_text())
    assert {"cores", "others_cpu_pct", "steal_pct"} <= set(meta["machine_load"])
    err = capsys.readouterr().err
    assert "[1/4] gpt2-tiny fp32 b=1 T=64: ok" in err and "(calibration)" in err


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _slow_children(monkeypatch) -> _FakeClock:
    """Every child takes 100 s of a fake runner clock."""
    clock, real_child = _FakeClock(), sweep.run_child

    def slow_child(*args, **kwargs):
        clock.now += 100.0
        return real_child(*args, **kwargs)

    monkeypatch.setattr(budget, "_clock", clock)
    monkeypatch.setattr(sweep, "run_child", slow_child)
    return clock


def test_a_time_budget_stops_before_a_cell_it_cannot_finish_and_resume_finishes(
        tmp_path, monkeypatch, capsys):
    # Each child takes 100 s of a fake clock, almost all of it start-up (one step of ms).
    _slow_children(monkeypatch)
    out = tmp_path / "run"
    # 310 s: fp32 b=1 (nothing finished: its timeout, 120 s) runs, fp32 b=2 (100 s at b=1, so
    # 200 s) runs, bf16 b=1 (fp32's start-up, ~100 s, and its step scaled) fits in the 110 s
    # left, then bf16 b=2 (200 s) does not fit in 10.
    assert main(["run", *FAST, "--precisions", "fp32,bf16", "--batch-sizes", "1,2",
                 "--timeout", "120", "--calibration", "0", "--time-budget", "310s",
                 "--out", str(out)]) == command.BUDGET_EXIT
    err = capsys.readouterr().err
    assert "--time-budget 310s is spent: 1 cell process(es)" in err
    [resume] = [line.removeprefix("resume with: ") for line in err.splitlines()
                if line.startswith("resume with: ")]
    assert resume.startswith(f"python -m bench run --resume {out} ")
    assert "--time-budget 310s" in resume
    first = _records(out)
    assert set(first) == {("fp32", 1), ("fp32", 2), ("bf16", 1)}
    assert all(r["status"] == "ok" and r["wall_s"] == 100.0 for r in first.values())
    meta = json.loads((out / store.META).read_text())
    assert meta["incomplete"]["cells"] == ["gpt2-tiny bf16 b=2 T=64"]
    assert any(w.startswith("incomplete: --time-budget 310s") for w in meta["warnings"])

    # The printed command, as printed, finishes the run: nothing that finished runs again.
    assert main(shlex.split(resume)[3:]) == 0
    again = _records(out)
    assert set(again) == {("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)}
    assert all(again[k]["timestamp"] == r["timestamp"] for k, r in first.items())
    assert len(_lines(out)) == 4
    meta = json.loads((out / store.META).read_text())
    assert "incomplete" not in meta
    assert not any(w.startswith("incomplete:") for w in meta["warnings"])


def test_a_time_budget_shorter_than_a_cell_runs_nothing_and_exits_3(tmp_path, cli_env):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "bench", "run", *FAST, "--timeout", "60",
                           "--time-budget", "30s", "--out", str(out)], env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert f"resume with: python -m bench run --resume {out}" in done.stderr
    assert store.load_records(out) == []


@pytest.mark.parametrize("text", ["0", "-5m", "soon", "5x", "1h-2m", "nan", "inf", "8d"])
def test_a_bad_time_budget_is_one_line_and_exit_2(tmp_path, capsys, text):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["run", *FAST, "--time-budget", text, "--out", str(out)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "argument --time-budget:" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# --time-budget's estimates, from hand-made records: a finished process's wall_s is its start-up
# plus (warmup + timed) steps at its median step time.
GPT = Cell("gpt2-tiny", "fp32", 4, seq_len=64)
BERT = Cell("bert-tiny", "fp32", 16, seq_len=32)


def _ran(cell, wall_s, step_ms, warmup=5, timed=15, status="ok"):
    """(cell, its record) for a process of ``cell`` that finished with ``status``."""
    return cell, {"cell_id": cell.cell_id, "status": status, "wall_s": wall_s,
                  "step_ms_median": step_ms, "warmup_steps": warmup, "timed_steps": timed}


def _estimate(cell, finished, timeout_s=300.0, num_steps=20):
    cells = {c.cell_id: c for c in [cell, *(c for c, _ in finished)]}
    return budget.estimate_s(cell, [r for _, r in finished], cells, timeout_s, num_steps,
                             _flops_of(cells.values()))


def _flops(cell):
    return models.get(cell.model).flops_per_sample(cell.seq_len or cell.image_size) \
        * cell.batch_size * cell.grad_accum


def _flops_of(cells):
    """What the device probe answers the runner: cell_id -> analytic FLOPs per step."""
    return {c.cell_id: _flops(c) for c in cells}


def test_an_unseen_model_is_estimated_from_a_finished_one_scaled_by_flops():
    # gpt2-tiny: 20 steps of 100 ms and 8 s of start-up.
    finished = [_ran(GPT, wall_s=10.0, step_ms=100.0)]
    ratio = _flops(BERT) / _flops(GPT)
    assert ratio != pytest.approx(1.0, rel=0.1)  # the scaling shows
    expected = 8.0 + 20 * 0.1 * ratio * budget.STEP_MARGIN
    assert _estimate(BERT, finished) == pytest.approx(expected)
    # The same policy is closer in kind than the same model under another policy.
    finished.append(_ran(replace(BERT, precision="bf16"), wall_s=8.0 + 20 * 5.0,
                         step_ms=5000.0))
    assert _estimate(BERT, finished) == pytest.approx(expected)
    # Only failed processes finished: nothing to go on.
    assert _estimate(BERT, [_ran(GPT, 10.0, 100.0, status="oom")]) == 300.0


def test_records_of_another_matrix_in_the_run_directory_count_too():
    # `ampbench validate` sweeps one matrix after another into one run directory: the tf32
    # step's first cell is estimated from the fp32 step's records, not given the timeout.
    record = {**_ran(GPT, wall_s=10.0, step_ms=100.0)[1], "model": GPT.model,
              "precision": GPT.precision, "batch_size": GPT.batch_size, "seq_len": GPT.seq_len}
    tf32 = replace(GPT, precision="tf32")
    flops = _flops_of([GPT, tf32])
    estimate = budget.estimate_s(tf32, [record], {tf32.cell_id: tf32}, 300.0, 20, flops)
    assert estimate == pytest.approx(8.0 + 20 * 0.1 * budget.STEP_MARGIN)
    damaged = {**record, "batch_size": "many"}
    assert budget.estimate_s(tf32, [damaged], {tf32.cell_id: tf32}, 300.0, 20, flops) == 300.0


def test_a_compiled_unseen_cell_adds_the_compile_time_measured_so_far():
    eager = _ran(GPT, wall_s=10.0, step_ms=100.0)  # start-up 8 s
    bert_compiled = replace(BERT, compile=True)
    # No compiled process has finished: its compile time is unknown, the timeout bounds it.
    assert _estimate(bert_compiled, [eager]) == 300.0
    # gpt2-tiny compiled: 20 steps of 50 ms in 61 s, so 60 s of start-up, 52 of it compiling.
    compiled = _ran(replace(GPT, compile=True), wall_s=61.0, step_ms=50.0)
    # Its steps: the slowest of the same policy's (the eager 100 ms), scaled by FLOPs.
    steps_s = 20 * 0.1 * _flops(BERT) / _flops(GPT) * budget.STEP_MARGIN
    assert _estimate(bert_compiled, [eager, compiled]) == pytest.approx(60.0 + steps_s)
    # An eager cell pays the eager start-up only.
    assert _estimate(BERT, [eager, compiled]) == pytest.approx(8.0 + steps_s)


def test_nothing_finished_gives_the_timeout_and_no_estimate_exceeds_it():
    assert _estimate(BERT, [], timeout_s=120.0) == 120.0
    slow = [_ran(GPT, wall_s=100.0, step_ms=4000.0, warmup=0, timed=1)]
    assert _estimate(BERT, slow, timeout_s=120.0) == 120.0  # 96 s + 20 steps of ~8 s, x2
    assert _estimate(replace(GPT, batch_size=8), slow, timeout_s=120.0) == 120.0  # 200 s


def test_a_group_that_has_run_keeps_its_slowest_wall_time_scaled_up_by_batch():
    finished = [_ran(GPT, wall_s=10.0, step_ms=100.0), _ran(GPT, wall_s=12.0, step_ms=100.0)]
    assert _estimate(replace(GPT, batch_size=8), finished) == pytest.approx(24.0)
    assert _estimate(replace(GPT, batch_size=2), finished) == pytest.approx(12.0)


def test_time_budget_durations():
    from bench.cli_types import duration_s

    assert [duration_s(t) for t in ("25m", "540s", "1h", "1h30m", "90", "2.5m")] == [
        1500, 540, 3600, 5400, 90, 150]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("preset", ["gpu", "gpu-quick"], ids=["gpu-preset", "gpu-quick-preset"])
def test_a_gpu_preset_without_cuda_is_one_line_and_exit_2(tmp_path, capsys, preset):
    out = tmp_path / "run"
    assert main(["run", "--preset", preset, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"ampbench run: error: preset '{preset}' needs a CUDA GPU and this machine "
                   "has none; here run --preset cpu (or quick)\n")
    assert not out.exists()


def test_a_time_budget_leaves_parity_runs_for_the_resume(tmp_path, monkeypatch, capsys):
    _slow_children(monkeypatch)
    matrix = tmp_path / "m.toml"
    matrix.write_text('precisions = ["fp32"]\nwarmup = 0\nsteps = 1\ndevice = "cpu"\n'
                      "calibration = 0\ntimeout_s = 120\nparity = true\nparity_steps = 3\n"
                      "parity_seeds = 2\n\n[models.gpt2-tiny]\nbatch_sizes = [1]\n")
    out = tmp_path / "run"
    # The cell takes 100 of 200 s; a parity run of a model not seen yet may take the timeout.
    assert main(["run", "--matrix", str(matrix), "--no-report", "--time-budget", "200s",
                 "--out", str(out)]) == command.BUDGET_EXIT
    assert "0 cell process(es) and 2 parity run(s) not started" in capsys.readouterr().err
    meta = json.loads((out / store.META).read_text())
    assert meta["incomplete"]["parity_runs"] == ["gpt2-tiny fp32 seed 0", "gpt2-tiny fp32 seed 1"]
    assert not (out / "parity.csv").exists() and not (out / "parity_runs.jsonl").exists()

    assert main(["run", "--resume", str(out), "--no-report", "--time-budget", "10m"]) == 0
    frame = pd.read_csv(out / "parity.csv")
    assert sorted(frame["seed"]) == [0, 1] and set(frame["steps"]) == {3}
    assert len(_lines(out)) == 1  # the cell did not run again
    assert "incomplete" not in json.loads((out / store.META).read_text())


def test_the_console_summary_labels_emulated_policies():
    records = [dict(model="gpt2-tiny", precision=p, batch_size=4, seq_len=64, status="ok",
                    samples_per_s=sps, emulated=p == "fp8")
               for p, sps in (("fp32", 100.0), ("fp8", 40.0))]
    text = console.summarize(records)
    assert "fp8 (emulated)" in text and "fp32 (emulated)" not in text
    assert "b=4" in text


def test_the_device_probe_answers_what_the_runner_would_ask_torch():
    import torch

    cell = Cell("gpt2-tiny", "fp32", 4, seq_len=64)
    found = device.probe("cpu", [cell, Cell("no-such-model", "fp32", 1)])
    assert found.checked_device() == "cpu" and found.error is None
    assert found.cuda == torch.cuda.is_available()
    assert found.env["device"] == "cpu" and found.env["torch_version"] == torch.__version__
    assert set(found.env) <= set(store.ENVIRONMENT) | {"torch_cuda_build"} and found.cpu_model
    assert found.flops_per_step == {cell.cell_id: _flops(cell)}  # an unknown model has none
    bad = device.probe("tpu")
    assert bad.device is None and bad.env == {} and bad.cuda == found.cuda
    with pytest.raises(BadInput, match=r"^unknown device 'tpu'; valid: cpu, cuda, cuda:N, auto$"):
        bad.checked_device()


@pytest.mark.parametrize("busy", [None, "ampbench run"])
def test_a_signal_stops_once_and_later_ones_wait_for_the_cleanup(capsys, busy):
    # `run` says it is still cleaning up; `validate` ignores them (busy=None).
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(busy):
        with pytest.raises(Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert stopped.value.signum == signal.SIGTERM and str(stopped.value) == "SIGTERM"
        assert isinstance(stopped.value, KeyboardInterrupt)  # nothing catches it by mistake
        os.kill(os.getpid(), signal.SIGHUP)  # during the cleanup: no second Stopped
        time.sleep(0.2)
    assert signal.getsignal(signal.SIGTERM) is before
    assert capsys.readouterr().err == ("ampbench run: SIGHUP: still cleaning up\n" if busy
                                       else "")


def test_a_resumed_run_keeps_every_choice_of_the_original(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *FAST, "--precisions", "fp32", "--batch-sizes", "1", "--calibration",
                 "0", "--out", str(out)]) == 0
    meta = json.loads((out / store.META).read_text())
    assert meta["matrix"]["parity"] is False and meta["no_report"] is True
    assert meta["find_max_batch"] is False
    capsys.readouterr()
    # Flags that contradict the run: one line each, nothing run or written.
    for flags, said in ((["--steps", "5"], "--steps makes steps 5, the run has 1"),
                        (["--precisions", "bf16"], "--precisions makes precisions ['bf16']"),
                        (["--find-max-batch"], "--find-max-batch, but the run is a sweep")):
        assert main(["run", "--resume", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert said in err and "a resumed run keeps every choice" in err, err
        assert err.count("\n") == 1
    # Without them it keeps --no-parity and --no-report: no parity stage, no report.
    assert main(["run", "--resume", str(out)]) == 0
    assert not (out / store.PARITY).exists() and not (out / store.PARITY_RUNS).exists()
    assert not (out / store.REPORT).exists()
    assert "accuracy parity" not in capsys.readouterr().err
    assert len(_lines(out)) == 1


def test_a_resumed_run_refuses_records_of_a_newer_schema_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    store.write_meta(out, {"run_id": "r", "matrix": {"models": {"gpt2-tiny": {
        "batch_sizes": [1]}}, "precisions": ["fp32"], "steps": 1, "warmup": 0,
        "calibration": 0, "parity": False}})
    newer = {**store.empty_record(cell_id="c", repeat=0, model="gpt2-tiny", precision="fp32",
                                  batch_size=1, status="ok"), "schema": store.SCHEMA_VERSION + 1}
    store.append(out, newer)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["run", "--resume", str(out), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert f"schema {store.SCHEMA_VERSION + 1} (1 row(s)), newer than the schema" in err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != store.LOCK}
    assert after == before  # meta.json and records.jsonl untouched
