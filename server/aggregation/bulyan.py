"""Bulyan.

El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium",
ICML 2018 (Bulyan, Algorithm 2 of the paper).

With K updates of which at most f are Byzantine (Bulyan needs ``K >= 4f + 3``):

1. Selection: ``theta = K - 2f`` times, run Krum on the updates not selected yet (score = the sum
   of squared distances to the ``r - f - 2`` nearest of the ``r`` remaining others, at least 1
   neighbour; ties to the lower index) and move its choice into the selection set S.
2. Aggregation, for every coordinate j: of the ``theta`` selected values, average the
   ``beta = theta - 2f`` closest to their median (numpy.median semantics; ties in distance to the
   lower sorted position), accumulated in float64.

So an attacker must pass Krum's neighbourhood test and then the coordinate-wise trimming around
the median. Sample weights are ignored (as in the paper); the output is on the scale of a mean.

Options:
    f       assumed number of Byzantine updates: an integer >= 0 or ``auto`` (default) =
            ``floor((K - 3) / 4)``, the largest f Bulyan tolerates for the round's K. An integer f
            above that is lowered to it (``info["f_clamped"]``), or with ``strict=true`` raises.
            Rounds with K < 3 fall back to the mean of all updates (``info["fallback"]``).
    strict  raise instead of clamping f / falling back (default false).

Memory: the ``[K, K]`` Gram matrix (one BLAS call, as Krum) and column blocks of the selected rows
of a few MiB (never a ``[theta, D]`` copy). Time: the Gram product O(K^2 D), ``theta`` Krum passes
over the ``[K, K]`` distances (O(K^3) with tiny constants) and a sort per coordinate (the window of
the ``beta`` values closest to the median is found without a second sort).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from .base import (
    CHUNK_BYTES,
    AggregationResult,
    AggregationRule,
    RoundContext,
    check_floating,
    check_inputs,
    gram_matrix,
    option_error,
    pairwise_sq_distances,
    parse_f,
    parse_options,
    use_numpy_path,
)


def max_byzantine_bulyan(k: int) -> int:
    """The largest f with ``K >= 4f + 3`` (negative when K < 3)."""
    return (k - 3) // 4


def recursive_krum(d2: torch.Tensor, f: int, theta: int) -> list[int]:
    """Indices chosen by ``theta`` successive Krum selections on squared distances ``d2 [K, K]``."""
    k = d2.shape[0]
    remaining = list(range(k))
    chosen: list[int] = []
    for _ in range(theta):
        r = len(remaining)
        if r == 1:
            chosen.append(remaining.pop())
            break
        sub = d2[remaining][:, remaining].clone()
        sub.fill_diagonal_(float("inf"))
        nb = max(1, r - f - 2)
        scores = torch.topk(sub, nb, dim=1, largest=False, sorted=False).values.sum(dim=1)
        best = int(torch.sort(scores, stable=True).indices[0])
        chosen.append(remaining.pop(best))
    return chosen


def closest_to_median_mean(s: Any, beta: int) -> Any:
    """Rows of ``s [c, theta]`` (each sorted ascending): the float64 mean of the ``beta`` values closest
    to the row's median, ties in distance to the lower position (NumPy array or tensor in, the same
    kind out).

    In a sorted row the ``beta`` closest values are a window ``[a, a + beta)``; the window starts at
    ``a`` = the number of ``i < theta - beta`` with ``med - s[i] > s[i + beta] - med`` (the predicate
    is monotone in i: the "k closest elements" search), so no per-row sort by distance is needed."""
    theta = s.shape[1]
    lo, hi = (theta - 1) // 2, theta // 2
    k = theta - beta
    med = s[:, lo] if lo == hi else (s[:, lo] + s[:, hi]) / 2
    if isinstance(s, torch.Tensor):
        a = ((med[:, None] - s[:, :k]) > (s[:, beta:beta + k] - med[:, None])).sum(dim=1)
        idx = a[:, None] + torch.arange(beta, device=s.device)[None, :]
        return torch.gather(s, 1, idx).to(torch.float64).mean(dim=1)
    a_np = ((med[:, None] - s[:, :k]) > (s[:, beta:beta + k] - med[:, None])).sum(axis=1)
    nidx = a_np[:, None] + np.arange(beta)[None, :]
    return np.take_along_axis(s, nidx, axis=1).mean(axis=1, dtype=np.float64)


def bulyan_coordinates(updates: torch.Tensor, selected: list[int], beta: int,
                       chunk_bytes: int = CHUNK_BYTES // 2) -> torch.Tensor:
    """Step 2 on the ``selected`` rows of ``updates [K, D]``: ``[D]`` (a block of columns at a time)."""
    d = updates.shape[1]
    theta = len(selected)
    cols = max(1, chunk_bytes // max(1, theta * updates.element_size()))
    out = torch.empty(d, dtype=updates.dtype, device=updates.device)
    if use_numpy_path(updates):
        u, o, sel = updates.numpy(), out.numpy(), np.asarray(selected)
        for start in range(0, d, cols):
            arr = np.ascontiguousarray(u[sel, start : start + cols].T)
            arr.sort(axis=1)
            o[start : start + cols] = closest_to_median_mean(arr, beta)
        return out
    idx = torch.as_tensor(selected, device=updates.device)
    for start in range(0, d, cols):
        block = torch.sort(updates[idx, start : start + cols].T, dim=1).values
        out[start : start + cols] = closest_to_median_mean(block, beta).to(updates.dtype)
    return out


def bulyan(updates: torch.Tensor, f: int) -> tuple[torch.Tensor, list[int]]:
    """Bulyan of ``updates [K, D]`` with f Byzantine (needs ``K >= 4f + 3``): ``(aggregate [D],
    selected indices in selection order)``."""
    check_floating(updates)
    k = updates.shape[0]
    if f < 0 or k < 4 * f + 3:
        raise ValueError(f"Bulyan needs K >= 4f + 3 and f >= 0; got K={k}, f={f}")
    theta, beta = k - 2 * f, k - 4 * f
    d2 = pairwise_sq_distances(gram_matrix(updates))
    selected = recursive_krum(d2, f, theta)
    return bulyan_coordinates(updates, selected, beta), selected


@dataclass(frozen=True)
class Bulyan(AggregationRule):
    """Rule object for :func:`bulyan` (registry name ``bulyan``); ``f=None`` means ``auto``."""

    f: int | None = None
    strict: bool = False
    name: str = field(default="bulyan")
    scale: ClassVar[str] = "mean"  # output on the scale of one update (the engine steps it x K, fedseq/engine.py)
    uses_weights: ClassVar[bool] = False  # sample weights are ignored: a worker's weight cannot move it (fedseq/engine.py rule_uses_weights)

    def __post_init__(self) -> None:
        if self.f is not None and self.f < 0:
            raise option_error(self.name, "f", self.f, "an integer >= 0 or 'auto'")

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult:
        check_inputs(updates, ctx.weights)
        k = updates.shape[0]
        f_max = max_byzantine_bulyan(k)
        info: dict[str, Any] = {"k": k, "f_requested": "auto" if self.f is None else self.f}
        if f_max < 0:
            if self.strict:
                raise ValueError(f"rule 'bulyan' needs K >= 3 updates, got K={k}")
            info.update(fallback="K < 3: mean of all updates", f=None)
            return AggregationResult(updates.mean(dim=0), None, info)
        f = f_max if self.f is None else self.f
        if f > f_max:
            if self.strict:
                raise ValueError(f"rule 'bulyan' needs K >= 4f + 3; got K={k}, f={f} (largest f for this K is {f_max})")
            f = f_max
        vec, selected = bulyan(updates, f)
        info.update(f=f, f_clamped=self.f is not None and f != self.f, theta=k - 2 * f, beta=k - 4 * f,
                    selected=selected)
        kept = tuple(sorted(selected))
        return AggregationResult(vec, None if len(kept) == k else kept, info)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Bulyan:
        opts = parse_options("bulyan", options, {"f": str, "strict": bool})
        return cls(**parse_f("bulyan", opts))
