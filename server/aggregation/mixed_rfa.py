"""Mixed-RFA: a convex mix of the plain mean and the geometric median of the round's updates.

Yin et al., "Dual-View Poisoning Attacks and Defenses for Federated Sequential Recommendation"
(DV-FSR), AAAI 2025, Eq. 10:

    v = lambda * mean + (1 - lambda) * GM(g_1..g_K; alpha_1..alpha_K)

The paper writes the mean part as ``sum_i alpha_i g_i``; its public code ("mixagg") uses the plain
``(sum_i g_i) / B`` over the round, which is the default here (``mean_weighted=false``; set it to
true for the alpha-weighted mean of Eq. 10). ``B`` is taken to be K, the number of updates actually
aggregated in this round. GM is :func:`server.aggregation.rfa.geometric_median` (smoothed
Weiszfeld, weighted by sample counts unless ``weighted=false``), with the same options as ``rfa``.
Paper Table 4 uses lambda = 0.3, the default. Like RFA, the output is on the scale of a mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import AggregationResult, AggregationRule, RoundContext, normalised_weights, option_error
from .rfa import (
    DEFAULT_EPS,
    DEFAULT_FTOL,
    DEFAULT_MAXITER,
    geometric_median,
    gm_info,
    parse_rfa_options,
    validate_rfa,
)

DEFAULT_LAMBDA = 0.3


def mixed_rfa(
    updates: torch.Tensor,
    weights: torch.Tensor,
    lam: float = DEFAULT_LAMBDA,
    maxiter: int = DEFAULT_MAXITER,
    eps: float = DEFAULT_EPS,
    ftol: float = DEFAULT_FTOL,
    weighted: bool = True,
    mean_weighted: bool = False,
) -> tuple[torch.Tensor, dict[str, object]]:
    """``lam * mean(updates) + (1 - lam) * GM(updates)`` as ``[D]``, plus the GM run's info."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    gm = geometric_median(updates, weights, maxiter, eps, ftol, weighted)
    if mean_weighted:
        mean = normalised_weights(weights, True).to(updates.device, updates.dtype) @ updates
    else:
        mean = updates.mean(dim=0)
    vec = lam * mean + (1.0 - lam) * gm.vector
    return vec, gm_info(gm)


@dataclass(frozen=True)
class MixedRFA(AggregationRule):
    """Rule object for :func:`mixed_rfa` (registry name ``mixed-rfa``).

    Sample weights enter the GM (unless ``weighted=false``) and the mean part only with
    ``mean_weighted=true``.
    """

    lam: float = DEFAULT_LAMBDA
    maxiter: int = DEFAULT_MAXITER
    eps: float = DEFAULT_EPS
    ftol: float = DEFAULT_FTOL
    weighted: bool = True
    mean_weighted: bool = False
    name: str = "mixed-rfa"
    scale: ClassVar[str] = "mean"  # output on the scale of one update (the engine steps it x K, fedseq/engine.py)
    uses_weights: ClassVar[bool] = True  # the sample weights shape the estimate (fedseq/engine.py rule_uses_weights)

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise option_error(self.name, "lambda", self.lam, "a float in [0, 1]")
        validate_rfa(self.name, self.maxiter, self.eps, self.ftol)

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult:
        vec, info = mixed_rfa(
            updates, ctx.weights, self.lam, self.maxiter, self.eps, self.ftol, self.weighted, self.mean_weighted
        )
        info = {"lambda": self.lam, "mean_weighted": self.mean_weighted, **info}
        return AggregationResult(vec, None, info)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> MixedRFA:
        opts = parse_rfa_options("mixed-rfa", options, {"lambda": float, "mean_weighted": bool})
        if "lambda" in opts:
            opts["lam"] = opts.pop("lambda")
        return cls(**opts)
