"""The pure-bf16 policies (bf16 weights, gradients and AdamW state, no fp32 masters) under
FSDP2, on CPU with two gloo ranks: each rank's BF16AdamW updates its own shard of the DTensor
parameters and holds its shard's state, bf16-pure trains as it does under DDP, and a cell
records what one rank holds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import store, strategy
from bench.cli import main

CHECK = """
import json, sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
from torch.distributed.tensor import Shard, distribute_tensor
from bench.cell.bf16_adamw import BF16AdamW
from bench.cell.train import prepare

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
found = {}


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def weights(trainer):
    return {n.removeprefix("module."): full(p.detach()).clone()
            for n, p in trainer.model.named_parameters()}


def train(policy, strategy, steps=3):
    trainer = prepare("gpt2-tiny", policy, 2, ddp=True, strategy=strategy, seed=0,
                      data_seed=rank)
    before = weights(trainer)
    losses = torch.stack([trainer.step() for _ in range(steps)]).float()
    return trainer, before, losses, weights(trainer)


# (a) bf16-pure (nearest) under fsdp2 (fp32 and bf16 reduction) against DDP, after 3 steps.
_, _, _, p_ddp = train("bf16-pure", "ddp")
for name in ("fsdp2", "fsdp2:bf16/bf16"):
    trainer, _, _, p_fsdp = train("bf16-pure", name)
    found[name] = {"names_match": sorted(p_ddp) == sorted(p_fsdp),
                   "dtypes": sorted({str(p.dtype) for p in p_fsdp.values()}),
                   "differing": sum(int((p_ddp[n] != p_fsdp[n]).sum()) for n in p_ddp),
                   "max_diff": max((p_ddp[n].float() - p_fsdp[n].float()).abs().max().item()
                                   for n in p_ddp)}
    del trainer


# (b) the reduction under fsdp2: bf16 gradients reduce-scattered in fp32, stored in bf16.
class Recording(DefaultReduceScatter):
    seen = []

    def __call__(self, output_tensor, input_tensor, *args, **kwargs):
        Recording.seen.append(str(input_tensor.dtype))
        return super().__call__(output_tensor, input_tensor, *args, **kwargs)


trainer = prepare("gpt2-tiny", "bf16-pure", 2, ddp=True, strategy="fsdp2", seed=0,
                  data_seed=rank)
for module in trainer.model.modules():
    if hasattr(module, "set_custom_reduce_scatter"):
        module.set_custom_reduce_scatter(Recording())
trainer.spec.loss(trainer.model, trainer.inputs, trainer.targets).backward()
found["reduce"] = sorted(set(Recording.seen))
found["grad_dtype"] = sorted({str(p.grad.to_local().dtype) for p in trainer.model.parameters()})
del trainer

# (c) the stochastic and Kahan policies train under fsdp2, each rank holding its shard's state.
for policy in ("bf16-pure-sr", "bf16-pure-kahan"):
    trainer, before, losses, after = train(policy, "fsdp2", steps=4)
    states, shapes, total, local = set(), set(), 0, 0
    for p in trainer.model.parameters():
        total, local = total + p.numel(), local + p.to_local().numel()
        for key, value in trainer.optimizer.state[p].items():
            if key != "step":
                states.add((key, type(value).__name__, str(value.dtype)))
                shapes.add(value.shape == p.to_local().shape)
    found[policy] = {"losses": losses.tolist(),
                     "moved": sum(int((before[n] != after[n]).sum()) for n in before),
                     "states": sorted(states), "shard_shaped": sorted(shapes),
                     "local_share": local / total, "updates": trainer.optimizer_steps()}
    del trainer

