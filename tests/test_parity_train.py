"""Tests for parity's child side: the tasks (bench/parity/tasks.py), the gradient probes
(probes.py) and one run's training (train.py), in this process; and the child's entry."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

import models
from bench import parity
from bench.parity import probes, tasks, train


def test_underflow_counter_on_hand_made_tensors() -> None:
    grads = [
        torch.tensor([0.0, 1.0, 2.0**-30, 2.0**-20, -(2.0**-25)]),  # zero is left out
        torch.tensor([[2.0**-14, -(2.0**-16)], [2.0**-24, 1e-3]]),
        None,
    ]
    underflow, subnormal = probes.fp16_underflow(grads)
    # non-zero: 8; below 2^-24: 2^-30, 2^-25; in [2^-24, 2^-14): 2^-20, 2^-16, 2^-24
    assert underflow == pytest.approx(2 / 8)
    assert subnormal == pytest.approx(3 / 8)
    assert probes.fp16_underflow([torch.zeros(3)]) == (0.0, 0.0)


def test_log2_histogram_bins_zeros_and_fp16_shares() -> None:
    hist = probes.Log2Histogram()
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
    empty = probes.Log2Histogram()
    empty.add(torch.zeros(4))
    assert empty.rows("m", "activation", 0) == [
        {"model": "m", "kind": "activation", "step": 0, "log2_bin": None, "count": 0, "zeros": 4}]


def test_the_underflow_task_trains_like_the_plain_one_in_fp32_but_lower_in_fp16s_range() -> None:
    cpu = torch.device("cpu")
    shifted = _tiny_setup(parity.UNDERFLOW, 6)
    plain = replace(shifted, step_tokens=None)
    assert shifted.step_tokens == parity.NANOGPT_STEP_TOKENS == 2**19
    row_u, curve_u, hist_u = train.train_one(parity.UNDERFLOW, "fp32", 0, shifted, cpu)
    row_p, curve_p, hist_p = train.train_one("gpt2-tiny", "fp32", 0, plain, cpu)
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
    assert train.train_one(parity.UNDERFLOW, "bf16", 0, shifted, cpu)[2] == []  # FP32's only


def test_markov_chain_entropy_rate_and_sampling() -> None:
    chain = tasks.MarkovChain(8, 3, seed=0)
    assert chain.trans.sum(axis=1) == pytest.approx([1.0] * 8)
    assert (chain.trans > 0).sum(axis=1).tolist() == [3] * 8
    assert chain.stationary @ chain.trans == pytest.approx(chain.stationary)
    assert 0 < chain.entropy_rate < math.log(3)
    states = chain.sample(4, 50, torch.Generator().manual_seed(1))
    assert states.shape == (4, 50)
    allowed = torch.as_tensor(chain.trans > 0)
    assert bool(allowed[states[:, :-1], states[:, 1:]].all())  # only real transitions


def test_gratings_carry_no_class_information_in_mean_colour() -> None:
    images, labels = tasks.gratings(64, 32, 6, torch.Generator().manual_seed(0))
    assert images.shape == (64, 3, 32, 32) and labels.max() < 6
    assert images.mean(dim=(2, 3)).abs().max() < 1e-5
    assert images.std(dim=(2, 3)) == pytest.approx(torch.ones(64, 3), abs=1e-5)


def _tiny_setup(name: str, steps: int) -> parity.Setup:
    return replace(parity.setup_for(name), steps=steps, sample_every=2,
                   eval_batches=1)


def test_same_seed_gives_identical_fp32_losses() -> None:
    setup = _tiny_setup("gpt2-tiny", 4)
    cpu = torch.device("cpu")
    a, curve_a, _ = train.train_one("gpt2-tiny", "fp32", 1, setup, cpu)
    b, curve_b, _ = train.train_one("gpt2-tiny", "fp32", 1, setup, cpu)
    c, _, _ = train.train_one("gpt2-tiny", "fp32", 2, setup, cpu)
    assert [r["loss"] for r in curve_a] == [r["loss"] for r in curve_b]
    assert a["eval_loss"] == b["eval_loss"]
    assert c["eval_loss"] != a["eval_loss"]  # the seed really changes weights and data
    assert a["optimal_loss"] == pytest.approx(tasks.Task(models.get("gpt2-tiny"),
                                                          setup).chain.entropy_rate)
    assert [c["time_s"] for c in curve_a] == sorted(c["time_s"] for c in curve_a)
    assert a["train_time_s"] == pytest.approx(curve_a[-1]["time_s"])
    assert 0 < a["step_time_ms"] < 1e3 * a["train_time_s"]


def test_the_child_makes_the_requested_gpu_current_before_it_trains(tmp_path, monkeypatch) -> None:
    # Only the hardware is faked: a cuda:1 that resolves, and set_device's calls logged.
    from bench.cell import train as cell

    gpu1 = torch.device("cuda", 1)
    monkeypatch.setattr(cell, "resolve_device",
                        lambda name, ranks=None: gpu1 if name == "cuda:1" else None)
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    seen = []

    def train_seeds(dev, args, ranks=None):
        seen.append((dev, list(current)))
        return 0

    monkeypatch.setattr(train, "_train_seeds", train_seeds)
    setup = json.dumps(vars(_tiny_setup("gpt2-tiny", 2)))
    train.main(["run", "--model", "gpt2-tiny", "--precision", "fp32", "--seeds", "0,1",
                "--setup", setup, "--device", "cuda:1", "--out", str(tmp_path / "0.json"),
                "--out", str(tmp_path / "1.json")])
    assert seen == [(gpu1, [gpu1])]


def test_the_child_writes_one_result_per_seed_and_an_exception_is_that_seeds_row(
        tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(train.FAULT_ENV, "gpt2-tiny:bf16:0=oom")
    setup = _tiny_setup("gpt2-tiny", 2)
    outs = [tmp_path / "0.json", tmp_path / "1.json"]
    code = train.main(["run", "--model", "gpt2-tiny", "--precision", "bf16", "--seeds", "0,1",
                       "--setup", json.dumps(vars(setup)), "--device", "cpu",
                       "--out", str(outs[0]), "--out", str(outs[1])])
    assert code == 1  # a seed failed
    crashed, trained = (json.loads(p.read_text()) for p in outs)
    assert crashed["row"]["error"].startswith("oom: ")
    assert "CUDA out of memory (injected fault in gpt2-tiny bf16 seed 0)" in crashed["row"]["error"]
    assert math.isnan(crashed["row"]["eval_loss"]) and crashed["curve"] == []
    assert trained["row"]["error"] is None and math.isfinite(trained["row"]["eval_loss"])
    assert [c["step"] for c in trained["curve"]] == [2] and trained["elapsed_s"] > 0
    assert not list(tmp_path.glob("*.tmp"))  # written whole, then renamed


def test_the_plan_names_the_device_models_setups_and_what_cannot_run(tmp_path) -> None:
    plan = train.plan("cpu", None, ["fp32", "bf16", "fp8"], keep_emulated=False, steps=7)
    assert plan["device"] == "cpu" and plan["device_type"] == "cpu"
    assert plan["models"] == list(parity.CPU_SETUPS)
    assert plan["precisions"] == ["fp32", "bf16"]  # FP8 is emulated on a CPU: only when asked
    assert plan["setups"]["gpt2-tiny"] == vars(replace(parity.setup_for("gpt2-tiny"), steps=7))
    out = tmp_path / "plan.json"
    assert train.main(["plan", "--device", "cuda:99", "--precisions", "fp32",
                       "--out", str(out)]) == 2
    assert "cuda:99" in json.loads(out.read_text())["bad_input"]


def test_a_conv_model_with_bf16_weights_is_probed_in_its_own_dtype() -> None:
    # Its probe has no FP32 weights to take FP32 gradients from: an FP32 image batch into bf16
    # convolutions used to crash every bf16-pure run of resnet-tiny.
    row, _, _ = train.train_one("resnet-tiny", "bf16-pure-sr", 0, _tiny_setup("resnet-tiny", 2),
                                torch.device("cpu"))
    assert math.isfinite(row["eval_loss"]) and row["underflow_frac"] >= 0
