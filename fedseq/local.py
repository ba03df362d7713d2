"""How users compute their updates, as configuration: :class:`LocalConfig`, PIECK's client-side
regularisers :class:`PieckReg`, local differential privacy :class:`LocalDP` and adversarial
training :class:`AdvTrainConfig`. Plain frozen dataclasses without torch, so that the run config
(fedseq/config.py), and with it the ``fedseq`` launcher, builds and checks them without importing
the training code (models, per-sample gradients); the training itself is fedseq/training.py and
fedseq/adv_train.py, which re-export them."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .device import check_name as check_device

__all__ = ["AdvTrainConfig", "LocalConfig", "LocalDP", "PieckReg"]


@dataclass(frozen=True)
class PieckReg:
    """PIECK's client-side defense: two regularisers on every benign user's local loss.

    Zhang, Li, Rong, Zhao, Chen, Shou, "Preventing the Popular Item Embedding Based Attack in
    Federated Recommendations", ICDE 2024 (public code: ``FedRecClientDefense`` in DL-FRS/client.py).
    Each round the user mines the ``size`` most popular items, the rows that moved most since
    version 0 (:mod:`fedseq.popularity`), ``e_1..e_s`` most moved first, weighted
    ``w_j = exp(s - j + 1) / sum_k exp(k)``, and adds to its loss

    * ``ipe_mu * L_ipe``, ``L_ipe = -sum_j w_j mean_i cos(e_j, E_i)`` over the user's training items
      ``i`` that are not popular (SASRec: positives and negatives; BERT4Rec: the input items), which
      spreads the popular items' region over ordinary items so that a target pulled next to the
      popular items gains less (item popularity enhancement is what PIECK-IPE exploits);
    * ``uea_mu * L_uea``, ``L_uea = -sum_j w_j mean_c softmax(u)_c (log softmax(u)_c - log softmax(e_j)_c)``
      with ``u`` the user's representation (the sequence output at its last position), which keeps
      users away from the popular items' embeddings (user embedding approximation, PIECK-UEA).

    ``e_j`` are constants (the global weights); the gradient flows through ``E_i`` and ``u``.
    Defaults are the public code's (``regula_size`` 10, ``ipe_mu`` = ``uea_mu`` = 45)."""

    size: int = 10
    ipe_mu: float = 45.0
    uea_mu: float = 45.0
    init_seed: int = 0  # the run seed: version 0 is its seeded initialisation

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"pieck-reg size must be >= 1, got {self.size}")
        for name in ("ipe_mu", "uea_mu"):
            v = getattr(self, name)
            if not (v >= 0.0 and v < float("inf")):
                raise ValueError(f"pieck-reg {name} must be finite and >= 0, got {v}")


@dataclass(frozen=True)
class LocalDP:
    """Local differential privacy: every benign user clips its update to L2 norm ``clip`` and adds
    Gaussian noise of standard deviation ``noise * clip`` to every coordinate before the update
    leaves it, so the server (and anyone on the wire) sees only the noised update.

    Wei, Li, Ding, Ma, Yang, Farokhi, Jin, Quek, Poor, "Federated Learning With Differential Privacy:
    Algorithms and Performance Analysis", IEEE TIFS 2020 (NbAFL: each client clips its parameters and
    perturbs them with Gaussian noise before uploading). fedseq perturbs the update (its gradient,
    or ``w_global - w_local`` in FedAvg mode); the noise of user u in round r comes from
    ``(seed, r, u)`` only (fedseq/ldp.py), so both runners send the same updates. A malicious client
    need not follow the protocol, and fedseq's attacks do not: their uploads are neither clipped
    nor noised (an attack that estimates benign updates with the training code, such as ALIE,
    sees them noised, as the benign clients send them).
    ``seed``: the run seed."""

    clip: float
    noise: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.clip > 0 and self.clip < float("inf")):
            raise ValueError(f"ldp clip must be a finite float > 0, got {self.clip}")
        if not (self.noise >= 0 and self.noise < float("inf")):
            raise ValueError(f"ldp noise must be a finite float >= 0, got {self.noise}")


@dataclass(frozen=True)
class LocalConfig:
    """How users compute their updates."""

    mode: str = "paper"  # "paper" | "fedavg"
    dropout: bool = True  # training-time dropout (seeded per user)
    local_epochs: int = 1  # fedavg mode only
    local_lr: float = 0.01  # fedavg mode only
    optimizer: str = "sgd"  # fedavg mode only: "sgd" | "adam"
    micro_batch: int = 64  # users per micro-batch
    max_tokens: int = 4096  # padded positions per micro-batch
    shared_neg_seed: bool = False  # compat: one constant negative-sampling seed for every client
    neg_from_vocab: bool = False  # compat: negatives drawn from 1..M+1 (mask token included)
    device: str = "cpu"  # where the per-user gradients are computed (fedseq/device.py); updates return on the CPU
    pieck: PieckReg | None = None  # PIECK's client-side regularisers (a defense), off by default
    ldp: LocalDP | None = None  # local differential privacy on every benign update (a defense), off by default

    def __post_init__(self) -> None:
        if self.mode not in ("paper", "fedavg"):
            raise ValueError(f"mode must be 'paper' or 'fedavg', got {self.mode!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.local_epochs < 1 or self.micro_batch < 1 or self.max_tokens < 1 or self.local_lr <= 0:
            raise ValueError("local_epochs and micro_batch must be >= 1 and local_lr > 0")
        check_device(self.device)


@dataclass(frozen=True)
class AdvTrainConfig:
    """adv_train settings; defaults are the public code's ``train_robust``."""

    steps: int = 3  # ascent steps on the one-hot input
    step_size: float = 1.0  # added times the per-position L2-normalised gradient
    switch_prob: float = 0.5  # probability that a non-padding position takes its perturbed row
    users_per_round: int = 32  # benign clients per round that recompute (chosen by the caller)
    max_onehot: int = 1 << 25  # at most B * L * V one-hot floats per micro-batch (128 MiB)

    def __post_init__(self) -> None:
        for name in ("steps", "users_per_round", "max_onehot"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):
                raise ValueError(f"AdvTrainConfig.{name} must be an integer, got {v!r}")
        if self.steps < 0:
            raise ValueError(f"AdvTrainConfig.steps must be >= 0, got {self.steps}")
        if self.users_per_round < 1:
            raise ValueError(f"AdvTrainConfig.users_per_round must be >= 1, got {self.users_per_round}")
        if self.max_onehot < 1:
            raise ValueError(f"AdvTrainConfig.max_onehot must be >= 1, got {self.max_onehot}")
        for name in ("step_size", "switch_prob"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"AdvTrainConfig.{name} must be a finite number, got {v!r}")
        if self.step_size <= 0:
            raise ValueError(f"AdvTrainConfig.step_size must be > 0, got {self.step_size}")
        if not 0.0 <= self.switch_prob <= 1.0:
            raise ValueError(f"AdvTrainConfig.switch_prob must be in [0, 1], got {self.switch_prob}")
