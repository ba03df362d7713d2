"""Attacker worker (gRPC ``fedseq.v1.Worker``, the same contract as client/): hosts the run's
malicious clients (ids ``N..N+m-1``, each holding a copy of a real user's data or, for the random
attack, a fabricated profile) and crafts their updates with the configured attack
(:mod:`attacker.attacks`). Its updates travel exactly like benign ones: same encoding, same
``num_samples`` convention, same upload path, so the server cannot tell them apart. It evaluates
no one (malicious clients are excluded from evaluation)."""

from __future__ import annotations

import logging

import numpy as np

from fedseq.config import ConfigError, ExperimentConfig
from fedseq.experiment import setup, worker_users
from fedseq.worker import Hosted

log = logging.getLogger(__name__)


def malicious_population_hosted(cfg: ExperimentConfig, shard_spec: tuple[int, int] | None) -> Hosted:
    """The malicious clients this attacker worker hosts (shard ``i/n`` of them, or all)."""
    s = setup(cfg)
    if s.attack is None or s.population is None:
        raise ConfigError("serve-attacker needs a run with an attack (config key 'attack' is 'none')")
    ids = worker_users(s, "attacker", shard_spec)
    seqs = dict(zip(ids.tolist(), s.population.sequences_of(ids), strict=True))
    attack, local = s.attack, cfg.local()

    def compute(params, user_ids, round_id):
        return attack.updates(s.model, params, [seqs[u] for u in user_ids], np.asarray(user_ids, dtype=np.int64),
                              s.targets, cfg.seed, round_id, local, cfg.compat)

    log.info("hosting %d malicious clients (%s; %s)", len(ids), cfg.attack, s.population.note)
    return Hosted(setup=s, users=ids, sequences=seqs, compute=compute, evaluate_users=np.zeros(0, dtype=np.int64))
