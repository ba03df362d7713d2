"""RA, the random attack (data poisoning with fabricated users).

Kapoor, Kapoor, Kumar, "A Review of Attacks and Its Detection Attributes on Collaborative
Recommender Systems", IJARCS 8(7), 2017 (the DV-FSR paper's RA baseline, Yin et al., AAAI 2025).
The malicious clients are fake users whose profile is ``length - 1`` (default 49) random items
followed by the target (:func:`attacker.population.random_attack_sequences`); they then train
*honestly* on that data: their update is exactly a benign update
(:func:`fedseq.training.compute_updates`) of their poisoned sequence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from fedseq.training import UpdateBatch, compute_updates

from .base import Attack, AttackContext, Option, parse_options


@dataclass(frozen=True)
class RandomAttack(Attack):
    name: str = "ra"
    profile_length: int = 50  # items per fake profile, the target included
    fake_users: ClassVar[bool] = True  # the population fabricates its users' profiles

    def updates(self, ctx: AttackContext) -> UpdateBatch:
        return compute_updates(ctx.model, ctx.params, ctx.sequences, ctx.users, ctx.seed, ctx.round_key, ctx.local)


def from_options(options: Mapping[str, str]) -> RandomAttack:
    spec = {"length": Option(int, 50, "items per fake profile, the target included",
                             lambda v: v >= 2, ">= 2")}
    v, _ = parse_options("ra", options, spec)
    return RandomAttack(profile_length=v["length"])
