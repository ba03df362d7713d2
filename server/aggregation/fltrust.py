"""FLTrust: trust bootstrapping from a server-held root update.

Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping",
NDSS 2021.

The server holds a small clean "root" dataset and, each round, computes its own update ``g0`` on
it at the current global model, exactly as a client would. Every client update is scored by its
direction relative to ``g0`` and rescaled to ``g0``'s norm:

    TS_i = ReLU(cos(g_i, g0))
    v    = sum_i TS_i * (||g0|| / ||g_i||) * g_i  /  sum_i TS_i

A zero update gets trust 0. If every trust score is 0 the output is the zero vector (no step) and
``info["all_rejected"]`` is true. The output has the norm scale of ``g0`` (one update), like a mean.
Sample weights are not used (as in the paper). Extra memory: O(K); time: two ``[K, D]`` passes.

Where the root comes from: option ``root_users`` (default 10) is the number of users whose
training data the server holds as its root dataset (fedseq/root.py: copies drawn once with the run
seed); each round the server computes one update on them in the same convention as client updates
(descent direction at the round's global weights, same loss and sequence handling). The rule
declares ``needs_root``, so :func:`fedseq.engine.aggregate_round` computes that update once per
round and passes it as ``ctx.root`` (:class:`fedseq.engine.RoundContext`); a direct caller puts
``g0`` in the context itself: ``rule(U, RoundContext(weights, root=g0))``. Calling the rule with
no root in the context raises :class:`MissingRootUpdate`. The rule itself only records
``root_users``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import (
    AggregationResult,
    AggregationRule,
    RoundContext,
    check_floating,
    check_inputs,
    option_error,
    parse_options,
)

DEFAULT_ROOT_USERS = 10
TINY = torch.finfo(torch.float64).tiny


class MissingRootUpdate(RuntimeError):
    """FLTrust was called without the round's root update in its context (``ctx.root``)."""


def fltrust(updates: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(aggregate [D], trust scores float64 [K])`` of ``updates [K, D]`` against ``root [D]``."""
    check_floating(updates)
    if root.dim() != 1 or root.shape[0] != updates.shape[1]:
        raise ValueError(f"root update must be [D={updates.shape[1]}], got shape {tuple(root.shape)}")
    r = root.to(updates.device, updates.dtype)
    root_norm = float(torch.linalg.vector_norm(r.to(torch.float64)))
    norms = torch.linalg.vector_norm(updates, dim=1).to(torch.float64)
    dots = (updates @ r).to(torch.float64)
    if root_norm > 0:
        cos = torch.where(norms > 0, dots / (norms.clamp_min(TINY) * root_norm), 0.0)
    else:
        cos = torch.zeros_like(norms)
    trust = cos.clamp(0.0, 1.0)
    total = float(trust.sum())
    if total <= 0:
        return torch.zeros(updates.shape[1], dtype=updates.dtype, device=updates.device), trust
    coef = torch.where(trust > 0, trust * root_norm / norms.clamp_min(TINY), 0.0)
    return (coef / total).to(updates.dtype) @ updates, trust


@dataclass(frozen=True)
class FLTrust(AggregationRule):
    """Rule object for :func:`fltrust` (registry name ``fltrust``); reads ``g0`` from ``ctx.root``."""

    root_users: int = DEFAULT_ROOT_USERS
    name: str = "fltrust"
    scale: ClassVar[str] = "mean"  # output on the scale of one update (the engine steps it x K, fedseq/engine.py)
    uses_weights: ClassVar[bool] = False  # sample weights are ignored: a worker's weight cannot move it (fedseq/engine.py rule_uses_weights)
    needs_root: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.root_users < 1:
            raise option_error(self.name, "root_users", self.root_users, "an integer >= 1")

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult:
        check_inputs(updates, ctx.weights)
        root = ctx.root
        if root is None:
            raise MissingRootUpdate(
                "rule 'fltrust' needs the server's root update for this round in its context (ctx.root): "
                "fedseq.engine.aggregate_round computes it with the runner's root source (fedseq/root.py), "
                "a direct caller passes RoundContext(weights, root=g0)"
            )
        vec, trust = fltrust(updates, root)
        kept = tuple(int(i) for i in torch.nonzero(trust > 0).flatten())
        info: dict[str, Any] = {
            "root_users": self.root_users,
            "root_norm": float(torch.linalg.vector_norm(root.to(torch.float64))),
            "trust": [float(t) for t in trust],
            "zero_trust": int((trust <= 0).sum()),
            "all_rejected": not kept,
        }
        return AggregationResult(vec, None if len(kept) == trust.shape[0] else kept, info)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> FLTrust:
        return cls(**parse_options("fltrust", options, {"root_users": int}))
