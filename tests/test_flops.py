"""Device peak table, name matching and MFU arithmetic (no torch needed)."""

from __future__ import annotations

import json
import logging

import pytest
from bench.cell.flops import (
    PEAK_TFLOPS,
    device_key,
    device_peak_tflops,
    mfu_fields,
    mfu_pct,
    peak_tflops,
)

from bench.cell import flops


@pytest.fixture(autouse=True)
def _fresh_warning_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flops, "_warned", set())


@pytest.mark.parametrize(("name", "key"), [  # as nvidia-smi and torch print them
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA GH200 144G HBM3e", "GH200"),
    ("NVIDIA H800", "H800 SXM"),
    ("NVIDIA H800 PCIe", "H800 PCIe"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100-SXM4-40GB", "A100"),
    ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA A10", "A10"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA B200", "B200"),
    ("  nvidia   h100 80GB HBM3 ", "H100 SXM"),
    ("NVIDIA A100_SXM4_80GB", "A100"),
    ("nvidia-a100-80gb-pcie", "A100"),
])
def test_device_names_match_their_row(name, key):
    assert device_key(name) == key


@pytest.mark.parametrize("name", [
    "NVIDIA A10G",  # another chip configuration than the A10
    "NVIDIA L40",  # not L40S
    "NVIDIA A100-SXM4-40GB MIG 1g.5gb",  # a MIG slice has a fraction of the peak
    "NVIDIA GeForce RTX 4090 Laptop GPU",
    "NVIDIA GeForce RTX 4090 D",
    "NVIDIA GB200",
    "NVIDIA GH200 480GB MIG 1g.12gb",
    "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
    "NVIDIA H20",  # the other export part: a fraction of the H100's tensor rate
    "AMD EPYC 7763 64-Core Processor",
    "cpu",
    "",
])
def test_other_names_get_no_row(name):
    assert device_key(name) is None


def test_h100_sxm_dense_peaks_per_policy():
    name = "NVIDIA H100 80GB HBM3"
    assert peak_tflops(name, "fp32") == 67.0
    assert peak_tflops(name, "tf32") == 495.0
    assert peak_tflops(name, "fp16") == 989.0
    assert peak_tflops(name, "bf16") == 989.0
    assert peak_tflops(name, "fp16-noscale") == 989.0


def test_table_holds_dense_not_sparse_figures():
    # Dense: tensor peaks sit below the sparsity figures, and TF32 is half of FP16/BF16
    # on every listed data-centre part (the 4090's FP32-accumulate rate is the exception).
    assert PEAK_TFLOPS["A100"] == {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0}
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA B200", "bf16") == 2250.0
    assert peak_tflops("NVIDIA B200", "tf32") == 1100.0  # 2.2 PFLOPS* in the datasheet
    no_tf32 = {"MI250X GCD", "MI210"}  # CDNA2: its matrix cores have no TF32
    for key, row in PEAK_TFLOPS.items():
        tf32 = set() if key in no_tf32 else {"tf32"}
        assert set(row) - {"fp8"} == {"fp32", "fp16", "bf16"} | tf32, key
        assert row["fp16"] == row["bf16"] and row["fp32"] < row["bf16"], key
        if tf32:
            assert row["fp32"] <= row["tf32"] < row["bf16"], key
        if tf32 and key != "RTX 4090":
            assert row["tf32"] == pytest.approx(row["bf16"] / 2, rel=0.03), key
        if "fp8" in row:  # twice BF16 on every FP8 part; a sparse figure would be 4x
            assert row["fp8"] == pytest.approx(2 * row["bf16"], rel=0.02), key


@pytest.mark.parametrize(("name", "fp8"), [
    ("NVIDIA H100 80GB HBM3", 1979.0),
    ("NVIDIA H100 PCIe", 1513.0),
    ("NVIDIA H100 NVL", 1670.5),
    ("NVIDIA H200", 1979.0),
    ("NVIDIA GH200 480GB", 1979.0),
    ("NVIDIA H800", 1979.0),
    ("NVIDIA L40S", 733.0),
    ("NVIDIA L4", 242.5),
    ("NVIDIA GeForce RTX 4090", 330.3),  # FP32 accumulate, as torch._scaled_mm
    ("NVIDIA B200", 4500.0),
])
def test_fp8_dense_peaks_of_hopper_ada_and_blackwell(name, fp8):
    assert device_peak_tflops(name, "fp8") == fp8


def test_a_gpu_without_fp8_has_no_fp8_peak_and_warns_once(caplog):
    with caplog.at_level(logging.WARNING):
        assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "fp8") is None
        assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "fp8") is None
        assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    (record,) = caplog.records
    assert "fp8 on A100" in record.getMessage()
    with pytest.raises(ValueError, match="unknown math kind 'fp4'"):
        device_peak_tflops("NVIDIA B200", "fp4")


def test_unknown_device_gives_none_and_warns_once(caplog):
    with caplog.at_level(logging.WARNING):
        assert peak_tflops("AMD EPYC 7763", "bf16") is None
        assert peak_tflops("AMD EPYC 7763", "fp32") is None
    (record,) = caplog.records
    assert "AMD EPYC 7763" in record.getMessage() and "--peak-tflops" in record.getMessage()


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="unknown precision 'fp4'"):
        peak_tflops("NVIDIA H100 80GB HBM3", "fp4")


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
