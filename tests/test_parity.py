"""Tests for bench/parity.py: tasks, determinism, verdicts, FP16 underflow counter, a real run."""

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
                         "curve": [(10, 3.0), (20, loss)]})
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


def test_steps_to_target_is_first_sample_at_or_below_fp32_final_train_loss() -> None:
    frame = _frame([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    frame.at[3, "curve"] = [(10, 1.5), (20, 0.9), (30, 0.8)]
    frame.at[4, "curve"] = [(10, 1.5), (20, 1.2)]
    judged = parity.judge(frame)
    assert judged.at[3, "steps_to_target"] == 20
    assert judged.at[4, "steps_to_target"] is None


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
    return replace(parity.setup_for(models.get(name)), steps=steps, sample_every=2,
                   eval_batches=1)


def test_same_seed_gives_identical_fp32_losses() -> None:
    setup = _tiny_setup("gpt2-tiny", 4)
    cpu = torch.device("cpu")
    a, curve_a = parity.train_one("gpt2-tiny", "fp32", 1, setup, cpu)
    b, curve_b = parity.train_one("gpt2-tiny", "fp32", 1, setup, cpu)
    c, _ = parity.train_one("gpt2-tiny", "fp32", 2, setup, cpu)
    assert [r["loss"] for r in curve_a] == [r["loss"] for r in curve_b]
    assert a["eval_loss"] == b["eval_loss"]
    assert c["eval_loss"] != a["eval_loss"]  # the seed really changes weights and data
    assert a["optimal_loss"] == pytest.approx(parity.Task(models.get("gpt2-tiny"),
                                                          setup).chain.entropy_rate)


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
    # Another setup (more steps) is another experiment: nothing is reused.
    calls.clear()
    parity.run_parity(tmp_path, **{**run, "steps": 4})
    assert len(calls) == 4


def test_parity_command_ends_with_the_verdict_table(tmp_path, monkeypatch, capsys) -> None:
    from bench.__main__ import main

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
    # A model's first run is bounded by unknown_s (5 s); later ones by its finished runs.
    left = iter([10.0, 10.0, 0.0])
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
