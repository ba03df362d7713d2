"""The privacy a run's differentially private defense gives each user: epsilon at delta.

A DP defense declares its mechanism (:class:`Mechanism`: the Gaussian mechanism's noise multiplier
z on updates clipped to L2 norm C; ``dp-fixed``, server/aggregation/dp.py). This module turns it
into the run's (epsilon, delta) with Opacus's RDP accountant (Mironov, "Renyi Differential
Privacy", CSF 2017; Mironov, Talwar, Zhang, "Renyi Differential Privacy of the Sampled Gaussian
Mechanism", 2019; ``opacus.accountants.analysis.rdp``).

Two numbers, each saying what it assumes:

- ``epsilon``: the guarantee this run has. Rounds are not Poisson samples: in paper mode each
  epoch's rounds partition the users (fedseq/engine.py ``epoch_rounds``), and an adversarial
  training round reuses some of a round's users. So no sampling amplification is claimed: a
  user's updates pass through at most ``participations`` Gaussian mechanisms (the most rounds any
  one client is in, counted on the run's plan), which compose (sample rate 1).
- ``epsilon_poisson``: what DP-SGD libraries usually report, as if every round sampled each
  client independently with probability ``sample_rate`` (the round size over the clients) for
  ``rounds`` rounds. It is an approximation for this schedule, given for comparison only.

``delta`` defaults to ``min(1e-5, 0.1 / N)`` for N clients (below 1/N, as user-level DP needs);
the rule's ``delta`` option overrides it. Opacus is imported only when a report is made."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Mechanism:
    """A defense's Gaussian mechanism: noise of standard deviation ``noise_multiplier * clip`` on
    the sum of updates clipped to ``clip``. ``accounted``: whether the guarantee holds for the
    rule as configured (a central rule whose inner rule is not a plain sum or mean gets the noise
    but not the bound). ``delta``: None for the default."""

    name: str
    noise_multiplier: float
    clip: float
    accounted: bool = True
    delta: float | None = None


def default_delta(num_clients: int) -> float:
    return min(1e-5, 0.1 / max(num_clients, 1))


def participations(rounds: Sequence[np.ndarray], num_clients: int) -> int:
    """The most rounds any one client is in (``rounds``: each round's client ids)."""
    if not rounds:
        return 0
    counts = np.bincount(np.concatenate([np.asarray(r, dtype=np.int64) for r in rounds]), minlength=num_clients)
    return int(counts.max())


def epsilon(noise_multiplier: float, steps: int, delta: float, sample_rate: float = 1.0) -> float:
    """Epsilon at ``delta`` after ``steps`` Gaussian mechanisms of ``noise_multiplier`` each,
    subsampled at ``sample_rate`` (1: no subsampling), by Opacus's RDP accountant; inf without
    noise, 0 without steps."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    with warnings.catch_warnings():  # "optimal order is the smallest alpha": a loose bound on an epsilon in the hundreds
        warnings.simplefilter("ignore", UserWarning)
        eps, _order = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def report(mech: Mechanism, rounds: Sequence[np.ndarray], num_clients: int, round_size: int) -> dict[str, Any]:
    """The run's privacy, for its results bundle (``summary.privacy``): the mechanism, delta,
    ``participations``, ``epsilon`` (None where the rule's guarantee does not hold) and
    ``epsilon_poisson`` (module docstring)."""
    import opacus

    delta = mech.delta if mech.delta is not None else default_delta(num_clients)
    steps = participations(rounds, num_clients)
    rate = min(1.0, round_size / max(num_clients, 1))
    bounded = mech.accounted and mech.noise_multiplier > 0
    out: dict[str, Any] = {
        "mechanism": mech.name, "noise_multiplier": mech.noise_multiplier, "clip": mech.clip, "delta": delta,
        "participations": steps, "rounds": len(rounds), "sample_rate": rate,
        "epsilon": epsilon(mech.noise_multiplier, steps, delta) if bounded else None,
        "epsilon_poisson": epsilon(mech.noise_multiplier, len(rounds), delta, rate) if bounded else None,
        "accountant": f"opacus {opacus.__version__} RDP",
    }
    if not mech.accounted:
        out["note"] = "the inner rule is not a plain sum or mean: one user's influence is not bounded by the clip"
    elif mech.noise_multiplier <= 0:
        out["note"] = "noise 0: clipping only, no privacy guarantee"
    return out


def privacy_line(privacy: dict[str, Any] | None) -> str | None:
    """One line on a run's privacy (``summary.privacy`` of its results bundle), or None without."""
    if not privacy:
        return None
    head = (f"privacy: {privacy['mechanism']} (noise multiplier {privacy['noise_multiplier']:g}, clip "
            f"{privacy['clip']:g}): ")
    if privacy.get("epsilon") is None:
        return head + f"no epsilon ({privacy.get('note', 'not accounted')})"
    return head + (f"epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:.3g} "
                   f"({privacy['participations']} rounds per client at most); "
                   f"{privacy['epsilon_poisson']:.3g} if the {privacy['rounds']} rounds sampled clients at rate "
                   f"{privacy['sample_rate']:.3g} (Poisson)")
