"""Pieces shared by the sequential recommenders: the BERT-pytorch LayerNorm, position ids for
left-padded sequences, the reference initialisation, and *seeded* dropout.

Seeded dropout is what lets fedseq compute many users' updates in one batch while keeping each
update a function of (global weights, the user's own data, a per-user seed) only: every dropout
mask element is a hash of (user seed, dropout site, position counted from the sequence end,
channel), so it does not depend on the batch a user lands in or on how much padding the batch
needs. With ``drop=None`` a model runs without dropout (eval mode).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_M32 = 0xFFFFFFFF


class SeqModelConfig:
    """What both model configs share: the vocabulary convention (items 1..M, 0 = padding,
    M + 1 = mask token, M + 2 rows) and the checks on the fields they have in common."""

    num_items: int
    hidden: int
    heads: int
    dropout: float
    attn_dropout: float

    @property
    def vocab(self) -> int:
        return self.num_items + 2

    @property
    def mask_token(self) -> int:
        return self.num_items + 1

    def check_shared(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """BERT-pytorch LayerNorm: ``w * (x - mean) / (std + eps) + b`` with the *unbiased* std."""
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)
    return weight * (x - mean) / (std + eps) + bias


class LayerNorm(nn.Module):
    """Module form of :func:`layer_norm` (parameters ``a_2`` scale and ``b_2`` shift)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.a_2 = nn.Parameter(torch.ones(dim))
        self.b_2 = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.a_2, self.b_2, self.eps)


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    """Positions for left-padded ``tokens [B, L]``: the n real items get 1..n, padding gets 0."""
    real = (tokens != 0).long()  # [B, L]
    return torch.cumsum(real, dim=1) * real


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (as in BERT-pytorch)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def reference_init(model: nn.Module, seed: int) -> None:
    """The public DV-FSR code's initialisation: truncated normal (std 0.02, +-0.04) on every
    non-LayerNorm parameter, then Xavier-normal on every parameter with 2 or more dimensions
    (what its server does before round 0). LayerNorm scale 1, shift 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("a_2", "b_2")):
                continue
            t = torch.randn(p.shape, generator=gen) * 0.02
            p.copy_(t.clamp_(-0.04, 0.04))
        for _name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_out, fan_in = p.shape[0], int(p[0].numel())
                std = math.sqrt(2.0 / float(fan_in + fan_out))
                p.copy_(torch.randn(p.shape, generator=gen) * std)


# ----------------------------------------------------------------------------- seeded dropout


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply, constants < 2**31 so int64 never overflows)."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & _M32
    h = h ^ (h >> 16)
    return h


def _site_code(site: str) -> int:
    code = 2166136261
    for ch in site.encode():
        code = ((code ^ ch) * 16777619) & _M32
    return code


@dataclass(frozen=True)
class DropSite:
    """A dropout site: its probability and the kind of tensor it acts on.

    kind "seq": x is ``[B, L, C]``; "attn": x is ``[B, H, L, L]``.
    """

    p: float
    kind: str
    channels: int  # C for "seq", H for "attn"


def _as_int32(h: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) as int32 with the same 32 bits (two's complement)."""
    return (h - ((h >> 31) << 32)).to(torch.int32)


def _mix32_i32_(h: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """:func:`_mix32` in place on the int32 form of the hashes (``tmp``: scratch of the same shape).

    Same bits as the int64 form: multiplication wraps modulo 2**32, and each right shift is made
    logical by masking off the copied sign bits. Three times faster than int64, which has no
    vector multiply on AVX2."""
    torch.bitwise_right_shift(h, 16, out=tmp)
    h.bitwise_xor_(tmp.bitwise_and_(0xFFFF)).mul_(0x7FEB352D)
    torch.bitwise_right_shift(h, 15, out=tmp)
    h.bitwise_xor_(tmp.bitwise_and_(0x1FFFF)).mul_(0x2C1B3C6D)
    torch.bitwise_right_shift(h, 16, out=tmp)
    return h.bitwise_xor_(tmp.bitwise_and_(0xFFFF))


@functools.lru_cache(maxsize=512)
def _position_code(name: str, kind: str, channels: int, length: int, device: torch.device | None = None) -> torch.Tensor:
    """The user-independent part of a site's mask hash, int32 form: ``[L, C]`` ("seq") or ``[H, L, L]``
    ("attn")."""
    if device is not None and device.type != "cpu":  # computed on the CPU once, kept on the device
        return _position_code(name, kind, channels, length).to(device)
    base = _mix32(torch.tensor(_site_code(name), dtype=torch.int64) ^ 0x5BD1E995)
    from_end = torch.arange(length - 1, -1, -1, dtype=torch.int64)  # [L]
    if kind == "seq":
        return _as_int32(_mix32(base ^ _mix32(from_end[:, None] * 65599 + torch.arange(channels)[None, :])))
    if kind == "attn":
        q, k = from_end[:, None], from_end[None, :]
        hh = torch.arange(channels, dtype=torch.int64)[:, None, None]
        return _as_int32(_mix32(base ^ _mix32((q * 4099 + k) * 131 + hh)))
    raise ValueError(f"unknown dropout site kind {kind!r}")


def keep_masks(
    sites: Mapping[str, DropSite], seeds: torch.Tensor, length: int
) -> dict[str, torch.Tensor]:
    """Scaled keep masks (``keep / (1 - p)``) for every site, one per user.

    seeds: ``[B]`` int64 per-user seeds in [0, 2**32). Element (b, t, c) of a "seq" mask is a
    hash of (seeds[b], site, L-1-t, c): it depends on the position counted from the end, so a user
    gets the same mask whatever the batch's padded length L is. An element is kept when its hash
    ``h`` has ``h / 2**32 >= p``, i.e. ``h >= ceil(p * 2**32)`` (exact: the scaling is by a power of
    two). The user-independent part of the hash is cached per (site, L); the per-user part runs in
    place on int32 (the unsigned comparison becomes a signed one after flipping the top bit).
    Returns ``{site: [B, L, C]}`` or ``{site: [B, H, L, L]}`` float32 tensors on ``seeds``' device.
    """
    out: dict[str, torch.Tensor] = {}
    user = _as_int32(_mix32(seeds.to(torch.int64) & _M32))  # [B]
    for name, site in sites.items():
        if site.p <= 0.0:
            continue
        pc = _position_code(name, site.kind, site.channels, length, seeds.device)  # [L, C] or [H, L, L], int32
        h = torch.bitwise_xor(pc[None], user.view(-1, *([1] * pc.dim())))  # [B, ...] int32
        _mix32_i32_(h, torch.empty_like(h))
        keep = h.bitwise_xor_(-(2**31)) >= math.ceil(site.p * 4294967296.0) - 2**31  # unsigned h >= ceil(p 2^32)
        out[name] = keep.to(torch.float32) / (1.0 - site.p)
    return out


class Drop:
    """Applies dropout at named sites, either from precomputed seeded masks or torch's RNG."""

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None, sites: Mapping[str, DropSite] | None = None):
        self.masks = masks
        self.sites = sites

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.masks is not None:
            m = self.masks.get(name)
            if m is None:
                return x
            if m.shape != x.shape:  # a block run for its last positions only: their rows of the mask
                m = m[..., m.shape[-2] - x.shape[-2] :, :]
            return x * m
        if self.sites is not None and name in self.sites:
            return F.dropout(x, self.sites[name].p, training=True)
        return x
