"""Tests for bench/parity/__init__.py: the `ampbench parity` command and the entry points the
runner and validate call (the stage, the verdicts, the tasks: test_parity_*.py)."""

from __future__ import annotations

import pandas as pd

from bench import parity


def test_parity_command_ends_with_the_verdict_table(tmp_path, monkeypatch, capsys) -> None:
    from bench.cli import main

    rows = pd.DataFrame({
        "model": ["gpt2-tiny"] * 2, "precision": ["fp32", "broken"], "seed": [0, 0],
        "eval_loss": [2.0, 3.0], "eval_accuracy": [0.3, 0.1], "optimal_loss": [1.9, 1.9],
        "delta": [0.0, 1.0], "tolerance": [0.03, 0.03], "scaler_skipped_steps": [None, None],
        "underflow_frac": [0.1, 0.1], "verdict": ["PASS", "FAIL"]})

    def fake_run_parity(out, **kwargs):
        rows.to_csv(tmp_path / "parity.csv", index=False)
        return tmp_path / "parity.csv"

    monkeypatch.setattr(parity, "run_parity", fake_run_parity)
    assert main(["parity", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("Accuracy parity against fp32")
    fp32, broken = (line for line in out.splitlines() if line.startswith("| gpt2-tiny"))
    assert fp32.rstrip(" |").endswith("PASS") and broken.rstrip(" |").endswith("FAIL")


def test_the_underflow_task_always_judges_the_ablation_and_leaves_tf32_out() -> None:
    asked = ["fp32", "tf32", "bf16", "fp8", parity.BROKEN]
    assert parity.task_policies(parity.UNDERFLOW, asked) == [
        "fp32", "bf16", "fp16-noscale", "fp8", parity.BROKEN]
    assert parity.task_policies("gpt2-tiny", asked) == asked  # other tasks: as asked


def test_the_entry_points_callers_use_stay_importable_without_torch(run_python) -> None:
    run_python(
        "import sys\n"
        "from bench import parity\n"
        "for name in ('run_parity', 'tasks_for', 'task_policies', 'OutOfTime', 'verdict_table',\n"
        "             'UNDERFLOW', 'main', 'VERDICTS', 'worst_verdict'):\n"
        "    assert hasattr(parity, name), name\n"
        "assert 'torch' not in sys.modules\n")
