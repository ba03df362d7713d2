"""Sign flipping: upload the negated (optionally scaled) honest gradient of the user's own data.

A classic untargeted Byzantine model-poisoning baseline (e.g. Damaskinos et al., "Asynchronous
Byzantine Machine Learning (the case of SGD)", ICML 2018; Li et al., "RSA: Byzantine-Robust
Stochastic Aggregation Methods", AAAI 2019). Model-agnostic: the update is
``-factor * compute_updates(...)`` (the user's benign update), so the server's step ascends that
user's loss. ``factor`` (default 1) > 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedseq.config import Compat
from fedseq.models import SeqModel
from fedseq.training import LocalConfig, UpdateBatch, compute_updates

from .base import Option, Users, parse_options, positive


@dataclass(frozen=True)
class SignFlip:
    factor: float = 1.0
    name: str = "sign-flip"
    fake_users: bool = False

    def updates(self, model: SeqModel, params: torch.Tensor, sequences: Sequence[np.ndarray],
                users: Users, targets: tuple[int, ...], seed: int, round_key: int,
                local: LocalConfig, compat: Compat) -> UpdateBatch:
        ub = compute_updates(model, params, sequences, users, seed, round_key, local)
        ub.updates.mul_(-self.factor)
        return ub


def from_options(options: Mapping[str, str]) -> SignFlip:
    v, _ = parse_options("sign-flip", options, {"factor": Option(float, 1.0, "scale of the flipped update",
                                                                 positive, "> 0")})
    return SignFlip(factor=v["factor"])
