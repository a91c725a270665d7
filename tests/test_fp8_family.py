"""The FP8 recipe family beyond tensorwise and rowwise (bench/cell/low_precision.py): rowwise
with a bf16 weight gradient, torchtitan's layer filter, MXFP8 (emulated on CPU) and NVFP4
(unsupported off CUDA), where the Blackwell formats are unsupported and why, and the report's
"which layers ran in which format" table."""

import collections
import json

import pytest
import torch

import models
from bench import precision
from bench.cell import low_precision
from bench.cell.main import prepare
from bench.cli import main
from tests.test_fp8 import _fake_cuda, needs_torchao


@needs_torchao
@pytest.mark.parametrize("name, kind, fmt", [
    ("fp8-rowwise-gw-hp", "Float8Linear", "float8 rowwise, wgrad bf16"),
    ("mxfp8", "MXFP8Linear", "mxfp8"),
])
def test_a_recipe_converts_the_tiny_gpts_linears_and_trains_emulated(name, kind, fmt):
    trainer = prepare("gpt2-tiny", name, batch_size=2)
    swapped = [m for m in trainer.model.modules()
               if kind in [c.__name__ for c in type(m).__mro__]]
    assert len(swapped) == 8 and trainer.conversion["low_precision_format"] == fmt
    assert trainer.conversion["emulated"] is True
    before = [m.weight.detach().clone() for m in swapped]
    losses = torch.stack([trainer.step() for _ in range(3)])
    assert torch.isfinite(losses).all() and losses[-1] < losses[0]
    assert all(not torch.equal(b, m.weight) for b, m in zip(before, swapped, strict=True))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


@needs_torchao
def test_the_gw_hp_recipe_keeps_the_weight_gradient_out_of_fp8():
    cfg = precision.get("fp8-rowwise-gw-hp")
    from torchao.float8.config import ScalingType

    net = cfg.prepare_model(torch.nn.Sequential(torch.nn.Linear(32, 64)))
    config = net[0].config
    assert config.cast_config_input_for_grad_weight.scaling_type is ScalingType.DISABLED
    assert config.cast_config_grad_output_for_grad_weight.scaling_type is ScalingType.DISABLED
    rowwise = precision.get("fp8-rowwise").prepare_model(torch.nn.Sequential(
        torch.nn.Linear(32, 64)))[0].config
    assert rowwise.cast_config_input_for_grad_weight.scaling_type is not ScalingType.DISABLED


@needs_torchao
def test_the_filter_leaves_first_and_last_block_head_and_small_gemms_in_bf16():
    with torch.device("meta"):
        net = models.get("gpt2-small").build()
    reason = low_precision.why_not("tensorwise", "torchtitan", net)
    why = {name: reason(m, name) for name, m in net.named_modules()
           if isinstance(m, torch.nn.Linear)}
    assert why["h.0.mlp.c_fc"] == "first block" and why["h.11.attn.c_attn"] == "last block"
    # torchao's tensorwise auto filter: in <= 4096 and out <= 1024 is too small to gain.
    assert why["h.5.attn.c_proj"] == why["h.5.mlp.c_proj"] == "small GEMM"  # 768x768, 3072x768
    assert why["h.5.attn.c_attn"] is None and why["h.5.mlp.c_fc"] is None  # 768x2304, 768x3072
    assert collections.Counter(why.values()) == {
        None: 20, "small GEMM": 20, "first block": 4, "last block": 4}
    head = torch.nn.Sequential(torch.nn.ModuleList(torch.nn.Linear(4096, 4096) for _ in range(3)),
                               torch.nn.Linear(4096, 4096))
    reason = low_precision.why_not("tensorwise", "torchtitan", head)
    assert reason(head[1], "1") == "outside the blocks" and reason(head[0][1], "0.1") is None


