"""Run directories: append-only records that survive a killed writer, derived CSV, names."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from bench import BadInput, store


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
    assert list(frame.columns) == [*store.FIELDS, "max_batch"]
    assert frame["throttle_reasons"].tolist()[1] == "sw_power_cap;hw_slowdown"
    assert not list(tmp_path.glob("*.tmp"))


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
