"""The server's root dataset for FLTrust (Cao et al., "FLTrust: Byzantine-robust Federated Learning
via Trust Bootstrapping", NDSS 2021).

FLTrust assumes the service provider holds a small clean dataset and computes its own "root"
update each round. fedseq's server gets it from the run's dataset: with rule ``fltrust`` it loads
the dataset named in the run config (``FEDSEQ_DATA_ROOT`` on the server for files) and keeps
copies of ``root_users`` users drawn with the run seed. The root update is the mean of their
updates at the round's global weights, computed like any client's (same loss, same mode) but
with the server's own randomness stream, so it never equals a client's upload bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import ExperimentConfig
from .data import load_dataset
from .engine import AggregationRule, RootUpdate
from .models import SeqModel
from .training import compute_updates

ROOT_KEY = 0x7007F  # seeds the root-user draw and the root updates' randomness


@dataclass(frozen=True)
class RootData:
    users: np.ndarray  # [k] user indices copied into the root set
    sequences: tuple[np.ndarray, ...]


def load_root(cfg: ExperimentConfig, k: int) -> RootData:
    """Copies of ``k`` users' training data, drawn with the run seed."""
    ds = load_dataset(cfg.dataset, cfg.data_root, seed=cfg.seed)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed & 0xFFFFFFFF, ROOT_KEY]))
    users = np.sort(rng.choice(ds.num_users, size=min(k, ds.num_users), replace=False)).astype(np.int64)
    return RootData(users, tuple(np.array(ds.train[u], copy=True) for u in users))


def root_update(model: SeqModel, params: torch.Tensor, root: RootData, cfg: ExperimentConfig,
                round_key: int) -> torch.Tensor:
    """The root update ``[D]``: mean of the root users' updates at ``params``."""
    ub = compute_updates(model, params, list(root.sequences), root.users.tolist(), cfg.seed ^ ROOT_KEY, round_key,
                         cfg.local())
    return ub.updates.mean(dim=0)


def root_source(rule: AggregationRule, cfg: ExperimentConfig, model: SeqModel) -> RootUpdate | None:
    """The root-update function of a rule that declares ``needs_root`` (FLTrust, or a wrapper
    around it), or None: :func:`fedseq.engine.aggregate_round` calls it once per round and hands
    the result to the rule as ``RoundContext.root``. The root dataset copies ``rule.root_users``
    users."""
    if not rule.needs_root:
        return None
    data = load_root(cfg, rule.root_users)

    def root(params: torch.Tensor, round_id: int) -> torch.Tensor:
        return root_update(model, params, data, cfg, round_id)

    return root
