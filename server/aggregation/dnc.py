"""DnC: divide-and-conquer outlier removal along the top singular direction.

Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
Defenses for Federated Learning", NDSS 2021 (Algorithm 3, "DnC").

    good = all K updates
    repeat niters times:
        r      = b coordinates drawn uniformly without replacement (all D when b >= D)
        mu     = the mean of the updates restricted to r;  C = U[:, r] - mu      ([K, b], float64)
        v      = the top right singular vector of C
        s_i    = <C_i, v>^2                                      (outlier score)
        good  &= the K - floor(c * f) updates with the lowest scores (ties to the lower index)
    output = the plain mean of the updates in good

Poisoning updates that move the mean far enough to matter have a large component along the top
singular direction of the centred updates, even on a random subset of coordinates (which keeps the
SVD cheap for models of millions of weights). The top singular vector comes from the ``[K, K]``
float64 Gram matrix ``C C^T`` (its top eigenvector u gives ``C v = sigma u``; fedseq computes
``v = C^T u / ||C^T u||`` and the scores as ``(C v)^2`` exactly as written above). Sample weights
are ignored (as in the paper); the output is on the scale of a mean. If every update is removed
(possible only when ``niters * c * f >= K``) the output is zero (no step, ``info["all_removed"]``).

Randomness: the coordinate subsets of round t come from a generator seeded by (option ``seed``, the
round id ``ctx.round_id`` of the round's :class:`fedseq.engine.RoundContext`, the iteration), so the
in-process runner and the services (and a resumed run) draw the same subsets.

Options:
    f       assumed number of malicious updates: an integer >= 0 or ``auto`` (default) =
            ``max(1, floor(K / 10))`` (10% of the round)
    c       filtering fraction, float > 0 (default 1.0): ``floor(c * f)`` updates removed per iteration
    niters  iterations, integer >= 1 (default 5)
    b       coordinates per iteration, integer >= 1 (default 10,000, the paper's)
    seed    integer seed of the coordinate draws (default: the run's seed, via make_run_rule; 0 outside a run)

Memory: the ``[K, b]`` float64 sample (20 MB at K = 256, b = 10,000) and ``[K, K]``; time
O(niters * (K b + K^2 b)) plus one ``[K] @ [K, D]`` product for the mean.
"""

from __future__ import annotations

import math
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
    option_error,
    parse_f,
    parse_options,
    round_generator,
)

DNC_KEY = 0xD2C  # stream of DnC's coordinate draws
DEFAULT_NITERS = 5
DEFAULT_B = 10_000


def auto_f(k: int) -> int:
    return max(1, k // 10)


def dnc_scores(sample: torch.Tensor) -> torch.Tensor:
    """Outlier scores ``<C_i, v>^2`` of the rows of ``sample [K, b]`` (float64 ``[K]``)."""
    x = sample.to(torch.float64)
    c = x - x.mean(dim=0)
    gram = c @ c.T
    _, vecs = torch.linalg.eigh((gram + gram.T) / 2)
    v = c.T @ vecs[:, -1]
    norm = torch.linalg.vector_norm(v)
    if float(norm) == 0.0:  # all rows equal on this sample: nobody is an outlier
        return torch.zeros(sample.shape[0], dtype=torch.float64)
    return (c @ (v / norm)) ** 2


def dnc(updates: torch.Tensor, f: int, c: float = 1.0, niters: int = DEFAULT_NITERS, b: int = DEFAULT_B,
        seed: int = 0, round_id: int = 0) -> tuple[torch.Tensor, list[int], list[int]]:
    """DnC of ``updates [K, D]`` (module docstring): ``(aggregate [D], kept indices sorted, removed
    per iteration)``."""
    check_floating(updates)
    k, d = updates.shape
    remove = int(c * f + 1e-9)
    good = np.ones(k, dtype=bool)
    removed: list[int] = []
    for i in range(niters):
        if b >= d:
            sample = updates
        else:
            cols = torch.randperm(d, generator=round_generator(seed, DNC_KEY, round_id, i))[:b]
            sample = updates[:, torch.sort(cols).values.to(updates.device)]
        scores = dnc_scores(sample).cpu()
        order = torch.sort(scores, stable=True).indices.numpy()
        keep = np.zeros(k, dtype=bool)
        keep[order[: max(0, k - remove)]] = True
        removed.append(int((good & ~keep).sum()))
        good &= keep
    kept = [int(i) for i in np.nonzero(good)[0]]
    if not kept:
        return torch.zeros(d, dtype=updates.dtype, device=updates.device), kept, removed
    coef = torch.zeros(k, dtype=updates.dtype, device=updates.device)
    coef[kept] = 1.0 / len(kept)
    return coef @ updates, kept, removed


@dataclass(frozen=True)
class DnC(AggregationRule):
    """Rule object for :func:`dnc` (registry name ``dnc``); ``f=None`` means ``auto``."""

    f: int | None = None
    c: float = 1.0
    niters: int = DEFAULT_NITERS
    b: int = DEFAULT_B
    seed: int = 0
    name: str = "dnc"
    scale: ClassVar[str] = "mean"  # output on the scale of one update (the engine steps it x K, fedseq/engine.py)
    uses_weights: ClassVar[bool] = False  # sample weights are ignored: a worker's weight cannot move it (fedseq/engine.py rule_uses_weights)

    def __post_init__(self) -> None:
        if self.f is not None and self.f < 0:
            raise option_error(self.name, "f", self.f, "an integer >= 0 or 'auto'")
        if not (self.c > 0 and math.isfinite(self.c)):
            raise option_error(self.name, "c", self.c, "a finite float > 0")
        if self.niters < 1:
            raise option_error(self.name, "niters", self.niters, "an integer >= 1")
        if self.b < 1:
            raise option_error(self.name, "b", self.b, "an integer >= 1")

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult:
        """DnC of the round; the coordinate subsets are round ``ctx.round_id``'s."""
        check_inputs(updates, ctx.weights)
        k = updates.shape[0]
        f = auto_f(k) if self.f is None else self.f
        vec, kept, removed = dnc(updates, f, self.c, self.niters, self.b, self.seed, ctx.round_id)
        info: dict[str, Any] = {"f": f, "c": self.c, "niters": self.niters, "b": min(self.b, updates.shape[1]),
                                "round_id": ctx.round_id, "removed_per_iteration": removed, "kept": len(kept),
                                "all_removed": not kept}
        return AggregationResult(vec, None if len(kept) == k else tuple(kept), info)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> DnC:
        opts = parse_options("dnc", options, {"f": str, "c": float, "niters": int, "b": int, "seed": int})
        return cls(**parse_f("dnc", opts))
