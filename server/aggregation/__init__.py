"""Aggregation rules: pure tensor functions, one file per rule, and a registry by name.

``make_rule(name, options)`` builds a configured rule; ``RULES`` lists the names. Every rule
follows :mod:`server.aggregation.base` (``rule(updates [K, D], weights [K]) -> AggregationResult``).
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import AggregationResult, AggregationRule, RuleConfigError, RuleFactory
from .fedavg import FedAvg, fedavg, server_step

RULES: dict[str, RuleFactory] = {
    "fedavg": FedAvg.from_options,
}


def make_rule(name: str, options: Mapping[str, str] | None = None) -> AggregationRule:
    """Build the rule registered as ``name`` with string ``options`` (validated, clear errors)."""
    if name not in RULES:
        raise RuleConfigError(f"unknown aggregation rule {name!r}; known rules: {', '.join(sorted(RULES))}")
    return RULES[name](dict(options or {}))


__all__ = [
    "RULES",
    "AggregationResult",
    "AggregationRule",
    "FedAvg",
    "RuleConfigError",
    "fedavg",
    "make_rule",
    "server_step",
]
