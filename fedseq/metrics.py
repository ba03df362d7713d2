"""Federated evaluation: HR@10 and NDCG@10 of each user's held-out item, and the exposure ratio
ER@K of attack target items (DV-FSR, Yin et al. AAAI 2025, Eq. 11; also PipAttack, Zhang et al.
WSDM 2022).

Two protocols:

* ``sampled`` (the paper's): candidates = [test item] + ``num_negatives`` items drawn uniformly,
  with replacement, from 1..M minus the user's training items + [target items]; a test or target
  item the user already trained on scores -1024.
* ``full``: the test item and each target are ranked among every item 1..M the user has not
  trained on.

Rank = number of candidates scoring strictly higher. HR@10 = [rank < 10], NDCG@10 = 1/log2(2 +
rank) if rank < 10, ER@K = [target rank < K] averaged over the targets. Results are *sums* over
users (:class:`MetricSums`), so workers evaluate their own users and the sums add up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from .device import check_name as check_device
from .device import model_on, resolve
from .models import BERT4Rec, SeqModel
from .models.common import Drop, keep_masks
from .params import set_vector
from .training import micro_batches, user_rng
from .v1 import common_pb2

KS = (5, 10, 20, 30)
EVAL_KEY = 0x5EED_E7A1  # round key of the evaluation candidate sampler (never a training round)
PROTOCOLS = ("sampled", "full")


@dataclass(frozen=True)
class EvalConfig:
    protocol: str = "sampled"
    num_negatives: int = 1000
    seed: int = 0
    dropout: bool = False  # compat: the public code evaluates in train mode (dropout on)
    mask_token_query: bool = False  # compat (SASRec): score at an appended, never-trained mask token
    max_tokens: int = 16384
    batch_size: int = 512
    device: str = "cpu"  # where the forward passes and scores run (fedseq/device.py); sums return on the CPU

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.num_negatives < 1:
            raise ValueError("num_negatives must be >= 1")


@dataclass
class MetricSums:
    """Per-user metrics summed over users (add them across workers, then call :meth:`means`)."""

    users: int = 0
    hr10: float = 0.0
    ndcg10: float = 0.0
    er: dict[int, float] = field(default_factory=lambda: {k: 0.0 for k in KS})

    def __add__(self, other: MetricSums) -> MetricSums:
        return MetricSums(
            self.users + other.users,
            self.hr10 + other.hr10,
            self.ndcg10 + other.ndcg10,
            {k: self.er.get(k, 0.0) + other.er.get(k, 0.0) for k in KS},
        )

    def means(self) -> dict[str, float]:
        n = max(self.users, 1)
        out = {"hr@10": self.hr10 / n, "ndcg@10": self.ndcg10 / n}
        out.update({f"er@{k}": self.er.get(k, 0.0) / n for k in KS})
        return out

    def to_dict(self) -> dict[str, float]:
        d: dict[str, float] = {"users": self.users, "hr10": self.hr10, "ndcg10": self.ndcg10}
        d.update({f"er{k}": v for k, v in self.er.items()})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, float]) -> MetricSums:
        return cls(int(d["users"]), float(d["hr10"]), float(d["ndcg10"]), {k: float(d.get(f"er{k}", 0.0)) for k in KS})


SCORE_ROWS = 32  # users per slice when scoring sampled candidates (Evaluator._sampled)


def ranks_from_scores(scores: torch.Tensor, col: int) -> torch.Tensor:
    """Rank of column ``col`` in each row of ``scores [B, C]``: how many others score strictly higher.
    A NaN score ranks worst (``C - 1``) and a NaN among the others ranks below every number: a
    broken model never looks like a perfect one (NaN compares false, so a NaN score would
    otherwise rank first)."""
    own = scores[:, col : col + 1]
    others = scores.masked_fill(torch.isnan(scores), -math.inf) if bool(torch.isnan(scores).any()) else scores
    rank = (others > own).sum(dim=1)
    return torch.where(torch.isnan(own[:, 0]), torch.full_like(rank, scores.shape[1] - 1), rank)


def metric_sums(test_rank: torch.Tensor, target_ranks: torch.Tensor) -> MetricSums:
    """Sum metrics from ``test_rank [B]`` and ``target_ranks [B, T]`` (T >= 1 targets)."""
    hit = test_rank < 10
    ndcg = torch.where(hit, 1.0 / torch.log2(test_rank.double() + 2.0), torch.zeros((), dtype=torch.float64))
    er = {k: float((target_ranks < k).double().mean(dim=1).sum()) for k in KS}
    return MetricSums(int(test_rank.shape[0]), float(hit.double().sum()), float(ndcg.sum()), er)


def eval_input(model: SeqModel, train: np.ndarray, cfg: EvalConfig) -> np.ndarray:
    """The sequence a user is scored from: its last items, with a trailing mask token for
    BERT4Rec (always) and for SASRec under the ``mask_token_query`` compat switch."""
    if isinstance(model, BERT4Rec):
        return np.append(train[max(len(train) - (model.cfg.input_len - 1), 0) :], model.cfg.mask_token)
    c = model.cfg
    if cfg.mask_token_query:
        return np.append(train[max(len(train) - (c.max_len - 1), 0) :], c.mask_token)
    return train[-c.max_len :]


def sample_candidates(rng: np.random.Generator, train: np.ndarray, n: int, num_items: int) -> np.ndarray:
    """``n`` items drawn uniformly with replacement from 1..M minus ``train``."""
    out = np.empty(0, dtype=np.int64)
    while len(out) < n:
        cand = rng.integers(1, num_items + 1, size=n + n // 4 + 8)
        out = np.concatenate([out, cand[~np.isin(cand, train)]])
    return out[:n]


class Evaluator:
    """Evaluates a fixed set of users; caches their inputs and sampled candidates across calls
    (candidates are a function of (seed, user) only, so every epoch sees the same ones)."""

    def __init__(
        self,
        model: SeqModel,
        train: Sequence[np.ndarray],
        test: Sequence[int] | np.ndarray,
        users: Sequence[int] | np.ndarray,
        targets: Sequence[int],
        cfg: EvalConfig = EvalConfig(),
    ) -> None:
        if not targets:
            raise ValueError("at least one target item is needed (for ER@K)")
        M = model.cfg.num_items
        for t in targets:
            if not 1 <= int(t) <= M:
                raise ValueError(f"target item {t} is outside the catalogue 1..{M}")
        self.model, self.cfg = model, cfg
        self.users = np.asarray(users, dtype=np.int64)
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        # read-only inputs (views into a Ragged's flat array) are copied: torch.from_numpy warns on them
        self.inputs = [x if x.flags.writeable else x.copy()
                       for x in (eval_input(model, np.asarray(s), cfg) for s in train)]
        self.train = [np.asarray(s) for s in train]
        self.test = np.asarray(test, dtype=np.int64)
        self._cands: list[np.ndarray] | None = None
        self._seen: torch.Tensor | None = None

    def _candidates(self) -> list[np.ndarray]:
        if self._cands is None:
            M, n = self.model.cfg.num_items, self.cfg.num_negatives
            self._cands = [
                sample_candidates(user_rng(self.cfg.seed, EVAL_KEY, int(u)), tr, n, M)
                for u, tr in zip(self.users, self.train, strict=True)
            ]
        return self._cands

    def _seen_items(self) -> torch.Tensor:
        """``[N, 1 + T]`` bool, cached: whether each user's history holds its test item (column 0)
        and each target (the data never changes between calls, so neither does this)."""
        if self._seen is None:
            targets = self.targets.numpy()
            seen = np.zeros((len(self.train), 1 + len(targets)), dtype=bool)
            for i, tr in enumerate(self.train):
                seen[i, 0] = np.isin(self.test[i], tr)
                seen[i, 1:] = np.isin(targets, tr)
            self._seen = torch.from_numpy(seen)
        return self._seen

    @torch.no_grad()
    def __call__(self, params: torch.Tensor) -> MetricSums:
        dev = resolve(self.cfg.device)
        model = cast(SeqModel, model_on(self.model, dev))
        set_vector(model, params.to(dev))
        total = MetricSums()
        sites = self.model.dropout_sites() if self.cfg.dropout else {}
        cands = self._candidates() if self.cfg.protocol == "sampled" else None
        for idx in micro_batches([len(x) for x in self.inputs], self.cfg.batch_size, self.cfg.max_tokens):
            L = max(len(self.inputs[i]) for i in idx)
            tokens = torch.zeros(len(idx), L, dtype=torch.int64)
            for r, i in enumerate(idx):
                tokens[r, L - len(self.inputs[i]) :] = torch.from_numpy(self.inputs[i])
            drop = None
            if sites:
                seeds = torch.tensor([int(user_rng(self.cfg.seed, EVAL_KEY, int(self.users[i]), 1).integers(0, 2**32))
                                      for i in idx], device=dev)
                drop = Drop(keep_masks(sites, seeds, L))
            h = model(tokens.to(dev), drop, last=True)[:, -1]  # [B, d]: the last block runs one query per user
            test = torch.as_tensor(self.test[idx])
            if cands is not None:
                total = total + self._sampled(model, h, idx, test, cands)
            else:
                total = total + self._full(model, h, idx, test)
        return total

    def _sampled(self, model: SeqModel, h: torch.Tensor, idx: np.ndarray, test: torch.Tensor,
                 cands: list[np.ndarray]) -> MetricSums:
        B, T = len(idx), len(self.targets)
        negs = torch.as_tensor(np.stack([cands[i] for i in idx]))  # [B, n]
        items = torch.cat([test[:, None], negs, self.targets[None].expand(B, T)], dim=1).to(h.device)  # [B, 1 + n + T]
        # in slices of SCORE_ROWS users: the gathered [rows, 1 + n + T, d] embeddings stay a few MB that
        # the allocator reuses (one [B, 1002, 64] gather is ~90 MB of fresh pages per call); same numbers
        scores = torch.cat([model.scores(h[a : a + SCORE_ROWS], items[a : a + SCORE_ROWS])
                            for a in range(0, B, SCORE_ROWS)]).cpu()
        seen = self._seen_items()[torch.as_tensor(idx)]  # [B, 1 + T]
        scores[:, 0] = scores[:, 0].masked_fill(seen[:, 0], -1024.0)
        scores[:, -T:] = scores[:, -T:].masked_fill(seen[:, 1:], -1024.0)
        test_rank = ranks_from_scores(scores, 0)
        target_ranks = torch.stack([ranks_from_scores(scores, scores.shape[1] - T + j) for j in range(T)], dim=1)
        return metric_sums(test_rank, target_ranks)

    def _full(self, model: SeqModel, h: torch.Tensor, idx: np.ndarray, test: torch.Tensor) -> MetricSums:
        M = self.model.cfg.num_items
        scores = model.scores(h)[:, : M + 1].cpu().clone()  # [B, M + 1]; column = item id
        scores = scores.masked_fill(torch.isnan(scores), -math.inf)  # NaN ranks worst, like an excluded item
        scores[:, 0] = -math.inf
        excluded = torch.zeros_like(scores, dtype=torch.bool)
        for r, i in enumerate(idx):
            excluded[r, torch.from_numpy(self.train[i])] = True
        scores = scores.masked_fill(excluded, -math.inf)
        rows = torch.arange(len(idx))
        t_score = scores[rows, test]
        test_rank = torch.where(t_score == -math.inf, torch.full_like(test, M), (scores > t_score[:, None]).sum(1))
        target_ranks = []
        for t in self.targets.tolist():
            s = scores[:, t]
            target_ranks.append(torch.where(s == -math.inf, torch.full_like(test, M), (scores > s[:, None]).sum(1)))
        return metric_sums(test_rank, torch.stack(target_ranks, dim=1))


def sums_to_proto(m: MetricSums) -> common_pb2.MetricSums:
    """``m`` as the wire message of an EvaluateReply."""
    return common_pb2.MetricSums(users=m.users, hr10=m.hr10, ndcg10=m.ndcg10, er={int(k): v for k, v in m.er.items()})


def sums_from_proto(p: common_pb2.MetricSums) -> MetricSums:
    """The sums of an EvaluateReply (check them with ``orchestrator.service.check_eval_sums``)."""
    return MetricSums(int(p.users), p.hr10, p.ndcg10, {int(k): v for k, v in p.er.items()})
