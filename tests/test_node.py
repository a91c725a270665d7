"""World size ``node``: every GPU of the node, parsed from --world-size and TOML, resolved by
the runner once its device probe has counted the GPUs (bench/run/node.py). The GPU counts here
come from a stand-in probe: no GPU is needed."""

from __future__ import annotations

import argparse

import pytest

from bench import BadInput, config, store
from bench.cli import build_parser, main
from bench.config import matrix
from bench.config.matrix import NODE
from bench.run import command, device, node


def _args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *flags])


def _probe(num_gpus: int):
    """A device probe that answers as on a node of ``num_gpus`` CUDA GPUs, and counts one
    FLOP per sample of each cell it is asked to price (as the real one, by cell id)."""
    def probe(asked, cells=(), references=()):
        return device.Probe(
            cuda=True, device="cuda", error=None,
            env={"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3",
                 "device_count": num_gpus},
            flops_per_step={c.cell_id: float(c.batch_size * c.grad_accum) for c in cells})
    return probe


def _setup(monkeypatch, num_gpus: int, *flags: str) -> command._Setup:
    monkeypatch.setattr(device, "probe", _probe(num_gpus))
    args = _args(*flags)
    return command._setup(args, command._budget(args), command._choose_matrix(args))


def test_node_is_a_world_size_of_the_command_line_and_of_a_matrix_file(tmp_path):
    assert _args("--world-size", "1,node").world_size == [1, NODE]
    assert _args("--world-size", "Node").world_size == [NODE]
    with pytest.raises(SystemExit):
        _args("--world-size", "1,nodes")
    mx = config.from_dict({"models": {"gpt2-tiny": {}}, "world_size": [1, "node"],
                           "strategies": ["ddp", "fsdp2"]})
    assert mx.world_size == (1, NODE)
    assert config.from_dict(mx.to_dict()) == mx  # meta.json's copy reads back
    (tmp_path / "m.toml").write_text(config.to_toml(mx))
    assert config.load(tmp_path / "m.toml") == mx  # and a matrix file written from it
    with pytest.raises(BadInput, match="'world_size' must be a whole number or 'node', got 'all'"):
        config.from_dict({"models": {"gpt2-tiny": {}}, "world_size": ["all"]})
    # Before the probe has counted, node may be several GPUs: a strategy is not refused.
    assert config.override(config.quick(), world_size=[NODE], strategies=["fsdp2"])


def test_node_resolves_to_the_gpus_counted_and_cells_hold_the_number():
    mx = config.override(config.quick(), models_=["gpt2-tiny"], world_size=[1, NODE],
                         strategies=["ddp", "fsdp2:bf16/fp32"])
    with pytest.raises(ValueError, match="resolved before"):
        matrix.expand(mx)
    resolved = matrix.resolve_node(mx, 4)
    assert resolved.world_size == (1, 4) and resolved.to_dict()["world_size"] == [1, 4]
    cells = matrix.expand(resolved)
    assert {(c.world_size, c.strategy) for c in cells} == {
        (1, "ddp"), (4, "ddp"), (4, "fsdp2:bf16/fp32")}
    # The ids of the number typed: a run resumed with --world-size 1,4 finds these cells.
    typed = matrix.expand(config.override(mx, world_size=[1, 4]))
    assert [c.cell_id for c in cells] == [c.cell_id for c in typed]


def test_a_node_of_one_gpu_runs_each_policy_once_and_its_matrix_reads_back():
    mx = config.override(config.quick(), world_size=[1, NODE],
                         strategies=["ddp", "fsdp2:bf16/fp32"])
    one = matrix.resolve_node(mx, 1)
    assert (one.world_size, one.strategies) == ((1,), ("ddp",))
    # The same single-process cells, with the ids they always had.
    assert matrix.expand(one) == matrix.expand(config.quick())
    assert config.from_dict(one.to_dict()) == one  # meta.json's copy is a valid matrix


def test_the_runner_resolves_node_after_the_probe_and_prices_every_cell(monkeypatch):
    setup = _setup(monkeypatch, 4, "--preset", "gpu-fsdp2", "--time-budget", "1h")
    assert setup.mx.world_size == (4,) and setup.mx.to_dict()["world_size"] == [4]
    assert {c.world_size for c in setup.cells} == {4}
    assert {c.strategy for c in setup.cells} == {"ddp", "fsdp2:bf16/fp32"}
    # --time-budget's estimates scale by FLOPs per step: each resolved cell has its own.
    assert all(setup.found.flops_per_step[c.cell_id] == c.batch_size for c in setup.cells)


def test_node_on_a_resumed_run_is_the_gpus_it_recorded(tmp_path, monkeypatch):
    mx = matrix.resolve_node(config.override(config.quick(), world_size=[1, NODE]), 4)
    store.write_meta(tmp_path, {"device": "cuda", "device_count": 4, "matrix": mx.to_dict()})
    # Resumed on a node of 2 GPUs, the run keeps its 4: the cells it started.
    setup = _setup(monkeypatch, 2, "--resume", str(tmp_path), "--world-size", "1,node")
    assert setup.mx.world_size == (1, 4)
    assert [c.cell_id for c in setup.cells] == [c.cell_id for c in matrix.expand(mx)]
    with pytest.raises(BadInput, match=r"--world-size makes world_size \[4\], the run has"):
        _setup(monkeypatch, 4, "--resume", str(tmp_path), "--world-size", "node")


def test_node_needs_cuda_gpus():
    with pytest.raises(BadInput, match="--world-size node: no CUDA GPU here"):
        node.gpus("cpu", False, 1)
    with pytest.raises(BadInput, match="the run's device is cpu; use --device cuda"):
        node.gpus("cpu", True, 8)
    assert node.gpus("cuda", True, 8) == 8


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_node_without_cuda_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "quick", "--world-size", "1,node", "--device", "cpu",
                 "--no-parity", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ampbench run: error: --world-size node: no CUDA GPU here")
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    # From a matrix file, the line names the file.
    toml = tmp_path / "m.toml"
    toml.write_text('world_size = ["node"]\ndevice = "cpu"\nparity = false\n\n'
                    "[models.gpt2-tiny]\nbatch_sizes = [2]\n")
    assert main(["run", "--matrix", str(toml), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f'{toml}: world_size "node": no CUDA GPU here' in err and not out.exists()
    # The preset says first that it is a GPU preset.
    assert main(["run", "--preset", "gpu-fsdp2", "--out", str(out)]) == 2
    assert "preset 'gpu-fsdp2' needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


def test_the_resume_command_repeats_node(tmp_path):
    args = _args("--preset", "quick", "--world-size", "1,node")
    assert "--world-size 1,node" in command.resume_command(args, tmp_path)
