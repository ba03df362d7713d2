"""Sign flipping: upload the negated (optionally scaled) honest gradient of the user's own data.

A classic untargeted Byzantine model-poisoning baseline (e.g. Damaskinos et al., "Asynchronous
Byzantine Machine Learning (the case of SGD)", ICML 2018; Li et al., "RSA: Byzantine-Robust
Stochastic Aggregation Methods", AAAI 2019). Model-agnostic: the update is
``-factor * compute_updates(...)`` (the user's benign update), so the server's step ascends that
user's loss. ``factor`` (default 1) > 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedseq.training import UpdateBatch, compute_updates

from .base import Attack, AttackContext, Option, parse_options, positive


@dataclass(frozen=True)
class SignFlip(Attack):
    factor: float = 1.0
    name: str = "sign-flip"

    def updates(self, ctx: AttackContext) -> UpdateBatch:
        ub = compute_updates(ctx.model, ctx.params, ctx.sequences, ctx.users, ctx.seed, ctx.round_key, ctx.local)
        ub.updates.mul_(-self.factor)
        return ub


def from_options(options: Mapping[str, str]) -> SignFlip:
    v, _ = parse_options("sign-flip", options, {"factor": Option(float, 1.0, "scale of the flipped update",
                                                                 positive, "> 0")})
    return SignFlip(factor=v["factor"])
