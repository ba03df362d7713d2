"""The attack interface shared by every attack in this package, and typed option parsing.

An attack turns the global weights and its malicious users' data into one *update* per malicious
user, in exactly the convention of benign updates (:func:`fedseq.training.compute_updates`): a
descent direction, the server steps ``w <- w - lr * aggregate(updates)``. In paper mode an
attack's update is the gradient of its attack loss at the global weights (a benign update is the
gradient of the local training loss). ``num_samples`` is the user's training-sequence length, as
for a benign user, so the server cannot tell a malicious update apart by its aggregation weight.

Every attack is a frozen dataclass subclassing :class:`Attack`, called with one
:class:`AttackContext`::

    attack.updates(ctx) -> UpdateBatch (one [D] update per user, in the order of ``ctx.users``)

``ctx.sequences[i]`` is the training sequence held by malicious user ``ctx.users[i]``;
``ctx.targets`` the items to promote (attacks that need a single target use the first);
``ctx.seed``/``ctx.round_key``/user id seed all randomness (negatives, dropout), so an update is a
function of (weights, the user's data, seed, round_key, user id) only, whatever the batch;
``ctx.lr`` is the round's server learning rate (a function of the round key and the run's config). A
wrapping attack (``scale``, ``alie``, ``min-max``, ``pieck``, ``spattack``) hands its inner attack
the same context.

What an attack declares, as typed attributes of :class:`Attack` with their defaults (override one
with a class attribute, a dataclass field or a property; a wrapper's properties return its inner
attack's where they concern the data it needs):

- ``fake_users`` (False): which data the attack's users hold: copies of real users' data, or
  fabricated profiles of ``profile_length`` items (the random attack, see
  :mod:`attacker.population`).
- ``needs_popularity`` (False): the attack reads ``ctx.popularity``, the training interactions per
  item id (Spattack).
- ``public_share`` (0.0): the share of the benign users whose training sequences the attack knows
  (FedRecAttack); above 0 the adversary draws them with the run seed and passes them as
  ``ctx.public``.

:func:`attacker.population.make_adversary` reads the declarations once and fills every context
the :class:`attacker.population.Adversary` builds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedseq.config import Compat
from fedseq.models import SeqModel
from fedseq.training import LocalConfig, UpdateBatch


class AttackConfigError(ValueError):
    """An attack name, option or option value is unknown or invalid (the message lists what is
    accepted)."""


Users = Sequence[int] | np.ndarray  # client ids


@dataclass(frozen=True, eq=False)
class AttackContext:
    """Everything an attack computes with, for one call (the malicious users of one round, or a
    shard of them).

    model: the run's model (its weights are ``params``; the model object is never modified).
    params: ``[D]`` the global weights of the round.
    sequences: per malicious user its training sequence (a copy of a real user's, or a fabricated
        profile), in the order of ``users``.
    users: ``[B]`` the malicious client ids (any sequence of ints; stored as an int64 array).
    targets: the items to promote.
    seed: the run seed; round_key: the round's randomness key (its round id).
    local: the run's local-training config (mode, dropout, ...); compat: the reference switches.
    popularity: ``[M + 1]`` training interactions per item id (index 0 unused), for an attack that
        declares ``needs_popularity``; None otherwise.
    public: the training sequences of the public benign users, for an attack that declares a
        ``public_share`` > 0; None otherwise.
    lr: the round's configured server learning rate (the run's ``lr_at(epoch)`` of the round's
        epoch, a protocol parameter every participant knows; the server steps ``w <- w - lr *
        aggregate``), for an attack that sizes its update so that the step lands where it wants
        (PoisonFRS); None where unknown (a direct call).
    """

    model: SeqModel
    params: torch.Tensor
    sequences: Sequence[np.ndarray]
    users: Users
    targets: tuple[int, ...]
    seed: int
    round_key: int
    local: LocalConfig
    compat: Compat
    popularity: np.ndarray | None = None
    public: tuple[np.ndarray, ...] | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "users", np.asarray(self.users, dtype=np.int64))
        object.__setattr__(self, "sequences", tuple(self.sequences))
        object.__setattr__(self, "targets", tuple(int(t) for t in self.targets))
        if len(self.users) != len(self.sequences):
            raise ValueError(f"{len(self.users)} users and {len(self.sequences)} sequences")


class Attack(ABC):
    """A configured attack (see the module docstring for the contract and the declarations)."""

    name: str

    @property
    def fake_users(self) -> bool:
        return False

    @property
    def profile_length(self) -> int:
        return 50

    @property
    def needs_popularity(self) -> bool:
        return False

    @property
    def public_share(self) -> float:
        return 0.0

    @abstractmethod
    def updates(self, ctx: AttackContext) -> UpdateBatch: ...


class DirectedAttack(Attack):
    """The base of an attack that perturbs along another attack's update (its ``direction``;
    None: its own untargeted direction): it needs whatever that attack declared it needs."""

    direction: Attack | None

    @property
    def needs_popularity(self) -> bool:
        return self.direction is not None and self.direction.needs_popularity

    @property
    def public_share(self) -> float:
        return 0.0 if self.direction is None else self.direction.public_share


AttackFactory = Callable[[Mapping[str, str]], Attack]


@dataclass(frozen=True)
class Option:
    """One accepted option: its type, default, an optional check and a one-line description."""

    type: type
    default: Any
    help: str
    check: Callable[[Any], bool] | None = None
    allowed: str = ""  # words for the check, e.g. "> 0"


def _convert(attack: str, key: str, raw: str, opt: Option) -> Any:
    try:
        if opt.type is bool:
            low = str(raw).strip().lower()
            if low not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(raw)
            value: Any = low in {"true", "1", "yes"}
        else:
            value = opt.type(str(raw).strip())
    except (TypeError, ValueError):
        raise AttackConfigError(
            f"attack {attack!r} option {key}={raw!r} is not a valid {opt.type.__name__}"
            + (f" ({opt.allowed})" if opt.allowed else "")
        ) from None
    if opt.check is not None and not opt.check(value):
        raise AttackConfigError(f"attack {attack!r} option {key}={raw!r} is invalid; allowed: {opt.allowed}")
    return value


def describe_options(spec: Mapping[str, Option]) -> str:
    """``key=default (help)`` for every accepted option, for error messages and docs."""
    if not spec:
        return "none"
    return "; ".join(f"{k}={v.default} ({v.help})" for k, v in sorted(spec.items()))


def parse_options(attack: str, options: Mapping[str, str], spec: Mapping[str, Option],
                  passthrough: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse string ``options`` against ``spec``: returns ``(typed values with defaults filled in,
    nested options)``. Keys ``<p>.<key>`` for a prefix ``p`` in ``passthrough`` are returned
    unparsed in the second dict (``{"p.key": v}``) for a wrapped attack to validate. Unknown keys
    raise :class:`AttackConfigError` listing the accepted ones."""
    values = {k: o.default for k, o in spec.items()}
    nested: dict[str, str] = {}
    for key, raw in options.items():
        if any(key.startswith(p + ".") and len(key) > len(p) + 1 for p in passthrough):
            nested[key] = str(raw)
            continue
        if key not in spec:
            extra = "".join(f"; {p}.<key>=value is passed to the {p} attack" for p in passthrough)
            raise AttackConfigError(
                f"attack {attack!r} has no option {key!r}; accepted options: {describe_options(spec)}{extra}"
            )
        values[key] = _convert(attack, key, raw, spec[key])
    return values, nested


def sub_options(nested: Mapping[str, str], prefix: str) -> dict[str, str]:
    """``{"base.tau": "0.3"} -> {"tau": "0.3"}`` for ``prefix="base"``."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in nested.items() if k.startswith(p)}


def positive(x: Any) -> bool:
    return x > 0


def non_negative(x: Any) -> bool:
    return x >= 0
