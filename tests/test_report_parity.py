"""The report's parity side and cost: gradient-range and loss-scale figures, the shares FP16
loses, time to accuracy against FP32, the peers section, and prices on `run` and `report`.
Fixture run directories are written here from parity.py's file contract, with numbers chosen
so that every expected value can be worked out by hand."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bench import BadInput, report, store
from bench.analysis import noise
from bench.cli import main
from bench.report import gradients

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPREAD = (0.98, 1.0, 1.02)  # three seeds or processes 2% apart: every own spread is 2%
UNDERFLOW = "gpt2-tiny-underflow"


def _cells() -> list[dict[str, Any]]:
    """gpt2-tiny batch 8 in three processes: fp32 100 samples/s, fp16 200 samples/s."""
    rows = []
    for policy, rate in (("fp32", 100.0), ("fp16", 200.0)):
        for repeat, f in enumerate(SPREAD):
            row = dict(run_id="r", cell_id=f"gpt2-tiny-{policy}-8", model="gpt2-tiny",
                       precision=policy, batch_size=8, seq_len=64, grad_accum=1, compile=False,
                       world_size=1, repeat=repeat, status="ok", samples_per_s=rate * f,
                       tokens_per_s=rate * f * 64, peak_rss_gib=0.5, device="cpu",
                       device_name="Test CPU",
                       joules_per_sample=2.0 * f if policy == "fp32" else None)
            rows.append(store.empty_record(**row))
    return rows


def _parity_rows() -> list[dict[str, Any]]:
    """Per model, policy and seed: step time, steps and time to FP32's final training loss."""
    # policy: (step_time_ms, steps_to_target, time_to_target_s per seed or None, fp16 scale)
    plans = {
        "gpt2-tiny": {
            "fp32": (10.0, 200, [2.0 * f for f in SPREAD], None),
            "fp16": (5.0, 250, [1.25 * f for f in SPREAD], [65536.0, 32768.0, 65536.0]),
            "fp16-noscale": (10.0, None, [None] * 3, None),
        },
        UNDERFLOW: {
            "fp32": (10.0, 200, [2.0 * f for f in SPREAD], None),
            "fp16": (6.0, 200, [1.2 * f for f in SPREAD], [16.0, 16.0, 8.0]),
            "bf16": (6.0, 220, [1.32, 1.35, None], None),
            "fp16-noscale": (5.0, None, [None] * 3, None),
        },
    }
    rows = []
    for model, policies in plans.items():
        for policy, (step_ms, steps, times, scales) in policies.items():
            for seed, f in enumerate(SPREAD):
                reached = times[seed] is not None
                rows.append(dict(
                    model=model, precision=policy, seed=seed, steps=300, eval_loss=1.2,
                    steps_to_target=steps if reached else None, scaler_skipped_steps=None,
                    underflow_frac=0.4, subnormal_frac=0.1,
                    scaler_scale_final=scales[seed] if scales else None,
                    verdict="FAIL" if policy == "fp16-noscale" and model == UNDERFLOW
                    else "PASS", fp32_mean=1.2, delta=0.0, tolerance=0.03, final_train_loss=1.1,
                    train_time_s=step_ms * f * 0.3, step_time_ms=step_ms * f,
                    time_to_target_s=times[seed], batch_size=16))
    return rows


def _curves() -> list[dict[str, Any]]:
    rows = []
    for seed in range(3):
        scale = 65536.0
        for step in (10, 20, 30, 40):
            skipped = {10: 2, 20: 1}.get(step, 0)
            scale = scale / 2 if skipped else scale
            rows.append(dict(model=UNDERFLOW, precision="fp16", seed=seed, step=step,
                             loss=2.0 - step / 100, scale=scale, skipped=skipped,
                             time_s=step * 0.006))
            rows.append(dict(model=UNDERFLOW, precision="fp32", seed=seed, step=step,
                             loss=2.0 - step / 100, scale=None, skipped=None,
                             time_s=step * 0.01))
    return rows


