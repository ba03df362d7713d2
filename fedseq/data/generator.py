"""The synthetic data generator (:func:`synthetic`), the project's default data set.

Markov-structured sequences with latent clusters and Zipf popularity, small enough for a
federated run to train in seconds; deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .base import DataError, IntArray, SeqDataset, UserSequences
from .ragged import Ragged
from .split import leave_one_out

__all__ = ["CHUNK", "SCALE_KEY", "synthetic"]

CHUNK = 32768
"""Users drawn together (one random stream each) by the vectorized generator."""
SCALE_KEY = 0x5CA1E
"""Mixed into the vectorized generator's per-chunk seeds (keeps them apart from other streams)."""


class _Sampler:
    """Draws from a fixed discrete distribution over candidate item ids, avoiding excluded ids.

    Sampling uses the cumulative weights and rejection against the user's already-seen items;
    after a few rejections it falls back to an exact draw from the renormalised remainder.
    """

    _TRIES = 16

    def __init__(self, candidates: IntArray, weights: NDArray[np.float64]) -> None:
        positive = weights > 0
        self.candidates = candidates[positive]
        self.weights = weights[positive]
        self.cdf = np.cumsum(self.weights)

    def draw(self, rng: np.random.Generator, seen: set[int]) -> int | None:
        """One id not in ``seen`` drawn proportionally to its weight, or None if all are seen."""
        n = len(self.candidates)
        if n == 0:
            return None
        total = float(self.cdf[-1])
        for _ in range(self._TRIES):
            k = min(int(np.searchsorted(self.cdf, rng.random() * total, side="right")), n - 1)
            item = int(self.candidates[k])
            if item not in seen:
                return item
        mask = np.fromiter((int(c) not in seen for c in self.candidates), dtype=bool, count=n)
        if not mask.any():
            return None
        w = self.weights[mask]
        k = min(int(np.searchsorted(np.cumsum(w), rng.random() * w.sum(), side="right")), len(w) - 1)
        return int(self.candidates[mask][k])


def synthetic(
    num_users: int = 400,
    num_items: int = 300,
    seed: int = 0,
    *,
    num_clusters: int = 10,
    successors: int = 3,
    successor_concentration: float = 1.0,
    in_cluster_successor_prob: float = 0.85,
    follow_prob: float = 0.75,
    cluster_prob: float = 0.15,
    zipf_exponent: float = 1.0,
    two_cluster_prob: float = 0.35,
    median_length: float = 15.0,
    length_sigma: float = 0.6,
    min_length: int = 5,
    max_length: int = 60,
    cold_items: int = 2,
    vectorized: int = 0,
    name: str = "synthetic",
) -> SeqDataset:
    """Generate the project's default data set: sequences with learnable sequential structure.

    Generative process (everything from ``np.random.default_rng(seed)``, so deterministic):

    1. **Clusters** ("genres"): the item ids ``1..M`` are shuffled and cut into ``num_clusters``
       nearly equal clusters.
    2. **Popularity**: a random permutation ranks the items; item of rank ``r`` (1-based) gets
       weight ``r ** -zipf_exponent`` (Zipf). The ``cold_items`` lowest-ranked items get weight 0:
       they are in the catalogue but never generated, like Steam's item 1358, so the least
       popular item (the default attack target) has zero training interactions.
    3. **Transitions** (sparse first-order Markov chain): every generated item gets
       ``successors`` distinct successor items, each drawn (without replacement, proportionally
       to popularity) from the item's own cluster with probability ``in_cluster_successor_prob``
       and from the whole catalogue otherwise. Their transition probabilities are a
       ``Dirichlet(successor_concentration)`` draw sorted in decreasing order.
    4. **Users**: each user prefers one cluster, or two with probability ``two_cluster_prob``.
       The sequence length (train + test item) is a lognormal draw with median
       ``median_length`` and log-scale ``length_sigma``, rounded and clipped to
       ``[min_length, max_length]`` (a right-skewed distribution, like real data).
    5. **Sequences**: the first item is drawn from the preferred clusters by popularity. Each next
       item is, with probability ``follow_prob``, a successor of the current item (by transition
       probability); with probability ``cluster_prob``, a popular item of the preferred
       clusters; otherwise (noise) a popular item of the whole catalogue. A user never repeats
       an item (each draw skips items already in the sequence and falls back to the preferred
       clusters, then to the whole catalogue, when a source is exhausted).

    ``vectorized=1`` (for large user counts; ``synthetic:users=1000000,vectorized=1``) draws step 5
    for all users of a chunk of :data:`CHUNK` users at once with numpy instead of item by item,
    from one random stream per chunk (``SeedSequence([seed, SCALE_KEY, chunk])``), and returns
    ``train`` as a :class:`Ragged` (one flat array and offsets). Steps 1-3 are the same draws as
    the default generator's, so clusters, popularity and transitions are identical; the users'
    sequences follow the same process but are other draws (two preferred clusters are picked by
    their popularity mass, then an item within the cluster, which is the same distribution).
    Deterministic in ``seed`` and independent of how it is called; the default
    (``vectorized=0``) output is unchanged.

    The result is split leave-one-out. With the defaults (400 users, 300 items) it has about
    7,000 interactions and a next-item distribution that a bigram model, and so SASRec and
    BERT4Rec, can learn; small federated runs train on it in seconds.

    Raises:
        ValueError: a parameter out of range (the message names it).
    """
    _check_synthetic_params(**locals())  # every parameter by name (nothing else is bound yet)
    rng = np.random.default_rng(seed)
    chain = _markov_chain(
        rng, num_items, num_clusters, zipf_exponent, cold_items,
        successors, successor_concentration, in_cluster_successor_prob,
    )
    shape = _UserShape(two_cluster_prob, follow_prob, cluster_prob, median_length, length_sigma, min_length, max_length)
    if vectorized:
        return _users_vectorized(seed, num_users, num_items, name, chain, shape)
    sequences = _users_sequential(rng, num_users, chain, shape)
    return leave_one_out(sequences, name=name, num_items=num_items, min_length=2)


