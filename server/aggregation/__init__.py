"""Aggregation rules: pure tensor functions, one file per rule, and a registry by name.

``make_rule(name, options)`` builds a configured rule; ``RULES`` lists the names. Every rule
follows :mod:`server.aggregation.base` (``rule(updates [K, D], ctx) -> AggregationResult``, ``ctx``
the round's :class:`fedseq.engine.RoundContext`: the weights ``[K]``, the round id, the parameter
layout, the global weights, and the root update for a rule that declares ``needs_root``).

| name           | rule (paper in the module docstring)              | sample weights (``uses_weights``) | output scale |
|----------------|---------------------------------------------------|----------------|--------------|
| ``fedavg``     | sum (default) or weighted mean                    | mean only      | sum / mean   |
| ``none``       | the paper's "common": plain sum (no options)      | no             | sum          |
| ``mean``       | plain unweighted mean (no options)                | no             | mean         |
| ``rfa``        | geometric median, smoothed Weiszfeld              | yes (alpha)    | mean         |
| ``mixed-rfa``  | lambda * mean + (1 - lambda) * GM (DV-FSR Eq. 10) | GM (+ option)  | mean         |
| ``median``     | coordinate-wise median                            | no             | mean         |
| ``trimmed-mean`` | coordinate-wise beta-trimmed mean               | no             | mean         |
| ``krum``       | Krum / Multi-Krum                                 | no             | mean         |
| ``norm-clip``  | clip each norm to ``bound``, then ``inner`` rule  | inner's        | inner's      |
| ``foolsgold``  | FoolsGold (round-level similarity)                | no             | sum / mean   |
| ``fltrust``    | FLTrust (needs a server root update per round)    | no             | one update   |
| ``sparse``     | item-wise sparse: ``inner`` rule per item row over | inner's        | sum          |
|                | the updates touching it, ``inner`` on the rest     |                |              |
| ``bulyan``     | Bulyan: recursive Krum, then the beta values      | no             | mean         |
|                | closest to the coordinate-wise median              |                |              |
| ``flame``      | FLAME: cosine clustering (HDBSCAN single cluster), | no             | mean         |
|                | median-norm clipping, seeded Gaussian noise        |                |              |
| ``dnc``        | DnC: drop top-singular-direction outliers on       | no             | mean         |
|                | seeded coordinate samples, mean of the rest        |                |              |
| ``dp-fixed``   | central DP: clip to ``clip``, ``inner`` rule (default | inner's     | inner's      |
|                | the plain sum), seeded Gaussian noise ``noise``*C   |                |              |
| ``dp-adaptive`` | central DP, the clip following a private quantile | inner's       | inner's      |
|                | of the update norms (state carried between rounds) |                |              |

Robust rules that estimate a mean ("mean" scale) give steps about K times smaller than the paper's
sum at the same learning rate; the experiment chooses the learning rate accordingly.

Round size and memory. The round is one ``[K, D]`` matrix: ``K * D * 4`` bytes in float32
(K = 256 Steam SASRec updates of D = 433,536 parameters: 444 MB). On top of it, each rule needs:

- fedavg / none / fltrust: the ``[D]`` output and O(K) scalars.
- rfa / mixed-rfa: two ``[D]`` vectors plus one row chunk of at most 8 MiB
  (:data:`base.CHUNK_BYTES`); distances are computed directly, never via a ``[K, D]`` copy.
- median / trimmed-mean: the ``[D]`` output plus column chunks of about 4 MiB (sorted in place).
- krum / foolsgold: the ``[K, K]`` Gram matrix (float32 and float64: 12 * K^2 bytes, 0.8 MB at
  K = 256, 200 MB at K = 4,096); no ``[K, K, D]`` or ``[K, D]`` intermediate.
- norm-clip: a clipped ``[K, D]`` copy (doubles the round) when any update is clipped, plus the
  inner rule's extra.
- bulyan: the ``[K, K]`` Gram matrix (as krum) and column blocks of the selected rows of a few MiB.
- flame: the ``[K, K]`` Gram matrix and one ``[D]`` noise vector.
- dnc: a ``[K, b]`` float64 coordinate sample (20 MB at K = 256, b = 10,000) and ``[K, K]``.
- sparse: the ``[K, R]`` touched mask of the item table (R rows), the touchers' rows gathered once
  (``touches x W`` floats: about 27,000 x 64 = 7 MB on a Steam round with 3 dense updates), the
  inner rule on the ``[K, D - R W]`` shared part (a view when the table comes first, as in SASRec
  and BERT4Rec), plus the inner rule's extra on each ``[G, n, W]`` block of rows touched n times.

So a round fits when about ``K * D * 4`` (x2 with norm-clip) plus ``12 * K^2`` bytes fit in
memory: e.g. K = 4,096 Steam updates need about 7.1 GB. Time: rfa O(maxiter * K * D); median and
trimmed-mean O(K log K * D) (a sort per coordinate); krum and foolsgold O(K^2 * D) (one BLAS
matrix product). What a round costs each rule at K = 256, D = 433,536 (one dense Steam SASRec
round) is in docs/results/aggregation.md (``bench/bench_aggregation.py``), for ``sparse`` on a
Steam-shaped round and the later rules in docs/results/newer-defenses.md
(``bench/bench_sparse.py``). Chunked passes on CPU run in NumPy (see
:func:`base.use_numpy_path`), so they do not suffer from torch thread oversubscription.

Option syntax: ``--defense NAME --defense-opt k=v`` or ``--defense NAME:k=v,k=v`` (the sweep's
cell syntax; :func:`parse_rule_spec`); a wrapping rule's first bare item names its inner rule:
``sparse:median`` = ``sparse:inner=median``, inner options as ``inner.<key>=<value>``.
``sparse`` declares ``needs_layout`` (it reads where the item table sits from ``ctx.layout``): the
round engine (:func:`fedseq.engine.aggregate_round`) passes the model's layout in both runners.

Rules needing a per-round root update (``fltrust``, or ``norm-clip``/``sparse`` with
``inner=fltrust``) declare ``needs_root``; the engine computes the root with the runner's root
source (fedseq/root.py) and passes it as ``ctx.root``. Seeded rules (``flame``, ``dnc``) draw
from (their seed, ``ctx.round_id``).

A new rule: subclass :class:`AggregationRule` (a frozen dataclass), implement
``__call__(self, updates, ctx)`` reading what it needs from ``ctx``, override the declarations whose
defaults (``scale="mean"``, ``uses_weights=True``, ``needs_root=False``, ``needs_layout=False``,
``root_users=0``) do not fit, and register its ``from_options`` in :data:`RULES`.
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import (
    AggregationResult,
    AggregationRule,
    RoundContext,
    RuleConfigError,
    RuleFactory,
    parse_options,
    rule_scale,
    rule_uses_weights,
)
from .bulyan import Bulyan, bulyan
from .dnc import DnC, dnc
from .dp import DPAdaptive, DPFixed, gaussian_sigma
from .fedavg import FedAvg, fedavg, server_step
from .flame import Flame, flame, single_cluster
from .fltrust import FLTrust, MissingRootUpdate, fltrust
from .foolsgold import FoolsGold, foolsgold, foolsgold_weights
from .krum import Krum, krum_scores, multi_krum
from .median import Median, coordinate_median
from .mixed_rfa import MixedRFA, mixed_rfa
from .norm_clip import NormClip, clip_norms
from .rfa import RFA, geometric_median
from .sparse import ItemRows, MissingLayout, SparseAggregation, sparse_aggregate
from .trimmed_mean import TrimmedMean, trimmed_mean


def _none_rule(options: Mapping[str, str]) -> AggregationRule:
    """``none``: the paper's no-defense "common" aggregation, FedAvg with ``reduce=sum``."""
    parse_options("none", options, {})
    return FedAvg(reduce="sum", weighted=False, name="none")


