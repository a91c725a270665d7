"""report.md, plots and publishing, from small run directories written as files."""

from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest

from bench import BadInput, report, store
from bench.cli import main
from bench.report.figures import policy_style

FIXTURES = Path(__file__).parent / "fixtures" / "report"
# resnet50 x fp32/fp16/bf16 x batch 128/256; fp32@256 oom, bf16@256 throttled, fp16@128 twice
RUN = FIXTURES / "run"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fixture_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture run's report.md, written once (plots take a few seconds)."""
    return report.write_report(RUN, tmp_path_factory.mktemp("report"))


def _record(**fields: Any) -> dict[str, Any]:
    row = dict(run_id="partial", model="resnet-tiny", precision="fp32", batch_size=8,
               image_size=32, grad_accum=1, compile=False, world_size=1, repeat=0, status="ok",
               samples_per_s=100.0, peak_rss_gib=0.5, device="cpu",
               device_name="Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", throttled=False)
    row.update(fields)
    row["cell_id"] = "-".join(str(row.get(k)) for k in store.IDENTITY[3:12])
    return store.empty_record(**row)


def _run_dir(root: Path, records: list[dict[str, Any]], meta: dict[str, Any] | None = None,
             name: str = "run") -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    store.write_csv(run_dir, records)
    if meta is not None:
        store.write_meta(run_dir, meta)
    return run_dir


def _pngs(plots: Path) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in sorted(plots.glob("*.png"))}


# ------------------------------------------------------------------------------ report.md


def test_report_matches_golden(fixture_report):
    golden = (FIXTURES / "report.md").read_text(encoding="utf-8")
    assert fixture_report.read_text(encoding="utf-8") == golden


def test_repeats_fold_into_the_median_of_ok_repeats():
    import pandas as pd

    rows = [_record(repeat=0, samples_per_s=100.0), _record(repeat=1, samples_per_s=300.0),
            _record(repeat=2, samples_per_s=110.0),
            _record(repeat=3, status="oom", samples_per_s=None)]
    cells = report.aggregate(pd.DataFrame(rows))
    assert len(cells) == 1
    cell = cells.iloc[0]
    assert cell["status"] == "ok"
    assert cell["samples_per_s"] == 110.0
    assert (cell["repeats"], cell["failed_repeats"]) == (4, 1)


def test_a_cell_with_no_ok_repeat_shows_its_worst_status():
    import pandas as pd

    rows = [_record(repeat=0, status="timeout"), _record(repeat=1, status="error")]
    assert report.aggregate(pd.DataFrame(rows)).iloc[0]["status"] == "error"


def test_language_models_report_tokens_and_joules_per_token(tmp_path):
    rows = [_record(model="gpt2-tiny", image_size=None, seq_len=128, precision=p,
                    samples_per_s=sps, tokens_per_s=sps * 128, joules_per_sample=j,
                    power_avg_w=300.0)
            for p, sps, j in (("fp32", 10.0, 12.8), ("bf16", 25.0, 6.4))]
    text = report.render(report.load(_run_dir(tmp_path, rows)))
    assert "**Throughput, tokens/s**" in text
    assert "**Energy, J/token (change vs fp32)**" in text
    assert "|       8 |  0.100 | 0.0500 (-50% (noise unknown)) |" in text  # 12.8 J / 128 tokens
    assert "not judged (noise not measured)" in text and "Wide spread" not in text
    summary = text.split("## Summary")[1].split("##")[0]
    assert re.search(r"\| gpt2-tiny \| bf16 +\| batch 8 +\| 2\.50x, not judged \(noise not "
                     r"measured\) \|", summary)  # one process, no spread: shown, not claimed


def test_emulated_cells_are_noted_and_never_the_summary_s_finding(tmp_path):
    rows = [_record(precision="fp32", samples_per_s=100.0, repeat=r) for r in range(3)]
    rows += [_record(precision="fp8", samples_per_s=500.0, repeat=r, emulated=True,
                     fp8_converted=0, fp8_unconverted="fc (64x10)") for r in range(3)]
    text = report.render(report.load(_run_dir(tmp_path, rows)))
    assert "Emulated: these cells ran their low-precision math in software" in text
    assert text.split("Emulated:")[1].split("\n")[0].endswith("claims them: fp8, batch 8.")
    summary = text.split("## Summary")[1].split("##")[0]
    row = next(line for line in summary.splitlines() if "| fp8 " in line)
    assert "5.00x (emulated: not a speed finding)" in row and "**" not in row  # no finding


