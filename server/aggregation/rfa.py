"""RFA: the geometric median of the round's updates by the smoothed Weiszfeld algorithm.

Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning", IEEE Transactions on
Signal Processing 70, 2022 (arXiv:1912.13445). Used as the "RFA" defense of the DV-FSR paper
(Yin et al., AAAI 2025), whose public code follows the RFA reference implementation:

    alpha_i = n_i / sum_j n_j                          (n = sample counts; uniform if weighted=false)
    v_0     = sum_i alpha_i g_i                        (the weighted mean)
    repeat at most maxiter times:
        beta_i  = alpha_i / max(eps, ||v - g_i||);  beta <- beta / sum(beta)
        v       = sum_i beta_i g_i
        obj     = sum_i alpha_i ||v - g_i||            (Eq. 9 of the DV-FSR paper)
        stop if |obj_prev - obj| <= ftol * obj

All parameters form one vector (the whole model), as in the reference. The output is on the scale
of a *mean* of the updates (not the paper's "common" sum). Each iteration costs one chunked pass
for the K distances and one ``[K] @ [K, D]`` product; the distances at an iterate serve both its
objective and the next iteration's weights, so ``maxiter`` iterations cost ``maxiter + 1`` passes.
Extra memory: O(D) for the iterate plus a chunk of a few MiB.
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
    normalised_weights,
    option_error,
    parse_options,
    row_distances,
)

DEFAULT_MAXITER = 4
DEFAULT_EPS = 1e-5
DEFAULT_FTOL = 1e-6


@dataclass(frozen=True)
class GeometricMedian:
    """The result of :func:`geometric_median`."""

    vector: torch.Tensor  # [D], the updates' dtype
    iterations: int  # Weiszfeld iterations performed (0 = the weighted mean was returned)
    objective: float  # sum_i alpha_i ||v - g_i|| at the returned v
    converged: bool  # True when the ftol criterion stopped it before maxiter
    distances: torch.Tensor  # [K] float64, ||v - g_i|| at the returned v


def geometric_median(
    updates: torch.Tensor,
    weights: torch.Tensor,
    maxiter: int = DEFAULT_MAXITER,
    eps: float = DEFAULT_EPS,
    ftol: float = DEFAULT_FTOL,
    weighted: bool = True,
) -> GeometricMedian:
    """Smoothed-Weiszfeld geometric median of the rows of ``updates [K, D]`` (see module doc)."""
    check_inputs(updates, weights)
    check_floating(updates)
    if maxiter < 0 or eps <= 0 or ftol < 0:
        raise ValueError(f"need maxiter >= 0, eps > 0, ftol >= 0; got {maxiter}, {eps}, {ftol}")
    alpha = normalised_weights(weights, weighted).to(updates.device)
    v = alpha.to(updates.dtype) @ updates
    dist = row_distances(updates, v)
    obj = float(alpha @ dist)
    iterations = 0
    converged = False
    for _ in range(maxiter):
        beta = alpha / dist.clamp_min(eps)
        beta = beta / beta.sum()
        v = beta.to(updates.dtype) @ updates
        iterations += 1
        prev_obj = obj
        dist = row_distances(updates, v)
        obj = float(alpha @ dist)
        if abs(prev_obj - obj) <= ftol * obj:
            converged = True
            break
    return GeometricMedian(v, iterations, obj, converged, dist)


def parse_rfa_options(
    rule: str, options: Mapping[str, str], extra: Mapping[str, type] | None = None
) -> dict[str, Any]:
    """Parse the shared RFA options (``maxiter``, ``eps``, ``ftol``, ``weighted``) plus ``extra``."""
    allowed: dict[str, type] = {"maxiter": int, "eps": float, "ftol": float, "weighted": bool}
    allowed.update(extra or {})
    return parse_options(rule, options, allowed)


def validate_rfa(rule: str, maxiter: int, eps: float, ftol: float) -> None:
    """Range-check the shared RFA options, naming the rule and option on failure."""
    if maxiter < 0:
        raise option_error(rule, "maxiter", maxiter, "an integer >= 0 (0 returns the weighted mean)")
    if not (eps > 0 and math.isfinite(eps)):
        raise option_error(rule, "eps", eps, "a finite float > 0")
    if not (ftol >= 0 and math.isfinite(ftol)):
        raise option_error(rule, "ftol", ftol, "a finite float >= 0")


def gm_info(gm: GeometricMedian) -> dict[str, Any]:
    """The JSON-serialisable facts of a geometric-median run for a round summary."""
    return {
        "iterations": gm.iterations,
        "objective": gm.objective,
        "converged": gm.converged,
        "max_distance": float(gm.distances.max()),
    }


@dataclass(frozen=True)
class RFA(AggregationRule):
    """Rule object for :func:`geometric_median` (registry name ``rfa``). Uses sample weights."""

    maxiter: int = DEFAULT_MAXITER
    eps: float = DEFAULT_EPS
    ftol: float = DEFAULT_FTOL
    weighted: bool = True
    name: str = "rfa"
    scale: ClassVar[str] = "mean"  # output on the scale of one update (the engine steps it x K, fedseq/engine.py)
    uses_weights: ClassVar[bool] = True  # the sample weights shape the estimate (fedseq/engine.py rule_uses_weights)

    def __post_init__(self) -> None:
        validate_rfa(self.name, self.maxiter, self.eps, self.ftol)

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult:
        gm = geometric_median(updates, ctx.weights, self.maxiter, self.eps, self.ftol, self.weighted)
        return AggregationResult(gm.vector, None, gm_info(gm))

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> RFA:
        return cls(**parse_rfa_options("rfa", options))
