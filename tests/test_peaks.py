"""The device peak table (bench/telemetry/peaks.py): name matching, dense figures, which peak a
policy is against, one warning per missing peak (no torch needed)."""

from __future__ import annotations

import logging

import pytest

from bench.telemetry import peaks
from bench.telemetry.peaks import PEAK_TFLOPS, device_key, device_peak_tflops, peak_tflops


@pytest.fixture(autouse=True)
def _fresh_warning_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peaks, "_warned", set())


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
