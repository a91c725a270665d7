"""Llama: a decoder-only transformer with RMSNorm, rotary position embeddings (RoPE), a SwiGLU
MLP and grouped-query attention (GQA), no biases.

llama-small: 124,668,672 parameters (vocab 32000, 12 layers, 12 query heads and 4 key/value
heads of 64, width 768, MLP 2048, untied head): every matrix dimension a multiple of 128.
llama-1b: Llama-3.2-1B's shape, 1,235,814,400 parameters (vocab 128256, 16 layers, 32 query
and 8 key/value heads of 64, width 2048, MLP 8192, Llama 3's RoPE scaling, head tied to the
token embeddings). Read gpt-fast's and Meta's model.py for the lineage; the module names are
Meta's, the RoPE layout transformers' (see ``apply_rotary``). The unit is one sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import gpt

# SDPA shares each key/value head across its group of query heads itself from torch 2.5 on.
_SDPA_GQA = torch.__version__ >= (2, 5)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's frequency-dependent RoPE scaling (transformers' rope_type "llama3")."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12  # query heads
    n_kv_head: int = 4  # key/value heads; each serves n_head // n_kv_head query heads
    n_embd: int = 768
    intermediate: int = 2048  # SwiGLU hidden width
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # the head reuses the token embeddings
    max_seq_len: int = 2048  # context length
    seq_len: int = 1024  # default benchmark length

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


SIZES: dict[str, LlamaConfig] = {
    "llama-small": LlamaConfig(),
    "llama-1b": LlamaConfig(vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
                            intermediate=8192, rope_scaling=RopeScaling(), tie_embeddings=True,
                            max_seq_len=131072, seq_len=2048),
    "llama-tiny": LlamaConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                              intermediate=192, rope_theta=10000.0, tie_embeddings=True,
                              max_seq_len=128, seq_len=64),
}


def inverse_frequencies(cfg: LlamaConfig, device: torch.device | str | None = None) -> Tensor:
    """RoPE's angle per position for each pair of head features, (head_dim / 2,), in fp32."""
    hs = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hs, 2, device=device).float() / hs)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3: wavelengths longer than the pre-training context are stretched by ``factor``,
    # those shorter than a quarter of it (high_freq_factor 4) kept, the band between blended.
    wavelen = 2 * math.pi / inv_freq
    long_wavelen = s.original_max_seq_len / s.low_freq_factor
    short_wavelen = s.original_max_seq_len / s.high_freq_factor
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    return torch.where(wavelen < short_wavelen, inv_freq,
                       torch.where(wavelen > long_wavelen, inv_freq / s.factor, blended))


def rotary(cfg: LlamaConfig, seq_len: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """cos and sin of each position's angles, (T, head_dim), always fp32.

    Computed here on every forward, never stored in a buffer that a ``model.to(bfloat16)``
    would round: an angle is position x frequency, up to 131,071 radians, and bf16's 8-bit
    mantissa holds angles above 256 only in steps of 2 radians (above 32,768 in steps of 256),
    so cos/sin in bf16 would scramble every position past the first few hundred."""
    positions = torch.arange(seq_len, device=device).float()
    angles = positions[:, None] * inverse_frequencies(cfg, device)[None, :]  # (T, hs / 2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate feature pairs (i, i + head_dim / 2) of ``x`` (B, nh, T, hs) by their position's
    angle. transformers' layout (Meta's checkpoints rotate adjacent pairs; transformers permutes
    their q and k weights to this one). The rotation runs in fp32 and is rounded once to x's
    dtype: under bf16 autocast x is bf16, and rotating in bf16 would round cos, sin and each
    product too."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistic in fp32 (as transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.n_kv_head != self.n_head
        if gqa and not _SDPA_GQA:
            groups = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        extra = {"enable_gqa": gqa} if _SDPA_GQA else {}
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)  # (B, nh, T, hs)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.intermediate, bias=False)  # gate
        self.w3 = nn.Linear(cfg.n_embd, cfg.intermediate, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate, cfg.n_embd, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-RMSNorm block."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size,
                                                                 bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):  # transformers' initializer_range
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        _, T = idx.shape
        cos, sin = rotary(self.cfg, T, idx.device)  # (T, hs), fp32
        x = self.tok_embeddings(idx)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        if self.output is None:
            return F.linear(x, self.tok_embeddings.weight)  # (B, T, vocab), head tied
        return self.output(x)  # (B, T, vocab)


def build(cfg: LlamaConfig) -> Llama:
    return Llama(cfg)


# The batches and the loss are GPT-2's: random token ids and their next-token targets (only
# ``vocab_size`` of the config is read), cross-entropy over every position.
make_batch = gpt.make_batch
loss = gpt.loss


def flops_per_sample(cfg: LlamaConfig, seq_len: int) -> int:
    """Training FLOPs per sequence: 3x forward (2 per MAC); attention counted over all T x T for
    every query head, as FlopCounterMode counts scaled_dot_product_attention (the causal half
    is not subtracted, GQA's shared key/value heads do not shrink it)."""
    d, L, T = cfg.n_embd, cfg.n_layer, seq_len
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    per_layer = 2 * d * q_dim + 2 * d * kv_dim + 3 * d * cfg.intermediate  # wq wo, wk wv, MLP
    matmul_params = L * per_layer + d * cfg.vocab_size
    fwd = 2 * T * matmul_params + L * 4 * T * T * q_dim
    return 3 * fwd
