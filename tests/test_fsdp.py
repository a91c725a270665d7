"""FSDP2 as a strategy next to DDP: the axis and its cell ids, and on CPU with two gloo ranks,
that fully_shard trains as DDP does and that its MixedPrecisionPolicy really takes effect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import BadInput, config, report, store, strategy
from bench.cli import main
from bench.config import Cell, Matrix, ModelAxis, expand
from bench.run import launch

# fp32 FSDP2 against DDP on gpt2-tiny, each rank on its own batch: gradients of the first step
# and weights after three AdamW steps. The same math in another collective (reduce-scatter of
# shards vs all-reduce of buckets): with two gloo ranks a sum of two is order-free and both
# match bit for bit (measured: 0.0); the tolerances leave room for other reduction orders.
GRAD_ATOL = 1e-6
PARAM_ATOL = 1e-5

CHECK = """
import json, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
from bench.cell import fsdp
from bench.cell.train import prepare

dist.init_process_group("gloo")
rank = dist.get_rank()
found = {}


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def first_step(strategy, policy="fp32"):
    trainer = prepare("gpt2-tiny", policy, 2, ddp=True, strategy=strategy, seed=0,
                      data_seed=rank)
    loss = trainer.spec.loss(trainer.model, trainer.inputs, trainer.targets)
    loss.backward()
    return trainer


# (a) fp32 FSDP2 against DDP: gradients of the first step, weights after three.
state = {}
for name in ("ddp", "fsdp2"):
    trainer = first_step(name)
    grads = {n.removeprefix("module."): full(p.grad).detach().clone()
             for n, p in trainer.model.named_parameters()}
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    for _ in range(2):
        trainer.step()
    params = {n.removeprefix("module."): full(p.detach()).clone()
              for n, p in trainer.model.named_parameters()}
    state[name] = (grads, params)
    del trainer
(g_ddp, p_ddp), (g_fsdp, p_fsdp) = state["ddp"], state["fsdp2"]
found["names_match"] = sorted(g_ddp) == sorted(g_fsdp)
found["grad_diff"] = max((g_ddp[n] - g_fsdp[n]).abs().max().item() for n in g_ddp)
found["param_diff"] = max((p_ddp[n] - p_fsdp[n]).abs().max().item() for n in p_ddp)
found["grad_scale"] = max(g.abs().max().item() for g in g_ddp.values())


# (b) the policy takes effect: dtypes in forward and at the reduce-scatter.
class Recording(DefaultReduceScatter):
    seen = []

    def __call__(self, output_tensor, input_tensor, *args, **kwargs):
        Recording.seen.append(str(input_tensor.dtype))
        return super().__call__(output_tensor, input_tensor, *args, **kwargs)


for name in ("fsdp2", "fsdp2:bf16/fp32", "fsdp2:bf16/bf16"):
    trainer = prepare("gpt2-tiny", "fp32", 2, ddp=True, strategy=name, seed=0, data_seed=rank)
    forward = []
    block = fsdp.units(trainer.model)[0]
    block.register_forward_pre_hook(
        lambda m, args: forward.extend(str(p.dtype) for p in m.parameters()))
    for module in trainer.model.modules():
        if hasattr(module, "set_custom_reduce_scatter"):
            module.set_custom_reduce_scatter(Recording())
    Recording.seen = []
    loss = trainer.spec.loss(trainer.model, trainer.inputs, trainer.targets)
    loss.backward()
    local = [p.grad.to_local() for p in trainer.model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in local])
    found[name] = {
        "forward": sorted(set(forward)), "reduce": sorted(set(Recording.seen)),
        "sharded_param": str(next(trainer.model.parameters()).dtype),
        "grad_dtype": sorted({str(g.dtype) for g in local}),
        # Reduced in bf16, every gradient is a bf16 number (stored in fp32): not so in fp32.
        "grads_bf16_exact": bool(torch.equal(flat, flat.bfloat16().float())),
    }
    del trainer

# fp16 with its scaler under FSDP2: a ShardedGradScaler, and the updates happen.
trainer = prepare("gpt2-tiny", "fp16", 2, ddp=True, strategy="fsdp2", seed=0, data_seed=rank)
losses = [trainer.step() for _ in range(3)]
found["fp16"] = {"scaler": type(trainer.scaler).__name__,
                 "updates": trainer.optimizer_steps(),
                 "finite": bool(torch.isfinite(torch.stack(losses)).all())}
