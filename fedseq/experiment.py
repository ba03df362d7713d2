"""What every runner shares: the experiment's dataset, model, initial weights, targets, malicious
population and attack, schedule and learning rate, built from an :class:`ExperimentConfig` the same
way everywhere, so the in-process runner and the networked services compute the same experiment.

Clients: the N benign users have ids ``0..N-1``; with an attack, the malicious clients follow with
ids ``N..N+m-1`` (:mod:`attacker.population`), and :func:`all_clients` lists both, so every epoch
shuffles them together as in the paper."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from attacker.attacks import Attack, AttackConfigError, make_attack
from attacker.population import MaliciousPopulation, build_population
from server.aggregation import RuleConfigError, make_rule

from .config import ConfigError, ExperimentConfig
from .data import SeqDataset, least_popular_item, load_dataset
from .metrics import EvalConfig
from .models import SeqModel, build_model
from .models.common import reference_init
from .params import Layout, get_vector

log = logging.getLogger(__name__)

SCHEDULE_KEY = 0x5C4ED  # stream of the epoch shuffles


@dataclass
class Setup:
    cfg: ExperimentConfig
    dataset: SeqDataset
    model: SeqModel
    layout: Layout
    targets: tuple[int, ...]
    population: MaliciousPopulation | None = None  # None when cfg.attack == "none"
    attack: Attack | None = None

    @property
    def benign_users(self) -> np.ndarray:
        return np.arange(self.dataset.num_users, dtype=np.int64)

    @property
    def malicious_users(self) -> np.ndarray:
        """Ids of the malicious clients (``N..N+m-1``; empty without an attack)."""
        if self.population is None:
            return np.zeros(0, dtype=np.int64)
        return self.population.ids

    def eval_config(self) -> EvalConfig:
        c = self.cfg
        return EvalConfig(
            protocol=c.protocol,
            num_negatives=c.num_negatives,
            seed=c.seed,
            dropout=c.compat.eval_dropout,
            mask_token_query=c.compat.eval_mask_token,
        )

    def initial_params(self) -> torch.Tensor:
        """Version 0: the reference initialisation seeded with the run seed."""
        reference_init(self.model, self.cfg.seed)
        return get_vector(self.model)


def setup(cfg: ExperimentConfig, dataset: SeqDataset | None = None) -> Setup:
    """Load the data and build the model for ``cfg`` (deterministic in ``cfg.seed``)."""
    ds = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_root, seed=cfg.seed)
    model = build_model(cfg.model, ds.num_items)
    targets = cfg.targets or (least_popular_item(ds),)
    for t in targets:
        if not 1 <= t <= ds.num_items:
            raise ConfigError(f"target item {t} is outside the catalogue 1..{ds.num_items} "
                              f"of dataset {ds.name!r}")
    targets = tuple(int(t) for t in targets)
    try:  # the server builds the rule; validate it here too so every runner fails before starting
        make_rule(cfg.aggregation, dict(cfg.aggregation_opts))
    except RuleConfigError as e:
        raise ConfigError(f"{e} (config keys 'aggregation' / 'aggregation_opts', flags --defense / --defense-opt)") \
            from None
    attack, population = make_population(cfg, ds, targets)
    return Setup(cfg, ds, model, Layout.of(model), targets, population, attack)


def make_population(cfg: ExperimentConfig, ds: SeqDataset, targets: tuple[int, ...]
                    ) -> tuple[Attack | None, MaliciousPopulation | None]:
    """The configured attack (validated) and its malicious population; ``(None, None)`` for
    ``attack="none"``. Raises :class:`ConfigError` with the accepted names/options/range."""
    if cfg.attack == "none":
        if cfg.malicious_ratio not in (0.0, 0.001):
            log.warning("malicious_ratio=%g is ignored: attack is 'none'", cfg.malicious_ratio)
        return None, None
    try:
        attack = make_attack(cfg.attack, dict(cfg.attack_opts))
    except AttackConfigError as e:
        raise ConfigError(f"{e} (config keys 'attack' / 'attack_opts'; 'none' for no attack)") from None
    if not 0.0 < cfg.malicious_ratio < 1.0:
        raise ConfigError(f"attack {cfg.attack!r} needs malicious_ratio in (0, 1) (a share of the "
                          f"{ds.num_users} benign users, e.g. 0.001), got {cfg.malicious_ratio}")
    try:
        population = build_population(attack, ds, cfg.malicious_ratio, cfg.seed, targets,
                                      reference_draw=cfg.compat.attacker_draw)
    except ValueError as e:
        raise ConfigError(f"malicious population: {e}") from None
    return attack, population


def all_clients(s: Setup) -> np.ndarray:
    """Every client id of the run, benign (``0..N-1``) then malicious (``N..N+m-1``)."""
    return np.concatenate([s.benign_users, s.malicious_users])


WORKER_KINDS = ("client", "attacker")


def worker_users(s: Setup, kind: str, shard_spec: tuple[int, int] | None) -> np.ndarray:
    """The users a worker of ``kind`` hosts on the orchestrator's ``shard_spec`` ``(i, n)``: for
    ``client`` the benign users ``u`` with ``u % n == i``, for ``attacker`` every n-th malicious
    client by position from the i-th; ``None``: all of the kind. The orchestrator decides the shard
    and the worker builds its population from it, so both sides compute the same set here."""
    if kind not in WORKER_KINDS:
        raise ValueError(f"unknown worker kind {kind!r}; kinds: {', '.join(WORKER_KINDS)}")
    ids = s.benign_users if kind == "client" else s.malicious_users
    if shard_spec is None:
        return ids
    i, n = shard_spec
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
    return ids[np.arange(len(ids)) % n == i]


def epoch_rounds(cfg: ExperimentConfig, clients: np.ndarray, epoch: int) -> list[np.ndarray]:
    """The rounds of 0-based ``epoch``.

    Paper mode (``fraction == 0``): shuffle every client and cut into rounds of
    ``clients_per_round`` (the last round may be smaller). FedAvg sampling (``fraction > 0``):
    ``ceil(1 / fraction)`` rounds, each an independent sample of ``max(1, fraction * n)`` clients.
    Each round's clients are returned sorted by id.
    """
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed & 0xFFFFFFFF, SCHEDULE_KEY, epoch]))
    clients = np.sort(np.asarray(clients, dtype=np.int64))
    if cfg.fraction <= 0:
        order = rng.permutation(clients)
        B = cfg.clients_per_round
        return [np.sort(order[i : i + B]) for i in range(0, len(order), B)]
    per_round = max(1, int(round(cfg.fraction * len(clients))))
    n_rounds = int(np.ceil(1.0 / cfg.fraction))
    return [np.sort(rng.choice(clients, size=per_round, replace=False)) for _ in range(n_rounds)]
