"""FoolsGold (round-level variant).

Fung, Yoon, Beschastnikh, "The Limitations of Federated Learning in Sybil Settings", RAID 2020
(arXiv:1808.04866), Algorithm 1 and the authors' reference code.

Sybils pushing one poisoning goal send updates that are more similar to each other than honest
clients' updates are. FoolsGold down-weights updates by their maximum cosine similarity to any
other update:

    cs_ij  = cos(g_i, g_j) for i != j, cs_ii = 0           (0 for a zero update)
    v_i    = max_j cs_ij
    pardoning: cs_ij <- cs_ij * v_i / v_j   where v_j > v_i
    a_i    = clip(1 - max_j cs_ij, 0, 1)   (values below 1e-6 count as 0: identical updates)
    a     <- a / max(a);  a_i = 0.99 where a_i = 1      (all a = 0: every weight is 0)
    w_i    = clip(kappa * (ln(a_i / (1 - a_i)) + 0.5), 0, 1)          (logit; kappa = confidence)

Round-level variant: the original compares each client's *historical* aggregate update (the sum
of all its past updates), which needs client identities across rounds. The fedseq server sees
each round's updates, so ``g_i`` here is the update of this round (a history could be accepted by
a later version). With DV-FSR-style attackers (same target, near-identical uploads in one round)
the round-level similarity is what matters.

Output scale (option ``reduce``): ``mean`` (default) returns ``sum_i w_i g_i / sum_i w_i``, the
mean of the accepted updates (comparable to ``fedavg reduce=mean``); ``sum`` returns
``sum_i w_i g_i``, comparable to the paper's "common" sum, so it can replace it with the same
learning rate. If every weight is 0 the output is the zero vector (no step). Sample weights are
not used (as in the paper). Extra memory: the ``[K, K]`` Gram matrix; time ``O(K^2 D)``.
"""

from __future__ import annotations

import math
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
    gram_matrix,
    option_error,
    parse_options,
)

DEFAULT_KAPPA = 1.0
#: ``1 - max cs`` below this counts as 0 (an identical update): the resolution of a cosine computed
#: from a float32 Gram matrix. Without it a round of identical updates would get weight 1 each
#: from rounding noise (``a / max(a)`` turns ~1e-16 into 1).
IDENTICAL_TOL = 1e-6


def foolsgold_weights(updates: torch.Tensor, kappa: float = DEFAULT_KAPPA) -> torch.Tensor:
    """FoolsGold weights in ``[0, 1]`` for the rows of ``updates [K, D]`` (float64 ``[K]``)."""
    check_floating(updates)
    if not kappa > 0:
        raise ValueError(f"kappa must be > 0, got {kappa}")
    k = updates.shape[0]
    gram = gram_matrix(updates)
    norms = torch.diagonal(gram).clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    tiny = torch.finfo(torch.float64).tiny
    cs = torch.where(denom > 0, gram / denom.clamp_min(tiny), torch.zeros_like(gram))
    cs = cs.clamp(-1.0, 1.0)
    cs.fill_diagonal_(0.0)
    v = cs.max(dim=1).values
    # pardoning: where v_j > v_i, cs_ij *= v_i / v_j (v_j > v_i >= 0 there, so v_j > 0)
    vi, vj = v[:, None].expand(k, k), v[None, :].expand(k, k)
    pardon = vj > vi
    cs = torch.where(pardon, cs * vi / torch.where(pardon, vj, torch.ones_like(vj)), cs)
    a = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
    a = torch.where(a < IDENTICAL_TOL, torch.zeros_like(a), a)
    top = float(a.max())
    if top <= 0:
        return torch.zeros(k, dtype=torch.float64, device=updates.device)
    a = a / top
    a = torch.where(a >= 1.0, torch.full_like(a, 0.99), a)
    logit = kappa * (torch.log(a / (1.0 - a)) + 0.5)  # a = 0 gives -inf, clipped to 0 below
    return torch.nan_to_num(logit, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)


def foolsgold(
    updates: torch.Tensor, kappa: float = DEFAULT_KAPPA, reduce: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(aggregate [D], weights float64 [K])``: the FoolsGold-weighted ``reduce`` of the updates."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    w = foolsgold_weights(updates, kappa)
    total = float(w.sum())
    if total <= 0:
        return torch.zeros(updates.shape[1], dtype=updates.dtype, device=updates.device), w
    coef = w / total if reduce == "mean" else w
    return coef.to(updates.dtype) @ updates, w


@dataclass(frozen=True)
class FoolsGold(AggregationRule):
    """Rule object for :func:`foolsgold` (registry name ``foolsgold``). Options kappa, reduce."""

    kappa: float = DEFAULT_KAPPA
    reduce: str = "mean"
    name: str = "foolsgold"

    @property
    def scale(self) -> str:
        """``sum`` or ``mean`` (option ``reduce``): the scale of the output (fedseq/engine.py)."""
        return self.reduce

    uses_weights: ClassVar[bool] = False  # sample weights are ignored: a worker's weight cannot move it

    def __post_init__(self) -> None:
        if not (self.kappa > 0 and math.isfinite(self.kappa)):
            raise option_error(self.name, "kappa", self.kappa, "a finite float > 0")
        if self.reduce not in ("sum", "mean"):
            raise option_error(self.name, "reduce", self.reduce, "'sum' or 'mean'")

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult:
        check_inputs(updates, ctx.weights)
        vec, w = foolsgold(updates, self.kappa, self.reduce)
        kept = tuple(int(i) for i in torch.nonzero(w > 0).flatten())
        info: dict[str, Any] = {
            "reduce": self.reduce,
            "kappa": self.kappa,
            "weights": [float(x) for x in w],
            "weight_min": float(w.min()),
            "weight_max": float(w.max()),
            "weight_mean": float(w.mean()),
            "zero_weight": int((w <= 0).sum()),
        }
        return AggregationResult(vec, None if len(kept) == w.shape[0] else kept, info)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> FoolsGold:
        return cls(**parse_options("foolsgold", options, {"kappa": float, "reduce": str}))