# -------------------------------------------------------------------------- steps 1-3
@dataclass(frozen=True)
class _Chain:
    """Steps 1-3 of :func:`synthetic`: the clusters, the popularity (index = item id; 0 unused)
    and the sparse transitions, ``succ[i]`` (k ids) with probabilities ``succ_p[i]``."""

    clusters: list[IntArray]
    popularity: NDArray[np.float64]
    succ: IntArray
    succ_p: NDArray[np.float64]


@dataclass(frozen=True)
class _UserShape:
    """The parameters of steps 4-5 of :func:`synthetic` (users and their sequences)."""

    two_cluster_prob: float
    follow_prob: float
    cluster_prob: float
    median_length: float
    length_sigma: float
    min_length: int
    max_length: int

    def lengths(self, rng: np.random.Generator, n: int) -> IntArray:
        """``n`` sequence lengths (train + test item): lognormal, rounded and clipped."""
        return np.clip(
            np.rint(rng.lognormal(math.log(self.median_length), self.length_sigma, size=n)),
            self.min_length, self.max_length,
        ).astype(np.int64)


def _markov_chain(
    rng: np.random.Generator,
    num_items: int,
    num_clusters: int,
    zipf_exponent: float,
    cold_items: int,
    successors: int,
    successor_concentration: float,
    in_cluster_successor_prob: float,
) -> _Chain:
    """Steps 1-3 of :func:`synthetic`, drawn from ``rng`` in that order."""
    ids = np.arange(1, num_items + 1, dtype=np.int64)

    # 1. clusters
    cluster_of = np.empty(num_items + 1, dtype=np.int64)
    cluster_of[0] = -1
    clusters = np.array_split(rng.permutation(ids), num_clusters)
    for c, members in enumerate(clusters):
        cluster_of[members] = c

    # 2. popularity (index = item id; 0 unused)
    rank = np.empty(num_items + 1, dtype=np.int64)
    rank[0] = 0
    rank[rng.permutation(ids)] = np.arange(1, num_items + 1)
    popularity = np.zeros(num_items + 1, dtype=np.float64)
    popularity[1:] = rank[1:].astype(np.float64) ** -zipf_exponent
    popularity[rank > num_items - cold_items] = 0.0

    # 3. transitions: succ[i] (k ids) with probabilities succ_p[i]
    succ = np.zeros((num_items + 1, successors), dtype=np.int64)
    succ_p = np.zeros((num_items + 1, successors), dtype=np.float64)
    for item in ids[popularity[1:] > 0]:
        own = clusters[cluster_of[item]]
        succ[item] = _successors_of(rng, int(item), own, ids, popularity, successors, in_cluster_successor_prob)
        succ_p[item] = np.sort(rng.dirichlet(np.full(successors, successor_concentration)))[::-1]
    return _Chain(clusters, popularity, succ, succ_p)


