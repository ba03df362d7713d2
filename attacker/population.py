"""The malicious population of an experiment: extra clients with ids ``N .. N+m-1`` after the N
benign users.

As in the DV-FSR paper (Yin et al., AAAI 2025) and its public code, m = floor(N * ratio) (Steam,
N = 3,753: 0.1% -> 3, 0.05% -> 1) and each malicious client holds a copy of the training data of
a real user drawn at random without replacement with the run's seed (that real user stays in the
federation as a benign client too). When floor(N * ratio) is 0 for a ratio > 0, one malicious
client is used and :attr:`MaliciousPopulation.note` says so.

The random attack (RA, Kapoor et al. 2017) instead injects fabricated users
(:func:`random_attack_sequences`): each holds ``length - 1`` random items followed by the target,
every fake user drawn independently (the public code builds them by appending to one shared list,
so later fake users also hold the earlier ones' items; fedseq does not reproduce that).

The :class:`Adversary` is the outward door: ``updates(setup, params, users, round_key)`` builds one
:class:`attacker.attacks.AttackContext` per call, filled with what the attack declared it needs
(:mod:`attacker.attacks.base`): the item popularity (``needs_popularity``) and the public share of
the benign users' sequences (``public_share``), both computed once by :func:`make_adversary`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedseq.config import ConfigError, ExperimentConfig
from fedseq.data import SeqDataset
from fedseq.engine import plan_run
from fedseq.experiment import Setup, all_clients, check_ratio, population_size  # noqa: F401 - check_ratio re-exported
from fedseq.training import UpdateBatch

from .attacks import Attack, AttackConfigError, AttackContext, item_counts, make_attack, public_sequences

log = logging.getLogger(__name__)

POPULATION_KEY = 0x4D414C  # seed stream of the population draw ("MAL")
RANDOM_ATTACK_KEY = 0x5241  # seed stream of the random attack's fake profiles ("RA")


@dataclass(frozen=True, eq=False)
class MaliciousPopulation:
    """The malicious clients of a run.

    ids: ``[m]`` int64 client ids ``N .. N+m-1`` (N = number of benign users).
    sequences: per malicious client its training sequence (int64 arrays, read-only by convention).
    source_users: ``[m]`` int64, the benign user each sequence was copied from (-1 when fabricated).
    note: human-readable facts for the run summary (size rule applied, kind of data).
    """

    ids: np.ndarray
    sequences: tuple[np.ndarray, ...]
    source_users: np.ndarray
    note: str

    @property
    def size(self) -> int:
        return len(self.ids)

    def sequences_of(self, clients: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """The training sequences of malicious ``clients`` (ids in :attr:`ids`)."""
        index = {int(c): i for i, c in enumerate(self.ids)}
        try:
            return [self.sequences[index[int(c)]] for c in clients]
        except KeyError as e:
            raise KeyError(f"client {e.args[0]} is not in the malicious population "
                           f"{self.ids.tolist()}") from None


def _ids(num_users: int, m: int) -> np.ndarray:
    return np.arange(num_users, num_users + m, dtype=np.int64)


REFERENCE_DRAW_SEED = 20000000  # the public DV-FSR code: random.seed(20000000); random.sample(range(N), m)


def malicious_population(dataset: SeqDataset, ratio: float, seed: int,
                         reference_draw: bool = False) -> MaliciousPopulation:
    """m = floor(N * ratio) (at least 1 for ratio > 0) clients holding copies of the training
    sequences of real users drawn at random, without replacement, with ``seed``.

    ``reference_draw`` (compat switch ``attacker_draw``) copies the users the public code copies:
    Python's ``random.seed(20000000); random.sample(range(N), m)`` (on Steam at 0.1%: users 26,
    3021, 3417). Which users are copied moves DV-FSR's early exposure a lot (their history
    lengths differ), so this is the way to compare with the reference's curves."""
    N = dataset.num_users
    m, note = population_size(N, ratio)
    if m > N:
        raise ValueError(f"cannot copy {m} distinct users out of {N}")
    if reference_draw:
        import random

        src = np.asarray(random.Random(REFERENCE_DRAW_SEED).sample(range(N), m), dtype=np.int64)
    else:
        rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, POPULATION_KEY]))
        src = np.sort(rng.choice(N, size=m, replace=False)).astype(np.int64) if m else np.zeros(0, dtype=np.int64)
    seqs = tuple(np.array(dataset.train[int(u)], dtype=np.int64, copy=True) for u in src)
    if m:
        note += f"; each holds a copy of a real user's training data (users {src.tolist()})"
    return MaliciousPopulation(_ids(N, m), seqs, src, note)


def random_attack_sequences(num_items: int, target: int | Sequence[int], m: int, seed: int,
                            length: int = 50) -> tuple[np.ndarray, ...]:
    """``m`` fake profiles of ``length - 1`` distinct random items from 1..M (never a target), then
    the target; with several targets, fake user j ends with ``targets[j % len(targets)]``. Every
    profile is drawn from its own generator (seed, j): independent of the others."""
    targets = [int(t) for t in target] if isinstance(target, Sequence) else [int(target)]
    if not targets:
        raise ValueError("the random attack needs a target item")
    if length < 1:
        raise ValueError(f"fake profile length must be >= 1, got {length}")
    for t in targets:
        if not 1 <= t <= num_items:
            raise ValueError(f"target item {t} is outside the catalogue 1..{num_items}")
    pool = np.setdiff1d(np.arange(1, num_items + 1, dtype=np.int64), np.asarray(targets, dtype=np.int64))
    k = min(length - 1, len(pool))
    out = []
    for j in range(m):
        rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, RANDOM_ATTACK_KEY, j]))
        items = rng.choice(pool, size=k, replace=False).astype(np.int64)
        out.append(np.append(items, np.int64(targets[j % len(targets)])))
    return tuple(out)