# (d) a one-row parameter: rank 1's shard is empty, and its update is a no-op, not an error.
mesh = init_device_mesh("cpu", (world,))
empty = {}
for rounding in ("nearest", "stochastic", "kahan"):
    torch.manual_seed(1)
    p = torch.nn.Parameter(distribute_tensor(torch.randn(1, 8).bfloat16(), mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.randn(1, 8).bfloat16(), mesh, [Shard(0)])
    before = p.to_local().clone()
    opt = BF16AdamW([p], rounding=rounding, lr=1e-2, seed=0)
    for _ in range(2):
        opt.step()
    empty[rounding] = {"rows": p.to_local().shape[0],
                       "state_rows": opt.state[p]["exp_avg"].shape[0],
                       "changed": int((p.to_local() != before).sum())}
every = [None] * world
dist.all_gather_object(every, empty)
found["empty"] = every

# (e) two shards of equal rows with equal gradients: stochastic rounding gives each shard noise
# of its own (the rows come apart), nearest rounds them alike.
for rounding in ("stochastic", "nearest"):
    torch.manual_seed(2)
    row, grad = torch.randn(1, 512).bfloat16(), torch.randn(1, 512).bfloat16()
    p = torch.nn.Parameter(distribute_tensor(row.repeat(world, 1), mesh, [Shard(0)]))
    p.grad = distribute_tensor(grad.repeat(world, 1), mesh, [Shard(0)])
    BF16AdamW([p], rounding=rounding, lr=1e-3, weight_decay=0.0, seed=0).step()
    rows = p.full_tensor()
    found.setdefault("shards_alike", {})[rounding] = bool(torch.equal(rows[0], rows[1]))

# (f) DDP replicas hold whole tensors: one stochastic stream, so they stay identical.
trainer, _, _, _ = train("bf16-pure-sr", "ddp")
flat = torch.cat([p.detach().float().flatten() for p in trainer.model.parameters()])
gathered = [torch.empty_like(flat) for _ in range(world)]
dist.all_gather(gathered, flat)
found["ddp_sr_replicas_equal"] = bool(torch.equal(gathered[0], gathered[1]))
del trainer

if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(found, f)
dist.barrier()
dist.destroy_process_group()
"""


def test_no_strategy_refuses_the_pure_policies():
    for name in ("ddp", "fsdp2", "fsdp2:bf16/fp32", "fsdp2:bf16/bf16", "fsdp2:fp32/bf16"):
        for policy in ("bf16-pure", "bf16-pure-sr", "bf16-pure-kahan"):
            assert strategy.check(strategy.parse(name), policy) is None


@pytest.mark.slow
def test_pure_bf16_trains_under_fsdp2_each_rank_updating_its_shard(tmp_path, cli_env):
    script, out = tmp_path / "fsdp_pure_check.py", tmp_path / "found.json"
    script.write_text(CHECK)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script), str(out)],
                          env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())
    # (a) Exact, not within a tolerance: with two ranks both reductions round the same exact
    # sum once to bf16 (DDP halves each bf16 gradient, exactly, and adds the halves in bf16;
    # FSDP2 adds them in fp32, where the sum of two bf16 numbers is exact, or in bf16, and
    # rounds that to bf16), so the gradients, and the elementwise updates, agree bit for bit
    # (measured: 0 elements differ). More ranks could round partial sums differently and
    # leave a bf16 ulp between them.
    for name in ("fsdp2", "fsdp2:bf16/bf16"):
        assert found[name]["names_match"] and found[name]["dtypes"] == ["torch.bfloat16"]
        assert found[name]["differing"] == 0, found[name]
    # (b) "fsdp2" reduces the bf16 gradients in fp32 and stores the rank's shard in bf16.
    assert found["reduce"] == ["torch.float32"] and found["grad_dtype"] == ["torch.bfloat16"]
    # (c) sr and kahan train: finite falling loss, weights moved, bf16 state of the shard's
    # shape (plain tensors, not DTensors), half the elements on each of the two ranks.
    for policy, extra in (("bf16-pure-sr", []), ("bf16-pure-kahan", ["compensation"])):
        got = found[policy]
        losses = got["losses"]
        assert all(abs(x) < float("inf") for x in losses) and losses[-1] < losses[0], losses
        assert got["moved"] > 0 and got["updates"] == 4
        assert got["states"] == sorted([[k, "Tensor", "torch.bfloat16"]
                                        for k in ["exp_avg", "exp_avg_sq", *extra]])
        assert got["shard_shaped"] == [True]
        assert got["local_share"] == pytest.approx(0.5, abs=0.02)
    # (d) the rank without rows of a one-row parameter steps without error; the other updates.
    for rounding in ("nearest", "stochastic", "kahan"):
        held, empty = (per_rank[rounding] for per_rank in found["empty"])
        assert held["rows"] == held["state_rows"] == 1 and held["changed"] > 0
        assert empty == {"rows": 0, "state_rows": 0, "changed": 0}
    # (e) each shard its own rounding noise; (f) replicas one stream.
    assert found["shards_alike"] == {"stochastic": False, "nearest": True}
    assert found["ddp_sr_replicas_equal"]


FAST = ["--preset", "quick", "--models", "gpt2-tiny", "--batch-sizes", "2", "--steps", "3",
        "--warmup", "1", "--no-parity"]


@pytest.mark.slow
def test_an_fsdp2_bf16_pure_cell_records_half_the_state_per_rank(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *FAST, "--precisions", "bf16-pure", "--world-size", "2",
                 "--strategy", "ddp,fsdp2", "--device", "cpu", "--out", str(out)]) == 0
    by_strategy = {r["strategy"]: r for r in store.load_records(out)}
    ddp, fsdp2 = by_strategy["ddp"], by_strategy["fsdp2"]
    assert ddp["status"] == "ok" and fsdp2["status"] == "ok", fsdp2.get("error")
    assert (fsdp2["fsdp_param_dtype"], fsdp2["fsdp_reduce_dtype"]) == ("fp32", "fp32")
    for record in (ddp, fsdp2):
        assert record["param_dtypes"] == record["optim_state_dtypes"] == "bfloat16"
    # Rank 0's shards: half of each parameter's rows, one more where their count is odd.
    assert fsdp2["optim_state_bytes"] / ddp["optim_state_bytes"] == pytest.approx(0.5, abs=0.05)
    assert fsdp2["param_bytes"] / ddp["param_bytes"] == pytest.approx(0.5, abs=0.05)
