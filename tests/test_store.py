"""Run directories: append-only records that survive a killed writer, derived CSV, names."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pandas as pd
import pytest

from bench import BadInput, store
from bench.analysis import noise


def _record(batch_size: int, **fields: object) -> dict:
    return store.empty_record(cell_id=f"c{batch_size}", repeat=0, model="gpt2-tiny",
                              precision="fp32", batch_size=batch_size, status="ok", **fields)


def test_records_round_trip_and_the_last_record_of_a_cell_wins(tmp_path):
    store.append(tmp_path, _record(1, samples_per_s=10.0))
    store.append(tmp_path, _record(2))
    store.append(tmp_path, _record(1, samples_per_s=20.0))  # a resumed run redid cell 1
    records = store.load_records(tmp_path)
    assert [(r["batch_size"], r["samples_per_s"]) for r in records] == [(1, 20.0), (2, None)]
    assert list(records[0]) == list(store.FIELDS)


def test_host_bound_and_memory_format_are_fields_of_a_usable_record(tmp_path):
    store.append(tmp_path, _record(1, host_ms_median=4.9, queued_ms_median=-0.01,
                                   host_bound=True, memory_format="channels_last"))
    (record,) = store.load_records(tmp_path)
    assert (record["host_bound"], record["memory_format"]) == (True, "channels_last")


def test_a_torn_tail_is_ignored_and_the_next_record_starts_its_own_line(tmp_path):
    store.append(tmp_path, _record(1))
    with open(tmp_path / store.RECORDS, "a", encoding="utf-8") as f:
        f.write(json.dumps(_record(2))[:40])  # a writer killed in the middle of its line
    assert [r["batch_size"] for r in store.load_records(tmp_path)] == [1]
    store.append(tmp_path, _record(3))
    assert [r["batch_size"] for r in store.load_records(tmp_path)] == [1, 3]
    assert len((tmp_path / store.RECORDS).read_text().splitlines()) == 3


def test_results_csv_is_derived_with_the_schema_columns_first(tmp_path):
    store.append(tmp_path, {**_record(1), "max_batch": 4})
    store.append(tmp_path, _record(2, throttle_reasons=["sw_power_cap", "hw_slowdown"]))
    frame = pd.read_csv(store.write_csv(tmp_path))
    assert list(frame.columns) == [*store.FIELDS, *store.CELL_NOISE, "max_batch"]
    assert frame["throttle_reasons"].tolist()[1] == "sw_power_cap;hw_slowdown"
    assert not list(tmp_path.glob("*.tmp"))


def test_mfu_columns_are_numbers_and_a_flag_beside_them(tmp_path, capsys):
    store.append(tmp_path, {**_record(1, mfu_pct=40.0, mfu_fp8_pct=20.0, peak_tflops=989.0,
                                      peak_fp8_tflops=1979.0, mfu_flag=""), "precision": "fp8"})
    store.append(tmp_path, _record(2, mfu_flag="above 100%: 121.3% of the bf16 peak (989 "
                                   "TFLOP/s)"))
    store.append(tmp_path, {**_record(3), "mfu_fp8_pct": "fast"})  # damaged: skipped
    frame = store.load_results(tmp_path)
    assert frame["mfu_fp8_pct"].tolist()[0] == 20.0 and frame["batch_size"].tolist() == [1, 2]
    assert frame["mfu_flag"].tolist()[1].startswith(store.MFU_ABOVE_100)
    assert "line 3: mfu_fp8_pct 'fast' is not a number; skipped" in capsys.readouterr().err
    with pytest.raises(BadInput, match="column mfu_fp8_pct holds -1, below 0"):
        store.load_results(_csv(tmp_path, "model,precision,batch_size,status,mfu_fp8_pct\n"
                                "gpt2-tiny,fp8,1,ok,-1\n"))


def test_an_fp8_row_before_schema_5_keeps_its_mfu_as_the_fp8_one(tmp_path):
    # Schema 4 measured an FP8 cell's mfu_pct against the FP8 peak; schema 5 against bf16's.
    path = _csv(tmp_path, "schema,model,precision,batch_size,status,peak_tflops,mfu_pct,"
                "fp8_converted\n"
                "4,gpt2-small,fp8,8,ok,1979.0,21.0,48\n"
                "4,gpt2-small,bf16,8,ok,989.0,35.0,\n"
                "4,resnet50,fp8,8,error,,,\n"
                "5,gpt2-small,fp8,8,ok,989.0,42.0,48\n")
    frame = store.load_results(path)
    assert frame["mfu_fp8_pct"].tolist()[0] == 21.0 and frame["peak_fp8_tflops"][0] == 1979.0
    assert np.isnan(frame["mfu_pct"][0]) and np.isnan(frame["peak_tflops"][0])
    assert frame["mfu_flag"][0] == "recorded before schema 5: MFU against the FP8 peak only"
    assert frame["mfu_pct"].tolist()[1] == 35.0 and frame["mfu_pct"].tolist()[3] == 42.0
    assert frame["mfu_flag"][1:].isna().all() and frame["mfu_fp8_pct"][1:].isna().all()


def _timed(batch_size: int, repeat: int, samples_per_s: float, **fields: object) -> dict:
    return {**_record(batch_size, samples_per_s=samples_per_s, step_ms_median=10.0,
                      step_ms_iqr=0.0, timed_steps=30, **fields), "repeat": repeat}


def test_results_csv_states_each_cells_value_and_noise_across_its_processes(tmp_path):
    # Cell 1 in three processes (1% apart); cell 2 in one: it gets the run's band.
    for repeat, value in enumerate([100.0, 101.0, 99.0]):
        store.append(tmp_path, _timed(1, repeat, value))
    store.append(tmp_path, _timed(2, 0, 50.0))
    frame = pd.read_csv(store.write_csv(tmp_path, cell_noise=noise.results_columns))
    one, two = frame[frame["batch_size"] == 1].iloc[0], frame[frame["batch_size"] == 2].iloc[0]
    assert (one["num_processes"], one["cell_samples_per_s"]) == (3, 100.0)
    assert one["process_spread_pct"] == pytest.approx(1.0)
    assert one["cell_samples_per_s_err_pct"] == pytest.approx(1.0 / np.sqrt(3))
    assert one["noise_source"] == "repeats"
    assert (two["num_processes"], two["cell_samples_per_s"]) == (1, 50.0)
    assert np.isnan(two["process_spread_pct"])  # its own: unknown
    assert two["noise_pct"] == pytest.approx(1.0)  # the run's band, from cell 1
    assert two["noise_source"] == "repeats"


def test_a_price_in_meta_adds_the_cost_of_a_million_samples_to_results_csv(tmp_path):
    store.write_meta(tmp_path, {"price_per_hour": 3.6, "price_per_kwh": 0.36})
    for repeat, value in enumerate([100.0, 101.0, 99.0]):  # the cell: 100 samples/s, 1% apart
        store.append(tmp_path, _timed(1, repeat, value, joules_per_sample=2.0, world_size=1))
    store.append(tmp_path, _timed(2, 0, 50.0, world_size=4))  # no energy measured
    store.append(tmp_path, {**_record(3), "status": "oom"})
    frame = pd.read_csv(store.write_csv(tmp_path, cell_noise=noise.results_columns))
    assert list(frame.columns) == [*store.FIELDS, *store.CELL_NOISE, *store.COST]
    one, four, oom = (frame[frame["batch_size"] == b].iloc[0] for b in (1, 2, 3))
    # $3.6 per device-hour = $0.001 per device-second; 1M samples at 100/s take 10,000 s.
    assert one["usd_per_1m_samples"] == pytest.approx(10.0)
    assert one["usd_per_1m_samples_err_pct"] == pytest.approx(1.0 / np.sqrt(3))
    assert four["usd_per_1m_samples"] == pytest.approx(4 * 0.001 * 1e6 / 50)  # 4 devices
    assert one["energy_usd_per_1m_samples"] == pytest.approx(0.2)  # 2 MJ = 0.556 kWh x $0.36
    assert np.isnan(four["energy_usd_per_1m_samples"])
    assert np.isnan(oom["usd_per_1m_samples"])


def test_without_a_price_results_csv_has_no_cost_columns(tmp_path):
    store.write_meta(tmp_path, {"run_id": "r"})
    store.append(tmp_path, _timed(1, 0, 100.0, joules_per_sample=2.0))
    frame = pd.read_csv(store.write_csv(tmp_path))
    assert not set(store.COST) & set(frame.columns)


@pytest.mark.parametrize("price", ["cheap", -1, 0, "nan", float("inf"), True])
def test_a_damaged_price_in_meta_is_bad_input_naming_it(tmp_path, price):
    store.write_meta(tmp_path, {"price_per_hour": price})
    store.append(tmp_path, _timed(1, 0, 100.0))
    with pytest.raises(BadInput, match=r"meta.json price_per_hour: expected a price in USD"):
        store.write_csv(tmp_path)


def test_empty_record_refuses_unknown_fields():
    with pytest.raises(ValueError, match="samples_per_sec"):
        store.empty_record(samples_per_sec=1.0)


def test_latest_run_is_the_most_recently_written(tmp_path):
    with pytest.raises(BadInput, match="no run directory"):
        store.latest_run(tmp_path)
    for name in ("old", "new"):
        (tmp_path / name).mkdir()
        store.append(tmp_path / name, _record(1))
    os.utime(tmp_path / "old" / store.RECORDS, (1, 1))
    assert store.latest_run(tmp_path) == tmp_path / "new"


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), ("True", True), ("true", True), (1, True), (np.bool_(True), True),
    (False, False), ("False", False), ("", False), (None, False), (float("nan"), False),
    (pd.NA, False), (0, False),
])
def test_truthy_reads_flags_back_from_json_and_csv(value, expected):
    assert store.truthy(value) is expected


@pytest.mark.parametrize(("name", "slug"), [
    ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
    ("NVIDIA A100-SXM4-40GB", "nvidia-a100-sxm4-40gb"),
    ("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "intel-xeon-platinum-8375c"),
    ("Intel(R) Core(TM) i9-9900K CPU @ 3.60GHz", "intel-core-i9-9900k"),
    ("AMD EPYC 7R13 Processor", "amd-epyc-7r13"),
    ("AMD Ryzen 9 5950X 16-Core Processor", "amd-ryzen-9-5950x"),
    ("AMD Ryzen 7 5800H with Radeon Graphics", "amd-ryzen-7-5800h"),
    ("Test CPU", "test-cpu"),
    ("", "unknown-device"),
    (None, "unknown-device"),
])
def test_device_slug(name, slug):
    assert store.device_slug(name) == slug


def _csv(tmp_path, text: str):
    path = tmp_path / "results.csv"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


HEADER = "model,precision,batch_size,status,samples_per_s,error\n"


@pytest.mark.parametrize(("row", "message"), [
    ("gpt2-tiny,fp32,1,ok,fast,", "line 3: column samples_per_s holds 'fast', not a number"),
    ("gpt2-tiny,fp32,two,ok,1.0,", "line 3: column batch_size holds 'two', not a number"),
    ("gpt2-tiny,fp32,1.5,ok,1.0,", "line 3: column batch_size holds '1.5', not a whole number"),
    ("gpt2-tiny,fp32,1,ok,-1,", "line 3: column samples_per_s holds -1.0, below 0"),
    ("gpt2-tiny,fp32,1,ok,1_000,", "line 3: column samples_per_s holds '1_000', not a number"),
    ("gpt2-tiny,fp32,1,exploded,1.0,", "line 3: unknown status 'exploded'"),
    (",fp32,1,ok,1.0,", "line 3: column model is empty"),
])
def test_the_results_reader_names_file_line_and_column_of_a_bad_value(tmp_path, row, message):
    path = _csv(tmp_path, HEADER + "gpt2-tiny,fp32,1,ok,1.0,\n" + row + "\n")
    with pytest.raises(BadInput, match=f"{path}: {re.escape(message)}"):
        store.load_results(path)


def test_the_results_reader_keeps_empty_and_infinite_measurements_for_the_caller(tmp_path):
    path = _csv(tmp_path, HEADER + 'gpt2-tiny,fp32,1, OK ,,"multi\nline"\n'
                "gpt2-tiny,bf16,2,ok,inf,\n")
    frame = store.load_results(path)
    assert frame["status"].tolist() == ["ok", "ok"]
    assert np.isnan(frame["samples_per_s"][0]) and np.isinf(frame["samples_per_s"][1])


def test_a_damaged_line_is_bad_input_or_a_warning_and_skipped(tmp_path, capsys):
    path = _csv(tmp_path, HEADER + "gpt2-tiny,fp32,1,ok,1.0,\n"
                "gpt2-tiny,fp32,2,ok,1.0,,extra\n" + "gpt2-tiny,bf16,1,ok,2.0,\n")
    with pytest.raises(BadInput, match="line 3: 7 fields, the header has 6"):
        store.load_results(path)
    frame = store.load_results(path, strict=False)
    assert frame["precision"].tolist() == ["fp32", "bf16"]
    err = capsys.readouterr().err
    assert f"warning: {path}: line 3: 7 fields, the header has 6; skipped" in err


@pytest.mark.parametrize(("data", "message"), [
    (b"model,precision,batch_size,status\n\xff,fp32,1,ok\n", "line 2: not UTF-8 text"),
    (b"", "empty, not a CSV with a header"),
    (b"model,precision\n", "missing column(s) batch_size, status"),
])
def test_an_unreadable_results_file_is_one_line(tmp_path, data, message):
    path = _csv(tmp_path, data)
    with pytest.raises(BadInput, match=re.escape(message)):
        store.load_results(path)


def test_damaged_record_lines_are_warnings_and_skipped(tmp_path, capsys):
    store.append(tmp_path, _record(1))
    with open(tmp_path / store.RECORDS, "ab") as f:
        f.write(b'42\n{"foo": 1}\n{"cell_id": \n\xff\xfe\n')
        f.write(json.dumps(_record(2, samples_per_s="fast")).encode() + b"\n")
        f.write(json.dumps({**_record(3), "repeat": True}).encode() + b"\n")
    store.append(tmp_path, _record(4))
    assert [r["batch_size"] for r in store.load_records(tmp_path)] == [1, 4]
    err = capsys.readouterr().err.splitlines()
    path = tmp_path / store.RECORDS
    assert err == [
        f"warning: {path}: line 2: not a record but int 42; skipped",
        f"warning: {path}: line 3: no cell_id; skipped",
        f"warning: {path}: line 4: not valid JSON; skipped",
        f"warning: {path}: line 5: not UTF-8 text; skipped",
        f"warning: {path}: line 6: samples_per_s 'fast' is not a number; skipped",
        f"warning: {path}: line 7: repeat True is not a whole number of at least 0; skipped",
    ]


@pytest.mark.parametrize(("text", "why"), [
    (b"[1, 2]", "line 1: not a JSON object but list"),
    (b'{"run_id": \n', "line 2: not valid JSON"),
    (b'{"a": "\xff"}', "line 1: not UTF-8 text"),
])
def test_damaged_meta_is_a_warning_and_empty(tmp_path, capsys, text, why):
    (tmp_path / store.META).write_bytes(text)
    assert store.read_meta(tmp_path) == {}
    assert f"warning: {tmp_path / store.META}: {why}" in capsys.readouterr().err


def test_the_record_line_marks_a_host_bound_cell():
    # One line per record: a cell's stderr and the runner's progress (torch-free).
    record = store.empty_record(
        model="bert-base", precision="bf16", batch_size=16, seq_len=128, status="ok",
        samples_per_s=800.0, step_ms_median=20.0, step_ms_iqr=0.2, peak_mem_reserved_gib=3.0,
        achieved_tflops=90.0, host_ms_median=19.5, host_bound=False)
    assert "host-bound" not in store.record_line(record)
    record.update(host_bound=True)
    assert store.record_line(record).endswith(
        "[host-bound: the GPU waits for the host's kernel launches]")


# ---------------------------------------------------------------- schema 6: raw step times


def test_a_record_keeps_its_raw_step_times_and_readers_derive_the_statistics(tmp_path):
    times = [10.0, 12.0, 11.0, 30.0, 10.5]
    # Stored statistics that disagree with the raw times: every reader goes by the raw times,
    # so a better statistic later applies to old records too.
    store.append(tmp_path, _record(1, timed_steps=5, step_times_ms=times, step_ms_median=99.0,
                                   step_ms_iqr=0.0, step_ms_min=1.0))
    q1, q3 = np.percentile(times, [25, 75])
    (record,) = store.load_records(tmp_path)
    assert record["step_times_ms"] == times and len(times) == record["timed_steps"]
    assert (record["step_ms_median"], record["step_ms_min"]) == (11.0, 10.0)
    assert record["step_ms_iqr"] == pytest.approx(q3 - q1)
    row = store.load_results(tmp_path).iloc[0]
    assert (row["step_ms_median"], row["step_ms_min"]) == (11.0, 10.0)
    assert row["step_ms_iqr"] == pytest.approx(q3 - q1)
    # results.csv carries the raw times too, as one exact ";"-joined column.
    text = pd.read_csv(tmp_path / store.RESULTS)["step_times_ms"][0]
    assert [float(t) for t in text.split(";")] == times


def test_a_schema_5_record_without_raw_times_keeps_its_stored_statistics(tmp_path):
    old = {k: v for k, v in _record(1, step_ms_median=10.0, step_ms_iqr=0.4, step_ms_min=9.5,
                                    samples_per_s=100.0).items() if k != "step_times_ms"}
    (tmp_path / store.RECORDS).write_text(json.dumps({**old, "schema": 5}) + "\n")
    (record,) = store.load_records(tmp_path)
    assert (record["schema"], record["step_ms_median"], record["step_ms_iqr"],
            record["step_ms_min"], record["samples_per_s"]) == (5, 10.0, 0.4, 9.5, 100.0)
    row = store.load_results(tmp_path).iloc[0]
    assert (row["step_ms_median"], row["step_ms_iqr"], row["step_ms_min"]) == (10.0, 0.4, 9.5)
    assert np.isnan(row["step_times_ms"])


def test_results_csv_rows_get_their_statistics_from_their_raw_times(tmp_path):
    path = _csv(tmp_path, "schema,model,precision,batch_size,status,step_ms_median,step_ms_iqr,"
                "step_ms_min,step_times_ms\n"
                "6,gpt2-tiny,fp32,1,ok,99,0,1,4.0;2.0;3.0\n"
                "6,gpt2-tiny,fp32,2,ok,5.0,0,5.0,5.0\n"  # one step: a plain number
                "5,gpt2-tiny,fp32,4,ok,7.5,0.5,7.0,\n"  # schema 5: its stored statistics
                "6,gpt2-tiny,fp32,8,oom,,,,\n")
    frame = store.load_results(path)
    assert frame["step_ms_median"].tolist()[:3] == [3.0, 5.0, 7.5]
    assert frame["step_ms_iqr"].tolist()[:3] == [1.0, 0.0, 0.5]
    assert frame["step_ms_min"].tolist()[:3] == [2.0, 5.0, 7.0]
    assert np.isnan(frame["step_ms_median"][3])


@pytest.mark.parametrize("times", ["1.0;fast", "1.0;;2.0", "-1", "2.0;-1.0"])
def test_damaged_raw_times_in_results_csv_are_bad_input_naming_the_line(tmp_path, times):
    path = _csv(tmp_path, "model,precision,batch_size,status,step_times_ms\n"
                f"gpt2-tiny,fp32,1,ok,1.0\ngpt2-tiny,fp32,2,ok,{times}\n")
    with pytest.raises(BadInput, match=f"{re.escape(str(path))}: line 3: column step_times_ms "
                                       "holds '.*', not step times in ms"):
        store.load_results(path)


@pytest.mark.parametrize("times", ["fast", [], [1.0, "x"], [1.0, -2.0], [True]])
def test_a_record_with_damaged_raw_times_is_a_warning_and_skipped(tmp_path, capsys, times):
    store.append(tmp_path, _record(1, step_times_ms=[1.0, 2.0]))
    store.append(tmp_path, _record(2, step_times_ms=times))
    assert [r["batch_size"] for r in store.load_records(tmp_path)] == [1]
    assert "line 2: step_times_ms" in capsys.readouterr().err


def test_a_newer_schema_is_one_line_naming_the_file_and_both_schemas(tmp_path):
    newer = store.SCHEMA_VERSION + 1
    store.append(tmp_path, {**_record(1), "schema": newer})
    said = (f"records.jsonl: schema {newer} (1 row(s)), newer than the schema "
            f"{store.SCHEMA_VERSION} this ampbench reads")
    with pytest.raises(BadInput, match=re.escape(said)):
        store.load_records(tmp_path)
    with pytest.raises(BadInput, match=re.escape(said)):
        store.load_results(tmp_path)  # derived from the records
    csv = tmp_path / "baseline.csv"  # a results CSV of its own, written by a newer ampbench
    pd.DataFrame([{**_record(1, samples_per_s=1.0), "schema": newer}]).to_csv(csv, index=False)
    with pytest.raises(BadInput, match=re.escape(f"baseline.csv: schema {newer} (1 row(s))")):
        store.load_results(csv)


def _ok(batch_size: int, repeat: int = 0, **fields: object) -> dict:
    measured = {"run_id": "r", "samples_per_s": 100.0, "step_ms_median": 10.0,
                "step_ms_iqr": 0.1, **fields}
    return {**_record(batch_size, **measured), "repeat": repeat}


def test_an_ok_record_with_a_non_finite_measurement_is_damaged_but_a_nan_loss_is_a_result(
        tmp_path, capsys):
    assert store.record_problem(_ok(1, loss_last=float("nan"))) is None  # fp16 diverged
    for field, value in (("samples_per_s", float("nan")), ("peak_rss_gib", float("inf"))):
        assert store.record_problem(_ok(1, **{field: value})) == \
            f"ok record with {field} {value}: not a finite measurement"
    assert store.record_problem({**_ok(1, samples_per_s=float("nan")), "status": "oom"}) is None
    store.append(tmp_path, _ok(1))
    store.append(tmp_path, _ok(2, samples_per_s=float("inf")))
    assert [r["batch_size"] for r in store.load_records(tmp_path)] == [1]  # run again on resume
    assert "line 2: ok record with samples_per_s inf: not a finite measurement; skipped" in \
        capsys.readouterr().err
    frame = store.load_results(tmp_path, strict=False)
    assert frame.attrs["problems"] == [f"{tmp_path / store.RECORDS}: line 2: ok record with "
                                       "samples_per_s inf: not a finite measurement; skipped"]


def test_non_finite_measurements_of_a_results_csv_are_left_out_and_said_by_a_lenient_reader(
        tmp_path):
    csv = tmp_path / "r.csv"
    rows = [_ok(1), _ok(1, 1, samples_per_s=float("inf")), _ok(1, 2, step_ms_median=math.inf),
            _ok(1, 3, loss_last=float("nan")), _ok(1, 4, samples_per_s=None)]
    pd.DataFrame(rows).to_csv(csv, index=False)
    strict = store.load_results(csv)  # the gate's: it judges what a missing value means
    assert np.isinf(strict["samples_per_s"][1]) and len(strict) == 5
    lenient = store.load_results(csv, strict=False)
    assert lenient["samples_per_s"].isna().tolist() == [False, True, False, False, True]
    assert np.isnan(lenient["step_ms_median"][2]) and np.isnan(lenient["loss_last"][3])
    assert lenient.attrs["problems"] == [
        f"{csv}: line 4: ok row(s) without a finite step_ms_median (NaN, inf or empty); left "
        "out of every statistic of it",
        f"{csv}: lines 3, 6: ok row(s) without a finite samples_per_s (NaN, inf or empty); "
        "left out of every statistic of it"]


def test_a_process_written_twice_counts_once_and_the_reader_says_so(tmp_path):
    csv = tmp_path / "r.csv"
    rows = [_ok(1, 0, samples_per_s=100.0), _ok(1, 1, samples_per_s=90.0),
            _ok(1, 0, samples_per_s=101.0), _ok(2, 0)]
    pd.DataFrame(rows).to_csv(csv, index=False)
    frame = store.load_results(csv, cell_noise=noise.results_columns)
    assert frame["samples_per_s"].tolist() == [90.0, 101.0, 100.0]  # the last of repeat 0
    assert frame["num_processes"].tolist() == [2, 2, 1]  # not three processes of cell 1
    assert frame.attrs["problems"] == [
        f"{csv}: line 2 repeat a later row's run, cell and repeat (the same process twice): "
        "each process is counted once, its last row kept"]
    # Two repeats, or two runs, of a cell are two processes.
    pd.DataFrame([_ok(1, 0), _ok(1, 1), {**_ok(1, 0), "run_id": "other"}]).to_csv(
        csv, index=False)
    assert len(store.load_results(csv)) == 3


def test_a_cut_off_last_line_is_said_by_a_lenient_reader(tmp_path):
    store.append(tmp_path, _ok(1))
    store.append(tmp_path, _ok(2))
    data = (tmp_path / store.RECORDS).read_bytes()
    (tmp_path / store.RECORDS).write_bytes(data[:-40])  # the writer died mid-line
    frame = store.load_results(tmp_path, strict=False)
    assert frame["batch_size"].tolist() == [1]
    assert frame.attrs["problems"] == [
        f"{tmp_path / store.RECORDS}: line 2: cut off (no newline at its end: the writer was "
        "stopped mid-line)"]
    csv = tmp_path / "copy.csv"
    text = (tmp_path / store.RESULTS).read_text()
    csv.write_text(text + text.splitlines()[1][:30])  # a second row, cut off
    assert "line 3: cut off (" in store.load_results(csv, strict=False).attrs["problems"][0]
    with pytest.raises(BadInput, match="line 3: cut off"):
        store.load_results(csv)  # the gate's reader refuses it


def test_a_run_directory_its_results_csv_and_its_records_resolve_alike(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    store.append(run, _ok(1))
    for given in (run, run / store.RESULTS, run / store.RECORDS):
        if given.name != store.RESULTS or given.exists():
            assert store.resolve(given) == (run, run / store.RESULTS)
        assert store.load_results(given)["batch_size"].tolist() == [1]
    baseline = tmp_path / "gpu.csv"
    baseline.write_text((run / store.RESULTS).read_text())
    assert store.resolve(baseline) == (None, baseline)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="empty: not a run directory"):
        store.resolve(tmp_path / "empty")
    with pytest.raises(BadInput, match="nope: no such run directory or results CSV"):
        store.resolve(tmp_path / "nope")


# ---------------------------------------------------------------- results.csv: derived, not kept


def _count_write_csv(monkeypatch) -> list:
    calls: list = []
    write = store.write_csv
    monkeypatch.setattr(store, "write_csv", lambda *a, **kw: calls.append(a) or write(*a, **kw))
    return calls


def test_results_csv_is_derived_on_read_when_missing_or_older_than_the_records(tmp_path,
                                                                            monkeypatch):
    calls = _count_write_csv(monkeypatch)
    store.append(tmp_path, _record(1, samples_per_s=10.0))
    assert store.load_results(tmp_path)["batch_size"].tolist() == [1]  # missing: derived
    assert len(calls) == 1
    assert store.load_results(tmp_path)["batch_size"].tolist() == [1]  # fresh: read as it is
    assert len(calls) == 1
    store.append(tmp_path, _record(2))  # a sweep still running appends its next record
    past = (tmp_path / store.RECORDS).stat().st_mtime_ns - 10**9
    os.utime(tmp_path / store.RESULTS, ns=(past, past))
    # Stale: derived again, from the run directory or from its results.csv by name.
    assert store.load_results(tmp_path / store.RESULTS)["batch_size"].tolist() == [1, 2]
    assert len(calls) == 2 and not list(tmp_path.glob("*.tmp"))


def test_a_stale_results_csv_that_cannot_be_derived_again_is_read_with_a_warning(
        tmp_path, monkeypatch, capsys):
    store.append(tmp_path, _record(1))
    store.write_csv(tmp_path)
    store.append(tmp_path, _record(2))
    os.utime(tmp_path / store.RESULTS, ns=(0, 0))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store, "write_csv", refuse)
    assert store.load_results(tmp_path)["batch_size"].tolist() == [1]
    assert "older than records.jsonl and cannot be derived again" in capsys.readouterr().err
    (tmp_path / store.RESULTS).unlink()
    with pytest.raises(BadInput, match=r"cannot derive it from records\.jsonl"):
        store.load_results(tmp_path)


def test_a_sweep_appends_per_cell_and_derives_results_csv_once_at_the_end(tmp_path,
                                                                       monkeypatch):
    from bench import report
    from bench.cli import main

    calls = _count_write_csv(monkeypatch)
    out = tmp_path / "run"
    assert main(["run", "--preset", "quick", "--models", "gpt2-tiny", "--precisions", "fp32",
                 "--batch-sizes", "1,2", "--steps", "2", "--warmup", "0", "--no-parity",
                 "--no-report", "--out", str(out)]) == 0
    assert len(calls) == 1  # not once per cell
    frame = pd.read_csv(out / store.RESULTS)
    assert frame["batch_size"].tolist() == [1, 2]
    assert [len(t.split(";")) for t in frame["step_times_ms"]] == [2, 2]
    # A sweep still running: its next record is appended, results.csv not yet rewritten; a
    # report read now sees it.
    record = store.load_records(out)[0]
    store.append(out, {**record, "cell_id": "another", "batch_size": 4})
    assert sorted(report.load(out).cells["batch_size"]) == [1, 2, 4]
    assert len(calls) == 2
