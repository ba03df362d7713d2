"""Central differential privacy with fixed clipping: clip every update, aggregate, add Gaussian noise.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models", ICLR
2018 (DP-FedAvg; user-level privacy): the server clips each user's update to L2 norm ``clip``
(C), so that one user moves the round's sum by at most C, and adds Gaussian noise of standard
deviation ``noise * clip`` (z C, z the noise multiplier) to every coordinate of the sum: the
Gaussian mechanism. Flower's ``DifferentialPrivacyServerSideFixedClipping`` is the same mechanism,
written for the mean of n clipped updates (noise z C / n).

fedseq's rule ``dp-fixed:clip=C,noise=z[,inner=RULE]``:

1. :func:`~server.aggregation.norm_clip.clip_norms` to C (every update: a malicious one too);
2. the ``inner`` rule on the clipped updates (default ``none``, the plain unweighted sum, whose
   sensitivity to one user is exactly C; ``mean``, the unweighted mean, has C / K);
3. ``N(0, sigma^2)`` on every coordinate, ``sigma = z C`` on a sum-scale inner rule and ``z C / K``
   on a mean-scale one (K clipped updates: the noise their mean needs). The noise of round t is
   drawn from (option ``seed``, the round id), so both runners, and a resumed run, add the same
   noise; in a run the seed defaults to the run's (:func:`server.aggregation.make_run_rule`).

The guarantee is the Gaussian mechanism's only where the inner rule is linear and unweighted
(``none``, ``mean``: :data:`ACCOUNTED_INNER`). Any other inner rule (a robust one, or ``fedavg``
weighted by the users' sample counts, which a worker could inflate) gets the same clipping and
noise, but one user's influence on its output is not bounded by C: the round's info says
``accounted: false`` and the run reports no epsilon. The run's epsilon is
:func:`fedseq.privacy.run_epsilon` (Opacus's RDP accountant).

Options: ``clip`` (float > 0, required), ``noise`` (float >= 0, required; 0 clips only),
``inner`` (a rule name, default ``none``; not ``dp-fixed``), ``inner.<key>=<value>``, ``seed`` (int),
``delta`` (the run's delta, in (0, 1); default fedseq/privacy.py ``default_delta``).
Extra memory: a clipped ``[K, D]`` copy when any update is clipped, and one ``[D]`` noise vector.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedseq.privacy import Mechanism

from .base import (
    AggregationResult,
    AggregationRule,
    RoundContext,
    RuleConfigError,
    WrappingRule,
    add_seeded_noise,
    check_inputs,
    option_error,
    parse_options,
    round_generator,
    split_inner,
)
from .norm_clip import clip_norms

DP_KEY = 0xD9F1  # stream of dp-fixed's noise
ACCOUNTED_INNER = frozenset({"none", "mean"})  # linear, unweighted: sensitivity C (sum) or C / K (mean)


def gaussian_sigma(noise: float, clip: float, scale: str, k: int) -> float:
    """The per-coordinate noise standard deviation for an aggregate of ``k`` updates clipped to
    ``clip``: ``noise * clip`` on the sum scale, ``noise * clip / k`` on the mean scale."""
    return noise * clip if scale == "sum" else noise * clip / k


@dataclass(frozen=True)
class DPFixed(WrappingRule):
    """Rule object (registry name ``dp-fixed``): clip, the inner rule, Gaussian noise; its
    declarations are the inner rule's."""

    clip: float
    noise: float
    inner_rule: AggregationRule = field(compare=False)
    inner: str = "none"
    seed: int = 0
    delta: float | None = None  # for the run's epsilon; None: fedseq/privacy.py default_delta
    name: str = "dp-fixed"

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise option_error(self.name, "clip", self.clip, "a finite float > 0 (the L2 clipping norm C)")
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise option_error(self.name, "noise", self.noise, "a finite float >= 0 (the noise multiplier z)")
        if self.delta is not None and not 0 < self.delta < 1:
            raise option_error(self.name, "delta", self.delta, "a float in (0, 1)")

    @property
    def accounted(self) -> bool:
        """Whether the Gaussian mechanism's guarantee holds (the inner rule is linear and unweighted)."""
        return self.inner in ACCOUNTED_INNER

    @property
    def privacy(self) -> Mechanism:
        """The Gaussian mechanism, for the run's epsilon (fedseq/privacy.py)."""
        return Mechanism("dp-fixed", self.noise, self.clip, self.accounted, self.delta)

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult:
        """Clip, aggregate with the inner rule, add round ``ctx.round_id``'s noise."""
        check_inputs(updates, ctx.weights)
        clipped, norms, mask = clip_norms(updates, self.clip)
        res = self.inner_rule(clipped, ctx)
        k = updates.shape[0]
        sigma = gaussian_sigma(self.noise, self.clip, self.inner_rule.scale, k)
        vec = add_seeded_noise(res.vector, sigma, self.seed, DP_KEY, ctx.round_id)
        info: dict[str, Any] = {"clip": self.clip, "noise": self.noise, "sigma": sigma, "accounted": self.accounted,
                                "clipped": int(mask.sum()), "max_norm_before": float(norms.max()),
                                "inner": self.inner, "inner_info": dict(res.info)}
        return AggregationResult(vec, res.kept, info)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> DPFixed:
        from . import make_rule  # late import: the registry imports this module

        own, inner_opts = split_inner(options)
        opts = parse_options("dp-fixed", own, {"clip": float, "noise": float, "inner": str, "seed": int, "delta": float})
        for key, what in (("clip", "the L2 clipping norm C, > 0"), ("noise", "the noise multiplier z, >= 0")):
            if key not in opts:
                raise RuleConfigError(f"rule 'dp-fixed' needs option {key}=<float> ({what}), e.g. "
                                      "dp-fixed:clip=1.0,noise=1.0")
        inner = opts.pop("inner", "none")
        if inner in ("dp-fixed", "dp-adaptive"):
            raise option_error("dp-fixed", "inner", inner, "a rule other than 'dp-fixed' and 'dp-adaptive'")
        return cls(inner_rule=make_rule(inner, inner_opts), inner=inner, **opts)