def test_mfu_compares_fp8_with_bf16_shows_its_fp8_peak_and_never_prints_a_flagged_value(
        tmp_path):
    h100 = {"device_name": "NVIDIA H100 80GB HBM3"}
    rows = [_record(precision="fp32", mfu_pct=10.0, mfu_flag="", **h100),
            _record(precision="fp16", mfu_pct=None, mfu_flag="above 100%: 130.0% of the fp16 "
                    "peak (989 TFLOP/s)", **h100),
            _record(precision="bf16", mfu_pct=40.0, mfu_flag="", **h100),
            _record(precision="fp8", mfu_pct=55.0, mfu_fp8_pct=27.5, mfu_flag="", **h100)]
    text = report.render(report.load(_run_dir(tmp_path, rows)))
    title = ("**MFU, % of the dense peak (fp32: FP32, tf32: TF32, the others: FP16/BF16, "
             "comparable across them); FP8 policies also of the FP8 peak**")
    table = text.split(title)[1].split("\n\n")[1]
    assert table.splitlines()[-1] == ("|       8 |  10.0% | flagged |  40.0% | "
                                      "55.0% (27.5% of FP8) |")
    assert text.count("130.0%") == 1  # only in the note that says why it is not shown
    assert ("MFU flagged: above 100% of the peak, which no run reaches, so the FLOP count or "
            "the peak is wrong (pass --peak-tflops if the table's is); not shown as a number: "
            "fp16, batch 8 (above 100%: 130.0% of the fp16 peak (989 TFLOP/s)).") in text


def test_max_batch_records_and_world_sizes_get_their_own_tables(tmp_path):
    rows = [
        _record(precision="fp32", samples_per_s=100.0),
        _record(precision="fp16", samples_per_s=200.0),
        _record(precision="fp32", world_size=2, samples_per_s=180.0),
        _record(precision="fp16", world_size=2, samples_per_s=300.0),
        {**_record(precision="fp32", batch_size=64), "max_batch_search": True, "max_batch": 64},
        {**_record(precision="fp16", batch_size=128), "max_batch_search": True,
         "max_batch": 128},
        {**_record(precision="bf16", batch_size=0, status="error"), "max_batch_search": True,
         "max_batch": None},
    ]
    path = report.write_report(_run_dir(tmp_path, rows))
    text = path.read_text(encoding="utf-8")
    # The search records stay out of the per-batch tables.
    assert "|      64 |" not in text and "|     128 |" not in text
    assert "| resnet-tiny |     64 | 128 (2.00x) |  error |" in text
    scaling = text.split("**Scaling efficiency vs world size 1**")[1].split("**")[0]
    assert "|       8 |            2 |    90% |    75% |" in scaling  # 180/(2*100), 300/(2*200)
    assert "max_batch" in _pngs(path.parent / report.PLOTS)


