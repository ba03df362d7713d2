"""ALIE, "A Little Is Enough": an adaptive attack on robust (Byzantine-tolerant) aggregation.

Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses For Distributed Learning",
NeurIPS 2019. The malicious updates stay within about z standard deviations of the benign
coordinate-wise mean, where coordinate-wise median / trimmed mean / Krum / geometric-median rules
cannot tell them from benign ones, and move every coordinate the same way at once.

How fedseq estimates the benign statistics (the attacker sees no benign update): it computes the
honest updates its own participating users would send (:func:`fedseq.training.compute_updates`),
plus ``views - 1`` more benign-like updates per user from random prefixes of its history (other
randomness for negatives and dropout); mu and sigma are the coordinate-wise mean and (population)
standard deviation of that pool.

z: ``auto`` (default) uses the paper's formula s = floor(n/2 + 1) - m, z = Phi^{-1}((n - s) / n),
with n = ``n`` (the assumed number of updates per round, default 256, the paper's round size) and
m = the number of malicious users in the call (those in this round). With very few attackers this
gives z close to 0 (n = 256, m = 1: z = 0), i.e. the malicious update is the benign mean: that is
the paper's point (stealth first); set ``z`` explicitly for a stronger push.

Direction (fedseq's targeted variant, option ``direction``): the paper's convergence attack sends
mu - z * sigma. To promote the target, fedseq instead sends

    mu + z * sigma * sign(g_target)

per user, where g_target is the update of the targeted attack ``direction`` (default ``eb``, the
gradient of -log sigmoid(target score)) for that user: since the server steps w - lr * aggregate,
each coordinate is pushed by z sigma in the direction that lowers the target loss, i.e. the
"backdoor" use of ALIE (stay inside the benign spread, move towards the attacker's objective).
Note that coordinates no benign-like update touches (sigma = 0, e.g. the item rows of items the
attacker's users never saw, the target's own row included) are not moved: ALIE trades strength
for stealth. ``direction=none`` gives the paper's untargeted mu - z * sigma. The direction attack
gets the same context, and ALIE declares the data it needs (``needs_popularity``, ``public_share``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from fedseq.training import UpdateBatch, compute_updates, user_rng

from .base import (
    Attack,
    AttackConfigError,
    AttackContext,
    DirectedAttack,
    Option,
    parse_options,
    positive,
    sub_options,
)
from .common import STREAM_VIEWS, num_samples


def alie_z(n: int, m: int) -> float:
    """The paper's z for n participants of which m malicious: s = floor(n/2 + 1) - m,
    z = Phi^{-1}((n - s) / n) (clamped to be finite and >= 0)."""
    if n < 1 or m < 0:
        raise ValueError(f"need n >= 1 and m >= 0, got n={n}, m={m}")
    s = math.floor(n / 2 + 1) - m
    q = (n - s) / n
    q = min(max(q, 0.5), 1.0 - 1e-12)
    return max(0.0, NormalDist().inv_cdf(q))


def benign_pool(ctx: AttackContext, views: int) -> UpdateBatch:
    """Benign-like updates ``[views * B, D]`` of the context's users, the attacker's estimate of
    the benign updates: view 0 = each user's own honest update; views 1.. = updates on random
    prefixes of its history (other randomness for negatives and dropout)."""
    pools = []
    for v in range(views):
        if v == 0:
            seqs, key = list(ctx.sequences), ctx.round_key
        else:
            seqs = []
            for u, s in zip(ctx.users, ctx.sequences, strict=True):
                rng = user_rng(ctx.seed, ctx.round_key, int(u), STREAM_VIEWS + v)
                n = len(s)
                cut = int(rng.integers(min(2, n), n + 1)) if n > 1 else n
                seqs.append(np.asarray(s)[:cut])
            key = ctx.round_key + ((STREAM_VIEWS + v) << 40)
        pools.append(compute_updates(ctx.model, ctx.params, seqs, ctx.users, ctx.seed, key, ctx.local))
    return UpdateBatch(
        np.concatenate([p.users for p in pools]), torch.cat([p.updates for p in pools]),
        np.concatenate([p.num_samples for p in pools]), np.concatenate([p.losses for p in pools]),
    )


@dataclass(frozen=True)
class ALIE(DirectedAttack):
    z: float | None = None  # None: the paper's formula
    n: int = 256
    views: int = 4
    direction: Attack | None = None  # None: untargeted mu - z sigma
    name: str = "alie"

    def benign_pool(self, ctx: AttackContext) -> UpdateBatch:
        return benign_pool(ctx, self.views)

    def updates(self, ctx: AttackContext) -> UpdateBatch:
        users, params = ctx.users, ctx.params
        B = len(users)
        if B == 0:
            return UpdateBatch.empty(params.shape[0])
        pool = self.benign_pool(ctx)
        mu = pool.updates.mean(0)
        sd = pool.updates.std(0, correction=0)
        z = self.z if self.z is not None else alie_z(self.n, B)
        if self.direction is None:
            out = (mu - z * sd).expand(B, -1).clone()
        else:
            g = self.direction.updates(ctx).updates
            out = mu + z * sd * torch.sign(g)
        return UpdateBatch(np.asarray(users, dtype=np.int64), out, num_samples(ctx.sequences), pool.losses[:B])


def _z(text: str) -> float | None:
    t = text.strip().lower()
    if t == "auto":
        return None
    z = float(t)
    if not (math.isfinite(z) and z >= 0):
        raise ValueError(text)
    return z


def factory(make: Callable[[str, Mapping[str, str]], Attack]) -> Callable[[Mapping[str, str]], ALIE]:
    """The registry entry (``make`` builds the direction attack by name)."""

    def from_options(options: Mapping[str, str]) -> ALIE:
        spec = {
            "z": Option(str, "auto", "std multiplier: 'auto' (paper formula from n and m) or a number >= 0"),
            "n": Option(int, 256, "assumed updates per round for z=auto", positive, ">= 1"),
            "views": Option(int, 4, "benign-like updates per user for mu/sigma", positive, ">= 1"),
            "direction": Option(str, "eb", "targeted attack giving the push direction, or 'none'"),
        }
        v, nested = parse_options("alie", options, spec, passthrough=("direction",))
        try:
            z = _z(v["z"])
        except ValueError:
            raise AttackConfigError(
                f"attack 'alie' option z={v['z']!r} is invalid; allowed: 'auto' or a number >= 0"
            ) from None
        direction = None
        if v["direction"] != "none":
            direction = make(v["direction"], sub_options(nested, "direction"))
        elif nested:
            raise AttackConfigError("attack 'alie': direction.<key> options need a direction attack")
        return ALIE(z=z, n=v["n"], views=v["views"], direction=direction)

    return from_options
