from pathlib import Path

import pytest

from bench import BadInput, config, parity
from bench.cli import main
from bench.config import matrix

FIXTURES = Path(__file__).parent / "fixtures" / "matrix"


def test_gpu_preset_is_the_documented_sweep():
    m = config.gpu()
    axes = {a.name: (a.batch_sizes, a.resolved_size) for a in m.models}
    assert axes == {
        "resnet50": ((32, 64, 128, 256), 224),
        "bert-base": ((16, 32, 64, 128), 128),
        "gpt2-small": ((4, 8, 16, 32), 1024),
        "llama-small": ((4, 8, 16, 32), 1024),
        "llama-1b": ((1, 2, 4), 2048),
    }
    assert m.precisions == ("fp32", "tf32", "fp16", "bf16", *config.presets.FP8_FAMILY) and m.parity
    assert (m.world_size, m.nnodes) == ((1,), 1)
    assert m.compile == (False, True)  # eager and torch.compile, both reported


def test_cpu_preset_is_tiny_and_leaves_the_ablation_to_the_underflow_task():
    m = config.cpu()
    assert m.precisions == ("fp32", "fp16", "bf16")  # no emulated FP8, no tf32 (fp32 on a CPU)
    assert [a.name for a in m.models] == ["resnet-tiny", "bert-tiny", "gpt2-tiny", "llama-tiny"]
    assert len(matrix.expand(m)) <= 24 and m.device == "cpu" and m.parity
    # Its parity stage adds the underflow task, which judges fp16-noscale all the same.
    assert parity.tasks_for(m.precisions) == [parity.UNDERFLOW]
    assert parity.task_policies(parity.UNDERFLOW, ["fp32", "tf32", *m.precisions]) == [
        "fp32", "fp16", "bf16", "fp16-noscale"]
    assert parity.task_policies("gpt2-tiny", m.precisions) == list(m.precisions)
    quick = config.quick()
    assert len(matrix.expand(quick)) <= 6 and not quick.parity


def test_gpu_quick_is_one_batch_per_full_size_model_bf16_and_fp8_compiled():
    m = config.preset("gpu-quick")
    cells = matrix.expand(m)
    assert {(c.model, c.batch_size, c.seq_len or c.image_size) for c in cells} == {
        ("resnet50", 256, 224), ("bert-base", 64, 128), ("gpt2-small", 16, 1024),
        ("llama-small", 16, 1024)}
    eager = {(c.model, c.precision) for c in cells if not c.compile}
    assert len(eager) == 16 and {p for _, p in eager} == {"fp32", "tf32", "fp16", "bf16"}
    assert {(c.model, c.precision) for c in cells if c.compile} == {
        (model, policy) for model in ("resnet50", "bert-base", "gpt2-small", "llama-small")
        for policy in ("bf16", *config.presets.FP8_FAMILY)}  # FP8 compiled only
    assert len(cells) == 44 and m.device == "cuda" and m.parity
    assert (m.parity_steps, m.parity_seeds) == (40, 2)


def test_gpu_fsdp2_compares_the_recipes_under_ddp_and_fsdp2_on_every_gpu_of_the_node():
    m = config.preset("gpu-fsdp2")
    assert m.world_size == (matrix.NODE,) and m.device == "cuda" and m.parity
    assert m.strategies == ("ddp", "fsdp2:bf16/fp32")
    assert "fp16" not in m.precisions  # refused under bf16-gathered parameters
    assert config.from_dict(m.to_dict()) == m  # meta.json and to_toml carry "node"
    cells = matrix.expand(matrix.resolve_node(m, 8))  # on an 8-GPU node
    assert {(c.model, c.batch_size, c.seq_len) for c in cells} == {
        ("llama-small", 16, 1024), ("llama-1b", 4, 2048)}
    assert {c.world_size for c in cells} == {8}
    pure = ("bf16-pure", "bf16-pure-sr", "bf16-pure-kahan")
    fp8 = config.presets.FP8_FAMILY
    by_strategy = {s: {(c.model, c.precision, c.compile) for c in cells if c.strategy == s}
                   for s in m.strategies}
    expected = {(model, policy, compiled) for model in ("llama-small", "llama-1b")
                for policy in ("bf16", *pure) for compiled in (False, True)} | {
        (model, policy, True) for model in ("llama-small", "llama-1b") for policy in fp8}
    assert by_strategy["ddp"] == by_strategy["fsdp2:bf16/fp32"] == expected  # FP8 compiled only
    assert len(cells) == 2 * 2 * (4 * 2 + len(fp8)) == 56
    # On one GPU: each policy once, one process, no strategy to compare.
    one = matrix.expand(matrix.resolve_node(m, 1))
    assert len(one) == 28 and {(c.world_size, c.strategy) for c in one} == {(1, "ddp")}


