"""The FP8 policies (torchao float8 training): conversion, emulated training on CPU, the record,
where FP8 is unsupported and why (a device without it, a model it would not touch), MFU's
peaks, and names validated without torch."""

import json
import sys

import pytest
import torch

from bench import config, precision
from bench.cell import flops
from bench.cell.main import prepare
from bench.cli import main
from bench.config import matrix


def _torchao_problem() -> str | None:
    try:
        import torchao.float8  # noqa: F401
    except Exception as exc:  # absent, or built for a torch this one is not
        return f"torchao is not importable here ({exc}); pip install -e .[fp8]"
    return None


needs_torchao = pytest.mark.skipif(_torchao_problem() is not None,
                                   reason=str(_torchao_problem()))
FP8 = ["fp8", "fp8-rowwise"]


@needs_torchao
@pytest.mark.parametrize("name", FP8)
def test_conversion_swaps_the_convertible_linears_and_names_the_others(name):
    from torchao.float8.float8_linear import Float8Linear

    policy = precision.get(name)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    net = policy.prepare_model(net)
    assert isinstance(net[0], Float8Linear)
    assert type(net[2]) is torch.nn.Linear  # 10 outputs: not a multiple of 16, stays bf16
    assert net[0].config.emulate  # on CPU: torchao's emulation, not FP8 hardware
    fields = policy.record_fields(net)
    assert (fields["emulated"], fields["fp8_converted"], fields["fp8_unconverted"],
            fields["fp8_num_unconverted"]) == (True, 1, "2 (64x10)", 1)


@needs_torchao
def test_the_tiny_models_convert_every_linear_but_resnets_classifier():
    fields = {m: prepare(m, "fp8", batch_size=2).conversion
              for m in ("gpt2-tiny", "bert-tiny", "resnet-tiny")}
    assert fields["gpt2-tiny"] == {
        "emulated": True, "fp8_converted": 8, "fp8_unconverted": "none", "fp8_num_unconverted": 0,
        "low_precision_format": "float8 tensorwise",
        "low_precision_filter": "in and out features multiples of 16"}
    assert fields["bert-tiny"]["fp8_converted"] == 9
    assert (fields["resnet-tiny"]["fp8_converted"], fields["resnet-tiny"]["fp8_unconverted"]) == (
        0, "fc (64x10)")


@needs_torchao
def test_a_long_list_of_unconverted_layers_is_cut_short():
    net = torch.nn.Sequential(*(torch.nn.Linear(10, 10) for _ in range(11)))
    fields = precision.get("fp8").record_fields(precision.get("fp8").prepare_model(net))
    assert fields["fp8_converted"] == 0
    assert fields["fp8_unconverted"].endswith("7 (10x10) and 3 more")


@needs_torchao
@pytest.mark.parametrize("name", FP8)
def test_an_emulated_fp8_training_step_on_cpu_learns_with_finite_loss(name):
    from torchao.float8.float8_linear import Float8Linear

    trainer = prepare("gpt2-tiny", name, batch_size=2)
    fp8 = [m.weight for m in trainer.model.modules() if isinstance(m, Float8Linear)]
    before = [w.detach().clone() for w in fp8]
    losses = torch.stack([trainer.step() for _ in range(3)])
    assert torch.isfinite(losses).all()
    assert trainer.optimizer_steps() == 3 and not trainer.scaler.is_enabled()
    assert len(fp8) == 8 and all(not torch.equal(a, w) for a, w in zip(before, fp8, strict=True))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # FP32 masters


