import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from bench import runner, store
from bench.__main__ import main

# One timed step, no warmup, the tiniest model: a cell is mostly child start-up.
FAST = ["--preset", "quick", "--models", "gpt2-tiny", "--steps", "1", "--warmup", "0",
        "--no-parity", "--no-report"]


def _records(run_dir):
    return {(r["precision"], r["batch_size"]): r for r in store.load_records(run_dir)}


def _lines(run_dir):
    return (run_dir / store.RECORDS).read_text().splitlines()


def test_classify_a_child_that_left_no_record():
    assert runner.classify(1, "Traceback\ntorch.OutOfMemoryError: CUDA out of memory.")[0] == "oom"
    status, error = runner.classify(-9, "")
    assert status == "error" and "SIGKILL" in error
    status, error = runner.classify(1, "line\n" * 20 + "RuntimeError: boom\n")
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
    assert "gpt2-tiny: samples/s (speedup over fp32)" in captured.out

    # Running again into the same directory repeats only the failed cells.
    monkeypatch.setenv("AMPBENCH_FAULT", "")
    before = {k: r["timestamp"] for k, r in got.items() if r["status"] in runner.DONE}
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


def test_a_bad_device_or_timeout_is_one_line_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *FAST, "--device", "tpu", "--out", str(out)]) == 2
    assert "unknown device 'tpu'; valid: cpu, cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main(["run", *FAST, "--timeout", "-1", "--out", str(out)])
    assert stopped.value.code == 2
    assert "argument --timeout: must be above 0, got -1" in capsys.readouterr().err
    assert not out.exists()
