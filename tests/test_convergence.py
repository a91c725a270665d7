"""Tests for bench/parity/convergence.py: MLPerf's olympic mean over seeds, not-reached and
crashed seeds, the exact one-sided rank-sum test against hand-worked values, and where the
verdicts appear (the console's verdict table, the report)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pandas as pd
import pytest

from bench import report, store
from bench.analysis import noise
from bench.parity import convergence, verdict_table
from bench.parity.convergence import olympic, slower_test

# ------------------------------------------------------------------------------ olympic mean


def test_five_seeds_drop_the_fastest_and_slowest_and_average_the_rest():
    # sorted: 100 (seed 1), 110 (3), 120 (2), 130 (0), 150 (4); drop seeds 1 and 4;
    # mean (110 + 120 + 130) / 3 = 120
    result = olympic({0: 130, 1: 100, 2: 120, 3: 110, 4: 150})
    assert result.value == pytest.approx(120.0)
    assert result.dropped == (1, 4)
    assert sorted(result.kept) == [0, 2, 3]
    assert (result.n, result.low, result.high) == (5, 100.0, 150.0)
    assert "after dropping the fastest (seed 1) and slowest (seed 4) of N=5" in \
        convergence.how(result)
    assert "MLPerf asks" not in convergence.how(result)


def test_three_seeds_leave_the_median_and_say_mlperf_asks_for_five():
    result = olympic({0: 90, 1: 200, 2: 100})
    assert (result.value, result.kept, result.dropped) == (100.0, (2,), (0, 1))
    assert "MLPerf asks for at least 5" in convergence.how(result)


def test_four_seeds_average_the_middle_two():
    assert olympic({0: 10, 1: 40, 2: 20, 3: 30}).value == pytest.approx(25.0)


def test_fewer_than_three_seeds_drop_nothing_and_say_so():
    result = olympic({0: 100, 1: 120})
    assert (result.value, result.dropped) == (110.0, ())
    assert "mean of 2 seeds, none dropped (fewer than 3)" in convergence.how(result)
    assert olympic({}).n == 0 and math.isnan(olympic({}).value)


def test_ties_are_broken_by_seed_number():
    assert olympic({2: 100, 0: 100, 1: 100}).dropped == (0, 2)


def test_one_seed_that_never_reached_is_dropped_as_the_slowest():
    # None and NaN are not reached: slower than any seed that reached; mean (100 + 110 + 120)/3
    result = olympic({0: 100, 1: None, 2: 120, 3: 110, 4: 90})
    assert result.value == pytest.approx(110.0)
    assert result.dropped == (4, 1) and result.not_reached == (1,)
    assert math.isinf(result.high)


def test_a_second_seed_that_never_reached_leaves_the_mean_not_reached():
    result = olympic({0: 100, 1: None, 2: 120, 3: math.nan, 4: 90})
    assert math.isinf(result.value) and result.not_reached == (1, 3)
    assert olympic({0: None}).value == math.inf  # one seed, none dropped, not reached
    assert convergence._num(result.value, whole=True) == convergence.NOT_REACHED


# ------------------------------------------------------------------------------ the test


def test_exact_rank_sum_test_worked_by_hand():
    # fp32 steps 100, 110, 120; bf16 115, 130, 140. Pooled ranks: 100=1 110=2 115=3 120=4
    # 130=5 140=6; bf16's rank sum W = 3 + 5 + 6 = 14, U = W - 3*4/2 = 8 (of 9 pairs, bf16 is
    # slower in 8). Under the null every 3 of the 6 ranks are bf16's with chance 1/C(6,3) =
    # 1/20; the triples summing to >= 14 are {4,5,6} = 15 and {3,5,6} = 14: p = 2/20 = 0.1.
    test = slower_test([115, 130, 140], [100, 110, 120])
    assert test.u == 8.0 and test.p == pytest.approx(0.1) and test.p_min == pytest.approx(0.05)
    assert not test.slower
    assert convergence.test_text(test) == \
        "U=8, p=0.1: not shown slower than fp32 at alpha 0.05 (N=3 vs 3)"


def test_ties_and_not_reached_worked_by_hand():
    # fp32 100, 110; bf16 110, not reached. Mid-ranks: 100=1, the two 110s share 2.5, not
    # reached=4. W = 2.5 + 4 = 6.5, U = 6.5 - 3 = 3.5. The C(4,2) = 6 pairs of {1, 2.5, 2.5, 4}
    # sum to 3.5, 3.5, 5, 5, 6.5, 6.5: two reach 6.5, p = 2/6. Smallest possible p 1/6 > 0.05.
    test = slower_test([110, None], [100, 110])
    assert test.u == 3.5 and test.p == pytest.approx(1 / 3)
    assert test.p_min == pytest.approx(1 / 6)
    assert "cannot tell at alpha 0.05 with N=2 vs 2 (smallest possible p 0.167)" in \
        convergence.test_text(test)


def test_a_policy_that_never_reached_in_three_seeds_is_slower_at_p_one_in_twenty():
    test = slower_test([None, None, math.nan], [100, 110, 120])
    assert test.u == 9.0 and test.p == pytest.approx(1 / 20) and test.slower


def test_a_faster_or_equal_policy_is_not_slower():
    assert slower_test([100, 100, 100], [100, 100, 100]).p == pytest.approx(1.0)
    assert slower_test([50, 60, 70], [100, 110, 120]).p == pytest.approx(1.0)
    assert slower_test([], [100]) is None


def _enumerated_p(xs: list[Any], ys: list[Any]) -> float:
    """The same p by listing every split (an independent count, for the subset-sum one)."""
    values = [math.inf if v is None else float(v) for v in xs + ys]
    rank = {v: (sum(u < v for u in values) + 1 + sum(u <= v for u in values)) / 2
            for v in values}
    observed = sum(rank[v] for v in values[:len(xs)])
    splits = list(itertools.combinations(values, len(xs)))
    return sum(sum(rank[v] for v in s) >= observed - 1e-9 for s in splits) / len(splits)


@pytest.mark.parametrize(("xs", "ys"), [
    ([120, 130, None, 140, 150], [100, 110, 120, 100, 130]),
    ([60, 60, 80, 90], [60, 70, 70, 80, 100, 60]),
    ([None, 40], [30, 40, 50]),
])
def test_the_subset_sum_count_matches_listing_every_split(xs, ys):
    assert slower_test(xs, ys).p == pytest.approx(_enumerated_p(xs, ys))


# ------------------------------------------------------------------------------ parity rows


def _rows(plans: dict[str, list[Any]], crashed: dict[str, list[int]] | None = None,
          model: str = "m") -> list[dict[str, Any]]:
    rows = []
    for policy, steps in plans.items():
        for seed, value in enumerate(steps):
            error = "oom: out of memory" if seed in (crashed or {}).get(policy, []) else None
            rows.append(dict(model=model, precision=policy, seed=seed,
                             steps_to_target=None if error else value,
                             time_to_target_s=None if error or value is None else value / 100,
                             error=error))
    return rows


_PLANS = {"fp32": [100, 110, 120, 100, 130], "bf16": [120, 130, None, 140, 150],
          "fp16": [100, 110, 120, 100, 130, 999]}


def test_judge_per_policy_leaves_crashed_runs_out_and_names_them():
    results = {r.policy: r for r in convergence.judge(
        pd.DataFrame(_rows(_PLANS, crashed={"fp16": [5]})), "m")}
    assert list(results) == ["fp32", "bf16", "fp16"]
    assert results["fp32"].test is None
    assert results["fp16"].crashed == (5,) and results["fp16"].steps.n == 5
    # bf16: 120 130 inf 140 150 -> drop seed 0 (120) and seed 2 (not reached): (130+140+150)/3
    assert results["bf16"].steps.value == pytest.approx(140.0)
    assert results["bf16"].seconds.value == pytest.approx(1.4)
    # U: 120 beats 3 and ties 1 (3.5), 130 beats 4 ties 1 (4.5), the other three beat all 5
    assert results["bf16"].test.u == 23.0 and results["bf16"].test.slower
    assert results["fp16"].test.p == pytest.approx(_enumerated_p(_PLANS["fp32"],
                                                                 _PLANS["fp32"]))


def test_no_convergence_without_steps_to_target_or_fp32():
    frame = pd.DataFrame(_rows(_PLANS))
    assert convergence.judge(frame.drop(columns=["steps_to_target"]), "m") == []
    assert convergence.judge(frame[frame["precision"] != "fp32"], "m") == []
    assert convergence.summary(frame.drop(columns=["steps_to_target"])) == ""


def test_the_verdict_line_states_n_the_drops_the_test_and_its_conclusion():
    lines = convergence.verdict_lines(convergence.judge(pd.DataFrame(_rows(_PLANS)), "m"))
    bf16 = next(line for line in lines if line.startswith("m bf16:"))
    assert bf16 == (
        "m bf16: 140 steps [mean of seeds 1, 3, 4 after dropping the fastest (seed 0) and "
        "slowest (seed 2) of N=5] (did not reach the target: seed 2) vs fp32 110 steps; "
        "one-sided exact rank-sum (Mann-Whitney U) permutation test on steps to the target, "
        "U=23, p=0.0198: slower than fp32 at alpha 0.05 (N=5 vs 5)")


def test_the_console_verdict_table_ends_with_convergence(tmp_path):
    path = tmp_path / "parity.csv"
    rows = [dict(r, eval_loss=1.0, eval_accuracy=0.5, optimal_loss=None, delta=0.0,
                 tolerance=0.03, scaler_skipped_steps=None, underflow_frac=None, verdict="PASS")
            for r in _rows({"fp32": [100, 110, 120], "bf16": [115, 130, 140]})]
    pd.DataFrame(rows).to_csv(path, index=False)
    text = verdict_table(path)
    assert text.startswith("Accuracy parity against fp32")
    assert "Convergence, MLPerf-style" in text
    assert "m bf16: 130 steps [mean of seed 1 after dropping the fastest (seed 0) and " \
           "slowest (seed 2) of N=3; MLPerf asks for at least 5]" in text
    assert "U=8, p=0.1: not shown slower than fp32" in text
    assert text.endswith(convergence.ENERGY_NOTE)


def test_the_report_shows_the_convergence_table_with_n_and_the_test(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    store.write_meta(run_dir, {"run_id": "r", "device_name": "Test CPU"})
    store.write_csv(run_dir, [], cell_noise=noise.results_columns)
    rows = [dict(r, steps=300, eval_loss=1.2, verdict="PASS", fp32_mean=1.2, delta=0.0,
                 tolerance=0.03, final_train_loss=1.1, step_time_ms=10.0, batch_size=16)
            for r in _rows({"bf16": [120, 130, None, 140, 150],
                            "fp32": [100, 110, 120, 100, 130]}, model="gpt2-tiny")]
    pd.DataFrame(rows).to_csv(run_dir / report.PARITY, index=False)
    text = report.render(report.load(run_dir))
    assert "**Convergence (MLPerf-style)**" in text
    table = text.split("**Convergence (MLPerf-style)**", 1)[1]
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["", "fp32", "bf16"]
    cells = {c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")]
                                   for line in lines[2:])}
    assert cells["seeds N (crashed runs left out)"] == ["5", "5"]
    assert cells["steps to the target, MLPerf mean"] == ["110", "140"]
    assert cells["seeds dropped from it (by steps)"][1] == "0 (fastest), 2 (slowest)"
    assert cells["seeds that did not reach the target"] == ["none", "2"]
    assert cells["slower to converge than fp32? (exact one-sided rank-sum test on steps, "
                 "alpha 0.05)"] == ["reference", "yes (U=23, p=0.0198)"]
    assert "- gpt2-tiny bf16: 140 steps" in table and convergence.TEST_NAME in table
    assert convergence.ENERGY_NOTE in table
