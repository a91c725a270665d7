"""The regression gate: cell matching, checks against noise, status/parity/missing, exit codes."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bench import BadInput, store
from bench.analysis.checks import Check, parse_checks
from bench.analysis.noise import Estimate
from bench.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "gate"


def _record(**fields: Any) -> dict[str, Any]:
    row = dict(run_id="r", cell_id="resnet-fp16-b32", model="resnet-tiny", precision="fp16",
               batch_size=32, image_size=32, grad_accum=1, compile=False, world_size=1,
               repeat=0, status="ok", step_ms_median=100.0, step_ms_iqr=1.0,
               samples_per_s=320.0, peak_rss_gib=1.0, device="cpu", device_name="Test CPU",
               throttled=False)
    row.update(fields)
    return store.empty_record(**row)


def _run(root: Path, name: str, records: list[dict[str, Any]],
         parity: list[tuple[str, str, str]] | None = None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    store.write_csv(run_dir, records)
    if parity is not None:
        pd.DataFrame(parity, columns=["model", "precision", "verdict"]).assign(seed=0).to_csv(
            run_dir / "parity.csv", index=False)
    return run_dir


def _gate(baseline: Path, current: Path, *extra: str) -> int:
    return main(["gate", "--baseline", str(baseline), "--current", str(current), *extra])


def _pair(tmp_path: Path, base: list[dict], cur: list[dict], **kw: Any) -> tuple[Path, Path]:
    return _run(tmp_path, "base", base, kw.get("base_parity")), _run(
        tmp_path, "cur", cur, kw.get("cur_parity"))


def test_identical_runs_pass(tmp_path, capsys):
    rows = [_record(), _record(precision="fp32", cell_id="x", samples_per_s=200.0)]
    assert _gate(*_pair(tmp_path, rows, rows)) == 0
    assert "gate PASS: 2 cell(s), 0 regression(s)" in capsys.readouterr().out


def test_throughput_drop_with_tight_spread_fails(tmp_path, capsys):
    base = [_record(samples_per_s=1000.0, step_ms_median=32.0, step_ms_iqr=0.2)]
    cur = [_record(samples_per_s=900.0, step_ms_median=35.5, step_ms_iqr=0.2)]
    assert _gate(*_pair(tmp_path, base, cur)) == 1
    out = capsys.readouterr().out
    assert re.search(r"-10\.0% \[[^]]+\] FAIL", out)
    assert "FAIL  resnet-tiny fp16 b=32 img=32: samples_per_s -10.0%" in out


def test_same_drop_inside_wide_noise_is_too_noisy_not_a_regression(tmp_path, capsys):
    base = [_record(samples_per_s=1000.0, step_ms_median=32.0, step_ms_iqr=8.0)]
    cur = [_record(samples_per_s=900.0, step_ms_median=35.5, step_ms_iqr=8.0)]
    base_dir, cur_dir = _pair(tmp_path, base, cur)
    assert _gate(base_dir, cur_dir) == 0
    out = capsys.readouterr().out
    assert re.search(r"-10\.0% \[[^]]+\] too noisy", out)
    assert "0 regression(s)" in out and "too noisy to judge" in out
    assert "taken as the run's typical step-to-step spread" in out  # says which band
    assert _gate(base_dir, cur_dir, "--fail-on-noisy") == 1


def test_quiet_sides_that_agree_are_judged_not_too_noisy(tmp_path, capsys):
    base = [_record(repeat=i, samples_per_s=v) for i, v in enumerate([1000.0, 1002.0, 998.0])]
    cur = [_record(repeat=i, samples_per_s=v) for i, v in enumerate([999.0, 1001.0, 1003.0])]
    assert _gate(*_pair(tmp_path, base, cur)) == 0
    out = capsys.readouterr().out
    assert "0 check(s) too noisy" in out
    assert "the spread across repeats of 1 cell(s)" in out


def test_calibration_band_covers_single_process_cells(tmp_path, capsys):
    # One process per cell, plus a calibration cell in five processes that moved by ~10%:
    # a 10% drop of another cell is then within what the machine does between processes.
    calib = [_record(cell_id="cal", precision="fp32", repeat=i, samples_per_s=v,
                     calibration=i > 0, step_ms_iqr=0.0)
             for i, v in enumerate([1000.0, 900.0, 1100.0, 1000.0, 950.0])]
    base = [*calib, _record(samples_per_s=1000.0, step_ms_iqr=0.0)]
    cur = [*calib, _record(samples_per_s=900.0, step_ms_iqr=0.0)]
    assert _gate(*_pair(tmp_path, base, cur)) == 0
    out = capsys.readouterr().out
    assert "from a calibration cell run in several processes" in out
    assert re.search(r"-10\.0% \[[^]]+\] too noisy", out)
    # A real slowdown far beyond that band still fails.
    slow = [*calib, _record(samples_per_s=500.0, step_ms_iqr=0.0)]
    assert _gate(*_pair(tmp_path / "slow", base, slow)) == 1


def test_lost_measurement_fails(tmp_path, capsys):
    base = [_record(joules_per_sample=2.0)]
    cur = [_record(joules_per_sample=None)]
    assert _gate(*_pair(tmp_path, base, cur)) == 1
    assert "joules_per_sample: the baseline measured it, the current run has no finite" in (
        capsys.readouterr().out)
    nan = [_record(samples_per_s=float("nan"))]
    assert _gate(*_pair(tmp_path / "nan", [_record()], nan)) == 1


@pytest.mark.parametrize("value", ["inf", ""])
def test_baseline_without_finite_throughput_is_bad_input(tmp_path, capsys, value):
    base_dir = _run(tmp_path, "base", [_record()])
    csv = base_dir / store.RESULTS
    frame = pd.read_csv(csv)
    frame["samples_per_s"] = frame["samples_per_s"].astype(object)
    frame.loc[0, "samples_per_s"] = value
    frame.to_csv(csv, index=False)
    cur = _run(tmp_path, "cur", [_record()])
    assert _gate(base_dir, cur) == 2
    err = capsys.readouterr().err
    assert "line 2: ok cell with samples_per_s=" in err and "Traceback" not in err


def test_spread_across_repeats_is_noise(tmp_path):
    # Within-run spread is tiny, but the repeats disagree by +-20%: a 10% drop is not proven.
    wide = [_record(repeat=i, samples_per_s=v, step_ms_iqr=0.0) for i, v in
            enumerate([1000.0, 800.0, 1200.0])]
    tight = [_record(repeat=i, samples_per_s=v, step_ms_iqr=0.0) for i, v in
             enumerate([1000.0, 1001.0, 999.0])]
    cur = [_record(repeat=i, samples_per_s=v, step_ms_iqr=0.0) for i, v in
           enumerate([900.0, 899.0, 901.0])]
    assert _gate(*_pair(tmp_path / "wide", wide, cur)) == 0
    assert _gate(*_pair(tmp_path / "tight", tight, cur)) == 1


def test_throughput_rise_is_not_a_regression(tmp_path):
    base = [_record(samples_per_s=1000.0)]
    cur = [_record(samples_per_s=1500.0)]
    assert _gate(*_pair(tmp_path, base, cur)) == 0


def _calibrated(*rows: dict[str, Any]) -> list[dict[str, Any]]:
    """``rows`` beside a calibration cell in five processes: memory exact, speed within 1%."""
    return [*(_record(cell_id="cal", precision="fp32", repeat=i, calibration=i > 0,
                      samples_per_s=v, step_ms_iqr=0.0, peak_mem_reserved_gib=5.0)
              for i, v in enumerate([1000.0, 1010.0, 990.0, 1005.0, 995.0])), *rows]


def test_memory_rise_fails_with_rss_fallback_on_cpu(tmp_path, capsys):
    base = _calibrated(_record(peak_rss_gib=1.0))
    cur = _calibrated(_record(peak_rss_gib=1.2))
    assert _gate(*_pair(tmp_path, base, cur)) == 1
    assert "peak_rss_gib +20.0%" in capsys.readouterr().out


def test_reserved_memory_is_checked_when_present(tmp_path, capsys):
    base = _calibrated(_record(peak_mem_reserved_gib=10.0, peak_rss_gib=2.0))
    cur = _calibrated(_record(peak_mem_reserved_gib=12.0, peak_rss_gib=2.0))
    assert _gate(*_pair(tmp_path, base, cur)) == 1
    assert "peak_mem_reserved_gib +20.0%" in capsys.readouterr().out


def test_status_ok_to_oom_fails(tmp_path, capsys):
    base = [_record()]
    cur = [_record(status="oom", samples_per_s=None, error="CUDA out of memory")]
    assert _gate(*_pair(tmp_path, base, cur)) == 1
    assert "status ok -> oom" in capsys.readouterr().out


def test_oom_in_one_repeat_is_an_oom_cell(tmp_path):
    base = [_record(repeat=0), _record(repeat=1)]
    cur = [_record(repeat=0), _record(repeat=1, status="oom")]
    assert _gate(*_pair(tmp_path, base, cur)) == 1


def test_missing_cell_fails_and_new_cell_passes(tmp_path, capsys):
    base = [_record(), _record(precision="bf16", cell_id="bf16")]
    assert _gate(*_pair(tmp_path / "missing", base, base[:1])) == 1
    assert "resnet-tiny bf16 b=32 img=32: in the baseline (ok) but not in the current run" in (
        capsys.readouterr().out)
    assert _gate(*_pair(tmp_path / "new", base[:1], base)) == 0


def test_cells_match_across_key_spellings(tmp_path):
    base = _run(tmp_path, "base", [_record()])
    csv = tmp_path / "cur.csv"
    frame = pd.read_csv(base / store.RESULTS)
    # Spellings a hand-edited CSV might have: 32.0 for 32, an empty grad_accum for 1.
    frame["batch_size"] = frame["batch_size"].astype(float)
    frame["grad_accum"] = None
    frame.to_csv(csv, index=False)
    assert _gate(base, csv) == 0


def test_parity_pass_to_fail_fails(tmp_path, capsys):
    rows = [_record()]
    base, cur = _pair(tmp_path, rows, rows,
                      base_parity=[("resnet-tiny", "fp32", ""), ("resnet-tiny", "fp16", "PASS")],
                      cur_parity=[("resnet-tiny", "fp32", ""), ("resnet-tiny", "fp16", "FAIL")])
    assert _gate(base, cur) == 1
    assert "resnet-tiny fp16: parity PASS -> FAIL" in capsys.readouterr().out


def test_parity_expected_fail_stays_fail_passes(tmp_path):
    rows = [_record()]
    parity = [("resnet-tiny", "fp16-noscale", "FAIL")]
    base, cur = _pair(tmp_path, rows, rows, base_parity=parity, cur_parity=parity)
    assert _gate(base, cur) == 0


def test_promoted_baseline_carries_parity_sibling(tmp_path, capsys):
    rows = [_record()]
    run = _run(tmp_path, "run", rows, [("resnet-tiny", "fp16", "PASS")])
    out = tmp_path / "baselines" / "test-cpu.csv"
    assert main(["baseline", str(run), "--out", str(out)]) == 0
    assert (tmp_path / "baselines" / "test-cpu.parity.csv").exists()
    cur = _run(tmp_path, "cur", rows, [("resnet-tiny", "fp16", "FAIL")])
    assert _gate(out, cur) == 1
    assert "parity PASS -> FAIL" in capsys.readouterr().out


def test_device_mismatch_is_refused_unless_allowed(tmp_path, capsys):
    base, cur = _pair(tmp_path, [_record(device_name="NVIDIA A100-SXM4-80GB")], [_record()])
    assert _gate(base, cur) == 2
    err = capsys.readouterr().err
    assert "is from NVIDIA A100-SXM4-80GB but the current run is from Test CPU" in err
    assert "--allow-device-mismatch" in err
    assert _gate(base, cur, "--allow-device-mismatch") == 0


def test_throttled_cell_is_reported_not_failed(tmp_path, capsys):
    base = [_record(samples_per_s=1000.0, step_ms_iqr=0.1)]
    cur = [_record(samples_per_s=800.0, step_ms_iqr=0.1, throttled=True)]
    base_dir, cur_dir = _pair(tmp_path, base, cur)
    assert _gate(base_dir, cur_dir) == 0
    assert re.search(r"-20\.0% \[[^]]+\] throttled", capsys.readouterr().out)
    assert _gate(base_dir, cur_dir, "--fail-on-throttled") == 1


def test_custom_check_replaces_defaults(tmp_path):
    base = [_record(samples_per_s=1000.0, step_ms_iqr=0.0)]
    cur = [_record(samples_per_s=900.0, step_ms_iqr=0.0)]
    base_dir, cur_dir = _pair(tmp_path, base, cur)
    assert _gate(base_dir, cur_dir, "--check", "samples_per_s:-15%") == 0
    assert _gate(base_dir, cur_dir, "--check", "samples_per_s:-50") == 1  # absolute, samples/s


def test_step_summary_gets_markdown(tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    base, cur = _pair(tmp_path, [_record()], [_record(status="timeout")])
    assert _gate(base, cur) == 1
    text = summary.read_text()
    assert text.startswith("### ampbench gate FAIL")
    assert "| resnet-tiny fp16 b=32 img=32 |" in text
    assert "- **FAIL** resnet-tiny fp16 b=32 img=32: status ok -> timeout" in text


def test_defaults_use_latest_run_and_device_baseline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = _run(tmp_path / "results" / "runs", "one", [_record()])
    assert main(["gate"]) == 2
    assert "no baseline results/baselines/test-cpu.csv" in capsys.readouterr().err
    assert main(["baseline", str(run)]) == 0
    assert (tmp_path / "results" / "baselines" / "test-cpu.csv").exists()
    _run(tmp_path / "results" / "runs", "two", [_record(status="error")])
    assert main(["gate"]) == 1


@pytest.mark.parametrize(("name", "reason"), [
    ("malformed.csv", "not a readable CSV (Error tokenizing data"),
    ("missing_column.csv", "missing column(s) samples_per_s"),
    ("not_a_number.csv", "column samples_per_s holds 'fast', not a number"),
])
def test_bad_csv_exits_2_with_reason(tmp_path, capsys, name, reason):
    good = _run(tmp_path, "good", [_record()])
    assert _gate(FIXTURES / name, good) == 2
    err = capsys.readouterr().err
    assert err.startswith("ampbench gate: error: ") and reason in err
    assert "Traceback" not in err


def test_missing_run_dir_exits_2(tmp_path, capsys):
    good = _run(tmp_path, "good", [_record()])
    assert _gate(good, tmp_path / "nope") == 2
    assert "no such run directory or results CSV" in capsys.readouterr().err


def test_promote_refuses_mixed_devices(tmp_path, capsys):
    run = _run(tmp_path, "run", [_record(), _record(precision="fp32", device_name="Other")])
    assert main(["baseline", str(run), "--out", str(tmp_path / "b.csv")]) == 2
    assert "rows from 2 devices" in capsys.readouterr().err
    assert not (tmp_path / "b.csv").exists()


@pytest.mark.parametrize(("text", "expected"), [
    ("samples_per_s:-5%", Check("samples_per_s", 5.0, -1, True)),
    ("step_ms_median:+5%", Check("step_ms_median", 5.0, 1, True)),
    ("peak_rss_gib:+0.5", Check("peak_rss_gib", 0.5, 1, False)),
    ("samples_per_s:2.5%", Check("samples_per_s", 2.5, -1, True)),  # usual direction: a drop
    ("joules_per_sample:10%", Check("joules_per_sample", 10.0, 1, True)),
    (" mfu_pct : - 1 % ", Check("mfu_pct", 1.0, -1, True)),
])
def test_check_parses(text, expected):
    assert Check.parse(text) == expected


@pytest.mark.parametrize(("text", "reason"), [
    ("samples_per_s", "is not METRIC:[+|-]THRESHOLD[%]"),
    ("samples_per_s:fast", "is not METRIC:[+|-]THRESHOLD[%]"),
    ("samples_per_s:-5%%", "is not METRIC:[+|-]THRESHOLD[%]"),
    ("throughput:-5%", "unknown metric 'throughput'"),
    ("status:+1", "unknown metric 'status'"),
])
def test_bad_check_is_bad_input(text, reason):
    with pytest.raises(BadInput, match=re.escape(reason)):
        Check.parse(text)


def test_bad_check_on_cli_exits_2(tmp_path, capsys):
    good = _run(tmp_path, "good", [_record()])
    assert _gate(good, good, "--check", "median:5%") == 2
    assert "unknown metric 'median'" in capsys.readouterr().err


def test_default_checks_round_trip():
    assert [str(c) for c in parse_checks(None)] == [
        "samples_per_s:-5%", "step_ms_median:+5%", "peak_mem_reserved_gib:+5%",
        "joules_per_sample:+5%"]


def _est(value: float, spread: float, n: int = 1) -> Estimate:
    return Estimate(value, spread, n, "repeats")


def test_check_fails_needs_threshold_and_noise():
    check = Check.parse("samples_per_s:-5%")
    assert check.judge(_est(1000.0, 0.01), _est(900.0, 0.01)) == "FAIL"
    assert check.judge(_est(1000.0, 0.10), _est(900.0, 0.10)) == "too noisy"
    assert check.judge(_est(1000.0, 0.0), _est(970.0, 0.0)) == "pass"  # within threshold
    assert check.judge(_est(1000.0, 0.0), _est(1200.0, 0.0)) == "pass"  # faster is fine
    # Far beyond the noise: a regression even where a 5% change could not have been seen.
    assert check.judge(_est(1000.0, 0.05), _est(500.0, 0.05)) == "FAIL"
    # More processes shrink the error of each side's median: the same spread becomes judgeable.
    assert check.judge(_est(1000.0, 0.02), _est(1000.0, 0.02)) == "too noisy"
    assert check.judge(_est(1000.0, 0.02, 9), _est(1000.0, 0.02, 9)) == "pass"


def test_gate_imports_no_torch():
    code = "import sys, bench.analysis.gate; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_contended_cell_is_reported_not_failed(tmp_path, capsys):
    base = [_record(samples_per_s=1000.0, step_ms_iqr=0.1, others_cpu_pct=2.0)]
    cur = [_record(samples_per_s=700.0, step_ms_iqr=0.1, others_cpu_pct=45.0)]
    assert _gate(*_pair(tmp_path, base, cur)) == 0
    out = capsys.readouterr().out
    assert "(contended: current)" in out and re.search(r"-30\.0% \[[^]]+\] contended", out)
    assert "other processes used the cores while it ran (contended)" in out


def test_a_single_process_run_inherits_its_baselines_spread(tmp_path):
    # The baseline measured this cell over five processes (4% apart); the current run is one
    # process 8% slower: within what the cell does between processes, so not a regression.
    base = [_record(repeat=i, samples_per_s=v, step_ms_iqr=0.0)
            for i, v in enumerate([1000.0, 960.0, 1040.0, 1000.0, 1000.0])]
    cur = [_record(samples_per_s=920.0, step_ms_iqr=0.0)]
    assert _gate(*_pair(tmp_path, base, cur)) == 0


def test_a_change_interval_is_the_ratios_on_the_log_scale_never_below_minus_100(tmp_path,
                                                                                 capsys):
    # Wide noise (40% per process) and a 70% drop: a symmetric interval would read -70% ±90%,
    # reaching below -100% (a negative throughput). On the log scale it stays above -100%.
    base = [_record(repeat=i, samples_per_s=v, step_ms_iqr=0.0)
            for i, v in enumerate([1000.0, 600.0, 1400.0])]
    cur = [_record(repeat=i, samples_per_s=v, step_ms_iqr=0.0)
           for i, v in enumerate([300.0, 180.0, 420.0])]
    _gate(*_pair(tmp_path, base, cur), "--check", "samples_per_s:-5%")
    low, high = map(float, re.search(r"-70\.0% \[([-+][\d.]+)% to ([-+][\d.]+)%\]",
                                     capsys.readouterr().out).groups())
    assert -100 < low < -70 < high
    assert math.log1p(low / 100) + math.log1p(high / 100) == pytest.approx(
        2 * math.log(0.3), abs=1e-2)  # symmetric around the ratio on the log scale


# ------------------------------------------------------------------ bad data is never silent


def test_gate_takes_a_run_directory_its_results_csv_or_its_records(tmp_path, capsys):
    base, cur = _pair(tmp_path, [_record()], [_record()])
    store.append(cur, _record())  # records.jsonl beside results.csv, as a run leaves it
    for current in (cur, cur / store.RESULTS, cur / store.RECORDS):
        assert _gate(base / store.RESULTS, current) == 0
        assert "gate PASS: 1 cell(s)" in capsys.readouterr().out
    assert _gate(base, tmp_path / "nope") == 2
    assert "nope: no such run directory or results CSV" in capsys.readouterr().err


def test_a_newer_schema_on_either_side_is_one_line_and_exit_2(tmp_path, capsys):
    newer = store.SCHEMA_VERSION + 1
    base, cur = _pair(tmp_path, [_record()], [{**_record(), "schema": newer}])
    assert _gate(base, cur) == 2
    err = capsys.readouterr().err
    assert err == (f"ampbench gate: error: {cur / store.RESULTS}: schema {newer} (1 row(s)), "
                   f"newer than the schema {store.SCHEMA_VERSION} this ampbench reads; read it "
                   "with the ampbench that wrote it, or a newer one\n")
    assert _gate(cur, base) == 2 and "newer than the schema" in capsys.readouterr().err


def test_a_process_written_twice_is_one_process_and_a_warning(tmp_path, capsys):
    # Three processes 1% apart and a 10% drop. Written twice, each process would count twice:
    # a narrower band than measured.
    base = [_record(repeat=i, samples_per_s=v, step_ms_iqr=0.0)
            for i, v in enumerate([1000.0, 1010.0, 990.0])]
    base_dir = _run(tmp_path, "base", base)
    csv = base_dir / store.RESULTS
    text = csv.read_text()
    csv.write_text(text + "".join(text.splitlines(keepends=True)[1:]))
    cur = _run(tmp_path, "cur", [_record(repeat=i, samples_per_s=v, step_ms_iqr=0.0)
                                 for i, v in enumerate([900.0, 909.0, 891.0])])
    assert _gate(base_dir, cur, "--check", "samples_per_s:-5%") == 1
    out = capsys.readouterr().out
    assert "baseline 1000 [" in out and "(n=3," in out and "(n=6," not in out
    assert (f"warn  baseline: {csv}: lines 2, 3, 4 repeat a later row's run, cell and repeat "
            "(the same process twice)") in out


@pytest.mark.parametrize(("column", "value"), [("samples_per_s", "nan"),
                                               ("step_ms_median", "inf"),
                                               ("joules_per_sample", "inf")])
def test_baseline_promotes_only_what_the_gate_accepts(tmp_path, capsys, column, value):
    run = _run(tmp_path, "run", [_record(joules_per_sample=1.0)])
    frame = pd.read_csv(run / store.RESULTS)
    frame[column] = frame[column].astype(object)
    frame.loc[0, column] = value
    frame.to_csv(run / store.RESULTS, index=False)
    out = tmp_path / "b.csv"
    assert main(["baseline", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"line 2: ok cell with {column}=" in err and err.count("\n") == 1
    assert not out.exists()
    # The gate refuses the same file as its baseline.
    assert _gate(run / store.RESULTS, run, "--check", f"{column}:+5%") == 2


def test_baseline_refuses_a_parity_file_the_gate_cannot_read(tmp_path, capsys):
    run = _run(tmp_path, "run", [_record()], [("resnet-tiny", "fp16", "MAYBE")])
    assert main(["baseline", str(run), "--out", str(tmp_path / "b.csv")]) == 2
    assert "unknown verdict 'MAYBE'" in capsys.readouterr().err
    assert not (tmp_path / "b.csv").exists()