def test_parity_table_shows_the_optimum_and_the_numerics_telemetry(tmp_path):
    import pandas as pd

    run_dir = _run_dir(tmp_path, [_record(model="gpt2-tiny", image_size=None, seq_len=64)])
    rows = []
    for policy, skipped, error in (("fp32", None, None), ("fp16", 3, None),
                                   ("fp16-noscale", None, "RuntimeError: boom")):
        for seed in (0, 1):
            rows.append(dict(model="gpt2-tiny", precision=policy, seed=seed, eval_loss=1.25,
                             eval_accuracy=0.5, optimal_loss=1.086, nonfinite_steps=0,
                             scaler_skipped_steps=skipped, underflow_frac=0.0123,
                             delta=0.0, tolerance=0.03, verdict="PASS",
                             error=error if seed == 1 else None))
    pd.DataFrame(rows).to_csv(run_dir / report.PARITY, index=False)
    text = report.render(report.load(run_dir))
    table = {cells[0]: cells[1:] for line in text.splitlines() if line.startswith("| ")
             for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert table[""] == ["fp32", "fp16", "fp16-noscale"]
    assert table["achievable optimum (entropy rate)"] == ["1.086"] * 3
    assert table["loss-scaler skipped steps"] == ["", "6", ""]  # summed over seeds
    assert table["weight gradients below 2^-24 (FP32 copy; mean of every probe and seed)"] == [
        "1.2%"] * 3
    assert table["crashed runs (see parity.csv)"] == ["0", "0", "1"]


def test_unknown_status_is_bad_input(tmp_path):
    run_dir = _run_dir(tmp_path, [_record(status="exploded")])
    with pytest.raises(BadInput, match="unknown status 'exploded'"):
        report.load(run_dir)


# ------------------------------------------------------------------------------ plots


def test_plots_for_a_full_run(fixture_report):
    plots = fixture_report.parent / report.PLOTS
    pngs = _pngs(plots)
    assert set(pngs) == {"throughput", "speedup", "memory", "energy", "pareto", "loss_curves"}
    for name, data in pngs.items():
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
        assert (plots / f"{name}.svg").stat().st_size > 10_000, name
        assert f"]({report.PLOTS}/{name}.png)" in fixture_report.read_text(encoding="utf-8")


def test_plots_and_report_for_partial_data(tmp_path):
    """Failed cells, a model with nothing ok, no parity, no power: what exists is drawn."""
    rows = [
        _record(precision="fp32", batch_size=8),
        _record(precision="fp32", batch_size=16, status="oom", samples_per_s=None),
        _record(precision="bf16", batch_size=8, samples_per_s=150.0, peak_rss_gib=0.4),
        _record(precision="bf16", batch_size=16, status="error", samples_per_s=None,
                error="RuntimeError: boom"),
        _record(model="gpt2-tiny", image_size=None, seq_len=64, precision="fp16",
                status="unsupported", samples_per_s=None),
    ]
    path = report.write_report(_run_dir(tmp_path, rows))  # no meta.json either
    pngs = _pngs(path.parent / report.PLOTS)
    assert set(pngs) == {"throughput", "speedup", "memory"}
    assert all(p.startswith(PNG_SIGNATURE) and len(p) > 10_000 for p in pngs.values())
    text = path.read_text(encoding="utf-8")
    assert "|       8 |    100 |    150 |\n|      16 |    oom |  error |" in text
    assert "|       8 | unsupported |" in text  # a model with nothing ok still shows why
    assert "- bf16, batch 16: error: RuntimeError: boom" in text
    assert "energy: not measured" in text and "parity: not run" in text
    assert re.search(r"\| gpt2-tiny +\| fp16 +\| +\| n/a \(no ok pair with fp32; fp16: "
                     r"unsupported\)", text)
    assert "5 cells: 2 ok, 1 error, 1 oom, 1 unsupported." in text


def test_policy_colours_are_fixed():
    colours, _ = policy_style(["bf16", "broken", "fp32"])
    again, _ = policy_style(["fp32"])
    assert colours["fp32"] == again["fp32"] and colours["bf16"] != colours["fp32"]
    assert colours["broken"] not in {colours[p] for p in report.POLICY_ORDER}


# ------------------------------------------------------------------------------ publish


def _rendered_copy(fixture_report: Path, dest: Path) -> Path:
    """The fixture run with its report already rendered, so publish need not plot again."""
    shutil.copytree(RUN, dest)
    shutil.copy(fixture_report, dest / report.REPORT)
    shutil.copytree(fixture_report.parent / report.PLOTS, dest / report.PLOTS)
    return dest


def test_publish_copies_the_run_and_indexes_it(tmp_path, fixture_report, capsys):
    run_dir = _rendered_copy(fixture_report, tmp_path / "runs" / "r1")
    results = tmp_path / "results"
    assert main(["publish", str(run_dir), "--results", str(results)]) == 0
    dest = results / "nvidia-h100-80gb-hbm3" / "2026-01-05"
    assert str(dest) in capsys.readouterr().out
    for name in ("results.csv", "parity.csv", "parity_curves.csv", "meta.json", "report.md",
                 "plots/throughput.png", "plots/throughput.svg"):
        assert (dest / name).read_bytes() == (run_dir / name).read_bytes(), name
    index = (results / report.INDEX).read_text(encoding="utf-8")
    assert "## NVIDIA H100 80GB HBM3" in index
    assert ("| 2026-01-05 | [20260105-101500-nvidia-h100](nvidia-h100-80gb-hbm3/2026-01-05/"
            "report.md) | 2.4.0+cu124 | resnet50 | 2.00x [1.61–2.48] (fp16, batch 128) | -44% "
            "(exact) (fp16, batch 128)") in index
    assert "| FAIL: bf16 |" in index

    # Publishing again changes nothing; another run of the same day gets its own directory.
    assert report.publish(run_dir, results) == dest
    assert (results / report.INDEX).read_text(encoding="utf-8") == index
    other = _rendered_copy(fixture_report, tmp_path / "runs" / "r2")
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "run_id": "second"}))
    assert report.publish(other, results) == dest.with_name("2026-01-05-2")
    index = (results / report.INDEX).read_text(encoding="utf-8")
    assert index.index("[second]") < index.index("[20260105-101500-nvidia-h100]")


