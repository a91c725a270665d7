"""Device peak table, name matching and MFU arithmetic (no torch needed)."""

from __future__ import annotations

import json
import logging

import pytest

from bench import flops
from bench.flops import PEAK_TFLOPS, device_key, mfu_fields, mfu_pct, peak_tflops


@pytest.fixture(autouse=True)
def _fresh_warning_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flops, "_warned", set())


@pytest.mark.parametrize(("name", "key"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"),
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
    for key, row in PEAK_TFLOPS.items():
        assert set(row) == {"fp32", "tf32", "fp16", "bf16"}, key
        assert row["fp16"] == row["bf16"] and row["fp32"] <= row["tf32"] < row["bf16"], key
        if key != "RTX 4090":
            assert row["tf32"] == pytest.approx(row["bf16"] / 2, rel=0.03), key


def test_unknown_device_gives_none_and_warns_once(caplog):
    with caplog.at_level(logging.WARNING):
        assert peak_tflops("AMD EPYC 7763", "bf16") is None
        assert peak_tflops("AMD EPYC 7763", "fp32") is None
    (record,) = caplog.records
    assert "AMD EPYC 7763" in record.getMessage() and "--peak-tflops" in record.getMessage()


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        peak_tflops("NVIDIA H100 80GB HBM3", "fp8")


def test_mfu_arithmetic():
    # 500 TFLOP per step in 1 s on a 989 TFLOP/s part: 50.56 %.
    assert mfu_pct(500e12, 1.0, 989.0) == pytest.approx(50.556, abs=1e-3)
    assert mfu_pct(1e12, 0.01, 312.0) == pytest.approx(100 * 100 / 312)
    assert mfu_pct(1e12, 0.01, None) is None
    assert mfu_pct(None, 0.01, 312.0) is None
    assert mfu_pct(1e12, 0.0, 312.0) is None


def test_mfu_fields_for_known_unknown_and_overridden_devices(caplog):
    known = mfu_fields(312e12, 2.0, "NVIDIA A100-SXM4-80GB", "bf16")
    assert known == {"peak_tflops": 312.0, "mfu_pct": pytest.approx(50.0)}
    unknown = mfu_fields(1e9, 0.1, "AMD EPYC", "bf16")
    assert unknown == {"peak_tflops": None, "mfu_pct": None}
    assert len(caplog.records) == 1
    overridden = mfu_fields(1e9, 0.1, "AMD EPYC", "bf16", override=0.1)
    assert overridden == {"peak_tflops": 0.1, "mfu_pct": pytest.approx(10.0)}
    assert len(caplog.records) == 1  # an override needs no warning


def test_cell_record_carries_the_overridden_peak_and_its_mfu(tmp_path):
    from bench.__main__ import main

    out = tmp_path / "record.json"
    code = main(["cell", "--model", "gpt2-tiny", "--precision", "bf16", "--batch-size", "1",
                 "--warmup", "0", "--steps", "1", "--device", "cpu", "--peak-tflops", "0.001",
                 "--out", str(out)])
    record = json.loads(out.read_text())
    assert code == 0 and record["peak_tflops"] == 0.001
    assert record["mfu_pct"] == pytest.approx(100 * record["achieved_tflops"] / 0.001)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_cell_rejects_a_peak_that_is_not_positive(value, capsys):
    from bench.__main__ import main

    with pytest.raises(SystemExit) as stopped:  # argparse's own exit, one line
        main(["cell", "--model", "gpt2-tiny", "--precision", "bf16", "--batch-size", "1",
              "--peak-tflops", value])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --peak-tflops: must be above 0, got {value}" in err and err.count("\n") == 1
