"""The pure-bf16 policies: bf16 weights, gradients and AdamW state with no FP32 master, the
update rounded to nearest, stochastically or Kahan-compensated (bench/cell/rounding.py,
bench/cell/bf16_adamw.py, bench/precision.py), what a cell records of them, and the parity
task that tells them apart."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from bench import precision, report, store
from bench.cell import footprint, rounding
from bench.cell.bf16_adamw import BF16AdamW
from bench.cell.train import prepare
from bench.cli import main
from bench.parity import tasks, updates
from bench.report import lost_updates
from bench.report.figures import Plotter, policy_style

LOW, HIGH = 1.0, 1.0 + 2.0**-7  # neighbouring bf16 values: the spacing at 1 is 2^-7


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    value = LOW + 0.3 * (HIGH - LOW)  # nearer the lower neighbour: nearest always rounds down
    x = torch.full((200_000,), value)
    rounded = rounding.round_stochastic(x, torch.Generator().manual_seed(0))
    assert rounded.dtype == torch.bfloat16
    assert set(rounded.float().unique().tolist()) == {LOW, HIGH}  # only the two neighbours
    mean = float(rounded.double().mean())
    # Each rounding is LOW or HIGH, up with probability p = 0.3: the mean's standard error.
    error = (HIGH - LOW) * math.sqrt(0.3 * 0.7 / x.numel())
    assert abs(mean - value) < 4 * error
    assert float(x.to(torch.bfloat16).double().mean()) == LOW  # nearest: biased by 0.3 spacing
    assert abs(LOW - value) > 100 * error


def test_stochastic_rounding_of_negative_exact_and_special_values():
    gen = torch.Generator().manual_seed(1)
    x = torch.full((100_000,), -(LOW + 0.75 * (HIGH - LOW)))
    mean = float(rounding.round_stochastic(x, gen).double().mean())
    assert abs(mean - float(x[0])) < 4 * (HIGH - LOW) * math.sqrt(0.75 * 0.25 / x.numel())
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 2.0**-130, math.inf, -math.inf])
    assert torch.equal(rounding.round_stochastic(exact, gen).float(), exact)  # no change
    assert rounding.round_stochastic(torch.tensor([math.nan]), gen).isnan().all()


def test_kahan_keeps_the_small_updates_that_nearest_rounding_loses():
    plain = torch.ones(1, dtype=torch.bfloat16)
    kahan = torch.ones(1, dtype=torch.bfloat16)
    compensation = torch.zeros(1, dtype=torch.bfloat16)
    update = torch.full((1,), 1e-4)  # under half the spacing at 1 (2^-8): lost to nearest
    for _ in range(1000):
        rounding.add_nearest_(plain, update)
        rounding.kahan_add_(kahan, compensation, update)
    assert float(plain) == 1.0
    assert abs(float(kahan) + float(compensation) - 1.1) < 0.01
    assert abs(float(kahan) - 1.1) < 2.0**-7  # within one bf16 spacing of the exact sum


def test_stochastic_updates_add_up_on_average():
    weights = torch.ones(20_000, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    for _ in range(200):
        rounding.add_stochastic_(weights, torch.full((1,), 1e-4), gen)
    assert abs(float(weights.double().mean()) - 1.02) < 1e-3  # nearest would leave 1.0


def _tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


@pytest.mark.parametrize("rounding_mode", ["nearest", "stochastic", "kahan"])
def test_bf16_adamw_matches_torch_adamw_at_a_large_learning_rate(rounding_mode):
    """Where bf16 spacing is small against the updates, every rounding follows torch's FP32
    AdamW closely: the update is the same AdamW, only its last write differs."""
    fp32, pure = _tiny_net(), _tiny_net().to(torch.bfloat16)
    ref = torch.optim.AdamW(fp32.parameters(), lr=1e-2, weight_decay=0.1)
    opt = BF16AdamW(pure.parameters(), rounding=rounding_mode, lr=1e-2, weight_decay=0.1, seed=0)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    y = x.sum(1, keepdim=True).tanh()
    for _ in range(20):
        for net, optimizer, inputs in ((fp32, ref, x), (pure, opt, x.bfloat16())):
            optimizer.zero_grad()
            ((net(inputs).float() - y) ** 2).mean().backward()
            optimizer.step()
    for a, b in zip(fp32.parameters(), pure.parameters(), strict=True):
        assert b.dtype == torch.bfloat16
        assert torch.allclose(a, b.float(), atol=0.02), (a - b.float()).abs().max()


def test_bf16_adamw_refuses_fp32_weights_and_unknown_rounding():
    with pytest.raises(ValueError, match="bf16 parameters"):
        BF16AdamW(_tiny_net().parameters())
    with pytest.raises(ValueError, match="unknown rounding 'up'"):
        BF16AdamW(_tiny_net().to(torch.bfloat16).parameters(), rounding="up")


@pytest.mark.parametrize("name", precision.PURE_BF16)
def test_pure_policies_hold_weights_gradients_and_state_in_bf16(name):
    trainer = prepare("gpt2-tiny", name, batch_size=2, size=16)
    trainer.optimizer.zero_grad(set_to_none=True)
    with trainer.policy.autocast("cpu"):
        trainer.spec.loss(trainer.model, trainer.inputs, trainer.targets).backward()
    grads = [p.grad for p in trainer.model.parameters()]
    assert {g.dtype for g in grads} == {torch.bfloat16}
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    states = [v for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert {v.dtype for v in states} == {torch.bfloat16}  # no FP32 master or moment anywhere
    per_param = 3 if name == "bf16-pure-kahan" else 2  # two moments (+ compensation)
    assert len(states) == per_param * len(grads)
    loss = trainer.step()  # the one training step, as a cell runs it
    assert torch.isfinite(loss)


def test_footprint_counts_bytes_by_dtype():
    params = sum(p.numel() for p in prepare("gpt2-tiny", "fp32", 2, 16).model.parameters())
    for name, param_bytes, state_bytes in (("fp32", 4, 8), ("bf16-pure", 2, 4),
                                           ("bf16-pure-kahan", 2, 6)):
        trainer = prepare("gpt2-tiny", name, batch_size=2, size=16)
        trainer.step()
        held = footprint.fields(trainer.model, trainer.optimizer)
        dtype = "float32" if name == "fp32" else "bfloat16"
        assert held == {"param_bytes": param_bytes * params, "param_dtypes": dtype,
                        "optim_state_bytes": state_bytes * params, "optim_state_dtypes": dtype}
    assert set(held) <= set(store.FIELDS)


def test_lost_share_counts_updates_that_left_the_weight_unchanged():
    net = torch.nn.Linear(64, 64).to(torch.bfloat16)
    with torch.no_grad():
        net.weight.fill_(1.0)  # spacing 2^-7: an update of 1e-4 is lost to nearest
        net.bias.fill_(2.0**-12)  # spacing 2^-19: the same update moves it
    shares = {}
    for mode in ("nearest", "stochastic", "kahan"):
        net_copy = torch.nn.Linear(64, 64).to(torch.bfloat16)
        net_copy.load_state_dict(net.state_dict())
        opt = BF16AdamW(net_copy.parameters(), rounding=mode, lr=1e-4, weight_decay=0.0, seed=0)
        net_copy(torch.ones(4, 64, dtype=torch.bfloat16)).sum().backward()
        before = updates.snapshot(opt)
        opt.step()
        shares[mode] = updates.lost_share(opt, before)
    weights, biases = 64 * 64, 64
    assert shares["nearest"] == pytest.approx(weights / (weights + biases))
    assert shares["kahan"] == pytest.approx(weights / (weights + biases))  # held in compensation
    assert 0.8 * shares["nearest"] < shares["stochastic"] < shares["nearest"]  # some round up


def test_the_lowlr_task_judges_the_pure_policies_beside_fp32_and_bf16():
    assert tasks.task_policies(tasks.LOWLR, ["fp32", "tf32", "fp16", "bf16"]) == [
        "fp32", "bf16", "bf16-pure", "bf16-pure-sr", "bf16-pure-kahan"]
    assert tasks.LOWLR in tasks.tasks_for(["fp32", "bf16-pure"])
    assert tasks.LOWLR not in tasks.tasks_for(["fp32", "tf32", "fp16", "bf16"])  # cpu preset's
    assert tasks.LOWLR not in tasks.default_models("cpu")
    assert tasks.spec_for(tasks.LOWLR).name == "gpt2-tiny"


def test_a_bf16_pure_cell_runs_end_to_end_and_records_what_it_holds(tmp_path):
    out = tmp_path / "record.json"
    code = main(["cell", "--model", "gpt2-tiny", "--precision", "bf16-pure", "--batch-size", "2",
                 "--seq-len", "16", "--warmup", "1", "--steps", "2", "--device", "cpu",
                 "--out", str(out)])
    record = json.loads(out.read_text())
    assert code == 0 and record["status"] == "ok", record["error"]
    assert math.isfinite(record["loss_last"]) and record["scaler_scale_final"] is None
    assert record["param_dtypes"] == record["optim_state_dtypes"] == "bfloat16"
    assert record["param_bytes"] > 0
    assert record["optim_state_bytes"] == 2 * record["param_bytes"]  # two bf16 moments


def _held_record(policy: str, param_bytes: int, state_bytes: int, dtype: str) -> dict:
    row = dict(run_id="r", model="gpt2-tiny", precision=policy, batch_size=8, seq_len=64,
               grad_accum=1, compile=False, world_size=1, repeat=0, status="ok",
               samples_per_s=100.0, peak_rss_gib=0.5, device="cpu", device_name="a CPU",
               throttled=False, param_bytes=param_bytes, param_dtypes=dtype,
               optim_state_bytes=state_bytes, optim_state_dtypes=dtype)
    row["cell_id"] = "-".join(str(row.get(k)) for k in store.IDENTITY[3:12])
    return store.empty_record(**row)


def test_the_report_shows_weights_and_optimizer_state_by_dtype(tmp_path):
    rows = [_held_record("fp32", 4_000_000, 8_000_000, "float32"),
            _held_record("bf16-pure", 2_000_000, 4_000_000, "bfloat16"),
            _held_record("bf16-pure-kahan", 2_000_000, 6_000_000, "bfloat16")]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    store.write_csv(run_dir, rows)
    text = report.render(report.load(run_dir))
    table = text.split("**Weights + optimizer state, MiB, their dtypes")[1].split("\n\n")[1]
    line = next(row for row in table.splitlines() if row.strip("| ").startswith("8"))
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    assert cells == ["3.81 + 7.63 (fp32)", "1.91 + 3.81 (bf16) (-50%)",
                     "1.91 + 5.72 (bf16) (-33%)"]


def test_the_lost_updates_figure_and_line_show_each_policy(tmp_path):
    curves = pd.DataFrame({
        "model": "gpt2-tiny-lowlr", "seed": [0, 0, 1, 1] * 2,
        "precision": ["fp32"] * 4 + ["bf16-pure"] * 4, "step": [10, 20] * 4,
        "loss": 5.0, "lost_frac": [0.0, 0.0, 0.0, 0.0, 0.6, 0.7, 0.6, 0.7]})
    run = SimpleNamespace(curves=curves, device_name="a CPU")
    colours, markers = policy_style(["fp32", "bf16-pure"])
    paths = lost_updates.plot(Plotter(run, tmp_path, colours, markers), "gpt2-tiny-lowlr")
    assert [p.name for p in paths] == ["lost_updates-gpt2-tiny-lowlr.png",
                                       "lost_updates-gpt2-tiny-lowlr.svg"]
    (line, _, figure, _) = lost_updates.block(run, "gpt2-tiny-lowlr",
                                              ["lost_updates-gpt2-tiny-lowlr"])
    assert "fp32 0.0%; bf16-pure 65.0%" in line and "lost for good" in line
    assert figure.endswith("(plots/lost_updates-gpt2-tiny-lowlr.png)")
    nothing_lost = curves.assign(lost_frac=0.0)
    assert lost_updates.block(SimpleNamespace(curves=nothing_lost), "gpt2-tiny-lowlr") == []


@pytest.mark.slow  # two 20-step parity runs: about 7 s on a shared CPU
def test_parity_curves_carry_the_share_of_updates_lost_to_rounding():
    from bench.parity.train import train_one

    setup = replace(tasks.setup_for(tasks.LOWLR), steps=20, eval_batches=1)
    lost = {}
    for name in ("fp32", "bf16-pure"):
        row, curve, _ = train_one(tasks.LOWLR, name, 0, setup, torch.device("cpu"))
        assert [c["step"] for c in curve] == [10, 20] and math.isfinite(row["eval_loss"])
        lost[name] = [c["lost_frac"] for c in curve]
    assert max(lost["fp32"]) < 1e-3  # FP32 weights take (almost) every update at this lr
    assert all(0.3 < share < 1.0 for share in lost["bf16-pure"])  # bf16 rounds most away
