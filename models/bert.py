"""BERT encoder with a masked-language-model head whose decoder shares the word embeddings.

bert-base: 109,514,298 parameters (vocab 30522, 512 positions, 2 token types, no pooler, as
Hugging Face's BertForMaskedLM). The unit is one sequence of ``seq_len`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100  # label of an unmasked position: no loss there


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate: int = 3072
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    seq_len: int = 128  # default benchmark length
    mask_prob: float = 0.15


SIZES: dict[str, BertConfig] = {
    "bert-base": BertConfig(),
    "bert-tiny": BertConfig(vocab_size=512, max_positions=128, n_layer=2, n_head=2, n_embd=64,
                            intermediate=256, seq_len=32),
}


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, nh, T, hs), bidirectional
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Layer(nn.Module):
    """Post-LayerNorm transformer layer, as in the original BERT."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.fc = nn.Linear(cfg.n_embd, cfg.intermediate)
        self.out = nn.Linear(cfg.intermediate, cfg.n_embd)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln_1(x + self.drop(self.attn(x)))
        return self.ln_2(x + self.drop(self.out(F.gelu(self.fc(x)))))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.n_embd)
        self.wtt = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.ln_emb = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))
        # MLM head: transform, then a decoder tied to the word embeddings (bias of its own)
        self.head = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln_head = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.decoder_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor, token_type: Tensor | None = None) -> Tensor:
        _, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        if token_type is not None:
            x = x + self.wtt(token_type)
        else:
            x = x + self.wtt.weight[0]  # every token is of type 0
        x = self.drop(self.ln_emb(x))
        for layer in self.layers:
            x = layer(x)
        x = self.ln_head(F.gelu(self.head(x)))
        return F.linear(x, self.wte.weight, self.decoder_bias)  # (B, T, vocab)


def build(cfg: BertConfig) -> Bert:
    return Bert(cfg)


def make_batch(
    cfg: BertConfig, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random token ids with ``mask_prob`` of them masked; labels are -100 where not masked."""
    tokens = torch.randint(1, cfg.vocab_size, (batch_size, seq_len), generator=generator)
    masked = torch.rand(batch_size, seq_len, generator=generator) < cfg.mask_prob
    masked[:, 0] = True  # at least one target per sequence
    inputs = tokens.masked_fill(masked, 0)  # id 0 plays [MASK]
    labels = tokens.masked_fill(~masked, IGNORE)
    return inputs, labels


def loss(model: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=IGNORE)


def flops_per_sample(cfg: BertConfig, seq_len: int) -> int:
    """Training FLOPs per sequence: 3x forward (2 per MAC); attention counted over all T x T."""
    d, L, T = cfg.n_embd, cfg.n_layer, seq_len
    matmul_params = L * (4 * d * d + 2 * d * cfg.intermediate) + d * d + d * cfg.vocab_size
    fwd = 2 * T * matmul_params + L * 4 * T * T * d
    return 3 * fwd
