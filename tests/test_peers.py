"""Peers: our models compute what transformers' and torchvision's compute, weight for weight."""

from __future__ import annotations

import csv
import importlib

import pytest

import models
from bench import peers
from bench.__main__ import main


def _equivalence(model: str, batch_size: int = 2, size: int | None = None) -> peers.Equivalence:
    import torch

    spec = models.get(model)
    torch.manual_seed(0)
    ours = spec.build()
    peer = peers.build_peer(model)
    peers.copy_weights(model, ours, peer)
    inputs, targets = spec.make_batch(batch_size, size or spec.default_size, seed=1)
    return peers.compare(model, ours, peer, inputs, targets)


@pytest.mark.parametrize("model", ["gpt2-tiny", "bert-tiny"])
def test_tiny_transformers_equal_their_peers(model):
    pytest.importorskip("transformers")
    eq = _equivalence(model)
    assert eq.params_ours == eq.params_peer
    assert eq.logit_max_abs_diff < 1e-5
    assert eq.loss_abs_diff < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2-small", "bert-base"])
def test_full_size_transformers_equal_their_peers(model):
    pytest.importorskip("transformers")
    eq = _equivalence(model, batch_size=1, size=64)
    assert eq.params_ours == eq.params_peer
    assert eq.logit_max_abs_diff < 1e-4
    assert eq.loss_abs_diff < 1e-4


def test_resnet18_equals_torchvision():
    try:
        importlib.import_module("torchvision")
    except Exception as exc:  # a torchvision built for another torch fails with more than this
        pytest.skip(f"torchvision does not import: {type(exc).__name__}")
    eq = _equivalence("resnet18", size=64)
    assert eq.params_ours == eq.params_peer
    assert eq.logit_max_abs_diff == 0.0


def test_a_peer_parameter_ours_lacks_is_named():
    transformers = pytest.importorskip("transformers")
    cfg = models.get("gpt2-tiny").config
    peer = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer + 1, n_head=cfg.n_head))
    with pytest.raises(ValueError, match=r"transformer\.h\.2\.attn\.c_attn\.weight"):
        peers.copy_weights("gpt2-tiny", models.get("gpt2-tiny").build(), peer)


def test_peers_cli_writes_the_table_and_csv(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "peers.csv"
    assert main(["peers", "--models", "gpt2-tiny", "--precisions", "fp32,bf16", "--steps", "2",
                 "--warmup", "1", "--device", "cpu", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["model"], r["precision"], r["status"]) for r in rows] == [
        ("gpt2-tiny", "fp32", "ok"), ("gpt2-tiny", "bf16", "ok")]
    assert float(rows[0]["logit_max_abs_diff"]) < 1e-5
    assert float(rows[0]["ratio_ours_per_peer_median"]) > 0
    assert "gpt2-tiny" in capsys.readouterr().out


def _without(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make importing ``names`` fail in bench.peers, as on a machine without them."""
    real = importlib.import_module

    def fake(name: str, *args: object) -> object:
        if name in names:
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real(name, *args)

    monkeypatch.setattr(peers.importlib, "import_module", fake)


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


def test_the_default_set_without_peer_libraries_is_skipped_rows(monkeypatch, capsys):
    _without(monkeypatch, "transformers", "torchvision")
    assert main(["peers", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for model in peers.DEFAULT_MODELS:
        assert f"| {model}" in out
    assert out.count("skipped") == len(peers.DEFAULT_MODELS)


def test_a_model_without_a_peer_is_bad_input(capsys):
    assert main(["peers", "--models", "resnet-tiny"]) == 2
    assert "no peer" in capsys.readouterr().err