def fake_population(dataset: SeqDataset, ratio: float, seed: int, targets: Sequence[int],
                    length: int = 50) -> MaliciousPopulation:
    """The random attack's population: the same ids and size rule, fabricated profiles."""
    N = dataset.num_users
    m, note = population_size(N, ratio)
    seqs = random_attack_sequences(dataset.num_items, list(targets), m, seed, length)
    if m:
        note += f"; fabricated profiles ({length - 1} random items + the target)"
    return MaliciousPopulation(_ids(N, m), seqs, np.full(m, -1, dtype=np.int64), note)


def build_population(attack: Attack, dataset: SeqDataset, ratio: float, seed: int,
                     targets: Sequence[int], reference_draw: bool = False) -> MaliciousPopulation:
    """The population ``attack`` needs: fabricated profiles of ``attack.profile_length`` items when
    ``attack.fake_users``, else copies of real users' data."""
    if attack.fake_users:
        return fake_population(dataset, ratio, seed, targets, attack.profile_length)
    return malicious_population(dataset, ratio, seed, reference_draw)


@dataclass(frozen=True, eq=False)
class Adversary:
    """The run's attack and the malicious clients it drives: what an attacker worker hosts (a
    shard of it) and what the in-process runner calls for the malicious users of a round.

    popularity / public: the data the attack declared it needs (``needs_popularity``,
    ``public_share``), computed once by :func:`make_adversary` and passed in every context; None
    when it needs none.

    Every context also carries the round's server learning rate (:meth:`round_lr`), which the
    adversary reads from the run's plan, so the in-process runner and an attacker worker, which
    knows a round only by its id, pass the same value."""

    attack: Attack
    population: MaliciousPopulation
    popularity: np.ndarray | None = None
    public: tuple[np.ndarray, ...] | None = None
    _lrs: dict[tuple, tuple[float, ...]] = field(default_factory=dict, repr=False)  # the plan's lr per round id

    def round_lr(self, s: Setup, round_key: int) -> float:
        """The configured learning rate of round ``round_key`` (its epoch's ``cfg.lr_at``), from the
        run's plan (:func:`fedseq.engine.plan_run` over every client: the one both runners walk);
        ``cfg.lr`` for a round id outside the plan (a direct call)."""
        key = (s.cfg, s.dataset.num_users, s.num_malicious)
        lrs = self._lrs.get(key)
        if lrs is None:
            lrs = tuple(rp.lr for rp in plan_run(s.cfg, all_clients(s), s.dataset.num_users))
            self._lrs[key] = lrs
        return lrs[round_key] if 0 <= round_key < len(lrs) else float(s.cfg.lr)

    def context(self, s: Setup, params: torch.Tensor, users: Sequence[int] | np.ndarray,
                round_key: int) -> AttackContext:
        """The attack's context for malicious ``users`` at the global weights ``params``."""
        cfg = s.cfg
        users = np.asarray(users, dtype=np.int64)
        return AttackContext(s.model, params, self.population.sequences_of(users), users, s.targets, cfg.seed,
                             round_key, cfg.local(), cfg.compat, popularity=self.popularity, public=self.public,
                             lr=self.round_lr(s, round_key))

    def updates(self, s: Setup, params: torch.Tensor, users: Sequence[int] | np.ndarray, round_key: int) -> UpdateBatch:
        """The attack's updates of malicious ``users`` at the global weights ``params``."""
        return self.attack.updates(self.context(s, params, users, round_key))


def make_attack_checked(cfg: ExperimentConfig) -> Attack:
    """The configured attack (``cfg.attack`` is not ``none``), or :class:`ConfigError` naming the
    config keys."""
    try:
        return make_attack(cfg.attack, dict(cfg.attack_opts))
    except AttackConfigError as e:
        raise ConfigError(f"{e} (config keys 'attack' / 'attack_opts'; 'none' for no attack)") from None


def make_adversary(s: Setup) -> Adversary | None:
    """The configured attack (validated) and its malicious population for setup ``s``; None for
    ``attack="none"``. Raises :class:`ConfigError` naming the accepted names, options or range."""
    cfg = s.cfg
    if cfg.attack == "none":
        return None
    attack = make_attack_checked(cfg)
    try:
        population = build_population(attack, s.dataset, cfg.malicious_ratio, cfg.seed, s.targets,
                                      reference_draw=cfg.compat.attacker_draw)
    except ValueError as e:
        raise ConfigError(f"malicious population: {e}") from None
    if population.ids.tolist() != s.malicious_users.tolist():
        raise AssertionError("the population's ids differ from the run's malicious client ids")
    # the data the attack declared it needs (attacker/attacks/base.py), computed once for the run
    popularity = item_counts(s.dataset) if attack.needs_popularity else None  # Spattack: the rare items
    public = public_sequences(s.dataset, attack.public_share, cfg.seed) if attack.public_share > 0 else None
    return Adversary(attack, population, popularity, public)
