"""FLAME: cluster by direction, clip to the median norm, add Gaussian noise.

Nguyen, Rieger, Chen, Yalame, Möllering, Fereidooni, Marchal, Miettinen, Mirhoseini, Zeitouni,
Koushanfar, Sadeghi, Schneider, "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022
(Algorithm 1).

1. Filtering: pairwise cosine distances ``c_ij = 1 - cos(g_i, g_j)`` (a zero update is at distance 1
   from everything), clustered by HDBSCAN with ``min_cluster_size = floor(K / 2) + 1``,
   ``min_samples = 1`` and a single cluster allowed; the updates in the cluster (always a majority)
   are admitted, the rest (HDBSCAN's noise) removed.
2. Clipping: ``S = median_i ||g_i||`` over all K updates (numpy.median); each admitted update is
   scaled by ``min(1, S / ||g_i||)``.
3. Aggregation and noise: the mean of the clipped admitted updates plus ``N(0, (lambda S)^2)`` per
   coordinate (option ``noise`` = lambda, the paper's 0.001 by default; 0 turns the noise off).

fedseq clusters the *updates* (the paper writes the local models; with one global model per round
``W_i = G - lr g_i``, and in paper mode the common G would dominate every cosine). The noise is added to
the aggregate in update units; after the engine's step (``lr * K`` for this mean-scale rule) it is
the paper's model noise ``lambda * S_model`` with ``S_model`` the median norm of the implied model
changes.

HDBSCAN without the dependency (``hdbscan`` needs SciPy and scikit-learn, which fedseq does not
carry): with ``min_samples = 1`` HDBSCAN's mutual-reachability distance *is* the distance, so its
tree is the single-linkage tree (the minimum spanning tree of the cosine distances, Prim's algorithm
here); with ``min_cluster_size > K / 2`` no split can have two children big enough to be clusters,
so the condensed tree has one cluster, the root, which ``allow_single_cluster`` selects; and
HDBSCAN labels a point as a member of a lone root cluster when it left the cluster at the largest
lambda (= 1 / distance) of any of the root's children. That is: walk down the single-linkage tree
from the root, always into the child with at least ``min_cluster_size`` points, until neither child
is that big; the points of that last node (and any that left at exactly its distance) are admitted.
:func:`single_cluster` computes exactly this; it can differ from the library only in how ties between
equal distances order the tree (here: by index). Checked against hdbscan 0.8.44 (``HDBSCAN(
min_cluster_size=K // 2 + 1, min_samples=1, allow_single_cluster=True, metric="precomputed")``) on
300 random rounds of 3-59 updates in 1-4 direction clusters: the same admitted set every time
(tests/test_fl_defenses.py repeats the check when ``hdbscan`` is installed).

Randomness: the noise of round t comes from a generator seeded by (option ``seed``, the round id
``ctx.round_id`` of the round's :class:`fedseq.engine.RoundContext`), so both runners add the same noise.
In a run the seed defaults to the run's seed (:func:`make_run_rule`), so seeds differ in noise too.

Options: ``noise`` (lambda, float >= 0, default 0.001), ``seed`` (int; default the run's seed, 0 outside a run). Sample weights are
ignored (as in the paper); the output is on the scale of a mean. Memory: the ``[K, K]`` Gram matrix
and one ``[D]`` noise vector; time O(K^2 D) for the Gram product plus O(K^2) for the tree.
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
    add_seeded_noise,
    check_floating,
    check_inputs,
    gram_matrix,
    option_error,
    parse_options,
)

FLAME_KEY = 0xF1A3  # stream of FLAME's noise
DEFAULT_NOISE = 0.001


def cosine_distances(updates: torch.Tensor) -> np.ndarray:
    """``1 - cos(g_i, g_j)`` as float64 ``[K, K]`` (1 against a zero update, 0 on the diagonal)."""
    gram = gram_matrix(updates).cpu().numpy()
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    denom = norms[:, None] * norms[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), 0.0)
    dist = 1.0 - np.clip(cos, -1.0, 1.0)
    np.fill_diagonal(dist, 0.0)
    return dist


def minimum_spanning_tree(dist: np.ndarray) -> list[tuple[float, int, int]]:
    """Prim's algorithm on a dense symmetric ``[K, K]`` distance matrix: the K - 1 edges
    ``(distance, i, j)`` (ties to the lower index)."""
    k = dist.shape[0]
    in_tree = np.zeros(k, dtype=bool)
    in_tree[0] = True
    best = dist[0].copy()
    parent = np.zeros(k, dtype=np.int64)
    edges = []
    for _ in range(k - 1):
        cand = np.where(in_tree, np.inf, best)
        j = int(np.argmin(cand))
        edges.append((float(best[j]), int(parent[j]), j))
        in_tree[j] = True
        closer = (dist[j] < best) & ~in_tree
        best = np.where(closer, dist[j], best)
        parent = np.where(closer, j, parent)
    return edges


def single_cluster(dist: np.ndarray, min_cluster_size: int) -> list[int]:
    """The members of HDBSCAN's lone cluster (min_samples = 1, allow_single_cluster, and
    ``min_cluster_size > K / 2``) for the distance matrix ``dist [K, K]``; see the module docstring."""
    k = dist.shape[0]
    if k == 1:
        return [0]
    if not 2 * min_cluster_size > k:
        raise ValueError(f"single_cluster needs min_cluster_size > K / 2, got {min_cluster_size} for K={k}")
    # the single-linkage tree, bottom-up: node k + t merges two nodes at distance height[t]
    edges = sorted(minimum_spanning_tree(dist), key=lambda e: e[0])
    uf = list(range(k))

    def find(x: int) -> int:
        while uf[x] != x:
            uf[x] = uf[uf[x]]
            x = uf[x]
        return x

    node_of = list(range(k))  # union-find root -> its tree node
    children: list[tuple[int, int]] = []
    height: list[float] = []
    size = [1] * k
    for d, i, j in edges:
        a, b = find(i), find(j)
        children.append((node_of[a], node_of[b]))
        height.append(d)
        size.append(size[node_of[a]] + size[node_of[b]])
        uf[b] = a
        node_of[a] = k + len(children) - 1

    def leaves(n: int) -> list[int]:
        out, stack = [], [n]
        while stack:
            x = stack.pop()
            if x < k:
                out.append(x)
            else:
                stack.extend(children[x - k])
        return out

    # walk down from the root into the child big enough to stay a cluster
    fell: dict[int, float] = {}  # point -> distance at which it left the cluster
    node = 2 * k - 2
    while True:
        a, b = children[node - k]
        big = [c for c in (a, b) if size[c] >= min_cluster_size]
        h = height[node - k]
        if not big:
            final = h
            members = set(leaves(node))
            break
        small = b if big[0] == a else a
        for p in leaves(small):
            fell[p] = h
        node = big[0]
    members |= {p for p, h in fell.items() if h <= final}
    return sorted(members)


def flame(updates: torch.Tensor, noise: float = DEFAULT_NOISE, seed: int = 0,
          round_id: int = 0) -> tuple[torch.Tensor, list[int], dict[str, Any]]:
    """FLAME of ``updates [K, D]``: ``(aggregate [D], admitted indices, facts)``."""
    check_floating(updates)
    k = updates.shape[0]
    admitted = single_cluster(cosine_distances(updates), k // 2 + 1)
    norms = torch.linalg.vector_norm(updates, dim=1).to(torch.float64)
    bound = float(np.median(norms.cpu().numpy()))
    factor = torch.where(norms > bound, bound / norms.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
    coef = torch.zeros(k, dtype=torch.float64, device=updates.device)
    coef[admitted] = factor[admitted] / len(admitted)
    vec = coef.to(updates.dtype) @ updates
    sigma = noise * bound
    vec = add_seeded_noise(vec, sigma, seed, FLAME_KEY, round_id)
    facts = {"median_norm": bound, "sigma": sigma, "clipped": int((norms[admitted] > bound).sum())}
    return vec, admitted, facts


@dataclass(frozen=True)
class Flame(AggregationRule):
    """Rule object for :func:`flame` (registry name ``flame``)."""

    noise: float = DEFAULT_NOISE
    seed: int = 0
    name: str = "flame"
    scale: ClassVar[str] = "mean"  # output on the scale of one update (the engine steps it x K, fedseq/engine.py)
    uses_weights: ClassVar[bool] = False  # sample weights are ignored: a worker's weight cannot move it (fedseq/engine.py rule_uses_weights)

    def __post_init__(self) -> None:
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise option_error(self.name, "noise", self.noise, "a finite float >= 0 (lambda; 0 = no noise)")

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult:
        """FLAME of the round; the noise is round ``ctx.round_id``'s."""
        check_inputs(updates, ctx.weights)
        k = updates.shape[0]
        vec, admitted, facts = flame(updates, self.noise, self.seed, ctx.round_id)
        info: dict[str, Any] = {"noise": self.noise, "round_id": ctx.round_id, "admitted": len(admitted),
                                "removed": k - len(admitted), **facts}
        return AggregationResult(vec, None if len(admitted) == k else tuple(admitted), info)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Flame:
        return cls(**parse_options("flame", options, {"noise": float, "seed": int}))
