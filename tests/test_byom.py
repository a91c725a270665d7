"""A model of your own (models/external.py, bench/cell/check.py): named by file, module or hf:
reference, read torch-free, checked before any cell starts, benchmarked, judged by parity and
never compared with an old baseline once its source changed."""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from bench import BadInput, config, parity, store
from bench.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "my_model.py"

# A module that works: every bad module below is this with one thing wrong.
GOOD = textwrap.dedent("""\
    import torch
    from torch import nn

    SIZES = {"small": 4}

    def build(c):
        return nn.Linear(c, 2)

    def make_batch(c, b, size, g):
        return torch.randn(b, c, generator=g), torch.randint(0, 2, (b,), generator=g)

    def loss(m, x, y):
        return nn.functional.cross_entropy(m(x), y)
""")
BAD = {
    "import_error": ("import not_a_module_anywhere\n" + GOOD,
                     "cannot import it: ModuleNotFoundError: No module named "
                     "'not_a_module_anywhere'"),
    "no_build": (GOOD.replace("def build(c):\n    return nn.Linear(c, 2)\n", ""),
                 "defines no build"),
    "sizes_not_a_dict": (GOOD.replace('SIZES = {"small": 4}', "SIZES = [4]"),
                         "SIZES must be a dict of named configs, not a list"),
    "list_of_ints": (GOOD.replace(
        "return torch.randn(b, c, generator=g), torch.randint(0, 2, (b,), generator=g)",
        "return [1, 2], [3]"), "make_batch's inputs: a list of int, not a tensor"),
    "non_scalar_loss": (GOOD.replace("cross_entropy(m(x), y)",
                                     "cross_entropy(m(x), y, reduction='none')"),
                        "loss returned a tensor of shape (2,), not a scalar"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _run_argv(model: str, out: Path, *extra: str) -> list[str]:
    return ["run", "--models", model, "--precisions", "fp32,bf16", "--batch-sizes", "2",
            "--steps", "2", "--warmup", "1", "--repeats", "1", "--calibration", "0",
            "--device", "cpu", "--no-parity", "--no-report", "--out", str(out), *extra]


def test_file_and_module_references_are_read_without_torch_or_running_them(tmp_path,
                                                                           run_python):
    # The module would fail if it ran (and torch cannot be imported): the runner reads its
    # card with ast, and hashes its bytes.
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    _write(pkg / "__init__.py", "")
    source = ('import torch\nraise RuntimeError("ran")\nUNIT = "sequence"\n'
              'DEFAULT_SIZE = 64\nMAX_SIZE = 128\nDEFAULT_BATCH_SIZE = 8\n'
              'SIZES = {"tiny": 1, "small": 2}\n')
    path = _write(pkg / "my_model.py", source)
    digest = hashlib.sha256(source.encode()).hexdigest()
    code = textwrap.dedent(f"""\
        import sys
        sys.modules["torch"] = None
        sys.path.insert(0, {str(tmp_path)!r})
        import models
        from bench import config
        for name, source in (({str(path)!r} + ":small", {str(path)!r}),
                             ("my_pkg.my_model:tiny", "my_pkg.my_model")):
            spec = models.get(name)
            assert (spec.name, spec.source, spec.source_sha256) == (name, source, {digest!r})
            assert (spec.unit, spec.size_arg, spec.default_size, spec.max_size,
                    spec.default_batch_size) == ("sequence", "seq_len", 64, 128, 8), spec
            assert spec.size == name.rsplit(":", 1)[1]
            mx = config.override(config.quick(), models_=[name])
            (cell, *_) = config.expand(mx)
            assert (cell.model, cell.seq_len, cell.image_size, cell.batch_size) == (
                name, 64, None, 8)
            assert spec.check_size(129) and not spec.check_size(128)
        assert sys.modules["torch"] is None and "my_pkg.my_model" not in sys.modules
    """)
    run_python(code)


def test_a_reference_round_trips_through_toml_and_meta_json(tmp_path):
    name = f"{EXAMPLE}:tiny"
    mx = config.override(config.quick(), models_=[name], batch_sizes=[2, 4])
    path = _write(tmp_path / "m.toml", config.to_toml(mx))
    assert f'[models."{name}"]' in path.read_text()
    assert config.load(path) == mx
    assert config.from_dict(json.loads(json.dumps(mx.to_dict()))) == mx
    # A "sample" model has no size axis: no seq_len or image_size in its cells or its table.
    assert mx.to_dict()["models"][name] == {"batch_sizes": [2, 4]}
    assert {(c.seq_len, c.image_size) for c in config.expand(mx)} == {(None, None)}
    bad = _write(tmp_path / "bad.toml", f'[models."{name}"]\nseq_len = 8\n')
    with pytest.raises(BadInput, match=r"'models.*seq_len' does not apply .* fixed-size input"):
        config.load(bad)


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_module_is_one_line_naming_its_file_before_any_cell(case, tmp_path, capsys):
    text, problem = BAD[case]
    path = _write(tmp_path / f"{case}.py", text)
    out = tmp_path / "run"
    assert main(_run_argv(f"{path}:small", out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: {problem}" in err, err
    assert not out.exists()  # no record, no meta.json: nothing started


def test_an_unknown_size_or_a_missing_file_is_one_line_before_the_probe(tmp_path, capsys):
    path = _write(tmp_path / "good.py", GOOD)
    for model, problem in ((f"{path}:large", f"{path}: no size 'large' in SIZES; sizes: small"),
                           (str(path), f"{path}: name a size after a colon"),
                           (f"{tmp_path}/none.py:small", "cannot read the model file")):
        assert main(_run_argv(model, tmp_path / "run")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and problem in err, err
    assert not (tmp_path / "run").exists()


def test_a_cell_checks_the_module_in_its_own_process(tmp_path, capsys):
    text, problem = BAD["non_scalar_loss"]
    path = _write(tmp_path / "bad.py", text)
    argv = ["cell", "--model", f"{path}:small", "--precision", "fp32", "--batch-size", "2",
            "--steps", "1", "--warmup", "0", "--device", "cpu"]
    assert main(argv) == 2
    assert f"{path}: {problem}" in capsys.readouterr().err


def test_tuple_and_dict_batches_train(tmp_path, capsys):
    # inputs a dict, targets a tuple: the cell moves both and the loss takes them as they are.
    text = GOOD.replace(
        "return torch.randn(b, c, generator=g), torch.randint(0, 2, (b,), generator=g)",
        "return {'x': torch.randn(b, c, generator=g)}, "
        "(torch.randint(0, 2, (b,), generator=g),)").replace(
        "cross_entropy(m(x), y)", "cross_entropy(m(x['x']), y[0])")
    path = _write(tmp_path / "dicts.py", text)
    out = tmp_path / "record.json"
    assert main(["cell", "--model", f"{path}:small", "--precision", "bf16", "--batch-size", "4",
                 "--steps", "2", "--warmup", "1", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    # One Linear(4, 2): 2 FLOPs per MAC, forward and the weight's gradient (no input gradient).
    assert record["status"] == "ok" and record["flops_per_step"] == 2 * 2 * 4 * 4 * 2


def test_fp8_on_a_model_without_a_convertible_linear_is_unsupported_with_why(tmp_path):
    pytest.importorskip("torch")
    import models
    from bench import precision

    spec = models.get(f"{_write(tmp_path / 'small.py', GOOD)}:small")
    reason = precision.get("fp8").model_reason(spec)
    assert reason and "no Linear layer" in reason and "4x2" in reason
    assert precision.get("fp8").model_reason(models.get(f"{EXAMPLE}:tiny")) is None


def _flops_of_example_step(batch: int) -> int:
    # FlopCounterMode counts matmuls: 2 FLOPs per MAC forward, twice that backward, except the
    # first layer's input gradient, which nothing needs (tiny: 32 -> 64 -> 64 -> 8 classes).
    macs = 32 * 64 + 64 * 64 + 64 * 8
    return batch * (2 * macs + 4 * macs - 2 * 32 * 64)


def _example_run(model: Path, out: Path) -> None:
    assert main(_run_argv(f"{model}:tiny", out)) == 0
    records = store.load_records(out)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    assert sorted(r["precision"] for r in records) == ["bf16", "fp32"]
    for record in records:
        assert record["status"] == "ok", record["error"]
        assert (record["model"], record["model_source"], record["model_sha256"]) == (
            f"{model}:tiny", str(model), digest)
        assert record["flops_per_step"] == _flops_of_example_step(2)
        assert record["seq_len"] is None and record["image_size"] is None


def test_the_max_batch_search_runs_on_a_user_model(tmp_path, monkeypatch):
    # A memory ceiling injected in the cell child (bench/cell/main.py): batch 5 fits, 6 does
    # not, so the search doubles 2 -> 4 -> 8 (oom) and bisects to 5, all in the module's cells.
    monkeypatch.setenv("AMPBENCH_FAULT_MAX_BATCH", "5")
    model = _write(tmp_path / "mine.py", GOOD)
    out = tmp_path / "run"
    argv = _run_argv(f"{model}:small", out, "--find-max-batch")
    argv[argv.index("fp32,bf16")] = "fp32"
    assert main(argv) == 0
    [record] = store.load_records(out)
    assert record["max_batch_search"] is True and record["max_batch"] == 5
    assert record["status"] == "ok" and record["batch_size"] == 5
    assert record["model"] == f"{model}:small" and record["model_sha256"]


def test_the_example_runs_end_to_end(tmp_path):
    _example_run(EXAMPLE, tmp_path / "run")
    assert main(["gate", "--baseline", str(tmp_path / "run"), "--current",
                 str(tmp_path / "run")]) == 0


@pytest.mark.slow
def test_a_changed_model_file_makes_the_gate_refuse_the_comparison(tmp_path, capsys):
    model = tmp_path / "my_model.py"
    shutil.copy(EXAMPLE, model)
    base = tmp_path / "base"
    _example_run(model, base)
    model.write_text(model.read_text() + "\n# changed\n")
    current = tmp_path / "current"
    assert main(_run_argv(f"{model}:tiny", current)) == 0
    capsys.readouterr()
    assert main(["gate", "--baseline", str(base), "--current", str(current)]) == 1
    out = capsys.readouterr().out
    assert out.count("the model changed") == 2 and "not comparable" in out, out
    assert "samples_per_s" not in out.split("FAIL", 1)[1].split("\n", 1)[0]


def test_the_gate_fails_a_cell_whose_model_changed_and_compares_the_others():
    from bench.analysis import gate
    from bench.analysis.checks import parse_checks

    def rows(sha: str | None) -> pd.DataFrame:
        return pd.DataFrame([
            {**dict.fromkeys(store.FIELDS), "model": "m.py:small", "precision": "fp32",
             "batch_size": 2, "status": "ok", "samples_per_s": 100.0, "step_ms_median": 20.0,
             "step_ms_iqr": 0.1, "device_name": "cpu", "model_sha256": sha, "repeat": r}
            for r in range(3)])

    checks = parse_checks(None)
    same = gate.compare(rows("a" * 64), rows("a" * 64), checks)
    assert not same.failed
    changed = gate.compare(rows("a" * 64), rows("b" * 64), checks)
    assert changed.failed and [f.what for f in changed.findings] == ["model"]
    assert "aaaaaaaaaaaa in the baseline, bbbbbbbbbbbb now" in changed.findings[0].detail


@pytest.mark.slow
def test_parity_judges_the_example_on_its_own_data(tmp_path):
    out = tmp_path / "parity"
    code = main(["parity", "--models", f"{EXAMPLE}:tiny", "--precisions", "fp32,bf16",
                 "--seeds", "2", "--steps", "20", "--device", "cpu", "--out", str(out)])
    frame = pd.read_csv(out / "parity.csv")
    assert code in (0, 1) and sorted(set(frame["precision"])) == ["bf16", "fp32"]
    assert set(frame["verdict"]) <= set(parity.VERDICTS) and frame["eval_accuracy"].isna().all()
    # It learned: the held-out loss fell from where it started.
    assert (frame["eval_loss"] < frame["initial_eval_loss"]).all()


def test_an_hf_reference_runs_one_cell_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    directory = tmp_path / "tiny-llama"
    directory.mkdir()
    _write(directory / "config.json", json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}))
    name = f"hf:{directory}:num_hidden_layers=1"
    out = tmp_path / "run"
    assert main(["run", "--models", name, "--precisions", "fp32", "--batch-sizes", "2",
                 "--steps", "1", "--warmup", "0", "--calibration", "0", "--device", "cpu",
                 "--no-parity", "--no-report", "--out", str(out)]) == 0
    (record,) = store.load_records(out)
    assert record["status"] == "ok", record["error"]
    assert (record["model"], record["model_source"]) == (name, name)
    assert record["model_sha256"] and record["seq_len"] == 64 and record["flops_per_step"] > 0


def test_the_device_probe_checks_each_module_and_counts_its_flops(tmp_path):
    from bench.config import Cell
    from bench.run import device

    bad = _write(tmp_path / "bad.py", BAD["list_of_ints"][0])
    example = f"{EXAMPLE}:tiny"
    cell = Cell(example, "fp32", 4, grad_accum=2)
    found = device.probe("cpu", [cell], [(example, None), (f"{bad}:small", None)])
    # The example's FLOPs, counted once on the check's step, price its cells (--time-budget).
    assert found.flops_per_step == {cell.cell_id: _flops_of_example_step(4) * 2}
    assert found.model_problems == {f"{bad}:small": f"{bad}: {BAD['list_of_ints'][1]} "
                                    "or a tuple or dict of tensors"}
    with pytest.raises(BadInput, match="make_batch's inputs"):
        found.checked_models()
