"""Coordinate-wise median.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018 (the "median" estimator).

For every parameter j the output is the median of ``u_1j .. u_Kj``. For an even K it is the mean
of the two middle values, exactly as :func:`numpy.median` (``(a + b) / 2`` in the updates' dtype).
Sample weights are ignored (the estimator is unweighted in the paper); the output is on the scale
of a mean of the updates. Computed a block of columns at a time (sorted with NumPy's SIMD sort on
CPU), so the extra memory is the ``[D]`` output plus a few MiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import (
    AggregationResult,
    AggregationRule,
    RoundContext,
    check_floating,
    check_inputs,
    parse_options,
    sorted_column_reduce,
)


def coordinate_median(updates: torch.Tensor, use_numpy: bool | None = None) -> torch.Tensor:
    """Coordinate-wise median of ``updates [K, D]`` as ``[D]`` (numpy.median semantics)."""
    check_floating(updates)
    k = updates.shape[0]
    lo, hi = (k - 1) // 2, k // 2
    if lo == hi:
        return sorted_column_reduce(updates, lambda s: s[:, lo], use_numpy=use_numpy)
    return sorted_column_reduce(updates, lambda s: (s[:, lo] + s[:, hi]) / 2, use_numpy=use_numpy)


@dataclass(frozen=True)
class Median(AggregationRule):
    """Rule object for :func:`coordinate_median` (registry name ``median``). No options."""

    name: str = "median"
    scale: ClassVar[str] = "mean"  # output on the scale of one update (the engine steps it x K, fedseq/engine.py)
    uses_weights: ClassVar[bool] = False  # sample weights are ignored: a worker's weight cannot move it (fedseq/engine.py rule_uses_weights)

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult:
        check_inputs(updates, ctx.weights)
        k = updates.shape[0]
        info = {"k": k, "even_k_mean_of_middle": k % 2 == 0}
        return AggregationResult(coordinate_median(updates), None, info)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Median:
        parse_options("median", options, {})
        return cls()