def test_cpu_fsdp2_asks_gpu_fsdp2s_question_on_two_cpu_ranks():
    m = config.preset("cpu-fsdp2")
    assert m.device == "cpu" and m.parity and m.parity_strategy == "fsdp2:bf16/fp32"
    cells = matrix.expand(m)
    pure = ("bf16-pure", "bf16-pure-sr", "bf16-pure-kahan")
    assert {(c.precision, c.strategy) for c in cells} == {
        (p, s) for p in ("fp32", "bf16", *pure) for s in ("ddp", "fsdp2:bf16/fp32")}
    assert {(c.model, c.batch_size, c.world_size) for c in cells} == {("llama-tiny", 8, 2)}
    assert config.from_dict(m.to_dict()) == m


def test_compile_precisions_and_parity_length_come_from_toml_and_are_checked():
    m = config.from_dict({"models": {"gpt2-tiny": {"batch_sizes": [2]}}, "compile": [False, True],
                          "compile_precisions": ["fp16"], "parity_steps": 7, "parity_seeds": 2})
    assert [(c.precision, c.compile) for c in matrix.expand(m)] == [
        ("fp32", False), ("tf32", False), ("fp16", False), ("fp16", True), ("bf16", False)]
    assert (m.parity_steps, m.parity_seeds) == (7, 2)
    assert config.from_dict(m.to_dict()) == m
    with pytest.raises(BadInput, match="compile_precisions: unknown precision 'fp4'"):
        config.from_dict({"models": {"gpt2-tiny": {}}, "compile_precisions": ["fp4"]})
    with pytest.raises(BadInput, match="'parity_seeds' must be at least 2"):
        config.from_dict({"models": {"gpt2-tiny": {}}, "parity_seeds": 1})


def test_a_matrix_file_names_parity_tasks_by_their_names():
    mx = config.from_dict({"models": {"gpt2-tiny": {}}, "parity_tasks": ["gpt2-tiny-shakespeare"]})
    assert mx.parity_tasks == ("gpt2-tiny-shakespeare",)
    assert config.from_dict(mx.to_dict()).parity_tasks == mx.parity_tasks  # meta.json round trip
    with pytest.raises(BadInput, match="parity_tasks: unknown parity task 'shakespeare'"):
        config.from_dict({"models": {"gpt2-tiny": {}}, "parity_tasks": ["shakespeare"]})


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(BadInput,
                       match="unknown preset 'huge'; valid: gpu, gpu-quick, gpu-fsdp2, cpu, "
                             "cpu-shakespeare, cpu-fsdp2, quick, auto"):
        config.preset("huge")


def test_toml_maps_onto_the_dataclasses():
    m = config.load(FIXTURES / "good.toml")
    assert m.name == "fixture" and m.precisions == ("fp32", "bf16")
    assert (m.warmup, m.steps, m.repeats, m.device, m.timeout_s) == (0, 1, 2, "cpu", 60.0)
    assert m.grad_accum == (1, 2) and m.parity is False
    gpt, resnet = m.models
    assert (gpt.name, gpt.batch_sizes, gpt.resolved_size) == ("gpt2-tiny", (2, 4), 32)
    assert (resnet.batch_sizes, resnet.resolved_size) == ((2,), 32)  # default image size


def test_matrix_survives_a_round_trip_through_meta_json():
    for m in (config.gpu(), config.gpu_quick(), config.cpu(),
              config.load(FIXTURES / "good.toml")):
        assert config.from_dict(m.to_dict()) == m


