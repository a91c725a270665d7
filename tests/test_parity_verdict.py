"""Tests for bench/parity/verdict.py: the verdicts and time to target judged from parity rows
(torch-free, on hand-made frames)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from bench import BadInput, parity


def _frame(fp32: list[float], other: list[float], *, nonfinite: int = 0,
           initial: float = 5.0) -> pd.DataFrame:
    rows = []
    for name, losses in (("fp32", fp32), ("bf16", other)):
        for seed, loss in enumerate(losses):
            rows.append({"model": "m", "precision": name, "seed": seed, "eval_loss": loss,
                         "nonfinite_steps": nonfinite if name == "bf16" else 0,
                         "initial_eval_loss": initial, "final_train_loss": loss,
                         "curve": [(10, 3.0, 1.0), (20, loss, 2.0)]})
    return pd.DataFrame(rows)


def _verdicts(frame: pd.DataFrame) -> dict[str, str]:
    judged = parity.judge(frame)
    return dict(zip(judged["precision"], judged["verdict"], strict=True))


def test_verdict_pass_within_band() -> None:
    judged = parity.judge(_frame([1.00, 1.01, 1.02], [1.02, 1.03, 1.01]))
    assert set(judged["verdict"]) == {"PASS"}
    bf16 = judged[judged["precision"] == "bf16"].iloc[0]
    assert bf16["delta"] == pytest.approx(0.01)
    assert bf16["tolerance"] == pytest.approx(max(parity.ABS_FLOOR, parity.K_SIGMA * 0.01))
    assert bf16["fp32_mean"] == pytest.approx(1.01)


def test_verdict_fail_outside_band_either_side() -> None:
    assert _verdicts(_frame([1.00, 1.01, 1.02], [1.30, 1.31, 1.29]))["bf16"] == "FAIL"
    assert _verdicts(_frame([1.00, 1.01, 1.02], [0.70, 0.71, 0.69]))["bf16"] == "FAIL"


def test_verdict_absolute_floor_when_fp32_seeds_agree() -> None:
    # sigma 0: only the floor protects a tiny, harmless difference from failing
    verdicts = _verdicts(_frame([1.0, 1.0, 1.0], [1.0 + parity.ABS_FLOOR / 2] * 3))
    assert verdicts == {"fp32": "PASS", "bf16": "PASS"}


def test_verdict_inconclusive_when_band_too_wide() -> None:
    # improvement 5.0 - 1.5 = 3.5; sigma ~0.5 is more than 10% of it
    verdicts = _verdicts(_frame([1.0, 1.5, 2.0], [3.0, 3.0, 3.0]))
    assert verdicts == {"fp32": "INCONCLUSIVE", "bf16": "INCONCLUSIVE"}


def test_verdict_fail_on_nonfinite() -> None:
    assert _verdicts(_frame([1.0, 1.01, 1.02], [1.01, 1.01, 1.01], nonfinite=1))["bf16"] == "FAIL"
    assert _verdicts(_frame([1.0, 1.01, 1.02], [math.nan, 1.01, 1.01]))["bf16"] == "FAIL"


def test_a_crashed_run_makes_its_policy_inconclusive_not_failed() -> None:
    frame = _frame([1.00, 1.01, 1.02], [1.01, 1.01, 1.01])
    frame["error"] = None
    frame.loc[4, ["eval_loss", "error"]] = [math.nan, "OutOfMemoryError: CUDA out of memory"]
    assert _verdicts(frame) == {"fp32": "PASS", "bf16": "INCONCLUSIVE"}
    frame.loc[3, "nonfinite_steps"] = 2  # a diverged seed still fails, crash or not
    assert _verdicts(frame)["bf16"] == "FAIL"


def test_without_two_fp32_runs_there_is_no_band() -> None:
    frame = _frame([1.00, 1.01, 1.02], [1.01, 1.01, 1.01])
    frame["error"] = None
    frame.loc[[0, 1], "error"] = "RuntimeError: boom"
    assert set(_verdicts(frame).values()) == {"INCONCLUSIVE"}


def test_time_to_target_is_the_first_sample_within_tolerance_of_fp32s_final_loss() -> None:
    frame = _frame([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    # FP32's seeds agree: tolerance is the floor, the target 1.0 + ABS_FLOOR
    frame.at[3, "curve"] = [(10, 1.5, 0.4), (20, 1.0 + parity.ABS_FLOOR, 0.9), (30, 0.8, 1.3)]
    frame.at[4, "curve"] = [(10, 1.5, 0.4), (20, 1.2, 0.8)]
    frame.at[5, "curve"] = [(10, 1.5, 0.4), (20, 0.9, None)]  # a run without times
    judged = parity.judge(frame)
    assert (judged.at[3, "steps_to_target"], judged.at[3, "time_to_target_s"]) == (20, 0.9)
    assert judged.at[4, "steps_to_target"] is None and judged.at[4, "time_to_target_s"] is None
    assert judged.at[5, "steps_to_target"] == 20 and judged.at[5, "time_to_target_s"] is None
    assert list(judged.loc[:2, "time_to_target_s"]) == [2.0, 2.0, 2.0]  # every FP32 run


def test_the_target_is_never_below_the_worst_fp32_seed() -> None:
    frame = _frame([1.0, 1.0, 1.3], [1.0, 1.0, 1.0])  # one FP32 seed ends well above the rest
    judged = parity.judge(frame)
    # tolerance 3 * std = 0.52 would put the target at 1.62; the worst seed is 1.3
    assert judged.at[0, "tolerance"] == pytest.approx(3 * pd.Series([1.0, 1.0, 1.3]).std())
    assert judged.loc[:2, "steps_to_target"].tolist() == [20, 20, 20]
    frame = _frame([1.0, 1.0, 1.02], [1.0, 1.0, 1.0])
    frame.loc[0, "curve"] = [(10, 3.0, 1.0), (20, 1.04, 2.0)]  # target 1.0067 + 0.0346
    assert parity.judge(frame).at[0, "steps_to_target"] == 20


def test_judge_needs_fp32_reference() -> None:
    frame = _frame([1.0], [1.0])
    with pytest.raises(BadInput, match="fp32"):
        parity.judge(frame[frame["precision"] != "fp32"])
