"""Benign client worker (gRPC ``fedseq.v1.Worker``, servicer in client/worker.py): hosts a shard
of the dataset's users, computes their updates on the model versions the orchestrator names,
streams them to the aggregation server, and evaluates them (HR@10, NDCG@10, ER@K). This module
is its population plug-in; client/app.py builds the service."""

from __future__ import annotations

import logging

from fedseq.adv_train import adversarial_updates
from fedseq.config import ExperimentConfig
from fedseq.experiment import setup, worker_users
from fedseq.training import compute_updates, iter_updates

from .worker import Hosted, ShardSequences

log = logging.getLogger(__name__)


def benign_population(cfg: ExperimentConfig, shard_spec: tuple[int, int] | None) -> Hosted:
    """The users a benign worker hosts: shard ``i/n`` of the dataset's users (the orchestrator's
    assignment), or all of them."""
    s = setup(cfg)
    ds = s.dataset
    users = worker_users(s, "client", shard_spec)
    seqs = ShardSequences(users, ds.train)  # no dict entry per user
    local = cfg.local()

    def compute(params, user_ids, round_id):
        return compute_updates(s.model, params, [seqs[u] for u in user_ids], user_ids, cfg.seed, round_id, local)

    def compute_pieces(params, user_ids, round_id):
        return iter_updates(s.model, params, [seqs[u] for u in user_ids], user_ids, cfg.seed, round_id, local)

    adv = cfg.adv_config()

    def compute_adversarial(params, user_ids, round_id):
        return adversarial_updates(s.model, params, [seqs[u] for u in user_ids], user_ids, cfg.seed, round_id,
                                   local, adv)

    log.info("hosting %d benign users of %s", len(users), ds.name)
    # it trains only its shard, but may evaluate any benign user (it holds the data set): the
    # orchestrator moves a lost worker's evaluation here, so every epoch evaluates all users
    return Hosted(setup=s, users=users, sequences=seqs, compute=compute, evaluate_users=s.benign_users,
                  compute_adversarial=compute_adversarial, compute_pieces=compute_pieces)

