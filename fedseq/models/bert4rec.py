"""BERT4Rec: sequential recommendation with bidirectional Transformer encoders.

Sun et al., "BERT4Rec: Sequential Recommendation with Bidirectional Encoder Representations from
Transformer", CIKM 2019, in the configuration the DV-FSR paper trains (Yin et al., AAAI 2025;
public code "Bert4rec2"): hidden 16, one post-LN block, one head, GELU (tanh) FFN, output head
``GELU(Linear(h)) . E^T + b`` tied to the item embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .common import Drop, DropSite, LayerNorm, SeqModelConfig, gelu_tanh, position_ids


@dataclass(frozen=True)
class BERT4RecConfig(SeqModelConfig):
    num_items: int  # M; vocabulary is M + 2 (0 = padding, M + 1 = mask token)
    hidden: int = 16
    blocks: int = 1
    heads: int = 1
    ffn: int = 64
    dropout: float = 0.2
    attn_dropout: float = 0.1
    max_len: int = 200  # rows of the position table (minus one)
    input_len: int = 50  # clients feed the last 50 items
    mask_prob: float = 0.15

    def __post_init__(self) -> None:
        self.check_shared()
        if not 1 <= self.input_len <= self.max_len:
            raise ValueError(f"input_len must be in [1, max_len={self.max_len}], got {self.input_len}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")


class Block(nn.Module):
    def __init__(self, cfg: BERT4RecConfig) -> None:
        super().__init__()
        d = cfg.hidden
        self.heads = cfg.heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = LayerNorm(d), LayerNorm(d)
        self.w1, self.w2 = nn.Linear(d, cfg.ffn), nn.Linear(cfg.ffn, d)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, drop: Drop, name: str, last: bool = False) -> torch.Tensor:
        # x: [B, L, d]; allowed: [B, 1, 1, L] bool (key not padding)
        # last: only the last position's output ([B, 1, d]; keys and values still from all of x)
        B, L, d = x.shape
        H, dh = self.heads, d // self.heads
        xq = x[:, -1:] if last else x  # [B, Lq, d]
        Lq = xq.shape[1]
        q = self.q(xq).view(B, Lq, H, dh).transpose(1, 2)  # [B, H, Lq, dh]
        k = self.k(x).view(B, L, H, dh).transpose(1, 2)  # [B, H, L, dh]
        v = self.v(x).view(B, L, H, dh).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(~allowed, -1e9)  # [B, H, Lq, L]
        probs = drop(f"{name}.attn", torch.softmax(scores, dim=-1))
        a = self.o((probs @ v).transpose(1, 2).reshape(B, Lq, d))
        x = self.ln1(xq + drop(f"{name}.attn_out", a))
        return self.ln2(x + drop(f"{name}.ffn_out", self.w2(gelu_tanh(self.w1(x)))))


class BERT4Rec(nn.Module):
    """``forward(tokens [B, L]) -> hidden [B, L, d]``; scores via :meth:`scores` (``[..., V]``)."""

    def __init__(self, cfg: BERT4RecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.vocab, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len + 1, cfg.hidden)
        self.emb_ln = LayerNorm(cfg.hidden)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.blocks)])
        self.head = nn.Linear(cfg.hidden, cfg.hidden)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab))

    def dropout_sites(self) -> dict[str, DropSite]:
        c = self.cfg
        sites = {"emb": DropSite(c.dropout, "seq", c.hidden)}
        for i in range(c.blocks):
            sites[f"b{i}.attn"] = DropSite(c.attn_dropout, "attn", c.heads)
            sites[f"b{i}.attn_out"] = DropSite(c.dropout, "seq", c.hidden)
            sites[f"b{i}.ffn_out"] = DropSite(c.dropout, "seq", c.hidden)
        return sites

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token + position embedding before LayerNorm and dropout: ``[B, L] -> [B, L, d]``."""
        return self.item_emb(tokens) + self.pos_emb(position_ids(tokens))

    def encode(self, tokens: torch.Tensor, x: torch.Tensor, drop: Drop | None = None, last: bool = False) -> torch.Tensor:
        """``[B, L, d]`` outputs (``last``: only the last position's, ``[B, 1, d]``)."""
        drop = drop or Drop()
        allowed = (tokens != 0)[:, None, None, :]  # [B, 1, 1, L]
        x = drop("emb", self.emb_ln(x))
        for i, blk in enumerate(self.blocks):
            x = blk(x, allowed, drop, f"b{i}", last and i == len(self.blocks) - 1)
        return gelu_tanh(self.head(x))  # [B, L, d] ([B, 1, d] with last)

    def forward(self, tokens: torch.Tensor, drop: Drop | None = None, last: bool = False) -> torch.Tensor:
        return self.encode(tokens, self.embed(tokens), drop, last)

    def scores(self, h: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``h . E^T + b``: all items (``[..., V]``) or ``items [..., K]`` (``[..., K]``)."""
        if items is None:
            return h @ self.item_emb.weight.T + self.out_bias
        return (h.unsqueeze(-2) * self.item_emb(items)).sum(-1) + self.out_bias[items]
