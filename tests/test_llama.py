"""models/llama.py: its sizes, FLOPs, RoPE numerics, and transformers' LlamaForCausalLM as its
peer, weight for weight."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import models
from bench import peers
from bench.cell.flops import count_training_flops
from bench.peers import build as peer_build
from models import llama

TINY = llama.SIZES["llama-tiny"]
# Llama-3.2-1B's RoPE (head_dim 64, theta 500000, llama3 scaling) on a one-layer toy.
TINY_1B_ROPE = replace(TINY, n_embd=128, n_head=2, n_kv_head=1, n_layer=1,
                       rope_theta=500000.0, rope_scaling=llama.RopeScaling(), max_seq_len=131072)
# Scaling whose three bands (kept, blended, stretched) all fall in head_dim 16 at theta 1e4.
TINY_SCALED = replace(TINY, rope_scaling=llama.RopeScaling(factor=8.0, original_max_seq_len=256),
                      max_seq_len=1024)


def _meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return models.get(name).build()


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed (the peers "
                               "extra: pip install -e .[peers])")


@pytest.mark.parametrize(("name", "expected"), [
    ("llama-tiny", 131_392),
    ("llama-small", 124_668_672),
    ("llama-1b", 1_235_814_400),  # Llama-3.2-1B's published count (its head tied)
])
def test_sizes_have_their_parameter_counts(name, expected):
    assert sum(p.numel() for p in _meta(name).parameters()) == expected


def test_the_1b_peer_built_on_meta_has_llama_3_2_1b_count():
    _transformers()
    with torch.device("meta"):
        peer = peer_build.llama_peer(llama.SIZES["llama-1b"])
    assert peers.num_params(peer) == 1_235_814_400
    assert peer.lm_head.weight is peer.model.embed_tokens.weight


@pytest.mark.parametrize("name", ["llama-small", "llama-1b"])
def test_every_matrix_dimension_is_a_multiple_of_128(name):
    shapes = [m.weight.shape for m in _meta(name).modules()
              if isinstance(m, nn.Linear | nn.Embedding)]
    assert shapes and all(dim % 128 == 0 for shape in shapes for dim in shape), shapes


def test_heads_are_tied_or_untied_as_the_size_says():
    assert "output.weight" not in dict(_meta("llama-1b").named_parameters())
    assert "output.weight" in dict(_meta("llama-small").named_parameters())
    # Tied: the head's gradient reaches embedding rows of tokens that were never input.
    spec = models.get("llama-tiny")
    model = spec.build()
    inputs, targets = spec.make_batch(2, 8)
    spec.loss(model, inputs, targets).backward()
    unused = torch.ones(TINY.vocab_size, dtype=torch.bool)
    unused[inputs.flatten()] = False
    assert model.tok_embeddings.weight.grad[unused].abs().sum() > 0


@pytest.mark.parametrize(("name", "seq_len"), [("llama-tiny", 64), ("llama-tiny", 128),
                                               ("llama-small", 256), ("llama-1b", 512)])
def test_analytic_flops_equal_flop_counter_mode(name, seq_len):
    spec = models.get(name)
    assert count_training_flops(spec, 2, seq_len) == 2 * spec.flops_per_sample(seq_len)


def test_batches_are_seeded_next_token_pairs_and_the_loss_starts_near_uniform():
    spec = models.get("llama-tiny")
    a, b, c = (spec.make_batch(3, 16, seed=s) for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    inputs, targets = a
    assert inputs.shape == targets.shape == (3, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one
    torch.manual_seed(0)
    loss = spec.loss(spec.build(), inputs, targets)
    # std-0.02 weights: logits near 0, so the loss is near log(vocab) = 6.24.
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(512.0)).item()) < 0.05


def test_llama3_rope_scaling_is_transformers():
    _transformers()
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = llama.SIZES["llama-1b"]
    with torch.device("meta"):
        hf_config = peer_build.llama_peer(replace(cfg, n_layer=1)).config
    theirs = LlamaRotaryEmbedding(hf_config).inv_freq
    ours = llama.inverse_frequencies(cfg)
    plain = llama.inverse_frequencies(replace(cfg, rope_scaling=None))
    assert torch.equal(ours, theirs)
    # All three bands: fast rotations kept, slow ones stretched 32x, the band between blended.
    kept, stretched = ours == plain, torch.isclose(ours, plain / 32)
    assert kept.any() and stretched.any() and (~kept & ~stretched).any()


def _rotate64(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The rotation in float64, angles (T, head_dim / 2)."""
    x1, x2 = x.double().chunk(2, dim=-1)
    cos, sin = angles.double().cos(), angles.double().sin()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def test_rope_rotates_in_fp32_under_bf16_autocast():
    cfg, seq_len = llama.SIZES["llama-1b"], 8192
    q = torch.randn(1, 2, seq_len, cfg.head_dim, generator=torch.Generator().manual_seed(0))
    q = q.to(torch.bfloat16)  # what a projection gives under bf16 autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = llama.rotary(cfg, seq_len, "cpu")
        rotated = llama.apply_rotary(q, cos, sin)
    assert cos.dtype == sin.dtype == torch.float32 and rotated.dtype == torch.bfloat16
    # One rounding of the fp32 rotation: bf16 autocast changes nothing but the output's dtype.
    fp32 = llama.apply_rotary(q.float(), *llama.rotary(cfg, seq_len, "cpu"))
    assert torch.equal(rotated, fp32.to(torch.bfloat16))
    # And the fp32 rotation is the exact one (float64 angles) to fp32's error in the angle.
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * llama.inverse_frequencies(
        cfg).double()
    exact = _rotate64(q, angles)
    # fp32 holds an angle below 8192 to 2**-12 rad, times |q| of up to about 5.
    assert (fp32.double() - exact).abs().max() < 2e-3
    # The pitfall this guards against: angles in bf16 lose the positions (errors of order 1).
    naive = _rotate64(q, angles.to(torch.bfloat16))
    assert (naive - exact).abs().max() > 0.5


