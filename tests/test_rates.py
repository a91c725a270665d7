"""The gate's error-rate benchmark: how its verdicts are counted (the runs themselves are slow
and live in `nox -s gate_rates`)."""

from __future__ import annotations

import pandas as pd

from bench import store
from bench.analysis import gate, gate_rates


def _frame(*values: float) -> pd.DataFrame:
    rows = [store.empty_record(model="gpt2-tiny", precision=p, batch_size=4, seq_len=64,
                               status="ok", samples_per_s=v, step_ms_median=1000 / v,
                               step_ms_iqr=0.0, timed_steps=30, device_name="cpu",
                               repeat=r, calibration=False)
            for r in range(3) for p, v in zip(("fp32", "bf16"), values, strict=True)]
    return pd.DataFrame(rows)


def test_tally_counts_every_judged_check_and_detection_counts_cells():
    checks = gate.parse_checks(["samples_per_s:-5%", "joules_per_sample:+5%"])
    same = gate.compare(_frame(100.0, 200.0), _frame(100.0, 200.0), checks)
    assert gate_rates.tally(same) == {"pass": 2}  # joules: n/a on both sides, not counted
    slowed = gate.compare(_frame(100.0, 200.0), _frame(80.0, 160.0), checks)
    assert gate_rates.detection(slowed) == {"FAIL": 2}
    text = gate_rates.render({"device_name": "cpu", "preset": "cpu", "repeats": 1, "reruns": 3,
                         "slowdown": 0.2, "timestamp": "t", "checks": ["samples_per_s:-5%"],
                         "baseline_repeats": 3,
                         "same_code": {"judged_checks": 360, "false_positives": 0,
                                       "too_noisy": 12},
                         "slowed": {"cells": 30, "detected": 29, "too_noisy": 1, "missed": 0}})
    assert "0 of 360 checks failed over 3 same-code reruns" in text
    assert "29 of 30 cells failed the samples/s check" in text
