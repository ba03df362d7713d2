"""Norm bounding (norm clipping) in front of any other rule.

Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", arXiv:1911.07963
(NeurIPS 2019 FL workshop): the server scales every update to L2 norm at most ``bound``,

    g_i <- g_i * min(1, bound / ||g_i||)

and then aggregates the clipped updates with the ``inner`` rule (default ``fedavg``, i.e. the
paper's sum; any other registered rule except ``norm-clip`` itself). The inner rule's options are
given with an ``inner.`` prefix, e.g. ``bound=5 inner=trimmed-mean inner.beta=0.2``. Sample
weights are passed through to the inner rule unchanged.

Options: ``bound`` (float > 0, required), ``inner`` (rule name, default ``fedavg``),
``inner.<key>=<value>``. Extra memory: a clipped copy of the round (``K * D`` floats) when at least
one update is clipped (none when no update exceeds the bound), plus whatever the inner rule uses.
The round's context (:class:`fedseq.engine.RoundContext`) goes to the inner rule unchanged, and the
rule declares what its inner rule declares (``needs_root``, ``root_users``, ``needs_layout``,
``scale``, ``uses_weights``): with ``inner=fltrust`` the engine puts the root update in the
context and the inner rule reads it there; the root is not clipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import (
    AggregationResult,
    AggregationRule,
    RoundContext,
    RuleConfigError,
    WrappingRule,
    check_floating,
    check_inputs,
    option_error,
    parse_options,
    split_inner,
)


def clip_norms(updates: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale each row of ``updates [K, D]`` to norm <= ``bound``.

    Returns ``(clipped [K, D], norms_before float64 [K], clipped_mask bool [K])``; ``clipped`` is
    ``updates`` itself (no copy) when no row exceeds the bound.
    """
    check_floating(updates)
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    norms = torch.linalg.vector_norm(updates, dim=1).to(torch.float64)
    mask = norms > bound
    if not bool(mask.any()):
        return updates, norms, mask
    scale = torch.where(mask, bound / norms.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
    return updates * scale.to(updates.dtype)[:, None], norms, mask


@dataclass(frozen=True)
class NormClip(WrappingRule):
    """Rule object: :func:`clip_norms` then ``inner_rule`` (registry name ``norm-clip``); its
    declarations are the inner rule's."""

    bound: float
    inner_rule: AggregationRule = field(compare=False)
    inner: str = "fedavg"
    name: str = "norm-clip"

    def __post_init__(self) -> None:
        if not self.bound > 0:
            raise option_error(self.name, "bound", self.bound, "a float > 0")

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult:
        check_inputs(updates, ctx.weights)
        clipped, norms, mask = clip_norms(updates, self.bound)
        res = self.inner_rule(clipped, ctx)
        info: dict[str, Any] = {
            "bound": self.bound,
            "clipped": int(mask.sum()),
            "max_norm_before": float(norms.max()),
            "mean_norm_before": float(norms.mean()),
            "inner": self.inner,
            "inner_info": dict(res.info),
        }
        return AggregationResult(res.vector, res.kept, info)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> NormClip:
        from . import make_rule  # late import: the registry imports this module

        own, inner_opts = split_inner(options)
        opts = parse_options("norm-clip", own, {"bound": float, "inner": str})
        if "bound" not in opts:
            raise RuleConfigError("rule 'norm-clip' needs option bound=<float > 0> (the L2 norm bound)")
        inner = opts.get("inner", "fedavg")
        if inner == "norm-clip":
            raise option_error("norm-clip", "inner", inner, "any registered rule other than 'norm-clip'")
        return cls(bound=opts["bound"], inner_rule=make_rule(inner, inner_opts), inner=inner)