@needs_torchao
def test_the_filtered_recipe_records_the_layers_it_left_and_why():
    net = torch.nn.Sequential(torch.nn.ModuleList(torch.nn.Linear(4096, 2048) for _ in range(3)),
                              torch.nn.Linear(2048, 16))
    policy = precision.get("fp8-filtered")
    fields = policy.record_fields(policy.prepare_model(net))
    assert fields["fp8_converted"] == 1 and fields["fp8_num_unconverted"] == 3
    assert fields["fp8_unconverted"] == ("0.0 (4096x2048: first block), 0.2 (4096x2048: last "
                                         "block), 1 (2048x16: outside the blocks)")
    assert fields["low_precision_filter"].startswith("in and out features multiples of 16; "
                                                     "not in the first or last block")


@needs_torchao
def test_the_filter_on_a_two_block_model_converts_nothing_and_says_so():
    reason = precision.get("fp8-filtered").model_reason(models.get("gpt2-tiny"))
    assert reason.startswith("no Linear layer of gpt2-tiny passes the FP8 filter "
                             "(h.0.attn.c_attn 64x192: first block")
    assert reason.endswith("nothing would run in FP8")


@needs_torchao
def test_nvfp4_is_unsupported_on_cpu_with_the_reason(tmp_path):
    out = tmp_path / "record.json"
    assert main(["cell", "--model", "gpt2-tiny", "--precision", "nvfp4", "--batch-size", "2",
                 "--device", "cpu", "--out", str(out)]) == 1
    record = json.loads(out.read_text())
    assert record["status"] == "unsupported"
    assert record["error"] == ("nvfp4 needs CUDA: torchao's NVFP4 training runs Triton kernels "
                               "only, with no emulation off the GPU")


@needs_torchao
@pytest.mark.parametrize("name", ["mxfp8", "nvfp4"])
def test_the_blackwell_formats_need_compute_capability_10(monkeypatch, name):
    _fake_cuda(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    assert precision.get(name).unsupported_reason(torch.device("cuda", 0)) == (
        f"{name} needs compute capability 10.0+ (this GPU, NVIDIA H100 80GB HBM3: 9.0)")
    assert precision.get("fp8-rowwise-gw-hp").unsupported_reason(torch.device("cuda", 0)) is None
    _fake_cuda(monkeypatch, (10, 0), "NVIDIA B200")
    assert precision.get(name).unsupported_reason(torch.device("cuda", 0)) is None


@needs_torchao
def test_an_mxfp8_cell_runs_emulated_end_to_end(tmp_path):
    out = tmp_path / "record.json"
    assert main(["cell", "--model", "gpt2-tiny", "--precision", "mxfp8", "--batch-size", "2",
                 "--warmup", "1", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert (record["status"], record["emulated"], record["fp8_converted"]) == ("ok", True, 8)
    assert (record["low_precision_format"], record["fp8_num_unconverted"]) == ("mxfp8", 0)


def test_the_report_groups_the_fp8_recipes_by_format(tmp_path):
    from bench.report import low_precision as table
    from bench.report.loading import aggregate

    base = {"model": "gpt2-small", "batch_size": 16, "seq_len": 1024, "status": "ok",
            "samples_per_s": 10.0, "device_name": "NVIDIA H100 80GB HBM3", "emulated": False}
    rows = [
        {**base, "precision": "bf16"},
        {**base, "precision": "fp8-filtered", "fp8_converted": 20, "fp8_num_unconverted": 28,
         "fp8_unconverted": "h.0.attn.c_attn (768x2304: first block)",
         "low_precision_format": "float8 tensorwise",
         "low_precision_filter": "in and out features multiples of 16; not in the first..."},
        {**base, "precision": "mxfp8", "status": "unsupported", "samples_per_s": None,
         "error": "mxfp8 needs compute capability 10.0+ (this GPU, NVIDIA H100: 9.0)"},
    ]

    class FakeRun:
        cells = aggregate(__import__("pandas").DataFrame(rows))

    lines = table.table(FakeRun(), "gpt2-small")
    text = "\n".join(lines)
    assert lines[0].startswith(f"**{table.TITLE}**")
    assert "| fp8-filtered | float8 tensorwise" in text and "| 20 " in text and "| 28 " in text
    assert "h.0.attn.c_attn (768x2304: first block)" in text
    assert "| mxfp8 " in text and "unsupported: mxfp8 needs compute capability 10.0+" in text
    assert "bf16 |" not in text.replace("in bf16", "")
    assert table.table(FakeRun(), "resnet50") == []
