"""The attack interface shared by every attack in this package, and typed option parsing.

An attack turns the global weights and its malicious users' data into one *update* per malicious
user, in exactly the convention of benign updates (:func:`fedseq.training.compute_updates`): a
descent direction, the server steps ``w <- w - lr * aggregate(updates)``. In paper mode an
attack's update is the gradient of its attack loss at the global weights (a benign update is the
gradient of the local training loss). ``num_samples`` is the user's training-sequence length, as
for a benign user, so the server cannot tell a malicious update apart by its aggregation weight.

Every attack is a function-style object::

    attack.updates(model, params [D], sequences, users, targets, seed, round_key, local, compat)
        -> UpdateBatch (one [D] update per user, in the order of ``users``)

``sequences[i]`` is the training sequence held by malicious user ``users[i]``; ``targets`` the
items to promote (attacks that need a single target use the first); ``seed``/``round_key``/user
id seed all randomness (negatives, dropout), so an update is a function of (weights, the user's
data, seed, round_key, user id) only, whatever the batch.

``fake_users`` says which data the attack's users hold: ``False`` (default) copies of real users'
data; ``True`` fabricated profiles (the random attack, see :mod:`attacker.population`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from fedseq.config import Compat
from fedseq.models import SeqModel
from fedseq.training import LocalConfig, UpdateBatch


class AttackConfigError(ValueError):
    """An attack name, option or option value is unknown or invalid (the message lists what is
    accepted)."""


Users = Sequence[int] | np.ndarray  # client ids


class Attack(Protocol):
    """A configured attack (see the module docstring for the contract)."""

    @property
    def name(self) -> str: ...

    @property
    def fake_users(self) -> bool: ...

    def updates(
        self,
        model: SeqModel,
        params: torch.Tensor,
        sequences: Sequence[np.ndarray],
        users: Users,
        targets: tuple[int, ...],
        seed: int,
        round_key: int,
        local: LocalConfig,
        compat: Compat,
    ) -> UpdateBatch: ...


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