def _successors_of(
    rng: np.random.Generator,
    item: int,
    own: IntArray,
    ids: IntArray,
    popularity: NDArray[np.float64],
    successors: int,
    in_cluster_successor_prob: float,
) -> list[int]:
    """``item``'s distinct successors, each from its own cluster ``own`` or the whole catalogue."""
    chosen: list[int] = []
    for _ in range(successors):
        pool = own if rng.random() < in_cluster_successor_prob else ids
        w = popularity[pool].copy()
        w[pool == item] = 0.0
        w[np.isin(pool, chosen)] = 0.0
        if w.sum() <= 0:  # own cluster exhausted: use the whole catalogue
            pool = ids
            w = popularity[pool].copy()
            w[pool == item] = 0.0
            w[np.isin(pool, chosen)] = 0.0
        chosen.append(int(rng.choice(pool, p=w / w.sum())))
    return chosen


# -------------------------------------------------------------------------- steps 4-5, user by user
def _users_sequential(rng: np.random.Generator, num_users: int, chain: _Chain, shape: _UserShape) -> UserSequences:
    """Steps 4-5 of :func:`synthetic`, one user and one item at a time (the default generator)."""
    clusters, popularity = chain.clusters, chain.popularity
    num_clusters = len(clusters)
    global_sampler = _Sampler(np.arange(1, len(popularity), dtype=np.int64), popularity[1:])
    cluster_samplers = [_Sampler(members, popularity[members]) for members in clusters]
    lengths = shape.lengths(rng, num_users)

    sequences: UserSequences = []
    for user in range(num_users):
        n_pref = 2 if (num_clusters >= 2 and rng.random() < shape.two_cluster_prob) else 1
        prefs = rng.choice(num_clusters, size=n_pref, replace=False)
        members = np.concatenate([clusters[c] for c in prefs])
        pref_sampler = _Sampler(members, popularity[members]) if n_pref > 1 else cluster_samplers[prefs[0]]
        seq = _one_sequence(rng, int(lengths[user]), pref_sampler, global_sampler, chain, shape)
        sequences.append((user, np.array(seq, dtype=np.int64)))
    return sequences


def _one_sequence(
    rng: np.random.Generator, length: int, pref: _Sampler, fallback: _Sampler, chain: _Chain, shape: _UserShape
) -> list[int]:
    """Step 5 for one user: ``length`` distinct items, each following the previous one."""
    seen: set[int] = set()
    seq: list[int] = []
    current = _draw_first(rng, seen, pref, fallback)
    for _ in range(length):
        seq.append(current)
        seen.add(current)
        if len(seq) == length:
            break
        u = rng.random()
        nxt: int | None = None
        if u < shape.follow_prob:
            nxt = _draw_successor(rng, seen, chain.succ[current], chain.succ_p[current])
        elif u >= shape.follow_prob + shape.cluster_prob:
            nxt = fallback.draw(rng, seen)
        if nxt is None:
            nxt = _draw_first(rng, seen, pref, fallback)
        current = nxt
    return seq


def _draw_first(rng: np.random.Generator, seen: set[int], pref: _Sampler, fallback: _Sampler) -> int:
    item = pref.draw(rng, seen)
    if item is None:
        item = fallback.draw(rng, seen)
    if item is None:  # excluded by the max_length check in _check_synthetic_params
        raise RuntimeError("synthetic: every generatable item is already in the sequence")
    return item


def _draw_successor(
    rng: np.random.Generator, seen: set[int], succ: IntArray, probs: NDArray[np.float64]
) -> int | None:
    """A successor not yet seen, by transition probability renormalised over unseen ones."""
    total = 0.0
    for s, p in zip(succ, probs, strict=True):
        if int(s) not in seen:
            total += float(p)
    if total <= 0.0:
        return None
    r = rng.random() * total
    last: int | None = None
    for s, p in zip(succ, probs, strict=True):
        if int(s) in seen:
            continue
        last = int(s)
        r -= float(p)
        if r < 0.0:
            return last
    return last


