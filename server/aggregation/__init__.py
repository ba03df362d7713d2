"""Aggregation rules: pure tensor functions, one file per rule, and a registry by name.

``make_rule(name, options)`` builds a configured rule; ``RULES`` lists the names. Every rule
follows :mod:`server.aggregation.base` (``rule(updates [K, D], weights [K]) -> AggregationResult``).

| name           | rule (paper in the module docstring)              | sample weights | output scale |
|----------------|---------------------------------------------------|----------------|--------------|
| ``fedavg``     | sum (default) or weighted mean                    | mean only      | sum / mean   |
| ``none``       | the paper's "common": plain sum (no options)      | no             | sum          |
| ``rfa``        | geometric median, smoothed Weiszfeld              | yes (alpha)    | mean         |
| ``mixed-rfa``  | lambda * mean + (1 - lambda) * GM (DV-FSR Eq. 10) | GM (+ option)  | mean         |
| ``median``     | coordinate-wise median                            | no             | mean         |
| ``trimmed-mean`` | coordinate-wise beta-trimmed mean               | no             | mean         |
| ``krum``       | Krum / Multi-Krum                                 | no             | mean         |
| ``norm-clip``  | clip each norm to ``bound``, then ``inner`` rule  | inner's        | inner's      |
| ``foolsgold``  | FoolsGold (round-level similarity)                | no             | sum / mean   |
| ``fltrust``    | FLTrust (needs a server root update per round)    | no             | one update   |

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

So a round fits when about ``K * D * 4`` (x2 with norm-clip) plus ``12 * K^2`` bytes fit in
memory: e.g. K = 4,096 Steam updates need about 7.1 GB. Time: rfa O(maxiter * K * D); median and
trimmed-mean O(K log K * D) (a sort per coordinate); krum and foolsgold O(K^2 * D) (one BLAS
matrix product). Measured at K = 256, D = 433,536 on the 2-core dev machine, one thread: fedavg
0.03 s, fltrust 0.05-0.09 s, median 0.15 s, trimmed-mean 0.19 s, rfa 0.2 s, mixed-rfa 0.22 s,
norm-clip 0.23 s, krum and foolsgold 0.55-0.9 s (the Gram product); see
``bench/bench_aggregation.py``. Chunked passes on CPU run in NumPy (see
:func:`base.use_numpy_path`), so they do not suffer from torch thread oversubscription.

Rules needing a per-round root update (``fltrust``, or ``norm-clip`` with ``inner=fltrust``) have
``needs_root`` true; the server binds the root with :func:`base.bind_root` before calling them.
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import (
    AggregationResult,
    AggregationRule,
    RuleConfigError,
    RuleFactory,
    bind_root,
    needs_root,
    parse_options,
)
from .fedavg import FedAvg, fedavg, server_step
from .fltrust import FLTrust, MissingRootUpdate, fltrust
from .foolsgold import FoolsGold, foolsgold, foolsgold_weights
from .krum import Krum, krum_scores, multi_krum
from .median import Median, coordinate_median
from .mixed_rfa import MixedRFA, mixed_rfa
from .norm_clip import NormClip, clip_norms
from .rfa import RFA, geometric_median
from .trimmed_mean import TrimmedMean, trimmed_mean


def _none_rule(options: Mapping[str, str]) -> AggregationRule:
    """``none``: the paper's no-defense "common" aggregation, FedAvg with ``reduce=sum``."""
    parse_options("none", options, {})
    return FedAvg(reduce="sum", weighted=False, name="none")


RULES: dict[str, RuleFactory] = {
    "fedavg": FedAvg.from_options,
    "none": _none_rule,
    "rfa": RFA.from_options,
    "mixed-rfa": MixedRFA.from_options,
    "median": Median.from_options,
    "trimmed-mean": TrimmedMean.from_options,
    "krum": Krum.from_options,
    "norm-clip": NormClip.from_options,
    "foolsgold": FoolsGold.from_options,
    "fltrust": FLTrust.from_options,
}


def make_rule(name: str, options: Mapping[str, str] | None = None) -> AggregationRule:
    """Build the rule registered as ``name`` with string ``options`` (validated, clear errors)."""
    if name not in RULES:
        raise RuleConfigError(f"unknown aggregation rule {name!r}; known rules: {', '.join(sorted(RULES))}")
    return RULES[name](dict(options or {}))


__all__ = [
    "RULES",
    "RFA",
    "AggregationResult",
    "AggregationRule",
    "FLTrust",
    "FedAvg",
    "FoolsGold",
    "Krum",
    "Median",
    "MissingRootUpdate",
    "MixedRFA",
    "NormClip",
    "RuleConfigError",
    "TrimmedMean",
    "bind_root",
    "clip_norms",
    "coordinate_median",
    "fedavg",
    "fltrust",
    "foolsgold",
    "foolsgold_weights",
    "geometric_median",
    "krum_scores",
    "make_rule",
    "mixed_rfa",
    "multi_krum",
    "needs_root",
    "server_step",
    "trimmed_mean",
]