del trainer
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(found, f)
dist.barrier()
dist.destroy_process_group()
"""


# ---------------------------------------------------------------- the axis (torch-free)


def test_strategy_names_parse_to_one_canonical_spelling():
    assert strategy.canonical("ddp") == "ddp"
    assert strategy.canonical("fsdp2") == "fsdp2"
    assert strategy.canonical("fsdp2:fp32/fp32") == "fsdp2"  # torch's default policy
    assert strategy.canonical("fsdp2:bf16/fp32") == "fsdp2:bf16/fp32"
    fields = strategy.parse("fsdp2:bf16/bf16").record_fields(2)
    assert fields == {"strategy": "fsdp2:bf16/bf16", "fsdp_param_dtype": "bf16",
                      "fsdp_reduce_dtype": "bf16"}
    assert strategy.parse("fsdp2").record_fields(1)["strategy"] is None  # one process
    for bad in ("fsdp", "fsdp2:bf16", "fsdp2:fp16/fp32", "ddp:bf16/fp32", ""):
        with pytest.raises(ValueError, match="unknown strategy"):
            strategy.parse(bad)


def test_unworkable_combinations_are_refused_with_a_reason():
    bf16_params = strategy.parse("fsdp2:bf16/fp32")
    assert "bf16-rounded weights" in strategy.check(bf16_params, "fp16")
    assert strategy.check(bf16_params, "bf16") is None  # autocast redundant, harmless
    assert strategy.check(strategy.parse("fsdp2"), "fp16") is None  # ShardedGradScaler
    for shared in (strategy.parse("fsdp2"), bf16_params):  # each rank updates its shard
        assert strategy.check(shared, "bf16-pure") is None
    assert strategy.check(strategy.parse("ddp"), "fp16") is None


def test_default_cells_keep_their_ids_and_strategies_get_their_own():
    # The id this cell had before the strategy axis existed (resume finds it).
    assert Cell("gpt2-tiny", "bf16", 2, seq_len=64, world_size=2).cell_id == "0ea5874d724b"
    ids = {Cell("gpt2-tiny", "bf16", 2, seq_len=64, world_size=2, strategy=s).cell_id
           for s in ("ddp", "fsdp2", "fsdp2:bf16/fp32")}
    assert len(ids) == 3


def test_expand_runs_each_strategy_once_on_several_processes_and_never_alone():
    mx = Matrix(models=(ModelAxis("gpt2-tiny", (2,)),), precisions=("bf16",),
                world_size=(1, 2), strategies=("ddp", "fsdp2:bf16/fp32"))
    cells = expand(mx)
    assert [(c.world_size, c.strategy) for c in cells] == [
        (1, "ddp"), (2, "ddp"), (2, "fsdp2:bf16/fp32")]
    assert "fsdp2:bf16/fp32" in cells[2].label()
    argv = launch.cell_argv(cells[2], launch.Settings("r", "cpu", 1, 1, 60.0, {}), 0,
                            Path("out.json"))
    assert argv[argv.index("--strategy") + 1] == "fsdp2:bf16/fp32"
    assert "--strategy" not in launch.cell_argv(cells[1], launch.Settings(
        "r", "cpu", 1, 1, 60.0, {}), 0, Path("out.json"))


def test_strategies_from_toml_and_flags_are_checked():
    data = {"models": {"gpt2-tiny": {"batch_sizes": [2]}}, "world_size": [2],
            "strategies": ["ddp", "fsdp2:fp32/fp32"]}
    assert config.from_dict(data).strategies == ("ddp", "fsdp2")
    with pytest.raises(BadInput, match="strategies: unknown strategy 'zero3'"):
        config.from_dict({**data, "strategies": ["zero3"]})
    with pytest.raises(BadInput, match="every cell is one process"):
        config.from_dict({**data, "world_size": [1]})
    mx = config.override(config.from_dict(data), strategies=["fsdp2:bf16/fp32"])
    assert mx.strategies == ("fsdp2:bf16/fp32",)


def test_a_strategy_outside_torchrun_is_bad_input(capsys):
    assert main(["cell", "--model", "gpt2-tiny", "--precision", "fp32", "--batch-size", "2",
                 "--device", "cpu", "--strategy", "fsdp2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--strategy fsdp2" in err[0] and "torchrun" in err[0]


def test_rows_from_before_the_strategy_field_key_as_ddp():
    from bench.analysis import cells

    old = {"model": "m", "precision": "fp32", "batch_size": 2, "world_size": 2}
    new = {**old, "strategy": "ddp", "fsdp_param_dtype": None}
    assert cells.cell_key(old) == cells.cell_key(new)
    assert cells.cell_key({**old, "strategy": "fsdp2:bf16/fp32"}).strategy == "fsdp2:bf16/fp32"


# ---------------------------------------------------------------- two ranks on CPU


@pytest.mark.slow
def test_fsdp2_matches_ddp_and_its_policy_takes_effect(tmp_path, cli_env):
    script, out = tmp_path / "fsdp_check.py", tmp_path / "found.json"
    script.write_text(CHECK)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script), str(out)],
                          env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())
    # (a) FSDP2 in fp32 trains as DDP does, within fp32 rounding of the reduction order.
    assert found["names_match"]
    assert found["grad_scale"] > 100 * GRAD_ATOL  # the tolerance is far below the gradients
    assert found["grad_diff"] <= GRAD_ATOL, found["grad_diff"]
    assert found["param_diff"] <= PARAM_ATOL, found["param_diff"]
    # (b) the policy: parameters as the block's forward sees them, the reduce-scatter's input.
    plain, bf16_fp32, bf16_bf16 = (found[n] for n in
                                   ("fsdp2", "fsdp2:bf16/fp32", "fsdp2:bf16/bf16"))
    assert plain["forward"] == ["torch.float32"] and plain["reduce"] == ["torch.float32"]
    assert bf16_fp32["forward"] == ["torch.bfloat16"]
    assert bf16_fp32["reduce"] == ["torch.float32"]
    assert bf16_bf16["forward"] == ["torch.bfloat16"]
    assert bf16_bf16["reduce"] == ["torch.bfloat16"]
    for policy in (plain, bf16_fp32, bf16_bf16):  # sharded master weights and grads stay fp32
        assert policy["sharded_param"] == "torch.float32"
        assert policy["grad_dtype"] == ["torch.float32"]
    # The reduction's precision shows in the values too: a no-op cast cannot pass.
    assert bf16_bf16["grads_bf16_exact"] and not bf16_fp32["grads_bf16_exact"]
    assert found["fp16"] == {"scaler": "ShardedGradScaler", "updates": 3, "finite": True}


FAST = ["--preset", "quick", "--models", "gpt2-tiny", "--batch-sizes", "2", "--steps", "3",
        "--warmup", "1", "--no-parity"]


@pytest.mark.slow
def test_an_fsdp2_cell_records_its_strategy_and_the_report_shows_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *FAST, "--precisions", "bf16,fp16", "--world-size", "2",
                 "--strategy", "fsdp2:bf16/fp32", "--device", "cpu", "--out", str(out)]) == 0
    by_policy = {r["precision"]: r for r in store.load_records(out)}
    bf16, fp16 = by_policy["bf16"], by_policy["fp16"]
    assert bf16["status"] == "ok" and bf16["world_size"] == 2
    assert (bf16["strategy"], bf16["fsdp_param_dtype"], bf16["fsdp_reduce_dtype"]) == (
        "fsdp2:bf16/fp32", "bf16", "fp32")
    assert bf16["cell_id"] == Cell("gpt2-tiny", "bf16", 2, seq_len=bf16["seq_len"],
                                   world_size=2, strategy="fsdp2:bf16/fp32").cell_id
    assert 0 < bf16["peak_mem_rank_min_gib"] <= bf16["peak_rss_gib"]
    assert fp16["status"] == "unsupported" and "bf16-rounded weights" in fp16["error"]
    assert fp16["strategy"] == "fsdp2:bf16/fp32"
    text = report.render(report.load(out))
    assert "**Memory per rank, GiB: peak RSS of the largest rank / the smallest rank" in text
    assert "fsdp2:bf16/fp32" in capsys.readouterr().out


def test_the_fsdp2_example_matrix_loads():
    mx = config.load(Path(__file__).resolve().parent.parent / "examples" / "fsdp2.toml")
    assert mx.world_size == (1, "node")  # every GPU of the node, counted when the run starts
    cells = expand(config.matrix.resolve_node(mx, 8))  # as on an 8-GPU node
    assert {c.strategy for c in cells if c.world_size == 8} == {"ddp", "fsdp2", "fsdp2:bf16/fp32"}
    assert {c.world_size for c in cells} == {1, 8}
    assert {c.model for c in cells} == {"llama-small", "gpt2-small"}