@pytest.mark.parametrize(("name", "message"), [
    ("unknown_key.toml", "unknown key 'stepz'"),
    ("wrong_type.toml", "'models.gpt2-tiny.batch_sizes' must be a non-empty list of pos-int"),
    ("unknown_model.toml", "unknown model 'gpt5-huge'"),
    ("unknown_policy.toml", "unknown precision 'fp4'"),
    ("malformed.toml", "not valid TOML"),
])
def test_bad_toml_is_one_line_exit_2_and_nothing_written(name, message, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--matrix", str(FIXTURES / name), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err and name in err
    assert not out.exists()


@pytest.mark.parametrize(("data", "message"), [
    ({"models": {"gpt2-tiny": {"batch_sizes": [0]}}}, "at least 1"),
    ({"models": {"gpt2-tiny": {"batch_sizes": [2], "seq_len": 4096}}}, "context of 128"),
    ({"models": {"gpt2-tiny": {"batch_sizes": [2], "image_size": 64}}}, "does not apply"),
    ({"models": {"gpt2-tiny": {"batch_sizes": [2], "depth": 3}}}, "models.gpt2-tiny.depth"),
    ({"models": {"gpt2-tiny": {"batch_sizes": [2]}}, "steps": True}, "'steps' must be"),
    ({"models": {"gpt2-tiny": {"batch_sizes": [2]}}, "compile": "yes"}, "'compile' must be"),
    ({"precisions": ["fp32"]}, "missing 'models'"),
    ({"models": {"gpt2-tiny": {"batch_sizes": [2]}}, "repeats": 10**9},
     "'repeats' must be at most 1000, got 1000000000"),
    ({"models": {"gpt2-tiny": {"batch_sizes": [2**30]}}}, "'models.gpt2-tiny.batch_sizes' must"),
    ({"models": {"gpt2-tiny": {"batch_sizes": [2]}}, "timeout_s": float("inf")}, "positive"),
    ({"models": {"gpt2-tiny": {"batch_sizes": [2]}}, "timeout_s": float("nan")}, "positive"),
    ({"models": {"gpt2-tiny": {"batch_sizes": list(range(1, 1001))}}, "repeats": 200},
     "processes; at most 100000 in one run"),
])
def test_invalid_values_name_the_key(data, message):
    with pytest.raises(BadInput, match=message):
        config.from_dict(data, "x.toml")


def test_cli_overrides_replace_axes():
    m = config.override(config.cpu(), models_=["gpt2-tiny", "bert-base"],
                        precisions=["bf16"], batch_sizes=[3, 1], steps=2, repeats=3,
                        timeout_s=9.0, world_size=[1, 2])
    assert [a.name for a in m.models] == ["gpt2-tiny", "bert-base"]
    assert m.models[0].resolved_size == 64 and m.models[1].resolved_size == 128
    assert all(a.batch_sizes == (1, 3) for a in m.models)
    assert (m.precisions, m.steps, m.repeats, m.timeout_s, m.world_size) == (
        ("bf16",), 2, 3, 9.0, (1, 2))
    assert config.override(m) == m
    with pytest.raises(BadInput, match="unknown precision 'fp4'"):
        config.override(m, precisions=["fp4"])
    with pytest.raises(BadInput, match="unknown model 'llama'"):
        config.override(m, models_=["llama"])


def test_a_matrix_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "m.toml"
    path.write_bytes(b'name = "x"\n\xff = 1\n')
    assert main(["run", "--matrix", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == f"ampbench run: error: {path}: line 2: not UTF-8 text (TOML is UTF-8)\n"
    with pytest.raises(BadInput, match="a matrix must be a table, got list"):
        config.from_dict([1, 2], "meta.json")  # type: ignore[arg-type]


def test_overrides_refuse_empty_lists_and_absurd_counts():
    m = config.quick()
    for axis in ("models_", "precisions", "batch_sizes"):
        with pytest.raises(BadInput, match="an empty list"):
            config.override(m, **{axis: []})
    with pytest.raises(BadInput, match="'repeats' must be at most 1000"):
        config.override(m, repeats=1001)
    with pytest.raises(BadInput, match="'batch_sizes' must be at most"):
        config.override(m, batch_sizes=[2**21])