def _check_synthetic_params(**p: Any) -> None:
    def fail(msg: str) -> None:
        raise DataError(f"synthetic: {msg}")

    for key in ("num_users", "num_items", "num_clusters", "successors", "min_length", "max_length"):
        if p[key] < 1:
            fail(f"{key} must be >= 1, got {p[key]}")
    if p["vectorized"] not in (0, 1):
        fail(f"vectorized must be 0 or 1, got {p['vectorized']}")
    if p["vectorized"] and p["num_items"] >= 2**31:
        fail(f"vectorized=1 draws item ids as int32: num_items must be < 2**31, got {p['num_items']}")
    for key in ("in_cluster_successor_prob", "follow_prob", "cluster_prob", "two_cluster_prob"):
        if not 0.0 <= p[key] <= 1.0:
            fail(f"{key} must be in [0, 1], got {p[key]}")
    if p["follow_prob"] + p["cluster_prob"] > 1.0:
        fail(f"follow_prob + cluster_prob must be <= 1, got {p['follow_prob'] + p['cluster_prob']}")
    if p["cold_items"] < 0:
        fail(f"cold_items must be >= 0, got {p['cold_items']}")
    live = p["num_items"] - p["cold_items"]
    if live < 2:
        fail(f"num_items - cold_items must be >= 2 items that can be generated, got {live}")
    if p["num_clusters"] > live:
        fail(f"num_clusters ({p['num_clusters']}) must be <= num_items - cold_items ({live})")
    if p["successors"] >= live:
        fail(f"successors ({p['successors']}) must be < num_items - cold_items ({live})")
    if p["min_length"] < 2:
        fail(f"min_length must be >= 2 (a test item and at least one training item), got {p['min_length']}")
    if p["max_length"] < p["min_length"]:
        fail(f"max_length ({p['max_length']}) must be >= min_length ({p['min_length']})")
    if p["max_length"] > live:
        fail(
            f"max_length ({p['max_length']}) must be <= num_items - cold_items ({live}): items do not repeat"
        )
    if not (p["successor_concentration"] > 0 and math.isfinite(p["successor_concentration"])):
        fail(f"successor_concentration must be > 0, got {p['successor_concentration']}")
    if not (p["zipf_exponent"] >= 0 and math.isfinite(p["zipf_exponent"])):
        fail(f"zipf_exponent must be >= 0, got {p['zipf_exponent']}")
    if not (p["median_length"] > 0 and math.isfinite(p["median_length"])):
        fail(f"median_length must be > 0, got {p['median_length']}")
    if not (p["length_sigma"] >= 0 and math.isfinite(p["length_sigma"])):
        fail(f"length_sigma must be >= 0, got {p['length_sigma']}")


# -------------------------------------------------------------------------- vectorized users
def _release_freed_memory() -> None:
    """Hand the chunks' freed heap back to the OS (glibc keeps it otherwise: about the data set's
    size again in RSS at 100k users). Best effort; a no-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _users_vectorized(
    seed: int, num_users: int, num_items: int, name: str, chain: _Chain, shape: _UserShape
) -> SeqDataset:
    """Steps 4-5 of :func:`synthetic` for chunks of users at once, straight into CSR form."""
    table = _ClusterTable(chain)
    # every chunk's lengths first (their first draw), so the flat array is allocated once and
    # each chunk writes into it: the peak is the data set plus one chunk, not twice the data set
    starts = range(0, num_users, CHUNK)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    lengths = [_chunk_stream(seed, c, num_users, shape)[1] for c in range(len(starts))]
    np.cumsum(np.concatenate(lengths) - 1, out=offsets[1:])
    flat_all = np.empty(int(offsets[-1]), dtype=np.int64)
    test_all = np.empty(num_users, dtype=np.int64)
    for chunk, start in enumerate(starts):
        rng, length = _chunk_stream(seed, chunk, num_users, shape)
        _write_chunk(_ChunkUsers(rng, length, table, chain, shape).draw(), length, start, offsets, flat_all, test_all)
    train = Ragged(flat_all, offsets)
    _release_freed_memory()
    return SeqDataset(name=name, num_items=int(num_items), train=train, test=test_all,
                      user_ids=np.arange(num_users, dtype=np.int64))


def _chunk_stream(seed: int, chunk: int, num_users: int, shape: _UserShape) -> tuple[np.random.Generator, IntArray]:
    """The chunk's random stream after its first draw, the sequence lengths (train + test)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, SCALE_KEY, chunk]))
    return rng, shape.lengths(rng, min(CHUNK, num_users - chunk * CHUNK))