@pytest.mark.parametrize("cfg", [
    TINY,  # the registered size: tied head, 2 query heads per key/value head
    replace(TINY, n_kv_head=1, tie_embeddings=False),  # multi-query attention, untied head
    replace(TINY, n_kv_head=TINY.n_head),  # plain multi-head attention
    TINY_SCALED,
    TINY_1B_ROPE,
], ids=["tiny-gqa-tied", "mqa-untied", "mha", "llama3-scaling", "llama-3.2-1b-rope"])
def test_equals_transformers_llama_after_the_weight_mapping(cfg):
    _transformers()
    torch.manual_seed(0)
    ours = llama.build(cfg)
    peer = peer_build.llama_peer(cfg)
    peer_build.copy_weights("llama-tiny", ours, peer)
    inputs, targets = llama.make_batch(cfg, 2, 128, torch.Generator().manual_seed(1))
    eq = peers.compare("llama-tiny", ours, peer, inputs, targets)
    assert eq.params_ours == eq.params_peer
    assert eq.logit_max_abs_diff < 1e-5 and eq.logit_max_abs_diff_train < 1e-5
    assert eq.loss_abs_diff < 1e-5


def test_scaling_changes_the_logits_the_peer_checks():
    """The llama3 case above could not pass with the scaling ignored on either side."""
    _transformers()
    torch.manual_seed(0)
    ours = llama.build(TINY_SCALED)
    peer = peer_build.llama_peer(replace(TINY_SCALED, rope_scaling=None))
    peer_build.copy_weights("llama-tiny", ours, peer)
    inputs, targets = llama.make_batch(TINY_SCALED, 2, 128, torch.Generator().manual_seed(1))
    assert peers.compare("llama-tiny", ours, peer, inputs, targets).logit_max_abs_diff > 1e-4


def test_the_peer_is_named_and_checked_by_default():
    # Its equivalence at the registered sizes: tests/test_peers.py, beside GPT-2's.
    assert peer_build.describe_peer("llama-small")[0] == "transformers.LlamaForCausalLM"
    assert peer_build.library("llama-1b") == "transformers"
    assert "llama-small" in peers.DEFAULT_MODELS


def test_a_head_tied_on_one_side_only_is_named():
    _transformers()
    tied, untied = TINY, replace(TINY, tie_embeddings=False)
    with pytest.raises(ValueError, match=r"peer parameters not mapped from ours: lm_head\.weight"):
        peer_build.copy_weights("llama-tiny", llama.build(tied), peer_build.llama_peer(untied))
    with pytest.raises(ValueError, match=r"our parameters the peer lacks: lm_head\.weight"):
        peer_build.copy_weights("llama-tiny", llama.build(untied), peer_build.llama_peer(tied))


def test_a_bf16_training_step_is_finite():
    spec = models.get("llama-tiny")
    model = spec.build()
    inputs, targets = spec.make_batch(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = spec.loss(model, inputs, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
