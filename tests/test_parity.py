"""Tests for bench/parity/: tasks, determinism, verdicts, FP16 underflow counter, a real run."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pandas as pd
import pytest
import torch

import models
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


def test_underflow_counter_on_hand_made_tensors() -> None:
    grads = [
        torch.tensor([0.0, 1.0, 2.0**-30, 2.0**-20, -(2.0**-25)]),  # zero is left out
        torch.tensor([[2.0**-14, -(2.0**-16)], [2.0**-24, 1e-3]]),
        None,
    ]
    underflow, subnormal = parity.fp16_underflow(grads)
    # non-zero: 8; below 2^-24: 2^-30, 2^-25; in [2^-24, 2^-14): 2^-20, 2^-16, 2^-24
    assert underflow == pytest.approx(2 / 8)
    assert subnormal == pytest.approx(3 / 8)
    assert parity.fp16_underflow([torch.zeros(3)]) == (0.0, 0.0)


def test_log2_histogram_bins_zeros_and_fp16_shares() -> None:
    hist = parity.Log2Histogram()
    hist.add(torch.tensor([0.0, 2.0**-25, -3 * 2.0**-25, 2.0**-14, 1.5, -2.0, math.inf]))
    hist.add(torch.tensor([[0.0, 2.0**-14 * 1.99]]))
    assert hist.zeros == 2  # inf is left out, not counted as a zero
    assert dict(hist.bins) == {-25: 1, -24: 1, -14: 2, 0: 1, 1: 1}
    # non-zero 6: 2^-25 flushes; 3*2^-25 = 1.5*2^-24 is a subnormal; 2^-14 is normal
    assert hist.fp16_shares() == pytest.approx((1 / 6, 1 / 6))
    rows = hist.rows("m", "weight", 7)
    assert [(r["log2_bin"], r["count"]) for r in rows] == [(-25, 1), (-24, 1), (-14, 2),
                                                           (0, 1), (1, 1)]
    assert {(r["model"], r["kind"], r["step"], r["zeros"]) for r in rows} == {("m", "weight", 7, 2)}
    empty = parity.Log2Histogram()
    empty.add(torch.zeros(4))
    assert empty.rows("m", "activation", 0) == [
        {"model": "m", "kind": "activation", "step": 0, "log2_bin": None, "count": 0, "zeros": 4}]


def test_the_underflow_task_trains_like_the_plain_one_in_fp32_but_lower_in_fp16s_range() -> None:
    cpu = torch.device("cpu")
    shifted = _tiny_setup(parity.UNDERFLOW, 6)
    plain = replace(shifted, step_tokens=None)
    assert shifted.step_tokens == parity.NANOGPT_STEP_TOKENS == 2**19
    row_u, curve_u, hist_u = parity.train_one(parity.UNDERFLOW, "fp32", 0, shifted, cpu)
    row_p, curve_p, hist_p = parity.train_one("gpt2-tiny", "fp32", 0, plain, cpu)
    # AdamW is invariant to the loss's scale when eps scales with it: the same training
    assert row_u["eval_loss"] == pytest.approx(row_p["eval_loss"], rel=1e-4)
    assert [c["loss"] for c in curve_u] == pytest.approx([c["loss"] for c in curve_p], rel=1e-4)
    assert {row_u["model"], *(c["model"] for c in curve_u)} == {parity.UNDERFLOW}
    # ... but every gradient sits log2(2^19 / (16 * 32)) = 10 bins lower
    def top(hist, kind):
        return max(h["log2_bin"] for h in hist if h["kind"] == kind and h["step"] == 0)
    for kind in ("activation", "weight"):
        assert top(hist_p, kind) - top(hist_u, kind) == 10
    assert top(hist_u, "activation") < -14  # every activation gradient below FP16's normal floor
    assert row_u["underflow_frac"] > 0.1 > row_p["underflow_frac"]
    assert {h["step"] for h in hist_u} == {0, 3, 5}  # the probe steps
    assert parity.train_one(parity.UNDERFLOW, "bf16", 0, shifted, cpu)[2] == []  # FP32's only


def test_markov_chain_entropy_rate_and_sampling() -> None:
    chain = parity.MarkovChain(8, 3, seed=0)
    assert chain.trans.sum(axis=1) == pytest.approx([1.0] * 8)
    assert (chain.trans > 0).sum(axis=1).tolist() == [3] * 8
    assert chain.stationary @ chain.trans == pytest.approx(chain.stationary)
    assert 0 < chain.entropy_rate < math.log(3)
    states = chain.sample(4, 50, torch.Generator().manual_seed(1))
    assert states.shape == (4, 50)
    allowed = torch.as_tensor(chain.trans > 0)
    assert bool(allowed[states[:, :-1], states[:, 1:]].all())  # only real transitions


def test_gratings_carry_no_class_information_in_mean_colour() -> None:
    images, labels = parity._gratings(64, 32, 6, torch.Generator().manual_seed(0))
    assert images.shape == (64, 3, 32, 32) and labels.max() < 6
    assert images.mean(dim=(2, 3)).abs().max() < 1e-5
    assert images.std(dim=(2, 3)) == pytest.approx(torch.ones(64, 3), abs=1e-5)


def _tiny_setup(name: str, steps: int) -> parity.Setup:
    return replace(parity.setup_for(name), steps=steps, sample_every=2,
                   eval_batches=1)


def test_same_seed_gives_identical_fp32_losses() -> None:
    setup = _tiny_setup("gpt2-tiny", 4)
    cpu = torch.device("cpu")
    a, curve_a, _ = parity.train_one("gpt2-tiny", "fp32", 1, setup, cpu)
    b, curve_b, _ = parity.train_one("gpt2-tiny", "fp32", 1, setup, cpu)
    c, _, _ = parity.train_one("gpt2-tiny", "fp32", 2, setup, cpu)
    assert [r["loss"] for r in curve_a] == [r["loss"] for r in curve_b]
    assert a["eval_loss"] == b["eval_loss"]
    assert c["eval_loss"] != a["eval_loss"]  # the seed really changes weights and data
    assert a["optimal_loss"] == pytest.approx(parity.Task(models.get("gpt2-tiny"),
                                                          setup).chain.entropy_rate)
    assert [c["time_s"] for c in curve_a] == sorted(c["time_s"] for c in curve_a)
    assert a["train_time_s"] == pytest.approx(curve_a[-1]["time_s"])
    assert 0 < a["step_time_ms"] < 1e3 * a["train_time_s"]


def test_bad_input() -> None:
    with pytest.raises(BadInput, match="nope"):
        parity.run_parity("unused", precisions=["nope"])
    with pytest.raises(BadInput, match="seeds"):
        parity.run_parity("unused", seeds=1)
    with pytest.raises(BadInput, match="resnet-huge"):
        parity.run_parity("unused", models=["resnet-huge"])


@pytest.mark.slow
def test_real_parity_run_passes_mixed_precision_and_fails_broken(tmp_path) -> None:
    # resnet-tiny: the cheapest family under CPU fp16 emulation; the CLI run covers the others
    path = parity.run_parity(tmp_path, models=["resnet-tiny"],
                             precisions=["fp32", "bf16", "fp16", parity.BROKEN],
                             seeds=3, device="cpu")
    frame = pd.read_csv(path)
    assert list(frame.columns[: len(parity.COLUMNS)]) == list(parity.COLUMNS)
    assert len(frame) == 12
    verdicts = frame.groupby("precision")["verdict"].first().to_dict()
    assert verdicts == {"fp32": "PASS", "bf16": "PASS", "fp16": "PASS", "broken": "FAIL"}
    fp16 = frame[frame["precision"] == "fp16"]
    assert (fp16["scaler_skipped_steps"] >= 0).all()
    assert (frame["underflow_frac"] > 0).all() and (frame["subnormal_frac"] > 0).all()
    curves = pd.read_csv(tmp_path / "parity_curves.csv")
    assert list(curves.columns) == list(parity.CURVE_COLUMNS)
    assert curves[curves["precision"] == "fp16"]["scale"].notna().all()
    assert curves[curves["precision"] == "fp32"]["scale"].isna().all()


@pytest.mark.slow
def test_without_loss_scaling_fp16_fails_the_underflow_task_and_scaling_rescues_it(
        tmp_path) -> None:
    path = parity.run_parity(tmp_path, models=[parity.UNDERFLOW],
                             precisions=["fp32", "fp16", "bf16", "fp16-noscale"], seeds=3,
                             device="cpu")
    frame = pd.read_csv(path)
    verdicts = frame.groupby("precision")["verdict"].first().to_dict()
    assert verdicts == {"fp32": "PASS", "fp16": "PASS", "bf16": "PASS", "fp16-noscale": "FAIL"}
    noscale = frame[frame["precision"] == "fp16-noscale"]
    assert (noscale["nonfinite_steps"] == 0).all()  # it fails by lost gradients, not overflow
    assert (noscale["delta"] > noscale["tolerance"]).all()
    assert (frame["underflow_frac"] > 0.1).all()  # the FP32 gradients FP16 would flush
    fp16 = frame[frame["precision"] == "fp16"]
    assert (fp16["scaler_scale_final"] >= 2.0**10).all()  # the scale that lifts them back
    assert frame[frame["precision"] == "fp32"]["time_to_target_s"].notna().all()
    hist = pd.read_csv(tmp_path / "grad_hist.csv")
    assert set(hist["model"]) == {parity.UNDERFLOW}
    activation = hist[(hist["kind"] == "activation")]
    assert activation["log2_bin"].max() < -14  # all below FP16's normal floor, unscaled
    curves = pd.read_csv(tmp_path / "parity_curves.csv")
    assert curves[curves["precision"] == "fp16"]["skipped"].notna().all()
    assert curves[curves["precision"] == "fp32"]["skipped"].isna().all()


def test_a_crash_is_recorded_and_finished_runs_are_reused(tmp_path, monkeypatch) -> None:
    real = parity.train_one
    calls = []

    def crash_bf16_seed_1(model, name, seed, *args, **kwargs):
        calls.append((name, seed))
        if (name, seed) == ("bf16", 1):
            raise RuntimeError("CUDA out of memory (pretend)")
        return real(model, name, seed, *args, **kwargs)

    monkeypatch.setattr(parity, "train_one", crash_bf16_seed_1)
    run = dict(models=["gpt2-tiny"], precisions=["fp32", "bf16"], steps=3, seeds=2,
               device="cpu")
    frame = pd.read_csv(parity.run_parity(tmp_path, **run))
    assert len(frame) == 4 and len(calls) == 4
    bf16 = frame[frame["precision"] == "bf16"].set_index("seed")
    assert "CUDA out of memory (pretend)" in bf16.loc[1, "error"]
    assert math.isnan(bf16.loc[1, "eval_loss"]) and math.isfinite(bf16.loc[0, "eval_loss"])
    assert set(bf16["verdict"]) == {"INCONCLUSIVE"}

    # Again into the same directory: only the crashed run trains again.
    def counted(model, name, seed, *args, **kwargs):
        calls.append((name, seed))
        return real(model, name, seed, *args, **kwargs)

    calls.clear()
    monkeypatch.setattr(parity, "train_one", counted)
    again = pd.read_csv(parity.run_parity(tmp_path, **run))
    assert calls == [("bf16", 1)]
    assert again["error"].isna().all()
    kept = frame[frame["precision"] == "fp32"]["eval_loss"].tolist()
    assert again[again["precision"] == "fp32"]["eval_loss"].tolist() == kept
    hist = pd.read_csv(tmp_path / "grad_hist.csv")  # FP32 seed 0's, kept from the first pass
    assert list(hist.columns) == list(parity.HIST_COLUMNS)
    assert set(hist["kind"]) == {"activation", "weight"} and set(hist["step"]) == {0, 1, 2}
    # Another setup (more steps) is another experiment: nothing is reused.
    calls.clear()
    parity.run_parity(tmp_path, **{**run, "steps": 4})
    assert len(calls) == 4


def test_parity_command_ends_with_the_verdict_table(tmp_path, monkeypatch, capsys) -> None:
    from bench.cli import main

    rows = pd.DataFrame({
        "model": ["gpt2-tiny"] * 2, "precision": ["fp32", "broken"], "seed": [0, 0],
        "eval_loss": [2.0, 3.0], "eval_accuracy": [0.3, 0.1], "optimal_loss": [1.9, 1.9],
        "delta": [0.0, 1.0], "tolerance": [0.03, 0.03], "scaler_skipped_steps": [None, None],
        "underflow_frac": [0.1, 0.1], "verdict": ["PASS", "FAIL"]})

    def fake_run_parity(out, **kwargs):
        rows.to_csv(tmp_path / "parity.csv", index=False)
        return tmp_path / "parity.csv"

    monkeypatch.setattr(parity, "run_parity", fake_run_parity)
    assert main(["parity", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("Accuracy parity against fp32")
    fp32, broken = (line for line in out.splitlines() if line.startswith("| gpt2-tiny"))
    assert fp32.rstrip(" |").endswith("PASS") and broken.rstrip(" |").endswith("FAIL")


def test_damaged_parity_runs_are_warnings_and_trained_again(tmp_path, capsys) -> None:
    good = {"key": "k1", "row": {"eval_loss": 1.0, "error": None},
            "curve": [{"step": 1, "loss": 2.0}]}
    lines = [json.dumps(good), "42", '{"key": "k2"}',
             json.dumps({**good, "key": "k3", "row": {"eval_loss": "low"}}),
             json.dumps({**good, "key": "k4", "curve": [{"step": 1}]}), '{"key": "k5", "ro']
    (tmp_path / parity.RUNS).write_text("\n".join(lines) + "\n")
    assert list(parity._load_runs(tmp_path)) == ["k1"]
    err = capsys.readouterr().err
    path = tmp_path / parity.RUNS
    for line in (2, 3, 4, 5, 6):
        assert f"warning: {path}: line {line}: " in err
    assert "Traceback" not in err


def test_a_time_budget_starts_no_parity_run_it_cannot_finish(tmp_path) -> None:
    # A model's first run is bounded by unknown_s (5 s); later ones by its finished runs (the
    # second gets far more than a run takes, however busy the machine).
    left = iter([10.0, 1000.0, 0.0])
    with pytest.raises(parity.OutOfTime) as stop:
        parity.run_parity(tmp_path, models=["gpt2-tiny", "bert-tiny"], precisions=["fp32"],
                          steps=3, seeds=2, device="cpu", time_left=lambda: next(left),
                          unknown_s=5.0)
    assert stop.value.not_run == ["bert-tiny fp32 seed 0", "bert-tiny fp32 seed 1"]
    # Judged: the model whose runs all finished; the others are not recorded at all.
    assert set(pd.read_csv(stop.value.path)["model"]) == {"gpt2-tiny"}
    runs = (tmp_path / parity.RUNS).read_text().splitlines()
    assert len(runs) == 2 and all(json.loads(line)["wall_s"] > 0 for line in runs)

    # Resumed with time enough: only the missing runs train.
    path = parity.run_parity(tmp_path, models=["gpt2-tiny", "bert-tiny"], precisions=["fp32"],
                             steps=3, seeds=2, device="cpu", time_left=lambda: 1000.0,
                             unknown_s=5.0)
    assert len(pd.read_csv(path)) == 4
    assert (tmp_path / parity.RUNS).read_text().splitlines()[:2] == runs
    assert len((tmp_path / parity.RUNS).read_text().splitlines()) == 4


def test_the_underflow_task_always_judges_the_ablation_and_leaves_tf32_out() -> None:
    asked = ["fp32", "tf32", "bf16", "fp8", parity.BROKEN]
    assert parity.task_policies(parity.UNDERFLOW, asked) == [
        "fp32", "bf16", "fp16-noscale", "fp8", parity.BROKEN]
    assert parity.task_policies("gpt2-tiny", asked) == asked  # other tasks: as asked


def test_parity_makes_the_requested_gpu_current_before_it_trains(tmp_path, monkeypatch) -> None:
    # Only the hardware is faked: a cuda:1 that resolves, and set_device's calls logged.
    from bench.cell import main as cell

    gpu1 = torch.device("cuda", 1)
    monkeypatch.setattr(cell, "resolve_device", lambda name: gpu1 if name == "cuda:1" else None)
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    seen = []

    def run_all(run_dir, model_names, chosen, seeds, steps, dev, *rest):
        seen.append((dev, list(current)))
        return run_dir / "parity.csv"

    monkeypatch.setattr(parity, "_run_all", run_all)
    parity.run_parity(tmp_path / "run", models=["gpt2-tiny"], precisions=["fp32"], steps=2,
                      seeds=2, device="cuda:1")
    assert seen == [(gpu1, [gpu1])]
