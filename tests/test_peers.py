"""Peers: our models compute what transformers' and torchvision's compute, weight for weight."""

from __future__ import annotations

import csv
import importlib
import os
import subprocess
import sys

import pytest

import models
from bench import peers
from bench.cli import main


def _equivalence(model: str, batch_size: int = 2, size: int | None = None) -> peers.Equivalence:
    return peers.compare_fresh(model, batch_size, size or models.get(model).default_size)


def _torchvision() -> None:
    """Skip, naming why, where torchvision does not import (absent, or built for another torch:
    PyPI's torchvision beside a local CPU build of torch fails on its C++ operators)."""
    try:
        importlib.import_module("torchvision")
    except Exception as exc:  # a torchvision built for another torch fails with more than this
        first = (str(exc).splitlines() or [""])[0]
        pytest.skip(f"torchvision does not import ({type(exc).__name__}: {first}); it is in "
                    "the peers extra: pip install -e .[peers]")


def _transformers():
    """transformers, or a skip naming the extra that has it."""
    return pytest.importorskip("transformers", reason="transformers is not installed (the peers "
                               "extra: pip install -e .[peers])")


@pytest.mark.parametrize("model", ["gpt2-tiny", "bert-tiny", "llama-tiny"])
def test_tiny_transformers_equal_their_peers(model):
    _transformers()
    eq = _equivalence(model)
    assert eq.params_ours == eq.params_peer
    assert eq.logit_max_abs_diff < 1e-5
    # Train mode with the same seed: dropout sits in the same places and draws the same masks.
    assert eq.logit_max_abs_diff_train < 1e-5
    assert eq.loss_abs_diff < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2-small", "bert-base", "llama-small"])
def test_full_size_transformers_equal_their_peers(model):
    _transformers()
    eq = _equivalence(model, batch_size=1, size=64)
    assert eq.params_ours == eq.params_peer
    assert eq.logit_max_abs_diff < 1e-4
    assert eq.loss_abs_diff < 1e-4


@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_resnets_equal_torchvision_in_eval_and_train_mode(model):
    _torchvision()
    eq = _equivalence(model, size=64)
    assert eq.params_ours == eq.params_peer == {"resnet18": 11_689_512,
                                                "resnet50": 25_557_032}[model]
    # The same kernels in the same order: exactly equal, BatchNorm's running statistics (eval)
    # and the batch's (train) alike.
    assert eq.logit_max_abs_diff == 0.0
    assert eq.logit_max_abs_diff_train == 0.0
    assert eq.loss_abs_diff == 0.0


def test_compare_leaves_batchnorm_statistics_and_modes_as_they_were():
    _torchvision()
    import torch

    spec = models.get("resnet18")
    ours, peer = spec.build(), peers.build_peer("resnet18")
    peers.copy_weights("resnet18", ours, peer)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    inputs, targets = spec.make_batch(2, 64, seed=1)
    peers.compare("resnet18", ours, peer, inputs, targets)
    assert ours.training and peer.training
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(peer.bn1.running_mean, before["bn1.running_mean"])


def test_a_peer_parameter_ours_lacks_is_named():
    transformers = _transformers()
    cfg = models.get("gpt2-tiny").config
    peer = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer + 1, n_head=cfg.n_head))
    with pytest.raises(ValueError, match=r"transformer\.h\.2\.attn\.c_attn\.weight"):
        peers.copy_weights("gpt2-tiny", models.get("gpt2-tiny").build(), peer)


def test_peers_cli_writes_the_table_and_csv(tmp_path, capsys):
    _transformers()
    out = tmp_path / "new" / "peers.csv"  # its directory is made
    assert main(["peers", "--models", "gpt2-tiny", "--precisions", "fp32,bf16", "--steps", "2",
                 "--warmup", "1", "--device", "cpu", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["model"], r["precision"], r["status"]) for r in rows] == [
        ("gpt2-tiny", "fp32", "ok"), ("gpt2-tiny", "bf16", "ok")]
    assert float(rows[0]["logit_max_abs_diff"]) < 1e-5
    assert float(rows[0]["ratio_ours_per_peer_median"]) > 0
    assert "gpt2-tiny" in capsys.readouterr().out


def test_a_failing_pair_is_its_row_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    _transformers()
    real = peers.race

    def race(ours, peer, warmup, steps):
        if ours.policy.name == "fp32":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(ours, peer, warmup, steps)

    monkeypatch.setattr(peers, "race", race)
    out = tmp_path / "peers.csv"
    assert main(["peers", "--models", "gpt2-tiny,bert-tiny", "--precisions", "fp32,bf16",
                 "--steps", "2", "--warmup", "1", "--device", "cpu", "--out", str(out)]) == 1
    rows = list(csv.DictReader(out.open()))
    assert [(r["model"], r["precision"], r["status"].split(":")[0]) for r in rows] == [
        ("gpt2-tiny", "fp32", "oom"), ("gpt2-tiny", "bf16", "ok"),
        ("bert-tiny", "fp32", "oom"), ("bert-tiny", "bf16", "ok")]
    assert "out of memory" in rows[0]["status"]
    # The equivalence was measured before the race failed: the row keeps it.
    assert float(rows[0]["logit_max_abs_diff"]) < 1e-5
    assert "gpt2-tiny fp32: oom" in capsys.readouterr().err


