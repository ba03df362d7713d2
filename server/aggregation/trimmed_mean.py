"""Coordinate-wise trimmed mean.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018 (the "trimmed mean" estimator).

For every parameter j: sort ``u_1j .. u_Kj``, drop the ``t = floor(beta * K)`` smallest and the
``t`` largest, and average the remaining ``K - 2t`` values (accumulated in float64, returned in the
updates' dtype). ``beta`` is the fraction trimmed from EACH side, ``0 <= beta < 0.5`` (so at least
one value always remains); ``beta = 0`` is the plain mean. Sample weights are ignored (unweighted
as in the paper); the output is on the scale of a mean. Computed a block of columns at a time
(NumPy SIMD sort on CPU): extra memory is the ``[D]`` output plus a few MiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .base import (
    AggregationResult,
    AggregationRule,
    RoundContext,
    check_floating,
    check_inputs,
    column_mean64,
    option_error,
    parse_options,
    sorted_column_reduce,
)

DEFAULT_BETA = 0.1


def trimmed_count(k: int, beta: float) -> int:
    """Number of values trimmed from each side: ``floor(beta * K)``.

    A 1e-9 slack absorbs binary rounding (``0.29 * 100`` is ``28.999...`` in floating point: 29);
    at least one value per coordinate is always kept.
    """
    return min(int(beta * k + 1e-9), (k - 1) // 2)


def trimmed_mean(
    updates: torch.Tensor, beta: float = DEFAULT_BETA, use_numpy: bool | None = None
) -> torch.Tensor:
    """Coordinate-wise ``beta``-trimmed mean of ``updates [K, D]`` as ``[D]``."""
    check_floating(updates)
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    k = updates.shape[0]
    t = trimmed_count(k, beta)
    if t == 0:
        return column_mean64(updates, use_numpy=use_numpy)
    return sorted_column_reduce(updates, lambda s: _mean64_rows(s[:, t : k - t]), use_numpy=use_numpy)


def _mean64_rows(kept: Any) -> Any:
    """Row means accumulated in float64 of a NumPy array or a tensor."""
    if isinstance(kept, torch.Tensor):
        return kept.to(torch.float64).mean(dim=1)
    return kept.mean(axis=1, dtype=np.float64)


@dataclass(frozen=True)
class TrimmedMean(AggregationRule):
    """Rule object for :func:`trimmed_mean` (registry name ``trimmed-mean``). Option ``beta``."""

    beta: float = DEFAULT_BETA
    name: str = "trimmed-mean"
    scale: ClassVar[str] = "mean"  # output on the scale of one update (the engine steps it x K, fedseq/engine.py)
    uses_weights: ClassVar[bool] = False  # sample weights are ignored: a worker's weight cannot move it (fedseq/engine.py rule_uses_weights)

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 0.5:
            raise option_error(self.name, "beta", self.beta, "a float in [0, 0.5) (fraction per side)")

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult:
        check_inputs(updates, ctx.weights)
        k = updates.shape[0]
        t = trimmed_count(k, self.beta)
        vec = trimmed_mean(updates, self.beta)
        info = {"beta": self.beta, "trimmed_per_side": t, "kept_per_coordinate": k - 2 * t}
        return AggregationResult(vec, None, info)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> TrimmedMean:
        return cls(**parse_options("trimmed-mean", options, {"beta": float}))
