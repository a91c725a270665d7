import pytest
import torch

import models
from bench.cell.flops import count_training_flops

EXACT_PARAMETERS = {
    "resnet50": 25_557_032,
    "resnet18": 11_689_512,
    "bert-base": 109_514_298,
    "gpt2-small": 124_439_808,
}


def _num_params(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in models.get(name).build().parameters())


@pytest.mark.parametrize("name", EXACT_PARAMETERS)
def test_full_size_parameter_counts_are_exact(name):
    assert _num_params(name) == EXACT_PARAMETERS[name]


def test_language_model_heads_are_tied_to_the_embeddings():
    for name in ("gpt2-tiny", "bert-tiny"):
        model = models.get(name).build()
        logits_weight_grad_source = model.wte.weight
        inputs, targets = models.get(name).make_batch(2, 8)
        models.get(name).loss(model, inputs, targets).backward()
        # the head's gradient lands on the embedding: rows of tokens never input still get one
        unused = torch.ones(model.cfg.vocab_size, dtype=torch.bool)
        unused[inputs.flatten()] = False
        assert logits_weight_grad_source.grad[unused].abs().sum() > 0


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(models.UnknownModel) as err:
        models.get("resnet51")
    for name in models.NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("name", models.NAMES)
def test_card_agrees_with_the_family_config(name):
    spec = models.get(name)
    cfg = spec.config
    if spec.family == "gpt":
        assert (spec.max_size, spec.default_size) == (cfg.block_size, cfg.seq_len)
    elif spec.family == "bert":
        assert (spec.max_size, spec.default_size) == (cfg.max_positions, cfg.seq_len)
    elif spec.family == "llama":
        assert (spec.max_size, spec.default_size) == (cfg.max_seq_len, cfg.seq_len)
    else:
        assert spec.max_size is None and spec.default_size == cfg.image_size


@pytest.mark.parametrize("name", models.NAMES)
def test_counted_flops_agree_with_the_analytic_formula(name):
    spec = models.get(name)
    batch = 2
    counted = count_training_flops(spec, batch, spec.default_size)
    analytic = batch * spec.flops_per_sample(spec.default_size)
    assert counted == pytest.approx(analytic, rel=0.10)


@pytest.mark.parametrize("name", ["resnet-tiny", "bert-tiny", "gpt2-tiny"])
def test_batches_are_seeded_and_shaped(name):
    spec = models.get(name)
    a = spec.make_batch(3, spec.default_size, seed=7)
    b = spec.make_batch(3, spec.default_size, seed=7)
    c = spec.make_batch(3, spec.default_size, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert a[0].shape[0] == a[1].shape[0] == 3
    loss = spec.loss(spec.build(), *a)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_sequence_longer_than_the_context_is_refused():
    assert "context of 128" in models.get("gpt2-tiny").check_size(129)
    assert models.get("gpt2-tiny").check_size(128) is None
    assert models.get("resnet50").check_size(4096) is None


def test_models_command_lists_every_model(capsys):
    assert models.main() == 0
    out = capsys.readouterr().out
    for name in models.NAMES:
        assert name in out
    assert "124,439,808" in out