def _write_chunk(
    seqs: NDArray[np.int32], length: IntArray, start: int, offsets: IntArray, flat_all: IntArray, test_all: IntArray
) -> None:
    """Copy a chunk's sequences (users ``start..start+B-1``) into ``flat_all`` and ``test_all``."""
    B = len(length)
    keep = np.arange(seqs.shape[1])[None, :] < (length - 1)[:, None]
    flat_all[offsets[start] : offsets[start + B]] = seqs[keep]
    test_all[start : start + B] = seqs[np.arange(B), length - 1]


class _ClusterTable:
    """What the vectorized generator draws items from by popularity.

    Items ordered by cluster with one running cumulative weight ``cum``: cluster ``c`` spans
    ``[lo[c], hi[c])`` and has popularity mass ``mass[c]``; ``gcdf`` is the global cumulative
    weight (index ``k`` -> item ``k + 1``).
    """

    def __init__(self, chain: _Chain) -> None:
        popularity = chain.popularity
        self.num_items = len(popularity) - 1
        self.order = np.concatenate(chain.clusters)
        sizes = np.array([len(c) for c in chain.clusters], dtype=np.int64)
        self.hi = np.cumsum(sizes)
        self.lo = self.hi - sizes
        self.cum = np.cumsum(popularity[self.order])
        self.base = np.where(self.lo > 0, self.cum[np.maximum(self.lo - 1, 0)], 0.0)
        self.mass = self.cum[self.hi - 1] - self.base
        self.gcdf = np.cumsum(popularity[1:])
        self.gtotal = float(self.gcdf[-1])
        self.succ_cdf = np.cumsum(chain.succ_p, axis=1)
        self.global_sampler = _Sampler(np.arange(1, self.num_items + 1, dtype=np.int64), popularity[1:])

    def draw_cluster(self, rng: np.random.Generator, c: IntArray) -> IntArray:
        """One item per entry of ``c`` from that cluster, by popularity."""
        r = self.base[c] + rng.random(len(c)) * self.mass[c]
        k = np.searchsorted(self.cum, r, side="right")
        return self.order[np.clip(k, self.lo[c], self.hi[c] - 1)]

    def draw_global(self, rng: np.random.Generator, n: int) -> IntArray:
        """``n`` items from the whole catalogue, by popularity."""
        k = np.searchsorted(self.gcdf, rng.random(n) * self.gtotal, side="right")
        return np.minimum(k, self.num_items - 1) + 1