def test_out_dir_writes_peers_csv_with_the_columns_the_report_reads(tmp_path):
    _torchvision()
    run_dir = tmp_path / "run"
    assert main(["peers", "--models", "resnet18", "--precisions", "fp32", "--batch-size", "2",
                 "--image-size", "64", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--out-dir", str(run_dir)]) == 0
    with (run_dir / peers.PEERS_CSV).open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == peers.COLUMNS
        (row,) = list(reader)
    assert (row["model"], row["precision"], row["status"]) == ("resnet18", "fp32", "ok")
    assert row["peer"] == "torchvision.models.resnet18" and row["peer_version"]
    assert (row["batch_size"], row["image_size"], row["seq_len"]) == ("2", "64", "")
    assert row["params_ours"] == row["params_peer"] == "11689512"
    assert float(row["logit_max_abs_diff"]) == float(row["logit_max_abs_diff_train"]) == 0.0
    assert float(row["ours_step_ms_median"]) > 0 and float(row["peer_step_ms_median"]) > 0
    assert row["device"] == "cpu" and row["torch_version"]


def _without(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make importing ``names`` fail in bench.peers, as on a machine without them."""
    real = importlib.import_module

    def fake(name: str, *args: object) -> object:
        if name in names:
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)


def test_a_named_model_without_its_peer_library_is_one_line_and_exit_2(monkeypatch, capsys):
    _without(monkeypatch, "transformers")
    assert main(["peers", "--models", "gpt2-tiny", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "transformers" in err and "pip install -e .[peers]" in err


def test_resnet50_without_torchvision_is_one_line_and_exit_2(capsys):
    try:
        importlib.import_module("torchvision")
    except Exception:  # absent, or installed but broken: the same one line
        pass
    else:
        pytest.skip("torchvision imports here")
    assert main(["peers", "--models", "resnet50"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torchvision" in err and ".[peers]" in err, err


def test_the_default_set_without_peer_libraries_is_skipped_rows(monkeypatch, capsys, tmp_path):
    _without(monkeypatch, "transformers", "torchvision")
    assert main(["peers", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for model in peers.DEFAULT_MODELS:
        assert f"| {model}" in out
    assert out.count("skipped") == len(peers.DEFAULT_MODELS)
    with (tmp_path / peers.PEERS_CSV).open() as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == list(peers.DEFAULT_MODELS)
    assert all(r["status"].startswith("skipped: ") and r["peer"] for r in rows)


def test_a_model_without_a_peer_is_bad_input(capsys):
    assert main(["peers", "--models", "resnet-tiny"]) == 2
    assert "no peer" in capsys.readouterr().err


def test_peers_makes_the_requested_gpu_current_before_it_builds_or_times(monkeypatch):
    # Only the hardware is faked: a cuda:1 that resolves, and set_device's calls logged.
    import torch

    _without(monkeypatch, "transformers", "torchvision")  # no peer library imports: fast
    gpu1 = torch.device("cuda", 1)
    monkeypatch.setattr(peers, "resolve_device", lambda name: gpu1 if name == "cuda:1" else None)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    seen = []

    def run(args, chosen, policies, missing, device, out):
        seen.append((device, list(current)))
        return 0

    monkeypatch.setattr(peers, "_run", run)
    assert main(["peers", "--device", "cuda:1"]) == 0
    assert seen == [(gpu1, [gpu1])]


def test_one_timed_step_has_no_spread_and_says_so(tmp_path, capsys):
    _transformers()
    from bench import report, store

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    store.write_csv(run_dir, [store.empty_record(
        cell_id="c", repeat=0, model="gpt2-tiny", precision="fp32", batch_size=1, seq_len=64,
        status="ok", samples_per_s=10.0, step_ms_median=10.0, step_ms_iqr=0.1)])
    assert main(["peers", "--models", "gpt2-tiny", "--precisions", "fp32", "--steps", "1",
                 "--warmup", "0", "--device", "cpu", "--out-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "ratio_ours_per_peer_iqr is empty: 1 timed step has no spread" in out
    (row,) = list(csv.DictReader((run_dir / peers.PEERS_CSV).open()))
    assert row["status"] == "ok" and row["ratio_ours_per_peer_iqr"] == ""  # not 0
    assert float(row["ratio_ours_per_peer_median"]) > 0
    assert "(IQR n/a: 1 step has no spread)" in report.render(report.load(run_dir))
    # Two steps have one.
    import torch

    assert peers.run_model("gpt2-tiny", ["fp32"], 1, 64, torch.device("cpu"), 0, 2)[0][
        "ratio_ours_per_peer_iqr"] >= 0


_BROKEN_TORCHVISION = ('__version__ = "0.28.0"\n'
                       'raise RuntimeError("operator torchvision::nms does not exist")\n')


def test_a_broken_torchvision_is_named_and_the_peers_without_it_still_run(tmp_path, cli_env):
    _transformers()
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(_BROKEN_TORCHVISION)  # built for another torch
    env = {**cli_env, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{cli_env['PYTHONPATH']}"}
    code = ("import sys\nimport bench.peers as p\np.DEFAULT_MODELS = ('gpt2-tiny', 'resnet18')\n"
            "from bench.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    common = ["peers", "--precisions", "fp32", "--steps", "2", "--warmup", "0", "--device",
              "cpu"]
    done = subprocess.run([sys.executable, "-c", code, *common], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    said = ("resnet18's peer needs torchvision, which is installed but fails to import "
            "(RuntimeError: operator torchvision::nms does not exist): a torchvision built for "
            "another torch")
    assert said in done.stderr and "fix: install the torchvision built for this torch" in (
        done.stderr)
    assert "Could not import module" not in done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| gpt2-tiny") and "| ok " in r for r in rows), done.stdout
    assert any(r.startswith("| resnet18") and "skipped: " in r for r in rows), done.stdout
    # Named, the ResNet is one line and exit 2, with the same cause and fix.
    named = subprocess.run([sys.executable, "-m", "bench", *common, "--models", "resnet18"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert named.returncode == 2 and named.stderr.count("\n") == 1, named.stderr
    assert said in named.stderr
