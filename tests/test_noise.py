"""Noise: between-process spread, the run's band, ratios with errors, the step-spread floor."""

from __future__ import annotations

import math

import pytest

from bench.analysis import noise


def test_own_spread_is_the_relative_sample_std_and_needs_two_processes():
    assert noise.own_spread([100.0]) is None
    assert noise.own_spread([99.0, 100.0, 101.0]) == pytest.approx(0.01)


def test_a_cell_in_enough_processes_uses_its_own_spread_guarded_by_the_band():
    band = noise.pooled([0.02, 0.04, None, 0.03])
    assert (band.spread, band.source, band.num_cells) == (pytest.approx(0.03), "repeats", 3)
    quiet = noise.estimate([100.0, 100.5, 99.5], band)
    assert quiet.spread == pytest.approx(0.03)  # three lucky processes do not beat the band
    loud = noise.estimate([80.0, 100.0, 120.0], band)
    assert (loud.spread, loud.source, loud.n) == (pytest.approx(0.2), "repeats", 3)
    assert loud.error == pytest.approx(0.2 / math.sqrt(3))


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
    assert speedup.half_width == pytest.approx(noise.Z * speedup.error * 1.1)
    noisy = noise.Estimate(110.0, 0.05, 1, "repeats").ratio(base)
    assert not noisy.beyond_noise


def test_two_sides_of_one_cell_share_the_larger_known_spread():
    measured = noise.Estimate(100.0, 0.04, 5, "repeats")
    single = noise.Estimate(90.0, 0.001, 1, "within-run")
    a, b = noise.shared(measured, single)
    assert (a.spread, b.spread, b.n, b.source) == (0.04, 0.04, 1, "repeats")
    unknown = noise.Estimate(90.0, math.inf, 1, "none")
    assert noise.shared(measured, unknown)[1].spread == 0.04