def _grad_hist() -> list[dict[str, Any]]:
    """Per step 0 and 10: activation 10 at 2^-30, 30 at 2^-26, 40 at 2^-20, 20 at 2^-5 and 100
    zeros; weight 9 at 2^13 and 81 at 2^0, no zeros."""
    rows = []
    for step in (0, 10):
        for kind, bins, zeros in (("activation", {-30: 10, -26: 30, -20: 40, -5: 20}, 100),
                                  ("weight", {13: 9, 0: 81}, 0)):
            rows += [dict(model=UNDERFLOW, kind=kind, step=step, log2_bin=b, count=n,
                          zeros=zeros) for b, n in bins.items()]
    return rows


_PEERS = [dict(model="gpt2-small", precision="bf16", status="ok",
               peer="transformers.GPT2LMHeadModel", peer_version="4.46.0", batch_size=8,
               seq_len=1024, image_size=None, params_ours=124439808,
               params_peer=124439808, logit_max_abs_diff=1.2e-5,
               logit_max_abs_diff_train=2.5e-6, loss_abs_diff=3e-7,
               ours_step_ms_median=1493.2, peer_step_ms_median=1552.0,
               ratio_ours_per_peer_median=0.962, ratio_ours_per_peer_iqr=0.011,
               ours_peak_mem_allocated_gib=None, peer_peak_mem_allocated_gib=None)]


