"""Numerics health: what a cell records (skipped steps, non-finite losses and gradients, the loss
scale per step), the gate's rule on it, and the report's table."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from bench import report, store
from bench.analysis import numerics
from bench.cli import main


def _cell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str, overflow: int = 0,
          warmup: int = 1, steps: int = 6) -> dict[str, Any]:
    if overflow:
        monkeypatch.setenv("AMPBENCH_OVERFLOW", str(overflow))
    out = tmp_path / f"{precision}.json"
    code = main(["cell", "--model", "gpt2-tiny", "--precision", precision, "--batch-size", "2",
                 "--seq-len", "16", "--warmup", str(warmup), "--steps", str(steps),
                 "--device", "cpu", "--out", str(out), "--cell-id", precision])
    assert code == 0
    return json.loads(out.read_text())


def _expanded(runs: list[list[Any]]) -> list[float]:
    return [scale for scale, count in runs for _ in range(count)]


def _gate_alone(tmp_path: Path, records: list[dict[str, Any]], capsys: Any) -> tuple[int, str]:
    """The gate on a run against itself: only what the current run shows can fail it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    for record in records:
        store.append(run_dir, record)
    capsys.readouterr()
    code = main(["gate", "--baseline", str(run_dir), "--current", str(run_dir)])
    return code, capsys.readouterr().out


def test_an_overflowing_fp16_cell_records_its_skips_and_scale_and_the_gate_fails_it(
        tmp_path, monkeypatch, capsys):
    record = _cell(tmp_path, monkeypatch, "fp16", overflow=5)
    scales = _expanded(record["scaler_scales"])
    # One entry per optimizer step (warmup included), the scale its backward ran at.
    assert len(scales) == record["num_steps_counted"] == 7
    assert scales[:6] == [65536.0, 32768.0, 16384.0, 8192.0, 4096.0, 2048.0]
    seen = [*scales, record["scaler_scale_final"]]
    decreases = sum(b < a for a, b in itertools.pairwise(seen))
    # GradScaler's default backoff halves the scale once per skipped step.
    assert record["scaler_skipped_steps"] == record["nonfinite_grad_steps"] == decreases == 5
    assert record["scaler_scale_changes"] == sum(
        a != b for a, b in itertools.pairwise(seen))
    assert (record["scaler_scale_min"], record["scaler_scale_max"]) == (min(seen), max(seen))
    assert record["nonfinite_steps"] == 0 and record["nonfinite_params"] == 0  # skipped, safe

    code, out = _gate_alone(tmp_path, [record], capsys)
    assert code == 1
    assert ("FAIL  gpt2-tiny fp16 b=2 seq=16: the loss scaler skipped 5 of 7 optimizer "
            "steps (71%)") in out
    assert "skipped 5 of 7 (71.4%) FAIL" in out

    # The results.csv form of the trajectory: "scale:steps;..." per cell.
    written = (tmp_path / "run" / store.RESULTS).read_text()
    assert "65536:1;32768:1;16384:1;8192:1;4096:1;2048:2" in written


def test_bf16_and_fp32_record_no_skips_and_no_trajectory(tmp_path, monkeypatch, capsys):
    for precision in ("bf16", "fp32"):
        record = _cell(tmp_path, monkeypatch, precision, warmup=1, steps=2)
        assert record["scaler_skipped_steps"] is None and record["nonfinite_grad_steps"] is None
        assert record["scaler_scales"] is None and record["scaler_scale_min"] is None
        assert record["nonfinite_steps"] == 0 and record["nonfinite_params"] == 0
        assert record["num_steps_counted"] == 3


def test_an_overflow_without_a_scaler_reaches_the_weights_and_fails_the_gate(
        tmp_path, monkeypatch, capsys):
    record = _cell(tmp_path, monkeypatch, "fp32", overflow=1, warmup=1, steps=2)
    # No per-step gradient check without a scaler: the weights, checked once, show it.
    assert record["nonfinite_grad_steps"] is None
    assert record["nonfinite_params"] > 0
    assert record["nonfinite_steps"] == 2  # the steps after the first ran on NaN weights
    code, out = _gate_alone(tmp_path, [record], capsys)
    assert code == 1
    assert "2 non-finite loss(es) in 3 steps" in out
    assert "parameter(s) non-finite after the last step" in out


# ------------------------------------------------------------------------ the rule, on fixtures