def _mean_rule(options: Mapping[str, str]) -> AggregationRule:
    """``mean``: the plain unweighted mean of the round's updates (``fedavg`` with ``reduce=mean``,
    ``weighted=false``; mean scale); ``sparse:mean`` is then the sparse sum."""
    parse_options("mean", options, {})
    return FedAvg(reduce="mean", weighted=False, name="mean")


RULES: dict[str, RuleFactory] = {
    "fedavg": FedAvg.from_options,
    "none": _none_rule,
    "mean": _mean_rule,
    "rfa": RFA.from_options,
    "mixed-rfa": MixedRFA.from_options,
    "median": Median.from_options,
    "trimmed-mean": TrimmedMean.from_options,
    "krum": Krum.from_options,
    "norm-clip": NormClip.from_options,
    "foolsgold": FoolsGold.from_options,
    "fltrust": FLTrust.from_options,
    "sparse": SparseAggregation.from_options,
    "bulyan": Bulyan.from_options,
    "flame": Flame.from_options,
    "dnc": DnC.from_options,
    "dp-fixed": DPFixed.from_options,
    "dp-adaptive": DPAdaptive.from_options,
}


#: rules whose first bare spec item names their inner rule: ``sparse:median`` = ``sparse:inner=median``
INNER_SHORTHAND = ("sparse", "norm-clip", "dp-fixed", "dp-adaptive")