def value_noise(noise: float, count_std: float) -> float:
    """The noise multiplier the clipped sum gets so that the whole adaptive mechanism (sum and
    clipped count) has noise multiplier ``noise`` (Andrew et al. 2021): ``(z^-2 - (2 s)^-2)^-1/2``
    with ``s`` the count's standard deviation; needs ``z < 2 s``. 0 without noise."""
    if noise <= 0:
        return 0.0
    if noise >= 2 * count_std:
        raise ValueError(f"noise {noise:g} needs count_std > {noise / 2:g} (it is {count_std:g}): the clipped count's "
                         "noise must leave room for the sum's")
    return float((noise ** -2 - (2 * count_std) ** -2) ** -0.5)


@dataclass(frozen=True)
class DPAdaptive(WrappingRule):
    """Central DP with adaptive clipping (registry name ``dp-adaptive``).

    Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping",
    NeurIPS 2021; Flower's ``DifferentialPrivacyServerSideAdaptiveClipping`` and TensorFlow
    Federated's ``gaussian_adaptive`` use the same defaults. The clipping norm C follows a private
    estimate of the ``quantile`` of the update norms: in round t the updates are clipped to C_t,
    aggregated by the inner rule (default the plain sum) and noised with ``value_noise(z, s) * C_t``
    per coordinate; the count of updates within C_t gets ``N(0, s^2)`` (``s = count_std``, default
    0.05 K for K updates), and ``C_{t+1} = C_t * exp(-clip_lr * (count / K - quantile))``. The two
    noises together make the round a Gaussian mechanism of noise multiplier z, so the run's
    epsilon is accounted as ``dp-fixed``'s (fedseq/privacy.py). C_t is the rule's state: it rides
    in the round's info (``state``), which the runners carry to the next round and the aggregation
    server stores with the model version (fedseq/engine.py RoundContext.state), so a resumed run
    continues with its clip. The draws of round t come from (``seed``, t).

    Options: ``noise`` (z >= 0, required), ``clip`` (C_0, default 0.1), ``quantile`` (0.5),
    ``clip_lr`` (0.2), ``count_std`` (s; in a run 0.05 x its clients per round, checked when the run
    starts: :func:`server.aggregation.make_run_rule`; else 0.05 K each round), ``inner``,
    ``inner.<key>``, ``seed``, ``delta``."""

    noise: float
    inner_rule: AggregationRule = field(compare=False)
    clip: float = 0.1
    quantile: float = 0.5
    clip_lr: float = 0.2
    count_std: float | None = None
    inner: str = "none"
    seed: int = 0
    delta: float | None = None
    name: str = "dp-adaptive"

    def __post_init__(self) -> None:
        checks = (("noise", self.noise >= 0, "a finite float >= 0"), ("clip", self.clip > 0, "a finite float > 0"),
                  ("quantile", 0 <= self.quantile <= 1, "a float in [0, 1]"),
                  ("clip_lr", self.clip_lr >= 0, "a finite float >= 0"),
                  ("count_std", self.count_std is None or self.count_std > 0, "a finite float > 0"),
                  ("delta", self.delta is None or 0 < self.delta < 1, "a float in (0, 1)"))
        for key, ok, allowed in checks:
            value = getattr(self, key)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise option_error(self.name, key, value, allowed)
        if self.count_std is not None:
            try:
                value_noise(self.noise, self.count_std)
            except ValueError as e:
                raise RuleConfigError(f"rule 'dp-adaptive': {e}") from None

    @property
    def privacy(self) -> Mechanism:
        """The mechanism's noise multiplier z (the clip adapts: ``clip`` is its start)."""
        return Mechanism("dp-adaptive", self.noise, self.clip, self.inner in ACCOUNTED_INNER, self.delta)

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult:
        """Clip to this round's C, aggregate, add the noise; the next round's C in ``info["state"]``."""
        check_inputs(updates, ctx.weights)
        k = updates.shape[0]
        c = float(ctx.state["clip"]) if ctx.state and "clip" in ctx.state else self.clip
        count_std = self.count_std if self.count_std is not None else 0.05 * k
        try:
            z_value = value_noise(self.noise, count_std)
        except ValueError as e:
            raise RuleConfigError(f"rule 'dp-adaptive': {e}") from None
        clipped, norms, mask = clip_norms(updates, c)
        res = self.inner_rule(clipped, ctx)
        sigma = gaussian_sigma(z_value, c, self.inner_rule.scale, k)
        vec = add_seeded_noise(res.vector, sigma, self.seed, DP_KEY, ctx.round_id, 0)
        within = int((~mask).sum())
        count = float(within)
        if self.noise > 0:
            count += float(torch.randn(1, generator=round_generator(self.seed, DP_KEY, ctx.round_id, 1),
                                       dtype=torch.float64)) * count_std
        c_next = c * math.exp(-self.clip_lr * (count / k - self.quantile))
        info: dict[str, Any] = {"clip": c, "noise": self.noise, "value_noise": z_value, "sigma": sigma,
                                "count_std": count_std, "within": within, "noisy_within": count,
                                "accounted": self.inner in ACCOUNTED_INNER, "clipped": int(mask.sum()),
                                "max_norm_before": float(norms.max()), "inner": self.inner,
                                "inner_info": dict(res.info), "state": {"clip": c_next}}
        return AggregationResult(vec, res.kept, info)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> DPAdaptive:
        from . import make_rule  # late import: the registry imports this module

        own, inner_opts = split_inner(options)
        opts = parse_options("dp-adaptive", own, {"noise": float, "clip": float, "quantile": float, "clip_lr": float,
                                                  "count_std": float, "inner": str, "seed": int, "delta": float})
        if "noise" not in opts:
            raise RuleConfigError("rule 'dp-adaptive' needs option noise=<float> (the noise multiplier z, >= 0), "
                                  "e.g. dp-adaptive:noise=1.0")
        inner = opts.pop("inner", "none")
        if inner in ("dp-fixed", "dp-adaptive"):
            raise option_error("dp-adaptive", "inner", inner, "a rule other than 'dp-fixed' and 'dp-adaptive'")
        return cls(inner_rule=make_rule(inner, inner_opts), inner=inner, **opts)