def _run_dir(root: Path, meta: dict[str, Any] | None = None, parity: bool = True,
             peers: bool = True, cells: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    store.write_meta(root, {"run_id": "r", "device_name": "Test CPU", **(meta or {})})
    store.write_csv(root, _cells() if cells else [], cell_noise=noise.results_columns)
    if parity:
        pd.DataFrame(_parity_rows()).to_csv(root / report.PARITY, index=False)
        pd.DataFrame(_curves()).to_csv(root / report.CURVES, index=False)
        pd.DataFrame(_grad_hist()).to_csv(root / "grad_hist.csv", index=False)
    if peers:
        pd.DataFrame(_PEERS).to_csv(root / "peers.csv", index=False)
    return root


_PRICES = {"price_per_hour": 3.6, "price_per_kwh": 0.36}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """report.md with its plots of the parity files alone (no benchmark cells, whose plots
    other tests cover: plotting is slow)."""
    return report.write_report(_run_dir(tmp_path_factory.mktemp("parity") / "run", _PRICES,
                                        cells=False))


@pytest.fixture(scope="module")
def priced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The whole priced fixture run and its report text (rendered without plots)."""
    run_dir = _run_dir(tmp_path_factory.mktemp("priced") / "run", _PRICES)
    return run_dir, report.render(report.load(run_dir))


def _section(text: str, heading: str) -> str:
    return text.split(f"\n{heading}\n")[1].split("\n## ")[0]


def _table(text: str, title: str) -> dict[str, list[str]]:
    """The rows of the table under ``**title**``, by their first cell."""
    block = text.split(f"**{title}**")[1].split("\n\n")[1]
    return {cells[0]: cells[1:] for line in block.splitlines() if not line.startswith("|--")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


# ------------------------------------------------------------------------------ figures


def test_parity_figures_are_written_and_shown_in_their_models_section(written):
    plots = written.parent / report.PLOTS
    text = written.read_text(encoding="utf-8")
    section = _section(text, f"## {UNDERFLOW} (parity task)")
    for name in (f"grad_range-{UNDERFLOW}", f"loss_scale-{UNDERFLOW}"):
        data = (plots / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
        assert (plots / f"{name}.svg").stat().st_size > 10_000, name
        assert f"({report.PLOTS}/{name}.png)" in section
        assert name not in _section(text, "## Plots")  # in their section, not the list
    # gpt2-tiny has no gradient histogram and no scaler curve: no figure, no dangling link.
    assert not list(plots.glob("*-gpt2-tiny.png"))
    assert "-gpt2-tiny.png" not in _section(text, "## gpt2-tiny (parity task)")
    # 1 + 1 + 2 skips in each of the three fp16 seeds' windows.
    assert "**Loss scale over training** (GradScaler's scale per seed; 9 skipped steps" in text


def test_stale_parity_figures_go_when_the_data_does(written, tmp_path):
    run_dir = _run_dir(tmp_path / "run", cells=False)
    (run_dir / report.PLOTS).mkdir()
    (run_dir / report.PLOTS / "grad_range-old-model.png").write_bytes(PNG_SIGNATURE)
    (run_dir / "grad_hist.csv").unlink()
    pd.DataFrame(_curves()).query("precision == 'fp32'").to_csv(run_dir / report.CURVES,
                                                                 index=False)
    report.write_report(run_dir)
    assert not list((run_dir / report.PLOTS).glob("grad_range-*"))
    assert not list((run_dir / report.PLOTS).glob("loss_scale-*"))


# ------------------------------------------------------------------------------ shares


def test_gradient_shares_against_fp16s_range_worked_by_hand(tmp_path):
    run = report.load(_run_dir(tmp_path / "run"))
    activation, weight = gradients.shares(run, UNDERFLOW)
    # fp16's final scales 16, 16, 8: the median, 16 = 2^4, moves every element 4 bins up.
    assert (activation.scale, activation.log2_scale) == (16.0, 4)
    assert activation.steps == (0, 10) and (activation.nonzero, activation.zeros) == (200, 200)
    assert activation.below() == pytest.approx(0.4)  # bins -30 and -26: 80 of 200
    assert activation.below(4) == pytest.approx(0.1)  # only -30 -> -26 stays below -24
    assert (activation.above(4), weight.below()) == (0.0, 0.0)
    assert weight.above(4) == pytest.approx(0.1)  # 2^13 x 2^4 = 2^17 > 65504
    assert weight.above() == 0.0


def test_the_parity_section_states_the_shares_on_one_line(priced):
    line = next(line for line in priced[1].splitlines()
                if line.startswith("**Gradients in FP16's range**"))
    assert line == (
        "**Gradients in FP16's range** (FP32 seed 0, steps 0, 10 pooled; shares of the non-zero "
        "elements; the parity table's row averages every probe and seed instead): activation "
        "gradients: 40.0% below 2^-24 unscaled, 10.0% after scaling by 2^4, 0% above 65504 after "
        "scaling; 50.0% exactly zero; weight gradients: 0% below 2^-24 unscaled, 0% after "
        "scaling by 2^4, 10.0% above 65504 after scaling; 0% exactly zero.")


def test_a_step_whose_gradients_were_all_zero_still_counts_its_zeros(tmp_path):
    run_dir = _run_dir(tmp_path / "run")
    pd.DataFrame([dict(model=UNDERFLOW, kind="weight", step=0, log2_bin=None, count=0, zeros=6),
                  dict(model=UNDERFLOW, kind="weight", step=5, log2_bin=-30, count=2, zeros=2)]
                 ).to_csv(run_dir / "grad_hist.csv", index=False)
    (weight,) = gradients.shares(report.load(run_dir), UNDERFLOW)
    assert (weight.nonzero, weight.zeros, weight.steps) == (2, 8, (0, 5))
    assert (weight.zero_share, weight.below(), weight.below(4)) == (0.8, 1.0, 1.0)


def test_a_log2_bin_that_is_not_whole_is_bad_input(tmp_path):
    run_dir = _run_dir(tmp_path / "run")
    pd.DataFrame([dict(model=UNDERFLOW, kind="weight", step=0, log2_bin=-3.5, count=1,
                       zeros=0)]).to_csv(run_dir / "grad_hist.csv", index=False)
    with pytest.raises(BadInput, match="log2_bin holds a fraction"):
        report.load(run_dir)


# ------------------------------------------------------------------------------ time to accuracy


def test_time_to_accuracy_against_fp32_worked_by_hand(priced):
    text = _section(priced[1], "## gpt2-tiny")
    table = _table(text, "Time to accuracy")
    assert table[""] == ["fp32", "fp16", "fp16-noscale"]
    assert table["step time in the parity runs (batch 16), ms"] == ["10.0", "5.00", "10.0"]
    # Medians 10 / 5 ms; each over 3 seeds with a 2% spread: error 2%/sqrt(3) per side,
    # sqrt(2) x that for the ratio; 3 sigma on the log scale: 2.00 x exp(-+0.049).
    assert table["its speedup over fp32"] == ["reference", "**2.00x** [1.90–2.10]",
                                              "1.00x [0.95–1.05]"]
    assert table["steps to the target (x fp32's)"] == ["200", "250 (1.25x)",
                                                       "not reached (0 of 3 seeds)"]
    assert table["time to the target, s"] == ["2.00", "1.25", "not reached (0 of 3 seeds)"]
    # 2.0 s / 1.25 s: faster per step by 2x, but 25% more steps.
    assert table["time-to-accuracy speedup over fp32"] == ["reference", "**1.60x** [1.52–1.68]",
                                                           "not reached"]
    # The benchmark ran batch 8 only (parity's 16 is not among its cells).
    assert table["benchmark throughput speedup (its own processes)"] == [
        "reference", "**2.00x** [1.90–2.10] (batch 8)", ""]


def test_a_policy_that_reached_the_target_in_some_seeds_says_so(priced):
    text = _section(priced[1], f"## {UNDERFLOW} (parity task)")
    table = _table(text, "Time to accuracy")
    assert table[""] == ["fp32", "fp16", "bf16", "fp16-noscale"]
    # Seeds 1.32 s, 1.35 s and one that never reached it, counted as the slowest: median 1.35.
    assert table["time to the target, s"][2] == "1.35 (2 of 3 seeds)"
    assert table["steps to the target (x fp32's)"][2] == "220 (1.10x) (2 of 3 seeds)"
    assert table["time-to-accuracy speedup over fp32"][2].startswith("**1.48x** [")  # 2.0/1.35
    assert table["time-to-accuracy speedup over fp32"][3] == "not reached"
    assert table["steps to the target (x fp32's)"][3] == "not reached (0 of 3 seeds)"
    assert "benchmark throughput speedup (its own processes)" not in table  # no cells here
    # What the missing seed did is said under the table (target max(1.1, 1.1 + 0.03)).
    assert ("Seeds that did not reach the target: bf16 seed 2 did not reach the target 1.13 at "
            "any logged step (final training loss 1.1); fp16-noscale seed 0") in text
    assert _table(text, "Accuracy parity")["verdict"][3] == "FAIL"


def test_no_time_table_without_timing_in_parity_csv(tmp_path):
    run_dir = _run_dir(tmp_path / "run")
    frame = pd.read_csv(run_dir / report.PARITY)
    frame.drop(columns=["step_time_ms", "time_to_target_s", "train_time_s"]).to_csv(
        run_dir / report.PARITY, index=False)
    text = report.render(report.load(run_dir))
    assert "**Accuracy parity**" in text and "Time to accuracy" not in text


# ------------------------------------------------------------------------------ cost


def test_cost_tables_for_the_price_the_run_recorded(priced):
    run_dir, text = priced
    text = _section(text, "## gpt2-tiny")
    # $3.6 per device-hour is $0.001 a second: 1M samples at 100/s cost $10, at 200/s $5;
    # 3 x 2%/sqrt(3) = 3.5% either way on the log scale.
    assert _table(text, "Cost, $ per 1M samples (at $3.6 per device-hour)")["8"] == [
        "$10.00 [9.66–10.35]", "$5.00 [4.83–5.18]"]
    # 2 J/sample x 1M = 0.556 kWh at $0.36; fp16 measured no energy.
    assert _table(text, "Energy cost, $ per 1M samples (at $0.36 per kWh)")["8"] == [
        "$0.200 [0.193–0.207]", "n/a"]
    results = pd.read_csv(run_dir / store.RESULTS)
    assert sorted(results["usd_per_1m_samples"].round(6).unique()) == [5.0, 10.0]


def test_a_price_given_to_report_overrides_the_recorded_one(tmp_path):
    run_dir = _run_dir(tmp_path / "run", {"price_per_hour": 3.6}, parity=False)
    text = report.render(report.load(run_dir, price_per_hour=7.2))
    assert _table(text, "Cost, $ per 1M samples (at $7.2 per device-hour)")["8"] == [
        "$20.00 [19.32–20.70]", "$10.00 [9.66–10.35]"]
    assert "Energy cost" not in text  # no price per kWh


def test_without_a_price_there_is_no_cost(tmp_path):
    run_dir = _run_dir(tmp_path / "run", parity=False)
    text = report.render(report.load(run_dir))
    assert "Cost" not in text and "$" not in text
    assert not set(store.COST) & set(pd.read_csv(run_dir / store.RESULTS).columns)


@pytest.mark.parametrize("command", ["run", "report"])
@pytest.mark.parametrize("price", ["-1", "nan", "two", "inf", "0"])
def test_a_bad_price_is_one_line_and_exit_2(tmp_path, capsys, command, price):
    run_dir = _run_dir(tmp_path / "run", parity=False, peers=False)
    before = sorted(p.name for p in run_dir.iterdir())
    argv = [command, *([str(run_dir)] if command == "report" else ["--out", str(run_dir)])]
    for flag in ("--price-per-hour", "--price-per-kwh"):
        with pytest.raises(SystemExit) as stopped:
            main([*argv, flag, price])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flag in err and price in err
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written


def test_a_damaged_price_in_meta_stops_report_with_exit_2(tmp_path, capsys):
    run_dir = _run_dir(tmp_path / "run", parity=False)
    store.write_meta(run_dir, {"run_id": "r", "price_per_hour": "free"})  # edited by hand
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "price_per_hour: expected a price in USD" in err
    # A good price given to the report is used instead of the damaged one.
    assert report.load(run_dir, price_per_hour=3.6).prices == {"price_per_hour": 3.6}


def test_a_run_records_its_prices_and_a_resumed_run_keeps_them():
    from bench.run.command import _prices

    def args(**given: float | None) -> argparse.Namespace:
        return argparse.Namespace(**{"price_per_hour": None, "price_per_kwh": None, **given})

    assert _prices(args(), {}) == {}  # no price: nothing in meta.json
    assert _prices(args(price_per_hour=2.5), {}) == {"price_per_hour": 2.5}
    kept = {"price_per_hour": 2.5, "price_per_kwh": 0.3}
    assert _prices(args(), kept) == kept
    assert _prices(args(price_per_kwh=0.2), kept) == {"price_per_hour": 2.5,
                                                      "price_per_kwh": 0.2}


# ------------------------------------------------------------------------------ peers


def test_peers_section_only_with_peers_csv(priced, tmp_path):
    section = _section(priced[1], "## Peers")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| gpt2-small")]
    assert rows == [["gpt2-small", "transformers.GPT2LMHeadModel (4.46.0)", "bf16", "8 x 1024",
                     "ok",
                     "124,439,808 (equal)", "1.2e-05 / 2.5e-06", "3e-07", "1,493 / 1,552",
                     "0.96x (IQR 0.01)"]]
    text = report.render(report.load(_run_dir(tmp_path / "run", parity=False, peers=False)))
    assert "## Peers" not in text