@needs_torchao
def test_the_cell_record_says_emulated_and_the_summary_warns(tmp_path, capsys):
    out = tmp_path / "record.json"
    assert main(["cell", "--model", "gpt2-tiny", "--precision", "fp8-rowwise", "--batch-size",
                 "2", "--warmup", "1", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["status"] == "ok" and record["precision"] == "fp8-rowwise"
    assert record["emulated"] is True
    assert (record["fp8_converted"], record["fp8_unconverted"]) == (8, "none")
    assert record["flops_per_step"] > 0 and record["mfu_fp8_pct"] is None  # a CPU: no peaks
    assert record["mfu_flag"] == f"no peak for '{record['device_name']}'"
    assert "[emulated: software FP8" in capsys.readouterr().err


@needs_torchao
@pytest.mark.parametrize("model, classifier", [("resnet-tiny", "fc 64x10"),
                                               ("resnet50", "fc 2048x1000")])
def test_a_model_with_no_convertible_layer_is_unsupported_before_anything_is_built(
        tmp_path, monkeypatch, capsys, model, classifier):
    import bench.cell.main

    def build(*args, **kwargs):
        raise AssertionError("an FP8 cell that converts nothing built its model")

    monkeypatch.setattr(bench.cell.main, "prepare", build)
    monkeypatch.setattr(bench.cell.main, "count_training_flops", build)
    out = tmp_path / "record.json"
    assert main(["cell", "--model", model, "--precision", "fp8", "--batch-size", "2",
                 "--device", "cpu", "--compile", "--out", str(out)]) == 1
    record = json.loads(out.read_text())
    assert record["status"] == "unsupported"
    assert record["error"] == (
        f"no Linear layer of {model} is convertible to FP8 ({classifier}: both dimensions must "
        "be multiples of 16); nothing would run in FP8")
    assert record["flops_per_step"] is None and record["step_ms_median"] is None
    assert f"{model} fp8 b=2" in capsys.readouterr().err


@needs_torchao
def test_a_model_with_a_convertible_layer_is_supported():
    import models

    for name in FP8:
        for model in ("gpt2-tiny", "bert-tiny", "gpt2-small"):
            assert precision.get(name).unsupported_reason(torch.device("cpu"),
                                                          models.get(model)) is None
    # A policy without FP8 never asks the model.
    assert precision.get("bf16").unsupported_reason(torch.device("cpu"),
                                                    models.get("resnet50")) is None


@needs_torchao
def test_parity_skips_a_model_fp8_would_not_touch_and_says_why(tmp_path, monkeypatch, capsys):
    from bench import parity
    from bench.parity import stage

    trained = []

    def fake_train_pair(runs, *args, **kwargs):  # the runs one child would train
        trained.extend((run.model, run.precision) for run in runs)
        return {run.key: stage._failed(run, "not trained in this test") for run in runs}

    monkeypatch.setattr(stage, "_train_pair", fake_train_pair)
    parity.run_parity(tmp_path, models=["resnet-tiny"], precisions=["fp32", "fp8"], seeds=2,
                      steps=2, device="cpu")
    assert trained == [("resnet-tiny", "fp32")] * 2
    assert ("parity: skipping resnet-tiny fp8: no Linear layer of resnet-tiny is convertible "
            "to FP8") in capsys.readouterr().err


def test_a_policy_without_fp8_records_nothing_emulated():
    trainer = prepare("gpt2-tiny", "bf16", batch_size=2)
    assert trainer.conversion == {"emulated": False}


def _fake_cuda(monkeypatch, capability, name):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@needs_torchao
@pytest.mark.parametrize("name", FP8)
def test_fp8_is_unsupported_before_compute_capability_8_9(monkeypatch, name):
    _fake_cuda(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    reason = precision.get(name).unsupported_reason(torch.device("cuda", 0))
    assert reason == ("NVIDIA A100-SXM4-80GB has no FP8 tensor cores (compute capability 8.0; "
                      "FP8 needs 8.9 or newer: Ada, Hopper, Blackwell)")
    assert precision.get("bf16").unsupported_reason(torch.device("cuda", 0)) is None


@needs_torchao
@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0)])
def test_fp8_runs_on_ada_hopper_and_blackwell(monkeypatch, capability):
    _fake_cuda(monkeypatch, capability, "some GPU")
    assert precision.get("fp8").unsupported_reason(torch.device("cuda", 0)) is None


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_without_torchao_the_reason_says_how_to_install_it(monkeypatch, device):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now fails
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    reason = precision.get("fp8").unsupported_reason(torch.device(device))
    assert reason is not None and reason.startswith("FP8 needs torchao (")
    assert reason.endswith("install it with: pip install -e .[fp8]")
    assert precision.get("bf16").unsupported_reason(torch.device("cpu")) is None


