"""The aggregation-rule interface shared by every rule in this package.

Convention (used everywhere in fedseq): an *update* is a descent direction. In paper mode it is
the gradient of a user's local loss at the global weights; in FedAvg mode it is
``w_global - w_local`` after local training. The server step is always

    w <- w - lr * aggregate(updates, weights)

A rule is a pure function of the round's stacked updates ``U`` of shape ``[K, D]`` (K updates,
D parameters, all tensors flattened in a fixed layout) and their non-negative sample-count
weights ``n`` of shape ``[K]`` (the user's number of training items). It returns the ``[D]``
aggregate and a small record of what it did, for the round summary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class RuleConfigError(ValueError):
    """A rule name or option is unknown or invalid (message says which and why)."""


@dataclass(frozen=True)
class AggregationResult:
    """What a rule returns.

    vector: ``[D]`` aggregate; the server steps ``w <- w - lr * vector``.
    kept: indices (into the K stacked updates) that the rule kept / gave weight to, or ``None``
        when every update contributed. Used by the experiment's own report to say whether a
        malicious update was among those kept (the rule itself never knows who is malicious).
    info: JSON-serialisable facts about the run of the rule (iterations, clipped count, ...).
    """

    vector: torch.Tensor
    kept: tuple[int, ...] | None = None
    info: Mapping[str, Any] = field(default_factory=dict)


class AggregationRule(Protocol):
    """A configured rule: ``rule(updates [K, D], weights [K]) -> AggregationResult``."""

    name: str

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> AggregationResult: ...


RuleFactory = Callable[[Mapping[str, str]], AggregationRule]


def check_inputs(updates: torch.Tensor, weights: torch.Tensor) -> None:
    """Validate the stacked round matrix and weights (shared by all rules)."""
    if updates.dim() != 2:
        raise ValueError(f"updates must be [K, D], got shape {tuple(updates.shape)}")
    if weights.dim() != 1 or weights.shape[0] != updates.shape[0]:
        raise ValueError(f"weights must be [K={updates.shape[0]}], got shape {tuple(weights.shape)}")
    if updates.shape[0] == 0:
        raise ValueError("cannot aggregate an empty round (K = 0)")
    if bool((weights < 0).any()):
        raise ValueError("weights must be non-negative")


def parse_options(
    rule: str, options: Mapping[str, str], allowed: Mapping[str, type]
) -> dict[str, Any]:
    """Parse string options (from the CLI ``--defense-opt k=v`` or config) into typed values.

    Unknown keys and unparsable values raise :class:`RuleConfigError` naming the rule, the key
    and the accepted keys.
    """
    out: dict[str, Any] = {}
    for key, raw in options.items():
        if key not in allowed:
            raise RuleConfigError(
                f"rule {rule!r} has no option {key!r}; accepted options: {sorted(allowed) or 'none'}"
            )
        typ = allowed[key]
        try:
            if typ is bool:
                low = str(raw).strip().lower()
                if low not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(raw)
                out[key] = low in {"true", "1", "yes"}
            else:
                out[key] = typ(raw)
        except (TypeError, ValueError):
            raise RuleConfigError(
                f"rule {rule!r} option {key!r}={raw!r} is not a valid {typ.__name__}"
            ) from None
    return out
