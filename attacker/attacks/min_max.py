"""Min-Max and Min-Sum: the AGR-agnostic optimised model-poisoning attacks.

Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
Defenses for Federated Learning", NDSS 2021 (Section IV-B). The malicious update is the benign
mean pushed as far as it can go along a perturbation direction ``p`` while staying as close to the
benign updates as they are to each other, so that distance-based robust rules (Krum, Bulyan,
geometric median, trimmed mean, FLTrust's cosine and norm checks, ...) cannot single it out:

    m = mu + gamma * p,  gamma as large as possible with
    Min-Max:  max_i ||m - g_i||      <= max_{i,j} ||g_i - g_j||
    Min-Sum:  sum_i ||m - g_i||^2    <= max_i sum_j ||g_i - g_j||^2

over the benign updates g_1..g_n with mean mu. The paper finds gamma by a halving search from
gamma_init; fedseq solves the constraint exactly, which is the value that search converges to:
each ||mu + gamma p - g_i||^2 = c_i + 2 gamma b_i + gamma^2 a (a = ||p||^2, b_i = p.(mu - g_i),
c_i = ||mu - g_i||^2) is a convex quadratic in gamma that starts at or below the bound (mu is in
the benign hull), so Min-Max's gamma is the smallest of the quadratics' positive roots at the
squared bound, and Min-Sum's is sqrt((S - sum_i c_i) / (n a)) since sum_i b_i = 0.

What the attacker knows (the paper's "AGR-agnostic, no benign updates" case, as fedseq's ALIE):
the benign updates are estimated by the pool of :func:`.alie.benign_pool`: each malicious user's
honest update on its own copied history plus ``views - 1`` updates on random prefixes of it.

Direction, option ``direction`` (fedseq's targeted use, as ALIE's): the paper's perturbations are
untargeted (``perturbation``: ``unit`` = -mu/||mu||, ``std`` = -sigma, ``sign`` = -sign(mu)); to
promote the target, fedseq takes p = g_t/||g_t|| per malicious user, g_t the update of the
targeted attack ``direction`` (default ``dv-fsr``), so the rule's own distance budget carries the
targeted push. ``direction=none`` gives the paper's untargeted attack. Each malicious user sends
its own m (its own g_t and gamma); with ``direction=none`` all send the same m, as in the paper.
The direction attack gets the same context, and the attack declares the data it needs
(``needs_popularity``, ``public_share``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedseq.training import UpdateBatch

from .alie import benign_pool
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
from .common import num_samples

MODES = ("min-max", "min-sum")
PERTURBATIONS = ("unit", "std", "sign")


def perturbation(pool: torch.Tensor, kind: str) -> torch.Tensor:
    """The paper's untargeted perturbation ``p`` [D] of benign updates ``pool`` [n, D]."""
    mu = pool.mean(0)
    if kind == "unit":
        return -mu / mu.norm().clamp_min(1e-12)
    if kind == "std":
        return -pool.std(0, correction=0)
    if kind == "sign":
        return -torch.sign(mu)
    raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {kind!r}")


def max_gamma(pool: torch.Tensor, p: torch.Tensor, mode: str) -> float:
    """The largest gamma >= 0 with ``mu + gamma p`` inside the ``mode`` bound of ``pool`` [n, D]
    (module docstring); 0 when ``p`` is zero."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    g = pool.double()
    p = p.double()
    a = float(p @ p)
    if a == 0.0:
        return 0.0
    mu = g.mean(0)
    diff = mu - g  # [n, D]
    c = (diff * diff).sum(1)  # [n]
    pair = torch.cdist(g, g) ** 2  # [n, n] squared distances
    if mode == "min-sum":
        room = float(pair.sum(1).max() - c.sum())
        return max(0.0, room / (len(g) * a)) ** 0.5
    bound = float(pair.max())
    b = diff @ p  # [n]
    disc = (b * b - a * (c - bound)).clamp_min(0.0)
    roots = (-b + disc.sqrt()) / a
    return max(0.0, float(roots.min()))


@dataclass(frozen=True)
class MinMax(DirectedAttack):
    mode: str = "min-max"
    views: int = 4
    direction: Attack | None = None  # None: the paper's untargeted perturbation
    kind: str = "unit"  # untargeted perturbation
    name: str = "min-max"

    def updates(self, ctx: AttackContext) -> UpdateBatch:
        users = ctx.users
        B = len(users)
        if B == 0:
            return UpdateBatch.empty(ctx.params.shape[0])
        pool = benign_pool(ctx, self.views)
        g = pool.updates  # [n, D], n = views * B
        mu = g.mean(0)
        if self.direction is None:
            p = perturbation(g, self.kind)
            out = (mu + max_gamma(g, p, self.mode) * p).expand(B, -1).clone()
        else:
            push = self.direction.updates(ctx).updates  # [B, D]
            out = torch.empty(B, g.shape[1])
            for i in range(B):
                p = push[i] / push[i].norm().clamp_min(1e-12)
                out[i] = mu + max_gamma(g, p, self.mode) * p
        return UpdateBatch(np.asarray(users, dtype=np.int64), out, num_samples(ctx.sequences), pool.losses[:B])


def factory(mode: str, make: Callable[[str, Mapping[str, str]], Attack]) -> Callable[[Mapping[str, str]], MinMax]:
    """The registry entry of ``mode`` (``make`` builds the direction attack by name)."""

    def from_options(options: Mapping[str, str]) -> MinMax:
        spec = {
            "views": Option(int, 4, "benign-like updates per malicious user for the benign estimate", positive,
                            ">= 1"),
            "direction": Option(str, "dv-fsr", "targeted attack giving the push direction, or 'none'"),
            "perturbation": Option(str, "unit", "untargeted perturbation (direction=none): unit, std or sign",
                                   lambda v: v in PERTURBATIONS, f"one of {', '.join(PERTURBATIONS)}"),
        }
        v, nested = parse_options(mode, options, spec, passthrough=("direction",))
        direction = None
        if v["direction"] != "none":
            direction = make(v["direction"], sub_options(nested, "direction"))
        elif nested:
            raise AttackConfigError(f"attack {mode!r}: direction.<key> options need a direction attack")
        return MinMax(mode=mode, views=v["views"], direction=direction, kind=v["perturbation"], name=mode)

    return from_options
