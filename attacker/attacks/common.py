"""Computations shared by the attacks: the attack input of a user, a functional view of the model at
a flat parameter vector, seeded dropout for attack forwards, and the target-score loss.

Attack input (``attack_tokens``): SASRec reads the last ``max_len`` items of the user's training
sequence, left-padded, and predicts at the last position; BERT4Rec predicts at a mask token, so its
input is the last ``input_len - 1`` items followed by the mask token (the "last position" is the
mask). Padding is trimmed to the batch's longest input: positions are counted over real items and
padding keys are masked, so trimming changes nothing (and seeded dropout is counted from the end).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedseq.models import BERT4Rec, SASRec, SeqModel
from fedseq.models.common import Drop, DropSite, keep_masks
from fedseq.params import Layout
from fedseq.training import user_rng

from .base import Users

# Streams of ``user_rng(seed, round_key, user, stream)`` used by attacks (benign training uses
# streams 0.. and 1000..; these never collide with them).
STREAM_NEGATIVES = 5000  # L_con negatives
STREAM_IMPORTANCE = 5100  # + repeat: dropout of the substitution's importance gradient
STREAM_ATTACK = 5300  # + repeat: dropout of the attack-loss forward
STREAM_VIEWS = 5500  # ALIE: benign-like views


def attack_input(model: nn.Module, train: np.ndarray) -> np.ndarray:
    """The token sequence an attack feeds for one user (see the module docstring)."""
    c: Any = model.cfg
    train = np.asarray(train, dtype=np.int64)
    if isinstance(model, BERT4Rec):
        return np.append(train[-(c.input_len - 1):] if c.input_len > 1 else train[:0], c.mask_token)
    if isinstance(model, SASRec):
        return train[-c.max_len:]
    raise TypeError(f"no attack input for model {type(model).__name__}")


def left_pad(rows: Sequence[np.ndarray]) -> torch.Tensor:
    """``[B, L]`` int64, each row right-aligned (left-padded with 0) to the longest row."""
    L = max(1, max(len(r) for r in rows))
    out = np.zeros((len(rows), L), dtype=np.int64)
    for i, r in enumerate(rows):
        if len(r):
            out[i, L - len(r):] = r
    return torch.from_numpy(out)


def attack_tokens(model: nn.Module, sequences: Sequence[np.ndarray]) -> torch.Tensor:
    """``[B, L]`` attack inputs of a batch of users (query position = last column)."""
    return left_pad([attack_input(model, s) for s in sequences])


class _Call(nn.Module):
    """Lets ``functional_call`` run a method of the model: ``forward``, ``embed``, ``encode`` or ``scores``."""

    def __init__(self, model: SeqModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, method: str, *args):
        m = self.model
        if method == "forward":
            return m.forward(*args)
        if method == "embed":
            return m.embed(*args)
        if method == "encode":
            return m.encode(*args)
        if method == "scores":
            return m.scores(*args)
        raise ValueError(f"no model method {method!r}; known: embed, encode, forward, scores")


class Functional:
    """The model evaluated at a flat parameter vector ``params [D]`` (the shared model object is
    never modified). Gradients flow into ``params`` when it requires grad."""

    def __init__(self, model: SeqModel, params: torch.Tensor) -> None:
        self.model = model
        self.cfg = model.cfg
        self.layout = Layout.of(model)
        self.params = params
        self._call = _Call(model)
        self._tensors = {f"model.{n}": t for n, t in self.layout.unflatten(params).items()}

    def __call__(self, method: str, *args):
        return functional_call(self._call, self._tensors, (method, *args))

    def tensor(self, name: str) -> torch.Tensor:
        """A parameter by name, e.g. ``"item_emb.weight"`` (a view of ``params``)."""
        return self._tensors[f"model.{name}"]

    @property
    def item_table(self) -> torch.Tensor:
        return self.tensor("item_emb.weight")  # [V, d]

    def hidden(self, tokens: torch.Tensor, drop: Drop | None) -> torch.Tensor:
        """``[B, L] -> [B, d]``: the hidden state at the last (query) position."""
        return self("forward", tokens, drop)[:, -1]

    def scores(self, h: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        return self("scores", h, items)


def leaf(params: torch.Tensor) -> torch.Tensor:
    """A fresh ``[D]`` leaf copy of ``params`` that requires grad."""
    return params.detach().clone().requires_grad_(True)


def attack_sites(model: SeqModel, dropout: bool, without: Sequence[str] = ()) -> dict[str, DropSite]:
    """The model's dropout sites (none when ``dropout`` is off), minus the names in ``without``."""
    if not dropout:
        return {}
    sites: dict[str, DropSite] = model.dropout_sites()
    return {k: v for k, v in sites.items() if k not in without}


def seeded_drop(sites: Mapping[str, DropSite], seed: int, round_key: int, users: Users,
                streams: Sequence[int], length: int) -> Drop | None:
    """Seeded dropout for rows ``(users[r], streams[r])``: row r's masks come from
    ``user_rng(seed, round_key, users[r], streams[r])`` only. ``None`` when there are no sites."""
    if not sites:
        return None
    seeds = torch.tensor(
        [int(user_rng(seed, round_key, int(u), int(s)).integers(0, 2**32))
         for u, s in zip(users, streams, strict=True)],
        dtype=torch.int64,
    )
    return Drop(keep_masks(sites, seeds, length))


def target_loss(scores: torch.Tensor) -> torch.Tensor:
    """``BCE(sigmoid(score), 1) = -log sigmoid(score)`` elementwise, computed stably."""
    return -F.logsigmoid(scores)


def num_samples(sequences: Sequence[np.ndarray]) -> np.ndarray:
    """The aggregation weight a malicious user reports: its training-sequence length, like a benign user."""
    return np.array([len(s) for s in sequences], dtype=np.int64)


def target_tensor(targets: Sequence[int], num_items: int) -> torch.Tensor:
    """Validated ``[T]`` int64 target items (each in ``1..num_items``)."""
    if not targets:
        raise ValueError("an attack needs at least one target item")
    t = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    if bool(((t < 1) | (t > num_items)).any()):
        raise ValueError(f"target items {list(targets)} must be in the catalogue 1..{num_items}")
    return t
