"""Attacker worker (gRPC ``fedseq.v1.Worker``, the same contract and servicer as client/): hosts
the run's malicious clients (ids ``N..N+m-1``, each holding a copy of a real user's data or, for
the random attack, a fabricated profile) and crafts their updates with the configured attack
(:mod:`attacker.attacks`). Its updates travel exactly like benign ones: same encoding, same
``num_samples`` convention, same upload path, so the server cannot tell them apart. It evaluates
no one (malicious clients are excluded from evaluation). This module is its population plug-in;
attacker/app.py builds the service."""

from __future__ import annotations

import logging

import numpy as np

from client.worker import Hosted
from fedseq.config import ConfigError, ExperimentConfig
from fedseq.experiment import setup, worker_users

from .population import make_adversary

log = logging.getLogger(__name__)


def malicious_population_hosted(cfg: ExperimentConfig, shard_spec: tuple[int, int] | None) -> Hosted:
    """The malicious clients this attacker worker hosts (shard ``i/n`` of them, or all)."""
    s = setup(cfg)
    adversary = make_adversary(s)
    if adversary is None:
        raise ConfigError("serve-attacker needs a run with an attack (config key 'attack' is 'none')")
    ids = worker_users(s, "attacker", shard_spec)

    def compute(params, user_ids, round_id):
        return adversary.updates(s, params, user_ids, round_id)

    seqs = dict(zip(ids.tolist(), adversary.population.sequences_of(ids), strict=True))
    log.info("hosting %d malicious clients (%s; %s)", len(ids), cfg.attack, adversary.population.note)
    return Hosted(setup=s, users=ids, sequences=seqs, compute=compute, evaluate_users=np.zeros(0, dtype=np.int64))

