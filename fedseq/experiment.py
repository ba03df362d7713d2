"""What every runner shares: the experiment's dataset, model, initial weights, targets and client
ids, built from an :class:`ExperimentConfig` the same way everywhere, so the in-process runner and
the networked services compute the same experiment.

Clients: the N benign users have ids ``0..N-1``; with an attack, the m malicious clients follow
with ids ``N..N+m-1`` (m from :func:`population_size`; their data and updates are the attacker's
business, :mod:`attacker.population`), and :func:`all_clients` lists both, so every epoch shuffles
them together as in the paper. The library never imports a service: rules and attacks are
plug-ins that the services (and the ``fedseq`` command) pass in."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import ConfigError, ExperimentConfig
from .data import SeqDataset, load_dataset, preset_targets
from .metrics import EvalConfig
from .models import SeqModel, build_model
from .models.common import reference_init
from .params import Layout, get_vector
from .privacy import Mechanism

log = logging.getLogger(__name__)

EVAL_SAMPLE_KEY = 0xE5A1  # seeds the evaluated-user sample (cfg.eval_users)


@dataclass
class Setup:
    cfg: ExperimentConfig
    dataset: SeqDataset
    model: SeqModel
    layout: Layout
    targets: tuple[int, ...]
    num_malicious: int = 0  # m: malicious clients of the run (0 without an attack)
    population_note: str = ""  # how m was chosen, for the run summary
    # [N + m] every client's aggregation weight (:func:`client_weights`); set by cli.plugins.prepare,
    # which knows the malicious population (the orchestrator sends these with each round)
    weights: np.ndarray | None = None
    # the run's differentially private mechanism (its rule's ``privacy``), set by cli.plugins.prepare:
    # the orchestrator reports the run's epsilon from it (fedseq/engine.py privacy_summary)
    privacy: Mechanism | None = None

    @property
    def benign_users(self) -> np.ndarray:
        return np.arange(self.dataset.num_users, dtype=np.int64)

    @property
    def malicious_users(self) -> np.ndarray:
        """Ids of the malicious clients (``N..N+m-1``; empty without an attack)."""
        n = self.dataset.num_users
        return np.arange(n, n + self.num_malicious, dtype=np.int64)

    @property
    def eval_users(self) -> np.ndarray:
        """The benign users evaluated each epoch: all of them, or with ``eval_users = k`` (for
        huge populations; 0, the default, is all) a fixed sorted sample of k drawn from the run
        seed, the same every epoch and in every runner."""
        k = self.cfg.eval_users
        n = self.dataset.num_users
        if k <= 0 or k >= n:
            return self.benign_users
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed & 0xFFFFFFFF, EVAL_SAMPLE_KEY]))
        return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)

    def eval_config(self) -> EvalConfig:
        c = self.cfg
        return EvalConfig(
            protocol=c.protocol,
            num_negatives=c.num_negatives,
            seed=c.seed,
            dropout=c.compat.eval_dropout,
            mask_token_query=c.compat.eval_mask_token,
            device=c.device,
        )

    def initial_params(self) -> torch.Tensor:
        """Version 0: the reference initialisation seeded with the run seed."""
        reference_init(self.model, self.cfg.seed)
        return get_vector(self.model)


def setup(cfg: ExperimentConfig, dataset: SeqDataset | None = None) -> Setup:
    """Load the data and build the model for ``cfg`` (deterministic in ``cfg.seed``)."""
    ds = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_root, seed=cfg.seed)
    model = build_model(cfg.model, ds.num_items)
    try:
        targets = cfg.targets or preset_targets(ds, cfg.target_preset)
    except ValueError as e:
        raise ConfigError(f"target_preset {cfg.target_preset!r}: {e}") from None
    for t in targets:
        if not 1 <= t <= ds.num_items:
            raise ConfigError(f"target item {t} is outside the catalogue 1..{ds.num_items} "
                              f"of dataset {ds.name!r}")
    targets = tuple(int(t) for t in targets)
    m, note = malicious_count(cfg, ds)
    return Setup(cfg, ds, model, Layout.of(model), targets, m, note)


def check_ratio(ratio: float) -> float:
    """``ratio`` as a float in [0, 1), or ValueError naming the accepted range."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"malicious ratio must be a number in [0, 1), got {ratio!r}") from None
    if not (math.isfinite(r) and 0.0 <= r < 1.0):
        raise ValueError(f"malicious ratio must be in [0, 1) (a share of the benign users), got {ratio!r}")
    return r


def population_size(num_users: int, ratio: float) -> tuple[int, str]:
    """``(m, note)``: m = floor(N * ratio), at least 1 when ratio > 0 (the DV-FSR paper and its
    public code: Steam, N = 3,753: 0.1% -> 3, 0.05% -> 1)."""
    r = check_ratio(ratio)
    m = int(math.floor(num_users * r + 1e-9))  # + 1e-9: 3753 * 0.001 must not round down to 3 - eps
    if r == 0.0:
        return 0, "no malicious clients (ratio 0)"
    if m == 0:
        return 1, (f"floor({num_users} * {r:g}) = 0 malicious clients; using 1 "
                   "(the smallest attack at a ratio > 0)")
    return m, f"{m} malicious clients = floor({num_users} * {r:g})"


def malicious_count(cfg: ExperimentConfig, ds: SeqDataset) -> tuple[int, str]:
    """``(m, note)`` of the run: 0 without an attack. Raises :class:`ConfigError` for a ratio
    outside (0, 1) with an attack."""
    if cfg.attack == "none":  # a ratio the user set anyway is warned about once, by build_config
        return 0, ""
    if not 0.0 < cfg.malicious_ratio < 1.0:
        raise ConfigError(f"attack {cfg.attack!r} needs malicious_ratio in (0, 1) (a share of the "
                          f"{ds.num_users} benign users, e.g. 0.001), got {cfg.malicious_ratio}")
    return population_size(ds.num_users, cfg.malicious_ratio)


def all_clients(s: Setup) -> np.ndarray:
    """Every client id of the run, benign (``0..N-1``) then malicious (``N..N+m-1``)."""
    return np.concatenate([s.benign_users, s.malicious_users])


def client_weights(s: Setup, malicious_sequences: Sequence[np.ndarray] = ()) -> np.ndarray:
    """``[N + m]`` int64: every client's aggregation weight, its training items (the FedAvg n_k):
    ``len(train[u])`` for benign user u, the length of its (copied or fabricated) sequence for a
    malicious client. The orchestrator knows the split, so it decides the weights and sends them
    with each round; an upload's ``num_samples`` is only a claim checked against them."""
    if len(malicious_sequences) != s.num_malicious:
        raise ValueError(f"{len(malicious_sequences)} malicious sequences for {s.num_malicious} malicious clients")
    train = s.dataset.train
    offsets = getattr(train, "offsets", None)  # a Ragged (the million-user data) answers without a loop
    benign = np.diff(offsets).astype(np.int64) if offsets is not None else \
        np.asarray([len(train[u]) for u in range(s.dataset.num_users)], dtype=np.int64)
    return np.concatenate([benign, np.asarray([len(q) for q in malicious_sequences], dtype=np.int64)])


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
