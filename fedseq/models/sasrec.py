"""SASRec: self-attentive sequential recommendation.

Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018, in the configuration the
DV-FSR paper trains (Yin et al., "Dual-View Federated Sequential Recommendation Poisoning",
AAAI 2025; public code "SASrec2"): no output projection in attention (as in the original TF
code), BERT-pytorch LayerNorm, learned positions 1..n for the n real items of a left-padded
sequence, item embedding tied to the output layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .common import Drop, DropSite, LayerNorm, SeqModelConfig, position_ids


@dataclass(frozen=True)
class SASRecConfig(SeqModelConfig):
    num_items: int  # M; vocabulary is M + 2 (0 = padding, M + 1 = mask token, unused in training)
    hidden: int = 64
    blocks: int = 2
    heads: int = 2
    ffn: int = 256
    dropout: float = 0.1
    attn_dropout: float = 0.1
    max_len: int = 200

    def __post_init__(self) -> None:
        self.check_shared()


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        d = cfg.hidden
        self.heads = cfg.heads
        self.ln1, self.ln2, self.ln3 = LayerNorm(d), LayerNorm(d), LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.w1, self.w2 = nn.Linear(d, cfg.ffn), nn.Linear(cfg.ffn, d)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, drop: Drop, name: str, last: bool = False) -> torch.Tensor:
        # x: [B, L, d]; allowed: [B, 1, L, L] bool (causal and key not padding)
        # last: only the last position's output ([B, 1, d]; keys and values still from all of x)
        B, L, d = x.shape
        H, dh = self.heads, d // self.heads
        xq = x[:, -1:] if last else x  # [B, Lq, d]
        Lq = xq.shape[1]
        q_in = self.ln1(xq)
        q = self.q(q_in).view(B, Lq, H, dh).transpose(1, 2)  # [B, H, Lq, dh]
        k = self.k(x).view(B, L, H, dh).transpose(1, 2)  # [B, H, L, dh]
        v = self.v(x).view(B, L, H, dh).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)  # [B, H, Lq, L]
        scores = scores.masked_fill(~allowed[:, :, L - Lq :], -1e9)
        probs = drop(f"{name}.attn", torch.softmax(scores, dim=-1))
        a = (probs @ v).transpose(1, 2).reshape(B, Lq, d)  # [B, Lq, d]
        x = self.ln2(a + q_in)
        h = drop(f"{name}.ffn_out", self.w2(drop(f"{name}.ffn_in", torch.relu(self.w1(x)))))
        return self.ln3(h + x)


class SASRec(nn.Module):
    """``forward(tokens [B, L]) -> hidden [B, L, d]``; scores of item i at t are ``h_t . E_i``."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.vocab, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len + 1, cfg.hidden)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.blocks)])

    def dropout_sites(self) -> dict[str, DropSite]:
        c = self.cfg
        sites = {"emb": DropSite(c.dropout, "seq", c.hidden)}
        for i in range(c.blocks):
            sites[f"b{i}.attn"] = DropSite(c.attn_dropout, "attn", c.heads)
            sites[f"b{i}.ffn_in"] = DropSite(c.dropout, "seq", c.ffn)
            sites[f"b{i}.ffn_out"] = DropSite(c.dropout, "seq", c.hidden)
        return sites

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token + position embedding before dropout: ``[B, L] -> [B, L, d]``."""
        return self.item_emb(tokens) + self.pos_emb(position_ids(tokens))

    def encode(self, tokens: torch.Tensor, x: torch.Tensor, drop: Drop | None = None, last: bool = False) -> torch.Tensor:
        """Run the blocks on embedded input ``x [B, L, d]`` (``tokens`` gives the padding mask).
        ``last``: only the last position's output, ``[B, 1, d]`` (evaluation: the last block then
        computes one query per user instead of L)."""
        drop = drop or Drop()
        L = tokens.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=tokens.device).tril()
        allowed = causal[None, None] & (tokens != 0)[:, None, None, :]  # [B, 1, L, L]
        x = drop("emb", x)
        for i, blk in enumerate(self.blocks):
            x = blk(x, allowed, drop, f"b{i}", last and i == len(self.blocks) - 1)
        return x

    def forward(self, tokens: torch.Tensor, drop: Drop | None = None, last: bool = False) -> torch.Tensor:
        return self.encode(tokens, self.embed(tokens), drop, last)

    def scores(self, h: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Scores: ``h [..., d]`` against all items (``[..., V]``) or ``items [..., K]`` (``[..., K]``)."""
        if items is None:
            return h @ self.item_emb.weight.T
        return (h.unsqueeze(-2) * self.item_emb(items)).sum(-1)