def _row(precision: str = "fp16", **fields: Any) -> dict[str, Any]:
    row = dict(run_id="r", model="resnet-tiny", precision=precision, batch_size=4,
               image_size=32, grad_accum=1, compile=False, world_size=1, repeat=0,
               status="ok", step_ms_median=100.0, step_ms_iqr=1.0, samples_per_s=40.0,
               peak_rss_gib=0.3, device="cpu", device_name="Test CPU", throttled=False,
               warmup_steps=5, timed_steps=30, num_steps_counted=35, nonfinite_steps=0,
               nonfinite_params=0)
    if precision == "fp16":
        row.update(scaler_skipped_steps=2, nonfinite_grad_steps=2, scaler_scale_final=16384.0,
                   scaler_scale_min=16384.0, scaler_scale_max=65536.0,
                   scaler_scale_changes=2,
                   scaler_scales=[[65536.0, 1], [32768.0, 1], [16384.0, 33]])
    row.update(fields)
    row["cell_id"] = f"{precision}-{row['batch_size']}"
    return store.empty_record(**row)


def test_two_calibration_skips_in_35_pass_the_gate(tmp_path, capsys):
    code, out = _gate_alone(tmp_path, [_row(), _row("fp32")], capsys)
    assert code == 0, out
    assert "skipped 2 of 35 (5.7%)" in out


def test_ten_skips_in_35_fail_the_gate_naming_the_cell_and_share(tmp_path, capsys):
    bad = _row(scaler_skipped_steps=10, nonfinite_grad_steps=10, batch_size=8)
    code, out = _gate_alone(tmp_path, [_row(), bad], capsys)
    assert code == 1
    assert ("FAIL  resnet-tiny fp16 b=8 img=32: the loss scaler skipped 10 of 35 "
            "optimizer steps (29%), above the 10%") in out
    assert "skipped 2 of 35 (5.7%)  " in out  # the other cell passes
    assert [line for line in out.splitlines() if line.startswith("FAIL")] == [
        next(line for line in out.splitlines() if line.startswith("FAIL  resnet-tiny fp16 b=8"))]


def test_a_short_run_may_spend_its_first_skips_calibrating():
    short = numerics.Health("fp16", steps=6, skipped=numerics.CALIBRATION_SKIPS,
                            nonfinite_losses=0, nonfinite_grad_steps=4, nonfinite_params=0)
    assert short.share > numerics.SKIPPED_SHARE_LIMIT and short.problems() == []
    more = numerics.Health("fp16", steps=6, skipped=numerics.CALIBRATION_SKIPS + 1,
                           nonfinite_losses=0, nonfinite_grad_steps=5, nonfinite_params=0)
    assert more.problems()


def test_nonfinite_losses_fail_a_policy_but_not_the_ablation(tmp_path, capsys):
    code, out = _gate_alone(tmp_path, [_row("bf16", nonfinite_steps=3)], capsys)
    assert code == 1 and "3 non-finite loss(es) in 35 steps" in out
    code, out = _gate_alone(tmp_path / "ablation", [_row("fp16-noscale", nonfinite_steps=3)],
                            capsys)
    assert code == 0, out


def test_an_older_row_counts_its_warmup_and_timed_steps(tmp_path, capsys):
    old = _row(scaler_skipped_steps=10, num_steps_counted=None, nonfinite_grad_steps=None,
               scaler_scales=None, schema=7)
    code, out = _gate_alone(tmp_path, [old], capsys)
    assert code == 1 and "skipped 10 of 35 optimizer steps" in out


def test_a_damaged_trajectory_is_a_damaged_record():
    assert "scaler_scales" in store.record_problem(_row(scaler_scales=[[65536.0, 0]]))
    assert store.record_problem(_row()) is None


def test_the_report_shows_numerics_health_beside_parity(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    store.write_csv(run_dir, [_row(), _row("fp32"),
                              _row(batch_size=8, scaler_skipped_steps=10,
                                   nonfinite_grad_steps=10, scaler_scale_min=64.0)])
    text = report.render(report.load(run_dir))
    first_screen = text.split("\n## ")[1]
    assert first_screen.startswith("Summary") and "**Numerics health**" in first_screen
    summary = first_screen.split("**Numerics health**")[1]
    fp16 = next(line for line in summary.splitlines()
                if line.startswith("| resnet-tiny | fp16"))
    assert "12 of 70 (17.1%)" in fp16
    assert "16384 (range 64–65536, 4 change(s))" in fp16
    assert "**FAIL** fp16, batch 8" in fp16 and "10 of 35" in fp16
    fp32 = next(line for line in summary.splitlines()
                if line.startswith("| resnet-tiny | fp32"))
    assert "no scaler" in fp32 and "none reached the weights" in fp32 and "| ok" in fp32
