"""Scaling (model replacement / boosting): multiply the update of any attack by a factor.

Bagdasaryan, Veit, Hua, Estrin, Shmatikov, "How To Backdoor Federated Learning", AISTATS 2020
(model replacement: scale the malicious update so it survives averaging); Bhagoji, Chakraborty,
Mittal, Calo, "Analyzing Federated Learning through an Adversarial Lens", ICML 2019 (explicit
boosting). Options: ``base=<attack>`` (default ``dv-fsr``), ``factor`` (default 10, > 0), and the
base attack's options as ``base.<key>=value``. The reported sample count stays the base's. The
base gets the same context, and the wrapper declares what the base declares (``fake_users``,
``profile_length``, ``needs_popularity``, ``public_share``), so the adversary gives the base its data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fedseq.training import UpdateBatch

from .base import Attack, AttackContext, Option, parse_options, positive, sub_options


@dataclass(frozen=True)
class Scale(Attack):
    base: Attack
    factor: float = 10.0
    name: str = "scale"

    @property
    def fake_users(self) -> bool:
        return self.base.fake_users

    @property
    def profile_length(self) -> int:
        return self.base.profile_length

    @property
    def needs_popularity(self) -> bool:
        return self.base.needs_popularity

    @property
    def public_share(self) -> float:
        return self.base.public_share

    def updates(self, ctx: AttackContext) -> UpdateBatch:
        ub = self.base.updates(ctx)
        ub.updates.mul_(self.factor)
        return ub


def factory(make: Callable[[str, Mapping[str, str]], Attack]) -> Callable[[Mapping[str, str]], Scale]:
    """The registry entry (``make`` builds the base attack by name; passed in to avoid an import cycle)."""

    def from_options(options: Mapping[str, str]) -> Scale:
        spec = {
            "base": Option(str, "dv-fsr", "the attack whose update is scaled"),
            "factor": Option(float, 10.0, "multiplier of the base update", positive, "> 0"),
        }
        v, nested = parse_options("scale", options, spec, passthrough=("base",))
        return Scale(base=make(v["base"], sub_options(nested, "base")), factor=v["factor"])

    return from_options