def test_index_without_published_runs(tmp_path):
    (tmp_path / "runs" / "scratch").mkdir(parents=True)  # scratch runs are not published ones
    shutil.copy(RUN / "results.csv", tmp_path / "runs" / "scratch" / "results.csv")
    text = report.write_index(tmp_path).read_text(encoding="utf-8")
    assert text.startswith("# Published runs\n") and "No runs published yet." in text


# ------------------------------------------------------------------------------ bad input


def test_missing_run_dir_is_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["report", str(missing)]) == 2
    assert main(["publish", str(missing), "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ampbench report: error: {missing}: no such run directory or results CSV",
                   f"ampbench publish: error: {missing}: no such run directory or results "
                   "CSV"]
    assert not (tmp_path / "results").exists()


def test_default_run_dir_is_the_latest_run(tmp_path, monkeypatch, capsys):
    import os

    monkeypatch.chdir(tmp_path)
    assert main(["report"]) == 2
    assert "no run directory under results/runs; pass RUN_DIR" in capsys.readouterr().err
    runs = tmp_path / "results" / "runs"
    old = _run_dir(runs, [_record()], name="old")
    new = _run_dir(runs, [_record()], name="new")
    os.utime(old / store.RESULTS, (1, 1))
    assert main(["report"]) == 0
    assert (new / report.REPORT).exists() and not (old / report.REPORT).exists()


@pytest.mark.parametrize("cuda", [
    {"cuda_version": None, "torch_cuda_build": "13.0"},
    {"cuda_version": "13.0"},  # a run recorded before torch_cuda_build existed
])
def test_a_cuda_build_of_torch_on_a_cpu_is_not_reported_as_the_devices_cuda(tmp_path, cuda):
    meta = {"device": "cpu", "torch_version": "2.14.1", "python_version": "3.11.7", **cuda}
    text = report.render(report.load(_run_dir(tmp_path, [_record()], meta)))
    assert "- **Software:** torch 2.14.1, Python 3.11.7 (torch built for CUDA 13.0; no GPU)" in text
    assert "CUDA 13.0," not in text


def test_the_header_shows_the_threads_a_cpu_number_depends_on(tmp_path):
    # meta.json's fingerprint (schema 7): torch's pools, each variable set or unset (None).
    meta = {"device": "cpu", "torch_version": "2.13.0", "torch_num_threads": 8,
            "torch_num_interop_threads": 4, "omp_num_threads": "8", "mkl_num_threads": None,
            "openblas_num_threads": None, "cuda_visible_devices": "0,1"}
    text = report.render(report.load(_run_dir(tmp_path, [_record()], meta)))
    assert ("- **Threads:** torch 8 intra-op, 4 inter-op; OMP_NUM_THREADS 8, MKL_NUM_THREADS "
            "unset, OPENBLAS_NUM_THREADS unset, CUDA_VISIBLE_DEVICES 0,1") in text
    # A run recorded before schema 7 claims nothing about its threads.
    older = {k: v for k, v in meta.items() if "thread" not in k and "visible" not in k}
    text = report.render(report.load(_run_dir(tmp_path, [_record()], older, name="older")))
    assert "**Threads:**" not in text


def test_a_difference_within_the_noise_is_never_a_finding(tmp_path):
    # One process per cell and a calibration cell that moved by ~8% between its processes:
    # a 5% "speedup" and a 2% memory "saving" are noise, a 60% speedup is not.
    calibration = [_record(repeat=i, samples_per_s=v, calibration=i > 0, step_ms_median=10.0,
                           step_ms_iqr=0.1)
                   for i, v in enumerate([100.0, 92.0, 108.0, 100.0, 95.0])]
    small = [*calibration, _record(precision="bf16", samples_per_s=105.0, peak_rss_gib=0.49)]
    run = report.load(_run_dir(tmp_path, small, name="small"))
    text = report.render(run)
    summary = text.split("## Summary")[1].split("##")[0]
    row = next(line for line in summary.splitlines() if "| bf16 " in line)
    # The point estimate and its interval, said to be within the noise, never bold.
    assert re.search(r"\| 1\.05x \[0\.\d\d–1\.\d\d\] within noise \|", row), row
    assert "**" not in row.split("|")[4]
    assert "from a calibration cell run in several processes" in text
    assert re.search(r"\| 1\.05x \[0\.\d\d–1\.\d\d\] \|", text)  # the model's table too
    assert report.headline(run)[0].speedup == "none beyond noise"
    big = [*calibration, _record(precision="bf16", samples_per_s=160.0)]
    run = report.load(_run_dir(tmp_path, big, name="big"))
    summary = report.render(run).split("## Summary")[1].split("##")[0]
    assert re.search(r"\| \*\*1\.60x\*\* \[1\.\d\d–\d\.\d\d\] faster \|", summary)
    assert re.search(r"1\.60x \[1\.\d\d–\d\.\d\d\] \(bf16, batch 8\)",
                     report.headline(run)[0].speedup)


def test_a_wide_spread_is_flagged_with_the_advice_that_fixes_it(tmp_path):
    rows = [_record(repeat=i, samples_per_s=v, step_ms_median=10.0, step_ms_iqr=0.2)
            for i, v in enumerate([100.0, 60.0, 140.0])]
    text = report.render(report.load(_run_dir(tmp_path, rows)))
    assert "Wide spread (over 10%): fp32, batch 8 (between processes 40.0%" in text
    assert "--repeats 3 or more on an idle machine" in text


def test_a_contended_cell_is_marked_and_never_a_finding(tmp_path):
    calibration = [_record(repeat=i, samples_per_s=v, calibration=i > 0, step_ms_median=10.0,
                           step_ms_iqr=0.1) for i, v in enumerate([100.0, 99.0, 101.0, 100.0])]
    rows = [*calibration, _record(precision="bf16", samples_per_s=300.0, others_cpu_pct=40.0)]
    run = report.load(_run_dir(tmp_path, rows))
    text = report.render(run)
    summary = text.split("## Summary")[1].split("##")[0]
    row = next(line for line in summary.splitlines() if "| bf16 " in line)
    assert "| 3.00x ‡ (contended: not a finding) |" in row and "**" not in row
    assert report.headline(run)[0].speedup == "n/a (contended cells left out)"
    assert "‡ other processes used more than 10% of the run's cores" in text
    assert re.search(r"\*\*3\.00x\*\* \[\d\.\d\d–\d\.\d\d\] ‡", text)


def test_cells_that_ran_beside_others_are_told_from_cells_that_ran_alone(tmp_path):
    # `run --devices`: bf16 b=8 ran beside fp32 b=8; fp32 b=16 ran alone (neighbours []).
    rows = [_record(precision="fp32", device_slot="0", neighbours=["x:0"]),
            _record(precision="bf16", device_slot="1", neighbours=["y:0"]),
            _record(precision="fp32", batch_size=16, device_slot="0", neighbours=[])]
    run = report.load(_run_dir(tmp_path, rows))
    assert sorted(run.cells["co_scheduled"]) == [False, True, True]
    text = report.render(run)
    summary = text.split("## Summary")[1].split("\n## ")[0]
    assert "2 of 3 cells ran beside others on this node's other devices" in summary
    [note] = [line for line in text.splitlines() if "Co-scheduled:" in line]
    assert "(1 of 3 ran alone;" in note and note.endswith("fp32, batch 8; bf16, batch 8.")


def test_a_host_bound_cell_gets_a_note(tmp_path):
    rows = [_record(precision="fp32", step_ms_median=10.0, host_ms_median=4.0,
                    queued_ms_median=6.0, host_bound=False),
            _record(precision="bf16", step_ms_median=5.0, host_ms_median=4.9,
                    queued_ms_median=0.1, host_bound=True)]
    text = report.render(report.load(_run_dir(tmp_path, rows)))
    notes = [line for line in text.splitlines() if line.startswith("- Host-bound:")]
    assert len(notes) == 1
    assert "bf16, batch 8 (host 4.90 ms per step, GPU 5.00 ms)" in notes[0]
    assert "fp32" not in notes[0]



def test_power_capping_is_a_note_not_a_dagger(tmp_path):
    rows = [_record(), _record(precision="bf16", samples_per_s=200.0, throttled=False,
                               throttle_reasons="sw_power_cap", power_capped=True)]
    text = report.render(report.load(_run_dir(tmp_path, rows)))
    assert "Power-capped (the clocks held to the power limit" in text
    assert "bf16, batch 8" in text.split("Power-capped")[1]
    assert "Warning: throttling" not in text and "200 †" not in text  # no dagger on the cell


# ------------------------------------------------------------------ bad data is never silent


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("- **Warning:**")]


