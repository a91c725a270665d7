"""Rows -> cells (bench/analysis/cells.py): one key whatever wrote the row, repeats and the
calibration processes of a cell are one cell, search rows apart; results.csv's noise columns."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest

from bench import store
from bench.analysis import cells, noise


def _row(**fields: Any) -> dict[str, Any]:
    row = dict(model="gpt2-tiny", precision="bf16", batch_size=4, seq_len=64, status="ok",
               repeat=0, samples_per_s=100.0, device_name="Test CPU")
    row.update(fields)
    return row


def test_missing_grad_accum_world_size_and_compile_read_as_one_one_and_false():
    key = cells.cell_key(_row())  # a hand-written CSV may leave them out
    assert (key.grad_accum, key.world_size, key.compile) == (1, 1, False)
    for empty in (None, "", " ", math.nan, pd.NA):
        blank = cells.cell_key(_row(grad_accum=empty, world_size=empty, compile=empty))
        assert blank == key
    assert key.image_size is None and key.device_name is None


@pytest.mark.parametrize("batch", [4, 4.0, "4", " 4.0 "])
@pytest.mark.parametrize("compiled", [True, "True", "true", 1])
def test_one_key_whatever_spelling_wrote_the_row(batch, compiled):
    written = cells.cell_key(_row(batch_size=batch, compile=compiled))
    assert written == cells.cell_key(_row(compile=True))
    assert written.batch_size == 4 and written.compile is True


def test_repeats_and_a_calibration_process_are_one_cell_another_batch_is_another():
    rows = [_row(repeat=0), _row(repeat=1, samples_per_s=101.0),
            _row(repeat=2, calibration=True), _row(batch_size=8), _row(precision="fp32")]
    grouped = cells.group(rows)
    assert list(grouped) == [cells.cell_key(rows[0]), cells.cell_key(rows[3]),
                             cells.cell_key(rows[4])]  # in the order first seen
    assert grouped[cells.cell_key(rows[0])] == rows[:3]
    # The same from a results frame: sub-frames that keep the frame's index.
    frame = pd.DataFrame(rows, index=[10, 11, 12, 13, 14])
    framed = cells.group_frame(frame)
    assert list(framed) == list(grouped)
    assert framed[cells.cell_key(rows[0])].index.tolist() == [10, 11, 12]


def test_a_frame_read_back_from_csv_groups_like_the_records_that_wrote_it(tmp_path):
    rows = [_row(grad_accum=1, compile=False, world_size=1, repeat=r) for r in range(2)]
    rows.append(_row(model="resnet-tiny", seq_len=None, image_size=32, grad_accum=2))
    path = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    frame = pd.read_csv(path)  # floats where a column has gaps, NaN for None
    assert list(cells.group_frame(frame)) == list(cells.group(rows))


def test_max_batch_search_rows_are_not_cells_of_the_sweep_unless_asked():
    sweep = _row()
    flagged = _row(batch_size=64, max_batch_search=True, max_batch=64)
    by_result = _row(batch_size=32, max_batch=32.0)  # results.csv without the flag column
    assert [cells.is_search(r) for r in (sweep, flagged, by_result)] == [False, True, True]
    assert list(cells.group([sweep, flagged, by_result])) == [cells.cell_key(sweep)]
    assert len(cells.group([sweep, flagged, by_result], searches=True)) == 3
    frame = pd.DataFrame([sweep, flagged])
    assert list(cells.group_frame(frame)) == [cells.cell_key(sweep)]


def test_the_device_is_part_of_the_key_only_when_asked():
    rows = [_row(), _row(device_name="NVIDIA H100"), _row(device_name=None)]
    assert len(cells.group(rows)) == 1
    keyed = cells.group(rows, with_device=True)
    assert [k.device_name for k in keyed] == ["Test CPU", "NVIDIA H100", cells.UNKNOWN_DEVICE]


def test_keys_sort_numerically_and_label_as_people_read_them():
    keys = [cells.cell_key(_row(batch_size=b)) for b in (16, 8, 128)]
    assert [k.batch_size for k in sorted(keys, key=cells.sort_key)] == [8, 16, 128]
    mixed = [cells.cell_key(_row(seq_len=64)), cells.cell_key(_row(seq_len=None))]
    assert sorted(mixed, key=cells.sort_key)[0].seq_len is None  # no None < int TypeError
    key = cells.cell_key(_row(model="resnet50", seq_len=None, image_size=224, batch_size=64.0,
                              grad_accum=2, compile="true", world_size=2))
    assert cells.label(key) == "resnet50 bf16 b=64 img=224 ga=2 compile ws=2"
    assert cells.label(cells.cell_key(_row())) == "gpt2-tiny bf16 b=4 seq=64"


def _timed(batch: int, repeat: int, value: float, **fields: Any) -> dict[str, Any]:
    return store.empty_record(**{**_row(batch_size=batch, repeat=repeat, samples_per_s=value,
                                        step_ms_median=10.0, step_ms_iqr=0.0, timed_steps=30,
                                        cell_id=f"c{batch}"), **fields})


def test_results_columns_state_each_cells_value_and_noise_across_its_processes():
    rows = [_timed(1, r, v) for r, v in enumerate([100.0, 101.0, 99.0])]
    rows += [_timed(2, 0, 50.0), _timed(2, 1, 50.2, calibration=True),  # quieter than 1
             _timed(3, 0, math.nan, status="oom")]
    frame = noise.results_columns(pd.DataFrame(rows))
    one, two, oom = (frame[frame["batch_size"] == b].iloc[0] for b in (1, 2, 3))
    assert (one["num_processes"], one["cell_samples_per_s"]) == (3, 100.0)
    assert one["process_spread_pct"] == pytest.approx(1.0)
    assert one["cell_samples_per_s_err_pct"] == pytest.approx(1.0 / math.sqrt(3))
    assert one["noise_source"] == "repeats"
    assert (two["num_processes"], two["cell_samples_per_s"]) == (2, 50.1)  # with calibration
    assert all(oom[c] is None for c in store.CELL_NOISE)  # no ok process: nothing to state


def test_store_writes_the_noise_columns_it_is_given_and_imports_no_analysis(tmp_path,
                                                                            run_python):
    rows = [_timed(1, r, v) for r, v in enumerate([100.0, 101.0, 99.0])]
    given = pd.read_csv(store.write_csv(tmp_path, rows, cell_noise=noise.results_columns))
    assert given["cell_samples_per_s"].tolist() == [100.0] * 3
    (tmp_path / "bare").mkdir()
    bare = pd.read_csv(store.write_csv(tmp_path / "bare", rows))
    assert list(bare.columns) == list(given.columns)  # the same columns, empty
    assert bare[list(store.CELL_NOISE)].isna().all().all()
    # Writing and reading results.csv pulls in nothing of analysis: the one-way dependency.
    for row in rows:
        store.append(tmp_path, row)
    run_python("import sys, bench.store\n"
               f"bench.store.load_results(bench.store.write_csv({str(tmp_path)!r}))\n"
               "assert not [m for m in sys.modules if m.startswith('bench.analysis')]\n"
               "import bench.analysis.cells, bench.analysis.checks, bench.analysis.baseline\n"
               "import bench.analysis.gate\n"
               "assert 'torch' not in sys.modules\n", timeout=120)


def test_readers_derive_the_noise_columns_on_read_whatever_the_file_holds(tmp_path):
    # A results.csv saved without the noise columns (a writer that was not given them) reads
    # with them: every reader on the analysis side passes results_columns, applied on read.
    rows = [_timed(1, r, v) for r, v in enumerate([100.0, 101.0, 99.0])]
    for row in rows:
        store.append(tmp_path, row)
    store.write_csv(tmp_path, rows)  # empty noise columns on disk
    frame = store.load_results(tmp_path, cell_noise=noise.results_columns)
    assert frame["cell_samples_per_s"].tolist() == [100.0] * 3
    assert set(frame["noise_source"]) == {"repeats"}