def test_mfu_of_fp8_cells_is_against_the_bf16_peak_and_its_own_column_the_fp8_peak():
    assert flops.math_kind("fp8") == flops.math_kind("fp8-rowwise") == "bf16"
    h100 = "NVIDIA H100 80GB HBM3"
    assert flops.peak_tflops(h100, "fp8-rowwise") == flops.peak_tflops(h100, "bf16") == 989.0
    fields = flops.mfu_fields(989e12, 2.0, h100, "fp8")
    assert fields["mfu_pct"] == pytest.approx(50.0)
    assert fields["peak_fp8_tflops"] == 1979.0
    assert fields["mfu_fp8_pct"] == pytest.approx(100 * 989 / 2 / 1979)
    assert flops.mfu_fields(989e12, 2.0, h100, "bf16")["mfu_fp8_pct"] is None


def test_the_fp8_policies_are_bf16_autocast_without_loss_scaling():
    for name in FP8:
        policy = precision.get(name)
        assert (policy.autocast_dtype, policy.loss_scaling, policy.tf32) == (
            "bfloat16", False, False)
    assert precision.get("fp8").fp8_recipe == "tensorwise"
    assert precision.get("fp8-rowwise").fp8_recipe == "rowwise"


def test_presets_gpu_has_fp8_eager_and_compiled_gpu_quick_compiled_only_cpu_none():
    gpu = {(c.precision, c.compile) for c in matrix.expand(config.gpu())}
    assert {("fp8", False), ("fp8", True), ("fp8-rowwise", False), ("fp8-rowwise", True)} <= gpu
    quick = [c for c in matrix.expand(config.gpu_quick()) if c.precision in FP8]
    # One batch per model in gpu-quick: each model once per FP8 policy, compiled only.
    assert len(quick) == 2 * len(config.gpu_quick().models) and all(c.compile for c in quick)
    assert not {c.precision for c in matrix.expand(config.cpu())} & set(FP8)


def test_compile_only_without_a_compiled_axis_keeps_the_eager_cells():
    m = config.from_dict({"models": {"gpt2-tiny": {"batch_sizes": [2]}},
                          "precisions": ["bf16", "fp8"], "compile_only": ["fp8"]})
    assert {(c.precision, c.compile) for c in matrix.expand(m)} == {
        ("bf16", False), ("fp8", False)}  # compile = [false]: nothing would run fp8 otherwise
    m = config.override(m, compile=[False, True])
    assert {(c.precision, c.compile) for c in matrix.expand(m)} == {
        ("bf16", False), ("bf16", True), ("fp8", True)}


def test_fp8_names_are_validated_without_torch(run_python):
    code = (
        "import sys\n"
        "from bench import BadInput, config, precision\n"
        "assert precision.get('fp8').fp8_recipe == 'tensorwise'\n"
        "m = config.from_dict({'models': {'gpt2-tiny': {'batch_sizes': [2]}},\n"
        "                      'precisions': ['fp8', 'fp8-rowwise'], 'compile_only': ['fp8']})\n"
        "config.override(m, precisions=['fp8-rowwise'])\n"
        "for bad in ({'precisions': ['fp8-blockwise']}, {'compile_only': ['fp9']}):\n"
        "    try:\n"
        "        config.from_dict({'models': {'gpt2-tiny': {}}, **bad})\n"
        "    except BadInput as exc:\n"
        "        assert 'fp8-rowwise' in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError(bad)\n"
        "assert 'torch' not in sys.modules and 'torchao' not in sys.modules\n"
    )
    run_python(code)


@pytest.mark.parametrize("asked, expected", [
    (None, ["fp32", "tf32", "fp16", "bf16", "fp16-noscale"]),  # emulated FP8 only on request
    (["fp8"], ["fp32", "fp8"]),
])
def test_parity_on_cpu_leaves_emulated_fp8_out_unless_asked(tmp_path, monkeypatch, asked,
                                                           expected):
    from bench import parity

    seen = {}

    def fake_run_all(run_dir, model_names, chosen, *rest):
        seen["chosen"] = list(chosen)
        return run_dir / "parity.csv"

    monkeypatch.setattr(parity.stage, "_run_all", fake_run_all)
    parity.run_parity(tmp_path, models=["gpt2-tiny"], precisions=asked, seeds=2, device="cpu")
    assert seen["chosen"] == expected