def test_a_run_cut_off_mid_record_says_so_in_report_md(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for batch in (8, 16):
        store.append(run_dir, _record(batch_size=batch))
    records = run_dir / store.RECORDS
    records.write_bytes(records.read_bytes()[:-30])  # the runner was killed mid-line
    warnings = _warnings(report.render(report.load(run_dir)))
    assert warnings[0].startswith("- **Warning:** incomplete: the run was stopped mid-write")
    assert f"read around: {records}: line 2: cut off" in warnings[1]


def test_report_md_says_what_it_left_out(tmp_path):
    rows = [_record(repeat=0), _record(repeat=1, samples_per_s=float("inf")),
            _record(repeat=0)]
    run_dir = _run_dir(tmp_path, rows)
    run = report.load(run_dir)
    assert run.cells["samples_per_s"].tolist() == [100.0]  # the inf is no median's
    warnings = _warnings(report.render(run))
    assert any("line 2 repeat a later row's run, cell and repeat" in w for w in warnings)
    assert any("line 3: ok row(s) without a finite samples_per_s" in w for w in warnings)
    assert not any("incomplete" in w for w in warnings)


def test_report_takes_the_path_forms_the_gate_takes(tmp_path, capsys):
    measured = _record(step_ms_median=80.0, step_ms_iqr=1.0)
    run_dir = _run_dir(tmp_path, [measured])
    store.append(run_dir, measured)
    expected = report.render(report.load(run_dir))
    for given in (run_dir / store.RESULTS, run_dir / store.RECORDS):
        assert report.render(report.load(given)) == expected
    assert main(["report", str(run_dir / store.RECORDS)]) == 0
    assert (run_dir / report.REPORT).read_text().startswith(expected.split("\n## ")[0])
    baseline = tmp_path / "gpu.csv"  # a results CSV of its own: its report goes to --out
    shutil.copyfile(run_dir / store.RESULTS, baseline)
    capsys.readouterr()
    assert main(["report", str(baseline)]) == 2
    assert capsys.readouterr().err == (f"ampbench report: error: {baseline}: a results CSV "
                                       "outside a run directory; pass --out DIR for its "
                                       "report.md\n")
    assert main(["report", str(baseline), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / report.REPORT).exists()
    assert main(["publish", str(baseline), "--results", str(tmp_path / "results")]) == 2
    assert "publish takes a run directory" in capsys.readouterr().err


def test_a_newer_schema_is_one_line_and_no_report(tmp_path, capsys):
    newer = store.SCHEMA_VERSION + 1
    run_dir = _run_dir(tmp_path, [{**_record(), "schema": newer}])
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ampbench report: error: {run_dir / store.RESULTS}: schema {newer} ")
    assert err.count("\n") == 1 and not (run_dir / report.REPORT).exists()


def test_an_outlier_process_is_named_and_does_not_set_the_band(tmp_path):
    # Five processes of the calibration cell, one of them far off (the machine went quiet):
    # the report names it by cell and process, and the band is what the other four show.
    values = [100.0, 96.0, 104.0, 100.0, 180.0]
    rows = [_record(repeat=i, samples_per_s=v, calibration=i > 0, step_ms_median=10.0,
                    step_ms_iqr=0.1) for i, v in enumerate(values)]
    text = report.render(report.load(_run_dir(tmp_path, rows)))
    noise_line = next(line for line in text.splitlines() if line.startswith("- **Noise:**"))
    assert ("Outlier processes (more than 5 robust standard deviations from their cell's "
            "median" in noise_line)
    assert "resnet-tiny fp32 batch 8: process 4: 180 samples/s against the median 100" in \
        noise_line
    spread = statistics.stdev([100.0, 96.0, 104.0, 100.0]) * 1.601  # 5.2%, not 34%
    assert f"between-process noise {spread:.1f}% per process" in noise_line
