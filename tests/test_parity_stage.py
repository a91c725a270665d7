"""Tests for bench/parity/stage.py, the parent side: runs planned, trained in child processes
(python -m bench.parity.train), reused from parity_runs.jsonl, cut by a time budget; a child
that crashes, is killed or hangs is a row with its error and the other runs go on."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pandas as pd
import pytest

from bench import BadInput, parity
from bench.parity import stage, train

TINY = dict(models=["gpt2-tiny"], precisions=["fp32", "bf16"], steps=2, seeds=2, device="cpu")


def _count_children(monkeypatch) -> list[tuple[str, int]]:
    """The (precision, seed) of every run handed to a child, in order."""
    calls: list[tuple[str, int]] = []
    real = stage._train_pair

    def counted(runs, *args, **kwargs):
        calls.extend((run.precision, run.seed) for run in runs)
        return real(runs, *args, **kwargs)

    monkeypatch.setattr(stage, "_train_pair", counted)
    return calls


def test_bad_input() -> None:
    with pytest.raises(BadInput, match="nope"):
        parity.run_parity("unused", precisions=["nope"])
    with pytest.raises(BadInput, match="seeds"):
        parity.run_parity("unused", seeds=1)
    with pytest.raises(BadInput, match="resnet-huge"):
        parity.run_parity("unused", models=["resnet-huge"])


@pytest.mark.slow
def test_real_parity_run_passes_mixed_precision_and_fails_broken(tmp_path) -> None:
    # resnet-tiny: the cheapest family under CPU fp16 emulation; the CLI run covers the others
    path = parity.run_parity(tmp_path, models=["resnet-tiny"],
                             precisions=["fp32", "bf16", "fp16", parity.BROKEN],
                             seeds=3, device="cpu")
    frame = pd.read_csv(path)
    assert list(frame.columns[: len(parity.COLUMNS)]) == list(parity.COLUMNS)
    assert len(frame) == 12
    verdicts = frame.groupby("precision")["verdict"].first().to_dict()
    assert verdicts == {"fp32": "PASS", "bf16": "PASS", "fp16": "PASS", "broken": "FAIL"}
    fp16 = frame[frame["precision"] == "fp16"]
    assert (fp16["scaler_skipped_steps"] >= 0).all()
    assert (frame["underflow_frac"] > 0).all() and (frame["subnormal_frac"] > 0).all()
    curves = pd.read_csv(tmp_path / "parity_curves.csv")
    assert list(curves.columns) == list(parity.CURVE_COLUMNS)
    assert curves[curves["precision"] == "fp16"]["scale"].notna().all()
    assert curves[curves["precision"] == "fp32"]["scale"].isna().all()


@pytest.mark.slow
def test_without_loss_scaling_fp16_fails_the_underflow_task_and_scaling_rescues_it(
        tmp_path) -> None:
    path = parity.run_parity(tmp_path, models=[parity.UNDERFLOW],
                             precisions=["fp32", "fp16", "bf16", "fp16-noscale"], seeds=3,
                             device="cpu")
    frame = pd.read_csv(path)
    verdicts = frame.groupby("precision")["verdict"].first().to_dict()
    assert verdicts == {"fp32": "PASS", "fp16": "PASS", "bf16": "PASS", "fp16-noscale": "FAIL"}
    noscale = frame[frame["precision"] == "fp16-noscale"]
    assert (noscale["nonfinite_steps"] == 0).all()  # it fails by lost gradients, not overflow
    assert (noscale["delta"] > noscale["tolerance"]).all()
    assert (frame["underflow_frac"] > 0.1).all()  # the FP32 gradients FP16 would flush
    fp16 = frame[frame["precision"] == "fp16"]
    assert (fp16["scaler_scale_final"] >= 2.0**10).all()  # the scale that lifts them back
    assert frame[frame["precision"] == "fp32"]["time_to_target_s"].notna().all()
    hist = pd.read_csv(tmp_path / "grad_hist.csv")
    assert set(hist["model"]) == {parity.UNDERFLOW}
    activation = hist[(hist["kind"] == "activation")]
    assert activation["log2_bin"].max() < -14  # all below FP16's normal floor, unscaled
    curves = pd.read_csv(tmp_path / "parity_curves.csv")
    assert curves[curves["precision"] == "fp16"]["skipped"].notna().all()
    assert curves[curves["precision"] == "fp32"]["skipped"].isna().all()


def test_a_crash_is_recorded_and_finished_runs_are_reused(tmp_path, monkeypatch) -> None:
    calls = _count_children(monkeypatch)
    monkeypatch.setenv(train.FAULT_ENV, "gpt2-tiny:bf16:1=oom")  # the child records the OOM
    run = dict(models=["gpt2-tiny"], precisions=["fp32", "bf16"], steps=3, seeds=2,
               device="cpu")
    frame = pd.read_csv(parity.run_parity(tmp_path, **run))
    assert len(frame) == 4 and len(calls) == 4
    bf16 = frame[frame["precision"] == "bf16"].set_index("seed")
    assert "CUDA out of memory (injected fault in gpt2-tiny bf16 seed 1)" in bf16.loc[1, "error"]
    assert bf16.loc[1, "error"].startswith("oom: ")
    assert math.isnan(bf16.loc[1, "eval_loss"]) and math.isfinite(bf16.loc[0, "eval_loss"])
    assert set(bf16["verdict"]) == {"INCONCLUSIVE"}

    # Again into the same directory: only the crashed run trains again.
    monkeypatch.delenv(train.FAULT_ENV)
    calls.clear()
    again = pd.read_csv(parity.run_parity(tmp_path, **run))
    assert calls == [("bf16", 1)]
    assert again["error"].isna().all()
    kept = frame[frame["precision"] == "fp32"]["eval_loss"].tolist()
    assert again[again["precision"] == "fp32"]["eval_loss"].tolist() == kept
    hist = pd.read_csv(tmp_path / "grad_hist.csv")  # FP32 seed 0's, kept from the first pass
    assert list(hist.columns) == list(parity.HIST_COLUMNS)
    assert set(hist["kind"]) == {"activation", "weight"} and set(hist["step"]) == {0, 1, 2}
    # Another setup (more steps) is another experiment: nothing is reused.
    calls.clear()
    parity.run_parity(tmp_path, **{**run, "steps": 4})
    assert len(calls) == 4


def test_damaged_parity_runs_are_warnings_and_trained_again(tmp_path, capsys) -> None:
    good = {"key": "k1", "row": {"eval_loss": 1.0, "error": None},
            "curve": [{"step": 1, "loss": 2.0}]}
    lines = [json.dumps(good), "42", '{"key": "k2"}',
             json.dumps({**good, "key": "k3", "row": {"eval_loss": "low"}}),
             json.dumps({**good, "key": "k4", "curve": [{"step": 1}]}), '{"key": "k5", "ro']
    (tmp_path / parity.RUNS).write_text("\n".join(lines) + "\n")
    assert list(stage._load_runs(tmp_path)) == ["k1"]
    err = capsys.readouterr().err
    path = tmp_path / parity.RUNS
    for line in (2, 3, 4, 5, 6):
        assert f"warning: {path}: line {line}: " in err
    assert "Traceback" not in err


def test_a_time_budget_starts_no_parity_run_it_cannot_finish(tmp_path) -> None:
    # A model's first run is bounded by unknown_s (5 s); later ones by its finished runs (the
    # second gets far more than a run takes, however busy the machine).
    left = iter([10.0, 1000.0, 0.0])
    with pytest.raises(parity.OutOfTime) as stop:
        parity.run_parity(tmp_path, models=["gpt2-tiny", "bert-tiny"], precisions=["fp32"],
                          steps=3, seeds=2, device="cpu", time_left=lambda: next(left),
                          unknown_s=5.0)
    assert stop.value.not_run == ["bert-tiny fp32 seed 0", "bert-tiny fp32 seed 1"]
    # Judged: the model whose runs all finished; the others are not recorded at all.
    assert set(pd.read_csv(stop.value.path)["model"]) == {"gpt2-tiny"}
    runs = (tmp_path / parity.RUNS).read_text().splitlines()
    assert len(runs) == 2 and all(json.loads(line)["wall_s"] > 0 for line in runs)

    # Resumed with time enough: only the missing runs train.
    path = parity.run_parity(tmp_path, models=["gpt2-tiny", "bert-tiny"], precisions=["fp32"],
                             steps=3, seeds=2, device="cpu", time_left=lambda: 1000.0,
                             unknown_s=5.0)
    assert len(pd.read_csv(path)) == 4
    assert (tmp_path / parity.RUNS).read_text().splitlines()[:2] == runs
    assert len((tmp_path / parity.RUNS).read_text().splitlines()) == 4


def test_a_killed_child_is_a_row_per_seed_it_left_and_the_other_runs_finish(
        tmp_path, monkeypatch, capsys) -> None:
    # bf16's child trains seed 0, then dies of SIGKILL at seed 1: seed 0 is kept.
    monkeypatch.setenv(train.FAULT_ENV, "gpt2-tiny:bf16:1=kill")
    frame = pd.read_csv(parity.run_parity(tmp_path, **TINY)).set_index(["precision", "seed"])
    assert frame.loc[("bf16", 1), "error"] == "killed by signal SIGKILL"
    assert math.isnan(frame.loc[("bf16", 1), "eval_loss"])
    assert frame.drop(("bf16", 1))["error"].isna().all()
    assert frame.drop(("bf16", 1))["eval_loss"].notna().all()
    assert frame.loc["bf16", "verdict"].tolist() == ["INCONCLUSIVE"] * 2
    assert frame.loc["fp32", "verdict"].tolist() == ["PASS"] * 2
    assert "parity [4/4] gpt2-tiny bf16 seed 1: crashed (killed by signal SIGKILL)" in \
        capsys.readouterr().err
    # Every run is in parity_runs.jsonl, the killed one with its error (a resume retrains it).
    runs = [json.loads(line) for line in (tmp_path / parity.RUNS).read_text().splitlines()]
    assert [r["row"]["error"] for r in runs] == [None, None, None, "killed by signal SIGKILL"]


def test_a_crash_before_the_first_seed_leaves_a_row_for_every_seed_of_that_child(
        tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(train.FAULT_ENV, "gpt2-tiny:fp32:0=kill")
    frame = pd.read_csv(parity.run_parity(tmp_path, **TINY))
    fp32, bf16 = (frame[frame["precision"] == name] for name in ("fp32", "bf16"))
    assert fp32["error"].tolist() == ["killed by signal SIGKILL"] * 2
    assert bf16["error"].isna().all() and bf16["eval_loss"].notna().all()  # its own child
    assert set(frame["verdict"]) == {"INCONCLUSIVE"}  # no FP32 band to judge against


def test_a_hung_child_hits_the_timeout_and_is_a_row(tmp_path, monkeypatch,
                                                   processes_mentioning) -> None:
    monkeypatch.setenv(train.FAULT_ENV, "gpt2-tiny:fp32:1=hang")
    # 30 s per run: fp32's child (two seeds, 60 s) trains seed 0 and is killed at seed 1.
    frame = pd.read_csv(parity.run_parity(tmp_path, **TINY, timeout_s=30))
    frame = frame.set_index(["precision", "seed"])
    assert frame.loc[("fp32", 1), "error"] == "timeout after 60 s"
    assert frame.drop(("fp32", 1))["error"].isna().all()  # seed 0 and bf16's child finished
    assert frame.loc["bf16", "eval_loss"].notna().all()
    assert not processes_mentioning(str(tmp_path)), "a timed-out child outlived its stage"


def test_the_stage_imports_no_torch_and_its_children_train(tmp_path, cli_env) -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # importing torch here now fails\n"
        "from bench import parity\n"
        f"path = parity.run_parity({str(tmp_path)!r}, models=['gpt2-tiny'], "
        "precisions=['fp32'], steps=2, seeds=2, device='cpu')\n"
        "import pandas as pd\n"
        "frame = pd.read_csv(path)\n"
        "assert frame['error'].isna().all() and frame['eval_loss'].notna().all(), frame\n"
        "assert list(frame['verdict']) == ['PASS', 'PASS']\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=cli_env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_a_device_this_machine_lacks_is_bad_input_before_anything_is_written(tmp_path) -> None:
    with pytest.raises(BadInput, match="cuda:99"):
        parity.run_parity(tmp_path / "run", models=["gpt2-tiny"], precisions=["fp32"],
                          steps=2, seeds=2, device="cuda:99")
    assert not (tmp_path / "run").exists()


def test_how_a_child_ended_is_one_line() -> None:
    from bench.run.launch import Ended

    traceback = "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n"
    assert stage.child_error(Ended(True, -9, "", 60.0), 60.0) == "timeout after 60 s"
    assert stage.child_error(Ended(False, -9, traceback, 1.0), 60.0) == \
        "killed by signal SIGKILL"
    assert stage.child_error(Ended(False, 1, traceback, 1.0), 60.0) == \
        "exit code 1: RuntimeError: boom"
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
    assert stage.child_error(Ended(False, 1, oom, 1.0), 60.0) == f"oom: exit code 1: {oom.strip()}"
