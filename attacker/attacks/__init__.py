"""Attacks: one file per attack, one interface (:mod:`.base`), and a registry by name.

``make_attack(name, options)`` builds a configured attack from string options (clear
:class:`AttackConfigError` for an unknown name, option or value); ``ATTACKS`` maps names to
factories. Every attack subclasses :class:`Attack`; its ``updates(ctx)`` takes one
:class:`AttackContext` (model, weights, the malicious users and their sequences, targets, seed,
round key, local-training config, compat switches, and the data the attack declared it needs)
and returns one update per malicious user in the benign convention (see :mod:`.base`).

A new attack: a frozen dataclass subclassing :class:`Attack` with a ``name`` and ``updates(self,
ctx)``; where it needs more than the defaults, it overrides a declaration of :class:`Attack`
(``fake_users``/``profile_length``: fabricated users; ``needs_popularity``: ``ctx.popularity``;
``public_share``: ``ctx.public``; a wrapper returns its inner attack's); then its factory is
registered in :data:`ATTACKS`. :func:`attacker.population.make_adversary` fills the contexts.

| name        | kind                         | paper (module docstring)                         |
|-------------|------------------------------|--------------------------------------------------|
| ``dv-fsr``  | model poisoning, targeted    | Yin et al., AAAI 2025 (explicit + implicit view) |
| ``c-fsr``   | DV-FSR without substitution  | ablation, same paper                             |
| ``s-fsr``   | DV-FSR without L_con         | ablation, same paper                             |
| ``eb``      | explicit boosting            | PipAttack, Zhang et al., WSDM 2022               |
| ``a-ra``    | target BCE, s forwards       | Rong, He, Chen, IJCAI 2022                       |
| ``ra``      | data poisoning, fake users   | random attack, Kapoor et al. 2017                |
| ``scale``   | wraps any attack, x factor   | Bagdasaryan et al. 2020; Bhagoji et al. 2019     |
| ``sign-flip`` | negated honest gradient    | classic Byzantine baseline                       |
| ``alie``    | adaptive vs robust rules     | Baruch et al., NeurIPS 2019                      |
| ``min-max`` | adaptive, optimised distance | Shejwalkar & Houmansadr, NDSS 2021 (AGR-agnostic) |
| ``min-sum`` | adaptive, optimised distance | same paper                                       |
| ``pieck``   | popular-item embedding (IPE) | Zhang et al., ICDE 2024                          |
| ``fedrecattack`` | public interactions, top-K | Rong et al., ICDE 2022                         |
| ``spattack`` | rare item rows, vs sparse agg. | Zhang et al., AAAI 2025 (Spattack)             |
| ``poisonfrs`` | target row onto scaled popular centroid | Yin, Xu, Fang, Gong, WWW 2024 (PoisonFRS) |
| ``hidattack`` | epsilon-greedy bandit over attacks | HidAttack (code waqar-uestc/HidAttack)      |
"""

from __future__ import annotations

from collections.abc import Mapping

from . import (
    a_ra,
    alie,
    c_fsr,
    dv_fsr,
    eb,
    fedrecattack,
    hidattack,
    min_max,
    pieck,
    poisonfrs,
    ra,
    s_fsr,
    scale,
    sign_flip,
    spattack,
)
from .alie import ALIE, alie_z
from .base import Attack, AttackConfigError, AttackContext, AttackFactory
from .dv_fsr import DualViewAttack, Substitution, contrastive_loss, substitute
from .fedrecattack import FedRecAttack, public_sequences, public_users
from .hidattack import HidAttack
from .min_max import MinMax, max_gamma
from .poisonfrs import PoisonFRS
from .ra import RandomAttack
from .scale import Scale
from .sign_flip import SignFlip
from .spattack import Spattack, item_counts, rare_items


def make_attack(name: str, options: Mapping[str, str] | None = None) -> Attack:
    """Build the attack registered as ``name`` with string ``options``."""
    if name not in ATTACKS:
        raise AttackConfigError(f"unknown attack {name!r}; known attacks: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name](dict(options or {}))


ATTACKS: dict[str, AttackFactory] = {
    "dv-fsr": dv_fsr.from_options,
    "c-fsr": c_fsr.from_options,
    "s-fsr": s_fsr.from_options,
    "eb": eb.from_options,
    "a-ra": a_ra.from_options,
    "ra": ra.from_options,
    "scale": scale.factory(make_attack),
    "sign-flip": sign_flip.from_options,
    "alie": alie.factory(make_attack),
    "min-max": min_max.factory("min-max", make_attack),
    "min-sum": min_max.factory("min-sum", make_attack),
    "pieck": pieck.factory(make_attack),
    "fedrecattack": fedrecattack.from_options,
    "spattack": spattack.factory(make_attack),
    "poisonfrs": poisonfrs.from_options,
    "hidattack": hidattack.factory(make_attack),
}

__all__ = [
    "ALIE",
    "ATTACKS",
    "Attack",
    "AttackConfigError",
    "AttackContext",
    "DualViewAttack",
    "FedRecAttack",
    "HidAttack",
    "MinMax",
    "PoisonFRS",
    "RandomAttack",
    "Scale",
    "SignFlip",
    "Spattack",
    "Substitution",
    "alie_z",
    "contrastive_loss",
    "item_counts",
    "make_attack",
    "max_gamma",
    "public_sequences",
    "public_users",
    "rare_items",
    "substitute",
]