class _ChunkUsers:
    """Steps 4-5 for one chunk of ``B`` users at once, drawn from the chunk's stream ``rng``."""

    def __init__(
        self, rng: np.random.Generator, length: IntArray, table: _ClusterTable, chain: _Chain, shape: _UserShape
    ) -> None:
        self.rng, self.length, self.table, self.chain, self.shape = rng, length, table, chain, shape
        B = len(length)
        num_clusters = len(chain.clusters)
        p1 = rng.integers(num_clusters, size=B)
        if num_clusters >= 2:
            two = rng.random(B) < shape.two_cluster_prob
            p2 = np.where(two, (p1 + 1 + rng.integers(num_clusters - 1, size=B)) % num_clusters, p1)
        else:
            p2 = p1
        self.p1, self.p2 = p1, p2
        self.m1, self.m2 = table.mass[p1], table.mass[p2]
        self.seqs = np.zeros((B, shape.max_length), dtype=np.int32)  # item ids < 2**31 (half the chunk's bytes)

    def draw(self) -> NDArray[np.int32]:
        """The ``[B, max_length]`` sequences (row ``i`` valid up to ``length[i]``)."""
        rows = np.arange(len(self.length))
        self.seqs[:, 0] = self.unseen_or_redraw(rows, self.pref_draw(rows), 0, "pref")
        for t in range(1, self.shape.max_length):
            rows = np.flatnonzero(self.length > t)
            if not len(rows):
                break
            self.seqs[rows, t] = self._step(rows, t)
        return self.seqs

    def _step(self, rows: IntArray, t: int) -> IntArray:
        """The items at position ``t`` of the sequences ``rows`` (those longer than ``t``)."""
        cur = self.seqs[rows, t - 1]
        u = self.rng.random(len(rows))
        nxt = np.zeros(len(rows), dtype=np.int64)
        f = np.flatnonzero(u < self.shape.follow_prob)
        if len(f):
            self._follow(nxt, f, rows[f], cur[f], t)
        g = np.flatnonzero(u >= self.shape.follow_prob + self.shape.cluster_prob)
        if len(g):
            nxt[g] = self.unseen_or_redraw(rows[g], self.table.draw_global(self.rng, len(g)), t, "global")
        rest = np.flatnonzero(nxt == 0)  # the cluster source, and exhausted successors/global
        if len(rest):
            nxt[rest] = self.unseen_or_redraw(rows[rest], self.pref_draw(rows[rest]), t, "pref")
        return nxt

    def _follow(self, nxt: IntArray, f: IntArray, rows: IntArray, cur: NDArray[np.int32], t: int) -> None:
        """Set ``nxt[f]`` to successors of the current items ``cur``, renormalised over those not
        yet seen; left 0 where every successor is seen."""
        sc = self.chain.succ[cur]
        unseen = ~(sc[:, :, None] == self.seqs[rows, None, :t]).any(axis=2)
        p = np.diff(self.table.succ_cdf[cur], axis=1, prepend=0.0) * unseen
        tot = p.sum(axis=1)
        r = self.rng.random(len(f)) * tot
        k = np.minimum((np.cumsum(p, axis=1) <= r[:, None]).sum(axis=1), sc.shape[1] - 1)
        ok = tot > 0
        nxt[f[ok]] = sc[ok, k[ok]]

    def pref_draw(self, rows: IntArray) -> IntArray:
        """Per row one of its preferred clusters by its popularity mass, then an item in it."""
        p1, p2, m1 = self.p1[rows], self.p2[rows], self.m1[rows]
        tot = m1 + np.where(p2 != p1, self.m2[rows], 0.0)
        pick2 = (p2 != p1) & (self.rng.random(len(rows)) * tot >= m1)
        return self.table.draw_cluster(self.rng, np.where(pick2, p2, p1))

    def unseen_or_redraw(self, rows: IntArray, cand: IntArray, t: int, source: str) -> IntArray:
        """``cand`` with items already in a row's sequence redrawn (rejection, then exact)."""
        for _ in range(_Sampler._TRIES):
            dup = (self.seqs[rows, :t] == cand[:, None]).any(axis=1)
            if not dup.any():
                return cand
            idx = np.flatnonzero(dup)
            cand[idx] = self.pref_draw(rows[idx]) if source == "pref" else self.table.draw_global(self.rng, len(idx))
        dup = np.flatnonzero((self.seqs[rows, :t] == cand[:, None]).any(axis=1))
        for j in dup.tolist():  # rare: exact draw from what is left
            cand[j] = self._exact_draw(int(rows[j]), t, source)
        return cand

    def _exact_draw(self, row: int, t: int, source: str) -> int:
        """An item not in ``row``'s first ``t`` items, exactly (preferred clusters first for "pref")."""
        seen = set(self.seqs[row, :t].tolist())
        clusters, p1, p2 = self.chain.clusters, self.p1[row], self.p2[row]
        members = np.concatenate([clusters[p1], clusters[p2]]) if p2 != p1 else clusters[p1]
        item = _Sampler(members, self.chain.popularity[members]).draw(self.rng, seen) if source == "pref" else None
        if item is None:
            item = self.table.global_sampler.draw(self.rng, seen)
        if item is None:  # excluded by the max_length check
            raise RuntimeError("synthetic: every generatable item is already in the sequence")
        return item