def parse_rule_spec(spec: str, options: Mapping[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """``"name:k=v,k=v"`` (the sweep's cell syntax, also accepted by ``--defense``) plus ``options``
    -> ``(name, options)``. For a wrapping rule (:data:`INNER_SHORTHAND`) a first item without
    ``=`` names the inner rule: ``sparse:trimmed-mean`` is ``sparse:inner=trimmed-mean``. An option
    given both in the spec and in ``options`` is an error."""
    name, sep, rest = spec.partition(":")
    name = name.strip()
    merged: dict[str, str] = {}
    if sep:
        for i, item in enumerate(x.strip() for x in rest.split(",")):
            if not item:
                continue
            if "=" not in item:
                if i == 0 and name in INNER_SHORTHAND:
                    merged["inner"] = item
                    continue
                hint = f" (the first item may name the inner rule of {', '.join(INNER_SHORTHAND)})"
                raise RuleConfigError(f"rule spec {spec!r}: option {item!r} must look like key=value{hint}")
            k, v = item.split("=", 1)
            merged[k.strip()] = v.strip()
    for k, v in (options or {}).items():
        if k in merged and merged[k] != v:
            raise RuleConfigError(f"rule spec {spec!r} sets {k}={merged[k]!r} and the options set {k}={v!r}")
        merged[k] = v
    return name, merged


SEEDED_RULES = frozenset({"flame", "dnc", "dp-fixed", "dp-adaptive"})  # rules with a ``seed`` option for their random draws


def make_run_rule(defense: str, options: Mapping[str, str], run_seed: int,
                  round_size: int | None = None) -> AggregationRule:
    """The rule of a run: :func:`make_rule`, and a seeded rule (:data:`SEEDED_RULES`, also as the
    inner rule of ``sparse:``/``norm-clip``) draws from the run's seed unless its options name one,
    so runs with different seeds draw different noise and subsets (and runs of one seed the same).
    ``round_size`` (the run's clients per round) sets ``dp-adaptive``'s default ``count_std``,
    0.05 of it, so that a noise it cannot carry fails when the run starts, not at its first round."""
    name, opts = parse_rule_spec(defense, options)
    if name == "dp-adaptive" and round_size:
        opts.setdefault("count_std", repr(0.05 * round_size))
    if name in SEEDED_RULES:
        opts.setdefault("seed", str(int(run_seed)))
    if name in INNER_SHORTHAND and opts.get("inner", "").split(":", 1)[0] in SEEDED_RULES:
        opts.setdefault("inner.seed", str(int(run_seed)))  # the inner rule's options carry the "inner." prefix
    return make_rule(name, opts)


def make_rule(name: str, options: Mapping[str, str] | None = None) -> AggregationRule:
    """Build the rule registered as ``name`` with string ``options`` (validated, clear errors).
    ``name`` may carry options as ``name:k=v,k=v`` (:func:`parse_rule_spec`)."""
    name, opts = parse_rule_spec(name, options)
    if name not in RULES:
        raise RuleConfigError(f"unknown aggregation rule {name!r}; known rules: {', '.join(sorted(RULES))}")
    return RULES[name](opts)


__all__ = [
    "RULES",
    "RFA",
    "AggregationResult",
    "AggregationRule",
    "Bulyan",
    "DPAdaptive",
    "DPFixed",
    "DnC",
    "FLTrust",
    "FedAvg",
    "Flame",
    "FoolsGold",
    "ItemRows",
    "Krum",
    "Median",
    "MissingLayout",
    "MissingRootUpdate",
    "MixedRFA",
    "NormClip",
    "RoundContext",
    "RuleConfigError",
    "SparseAggregation",
    "TrimmedMean",
    "bulyan",
    "clip_norms",
    "coordinate_median",
    "dnc",
    "fedavg",
    "flame",
    "fltrust",
    "gaussian_sigma",
    "foolsgold",
    "foolsgold_weights",
    "geometric_median",
    "krum_scores",
    "make_rule",
    "make_run_rule",
    "mixed_rfa",
    "multi_krum",
    "parse_rule_spec",
    "rule_scale",
    "rule_uses_weights",
    "server_step",
    "single_cluster",
    "sparse_aggregate",
    "trimmed_mean",
]
