"""FedAvg / FedSGD aggregation.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017. The DV-FSR paper's "common" aggregation (Yin et al., AAAI 2025, public code) is the
unweighted *sum* of the round's gradients, stepped with the server learning rate; ``reduce=mean``
gives the textbook sample-count-weighted average.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedseq.engine import server_step  # noqa: F401 - re-exported: the step is the engine's

from .base import AggregationResult, AggregationRule, RoundContext, RuleConfigError, check_inputs, parse_options


def fedavg(
    updates: torch.Tensor, weights: torch.Tensor, reduce: str = "sum", weighted: bool = True
) -> torch.Tensor:
    """Aggregate ``[K, D]`` updates into ``[D]``.

    reduce="sum":  sum_i u_i                      (the paper's "common"; weights ignored)
    reduce="mean": sum_i n_i u_i / sum_i n_i      (weighted=True, n = sample counts)
                   mean_i u_i                     (weighted=False)
    """
    check_inputs(updates, weights)
    if reduce == "sum":
        return updates.sum(dim=0)
    if reduce == "mean":
        if not weighted:
            return updates.mean(dim=0)
        w = weights.to(updates.dtype)
        total = w.sum()
        if float(total) <= 0:
            raise ValueError("reduce=mean with weighted=true needs a positive total weight")
        return (w / total) @ updates
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


@dataclass(frozen=True)
class FedAvg(AggregationRule):
    """Rule object for :func:`fedavg` (registry names ``fedavg`` and ``none``)."""

    reduce: str = "sum"
    weighted: bool = True
    name: str = "fedavg"

    def __post_init__(self) -> None:
        if self.reduce not in ("sum", "mean"):
            raise RuleConfigError(f"rule 'fedavg' option reduce must be 'sum' or 'mean', got {self.reduce!r}")

    @property
    def scale(self) -> str:
        """``sum`` (the paper's "common") or ``mean``: the scale of the output (fedseq/engine.py)."""
        return self.reduce

    @property
    def uses_weights(self) -> bool:
        """Only the weighted mean reads the sample weights (the sum and the plain mean do not)."""
        return self.reduce == "mean" and self.weighted

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult:
        vec = fedavg(updates, ctx.weights, self.reduce, self.weighted)
        return AggregationResult(vec, None, {"reduce": self.reduce, "weighted": self.weighted})

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> FedAvg:
        return cls(**parse_options("fedavg", options, {"reduce": str, "weighted": bool}))
