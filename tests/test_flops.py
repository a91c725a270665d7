"""MFU arithmetic and the record's MFU fields against the device peak table (no torch needed,
but for the cell's own record)."""

from __future__ import annotations

import json

import pytest

from bench.cell.flops import mfu_fields, mfu_pct
from bench.telemetry import peaks


@pytest.fixture(autouse=True)
def _fresh_warning_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peaks, "_warned", set())


def test_mfu_arithmetic():
    # 500 TFLOP per step in 1 s on a 989 TFLOP/s part: 50.56 %.
    assert mfu_pct(500e12, 1.0, 989.0) == pytest.approx(50.556, abs=1e-3)
    assert mfu_pct(1e12, 0.01, 312.0) == pytest.approx(100 * 100 / 312)
    assert mfu_pct(1e12, 0.01, None) is None
    assert mfu_pct(None, 0.01, 312.0) is None
    assert mfu_pct(1e12, 0.0, 312.0) is None


def _mfu(**fields):
    return {"peak_tflops": None, "mfu_pct": None, "peak_fp8_tflops": None, "mfu_fp8_pct": None,
            "mfu_flag": "", **fields}


def test_mfu_fields_for_known_unknown_and_overridden_devices(caplog):
    known = mfu_fields(312e12, 2.0, "NVIDIA A100-SXM4-80GB", "bf16")
    assert known == _mfu(peak_tflops=312.0, mfu_pct=pytest.approx(50.0))
    unknown = mfu_fields(1e9, 0.1, "AMD EPYC", "bf16")
    assert unknown == _mfu(mfu_flag="no peak for 'AMD EPYC'")
    assert len(caplog.records) == 1
    overridden = mfu_fields(1e9, 0.1, "AMD EPYC", "bf16", override=0.1)
    assert overridden == _mfu(peak_tflops=0.1, mfu_pct=pytest.approx(10.0))
    assert len(caplog.records) == 1  # an override needs no warning


def test_a_known_device_without_the_policys_peak_is_flagged():
    assert mfu_fields(1e12, 1.0, "NVIDIA A10", "fp8") == _mfu(
        peak_tflops=125.0, mfu_pct=pytest.approx(0.8), mfu_flag="no peak for fp8 on A10")


@pytest.mark.parametrize("policy", ["fp8", "fp8-rowwise"])
def test_fp8_mfu_is_against_the_bf16_peak_and_also_the_fp8_peak_in_its_own_column(policy):
    h100 = "NVIDIA H100 80GB HBM3"
    fields = mfu_fields(494.5e12, 1.0, h100, policy)  # half of bf16's 989, a quarter of FP8's
    assert fields == _mfu(peak_tflops=989.0, mfu_pct=pytest.approx(50.0),
                          peak_fp8_tflops=1979.0, mfu_fp8_pct=pytest.approx(24.987, abs=1e-3))
    # The same work at the same speed reads the same as bf16's: comparable across policies.
    assert mfu_fields(494.5e12, 1.0, h100, "bf16")["mfu_pct"] == fields["mfu_pct"]


def test_an_mfu_above_100_percent_is_flagged_and_never_a_number():
    h100 = "NVIDIA H100 80GB HBM3"
    fields = mfu_fields(1200e12, 1.0, h100, "bf16")
    assert fields["mfu_pct"] is None and fields["peak_tflops"] == 989.0
    assert fields["mfu_flag"] == "above 100%: 121.3% of the bf16 peak (989 TFLOP/s)"
    # FP8 past bf16's peak is what FP8 is for; past the FP8 peak no run can be.
    faster = mfu_fields(1200e12, 1.0, h100, "fp8")
    assert faster["mfu_pct"] == pytest.approx(121.3, abs=0.05) and faster["mfu_flag"] == ""
    impossible = mfu_fields(2400e12, 1.0, h100, "fp8")
    assert impossible["mfu_pct"] is None and impossible["mfu_fp8_pct"] is None
    assert impossible["mfu_flag"] == "above 100%: 121.3% of the fp8 peak (1979 TFLOP/s)"


def test_an_unknown_device_is_flagged_once_for_both_fp8_peaks():
    fields = mfu_fields(1e12, 1.0, "NVIDIA H20", "fp8")
    assert fields == _mfu(mfu_flag="no peak for 'NVIDIA H20'")


@pytest.mark.parametrize(("peak", "expected_flag"), [
    (1000.0, ""),  # a CPU's tiny model is far below it
    (1e-6, "above 100%"),  # an absurd --peak-tflops: the record keeps no impossible MFU
])
def test_cell_record_carries_the_overridden_peak_and_its_mfu(tmp_path, peak, expected_flag):
    from bench.cli import main

    out = tmp_path / "record.json"
    code = main(["cell", "--model", "gpt2-tiny", "--precision", "bf16", "--batch-size", "1",
                 "--warmup", "0", "--steps", "1", "--device", "cpu", "--peak-tflops", str(peak),
                 "--out", str(out)])
    record = json.loads(out.read_text())
    assert code == 0 and record["peak_tflops"] == peak
    assert record["mfu_flag"].startswith(expected_flag)
    if expected_flag:
        assert record["mfu_pct"] is None and "% of the bf16 peak (1e-06 TFLOP/s)" in \
            record["mfu_flag"]
    else:
        assert record["mfu_pct"] == pytest.approx(100 * record["achieved_tflops"] / peak)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_cell_rejects_a_peak_that_is_not_positive(value, capsys):
    from bench.cli import main

    with pytest.raises(SystemExit) as stopped:  # argparse's own exit, one line
        main(["cell", "--model", "gpt2-tiny", "--precision", "bf16", "--batch-size", "1",
              "--peak-tflops", value])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --peak-tflops: must be above 0, got {value}" in err and err.count("\n") == 1
