"""Noise: between-process spread, the run's band, ratios with errors, the step-spread floor."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from bench.analysis import noise


def test_own_spread_leaves_out_the_farthest_process_from_five_on():
    assert noise.own_spread([100.0]) is None
    assert noise.own_spread([99.0, 100.0, 101.0]) == pytest.approx(0.01)  # below five: stdev
    # Five: the stdev of the four nearest the median, times 1.601.
    values = [99.0, 100.0, 101.0, 100.0, 130.0]
    assert noise.own_spread(values) == pytest.approx(
        statistics.stdev([99.0, 100.0, 101.0, 100.0]) * 1.601 / 100)


def test_one_process_cannot_set_the_spread():
    # The published calibration cell (results/amd-epyc/2026-12-06): its fifth process ran at
    # 836 samples/s when the machine went quiet. The standard deviation read 35.2%.
    values = [485.4, 387.8, 480.9, 553.4, 835.9]
    assert statistics.stdev(values) / statistics.median(values) == pytest.approx(0.352, abs=1e-3)
    assert noise.own_spread(values) == pytest.approx(0.224, abs=1e-3)
    # However far it goes, the spread stays where the other four put it.
    assert noise.own_spread([*values[:4], 1e9]) == pytest.approx(noise.own_spread(values))
    assert noise.outliers(values) == []  # 3.2 spreads out: wide noise, not an outlier
    assert noise.outliers([*values[:4], 2000.0]) == [4]
    # Ties (a quantised clock) do not make the spread zero.
    assert noise.own_spread([1000.0, 960.0, 1040.0, 1000.0, 1000.0]) > 0.02


def test_outliers_need_five_processes_and_a_scale_no_finer_than_the_steps():
    assert noise.outliers([100.0, 100.1, 200.0, 99.9]) == []
    # Four processes that agree to 0.1% make a 2% one an outlier only without a floor.
    assert noise.outliers([100.0, 100.1, 99.9, 100.05, 102.0]) == [4]
    assert noise.outliers([100.0, 100.1, 99.9, 100.05, 102.0], floor=0.01) == []
    assert noise.outliers([100.0] * 5) == []


def test_the_trimming_factors_make_the_spread_unbiased():
    # Checked by simulation: E[robust_sigma] = sigma for normal noise.
    rng = random.Random(0)
    for n in (5, 8, 20):
        draws = [noise.robust_sigma([rng.gauss(0.0, 1.0) for _ in range(n)])
                 for _ in range(5000)]
        assert statistics.fmean(draws) == pytest.approx(1.0, abs=0.03), n


def test_a_cell_in_enough_processes_uses_its_own_spread_guarded_by_the_band():
    band = noise.pooled([0.02, 0.04, None, 0.03])
    assert (band.spread, band.source, band.num_cells) == (pytest.approx(0.03), "repeats", 3)
    quiet = noise.estimate([100.0, 100.5, 99.5], band)
    assert quiet.spread == pytest.approx(0.03)  # three lucky processes do not beat the band
    loud = noise.estimate([80.0, 100.0, 120.0], band)
    spread = 0.2
    assert (loud.spread, loud.source, loud.n) == (pytest.approx(spread), "repeats", 3)
    assert loud.error == pytest.approx(spread / math.sqrt(3))


def test_a_single_process_takes_the_calibration_band_or_says_it_has_only_the_floor():
    calibration = noise.pooled([0.05], calibration_only=True)
    one = noise.estimate([100.0], calibration, floor=0.001)
    assert (one.spread, one.source) == (0.05, "calibration")
    alone = noise.estimate([100.0], noise.pooled([]), floor=0.001)
    assert (alone.spread, alone.source) == (0.001, "within-run")
    assert noise.estimate([float("nan"), None], calibration) is None  # type: ignore[list-item]
    unknown = noise.estimate([100.0], noise.pooled([]))
    assert unknown.source == "none" and math.isinf(unknown.error)
    assert not unknown.ratio(one).beyond_noise  # unknown noise: no claim, however large
    assert "not measured" in noise.describe(noise.pooled([]))
    assert "calibration cell" in noise.describe(calibration)


def test_step_spread_is_sigma_of_the_steps_relative_to_the_median():
    # IQR 1.349 ms on a 100 ms median: sigma 1 ms per step, 1%.
    assert noise.step_spread([1.349], [100.0]) == pytest.approx(0.01)
    assert noise.step_spread([1.349, None, 2.698], [100.0, 50.0, 100.0]) == pytest.approx(0.015)


def test_a_cell_whose_steps_scatter_is_taken_to_scatter_between_processes():
    rows = {"quiet": [{"samples_per_s": 100.0, "step_ms_iqr": 0.1349, "step_ms_median": 10.0}],
            "loud": [{"samples_per_s": 100.0, "step_ms_iqr": 1.349, "step_ms_median": 10.0}]}
    estimates, band = noise.cell_estimates(rows, "samples_per_s")
    assert band.step_floor == pytest.approx(0.055)  # the run's median
    assert estimates["loud"].spread == pytest.approx(0.1)
    assert estimates["quiet"].spread == pytest.approx(0.055)
    assert estimates["quiet"].source == "within-run"


def test_a_ratio_is_beyond_noise_only_when_its_interval_excludes_one():
    fast = noise.Estimate(110.0, 0.01, 1, "calibration")
    base = noise.Estimate(100.0, 0.01, 1, "calibration")
    speedup = fast.ratio(base)
    assert speedup.value == pytest.approx(1.1)
    assert speedup.error == pytest.approx(math.hypot(0.01, 0.01))
    assert speedup.beyond_noise and speedup.source == "calibration"
    assert speedup.low == pytest.approx(1.1 * math.exp(-noise.Z * speedup.error))
    assert speedup.high == pytest.approx(1.1 * math.exp(noise.Z * speedup.error))
    noisy = noise.Estimate(110.0, 0.05, 1, "repeats").ratio(base)
    assert not noisy.beyond_noise


def test_a_ratio_interval_is_on_the_log_scale_and_never_reaches_zero():
    # The published "0.39x ±0.58" (a symmetric interval reaching -0.19x): relative error 0.5.
    slow = noise.Ratio(0.39, 0.5, "calibration")
    assert 0 < slow.low < slow.value < slow.high
    assert slow.low * slow.high == pytest.approx(0.39 ** 2)  # symmetric on the log scale
    assert not slow.beyond_noise  # [0.09-1.74] holds 1
    assert noise.Ratio(0.39, 0.1, "repeats").beyond_noise  # [0.29-0.53]
    unknown = noise.Ratio(2.0, math.inf, "none")
    assert (unknown.low, unknown.high, unknown.beyond_noise) == (0.0, math.inf, False)


def test_two_sides_of_one_cell_share_the_larger_known_spread():
    measured = noise.Estimate(100.0, 0.04, 5, "repeats")
    single = noise.Estimate(90.0, 0.001, 1, "within-run")
    a, b = noise.shared(measured, single)
    assert (a.spread, b.spread, b.n, b.source) == (0.04, 0.04, 1, "repeats")
    unknown = noise.Estimate(90.0, math.inf, 1, "none")
    assert noise.shared(measured, unknown)[1].spread == 0.04
