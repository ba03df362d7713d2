"""Client-side adversarial training (the "adv_train" defense).

Yue et al., "Defending Substitution-Based Profile Pollution Attacks on Sequential Recommenders",
RecSys 2022, as the DV-FSR public code runs it (``train_robust``; README "Defenses"):
some of a round's benign clients recompute their update on an adversarially perturbed input.

For one user (paper mode: the update is a gradient at the global weights):

1. Build the user's round example exactly as benign training does (same seeded SASRec negatives
   or BERT4Rec cloze masking: :func:`fedseq.training._prepare`), and write its tokens as one-hot
   distributions ``P [L, V]`` over the vocabulary (V = M + 2).
2. ``steps`` times, without dropout (the reference runs these in eval mode): ``G = dLoss/dP``;
   normalise each position's row to unit L2 norm (``G / (||G|| + 1e-9)``); ``P <- P + step_size
   * G``; clamp at 0; renormalise each row to sum 1.
3. Switch each non-padding position to its perturbed row with probability ``switch_prob``
   (seeded per user), keep the clean one-hot elsewhere.
4. The update is the gradient of the local loss on that input w.r.t. all parameters at the
   global weights, with the user's seeded dropout when ``LocalConfig.dropout`` (the reference's
   train mode), i.e. the same dropout masks a benign update uses.

The input embedding of a row ``p`` is ``p @ E + pos_emb[position]`` (``E`` the item table), fed
to ``model.encode``; the tokens still give the padding and attention masks.

Choices where the reference is silent or degenerate (deliberate, documented):

* Padding positions are never perturbed and keep the exact benign embedding (``E[0]`` looked up
  with ``padding_idx``, so no gradient reaches ``E[0]`` through the input, as in benign training).
* The padding column (item 0) is excluded from the perturbation (its gradient is zeroed before the
  normalisation), so a real position never mixes in "no item". The mask token column is kept.
* A row whose clamped sum is 0 (possible only when the step exactly cancels the row) keeps its
  previous distribution instead of becoming NaN.
* The reported loss is the loss on the final (switched) input at the global weights.

Batching and memory: the ascent steps take the input gradient of the SUM of the micro-batch's
per-user losses; since user b's loss depends only on its own ``P[b]`` (and padding is masked out
exactly), that gradient restricted to ``P[b]`` is user b's own gradient, so one batched backward
serves all users. The parameter gradients are per-user (``vmap(grad)``) with a dense item table
(the perturbed rows spread over the whole vocabulary). A micro-batch holds ``B * L * V`` floats
for ``P`` plus a few same-sized temporaries, and ``B * V * d`` floats of item-table gradients:
for V = 5,000 and L = 200 that is 1M floats (4 MB) per user per copy, so a few dozen users per
micro-batch is fine; ``AdvTrainConfig.max_onehot`` caps ``B * L * V`` per micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .local import AdvTrainConfig
from .models import SeqModel
from .models.common import Drop, position_ids
from .params import Layout
from .training import LocalConfig, UpdateBatch, _prepare, micro_batches, user_losses, user_rng

SWITCH_STREAM = 2000  # user_rng stream of the switch draws (examples use 0.., dropout 1000..)
PICK_TAG = 0xAD7  # seed-sequence tag of pick_adv_users
NORM_EPS = 1e-9  # as the reference: G / (||G|| + 1e-9)


DEFAULT_LOCAL = LocalConfig()
DEFAULT_ADV = AdvTrainConfig()


def pick_adv_users(round_users: Sequence[int] | np.ndarray, seed: int, round_key: int, k: int) -> np.ndarray:
    """The ``min(k, n)`` of a round's ``n`` benign users that run adversarial training.

    Deterministic in ``(round_users, seed, round_key, k)``; returned in the round's order.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    users = np.asarray(round_users, dtype=np.int64).reshape(-1)
    m = min(int(k), len(users))
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, int(round_key), PICK_TAG]))
    idx = np.sort(rng.choice(len(users), size=m, replace=False)) if m else np.zeros(0, dtype=np.int64)
    return users[idx]


# ----------------------------------------------------------------------------- soft inputs


def soft_embed(model: SeqModel, tokens: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Input embedding ``[B, L, d]`` of distributions ``dist [B, L, V]``: ``dist @ E + pos`` at
    non-padding positions, the benign ``model.embed(tokens)`` at padding positions."""
    clean = model.embed(tokens)
    soft = dist @ model.item_emb.weight + model.pos_emb(position_ids(tokens))
    return torch.where((tokens != 0).unsqueeze(-1), soft, clean)


class _SoftObjective(nn.Module):
    """Per-user losses on soft inputs; wraps the model so ``functional_call`` can swap weights."""

    def __init__(self, model: SeqModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], dist: torch.Tensor,
                masks: dict[str, torch.Tensor] | None) -> torch.Tensor:
        drop = None if masks is None else Drop(masks)
        return user_losses(self.model, batch, drop, x=soft_embed(self.model, batch["tokens"], dist))


def _ascend(objective: _SoftObjective, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
            opts: AdvTrainConfig) -> torch.Tensor:
    """``opts.steps`` ascent steps from the one-hot input; returns the perturbed ``[B, L, V]``."""
    tokens = batch["tokens"]
    V = objective.model.item_emb.weight.shape[0]
    real = (tokens != 0).unsqueeze(-1)  # [B, L, 1]
    dist = F.one_hot(tokens, V).to(params["model.item_emb.weight"].dtype)
    for _ in range(opts.steps):
        d = dist.detach().requires_grad_(True)
        with torch.enable_grad():
            losses = functional_call(objective, params, (batch, d, None))
            (g,) = torch.autograd.grad(losses.sum(), d)
        g[..., 0] = 0.0  # never move mass onto the padding item
        g = g / (g.norm(dim=-1, keepdim=True) + NORM_EPS)
        new = (dist + opts.step_size * g).clamp(min=0.0)
        total = new.sum(-1, keepdim=True)
        dist = torch.where(real & (total > 0), new / total.clamp(min=torch.finfo(new.dtype).tiny), dist)
    return dist.detach()


def _switch_mask(tokens: torch.Tensor, users: Sequence[int], seed: int, round_key: int, prob: float) -> torch.Tensor:
    """``[B, L]`` bool: which non-padding positions take their perturbed row. A user's draws cover
    its own (right-aligned) positions only, so they do not depend on the batch's padding."""
    B, L = tokens.shape
    out = torch.zeros(B, L, dtype=torch.bool)
    n_real = (tokens != 0).sum(-1).tolist()
    for b, (u, n) in enumerate(zip(users, n_real, strict=True)):
        if n:
            draws = user_rng(seed, round_key, int(u), SWITCH_STREAM).random(n) < prob
            out[b, L - n :] = torch.from_numpy(draws)
    return out & (tokens != 0)


@dataclass
class AdvInputs:
    """The adversarial inputs of one collated group of users (for inspection and tests)."""

    tokens: torch.Tensor  # [B, L] the benign example's tokens (left-padded)
    perturbed: torch.Tensor  # [B, L, V] after the ascent steps (padding rows: one-hot at 0)
    switched: torch.Tensor  # [B, L] bool, positions that take their perturbed row
    inputs: torch.Tensor  # [B, L, V] the final input: perturbed where switched, one-hot elsewhere


def _inputs_for(objective, params_p, model, seqs, users, seed, round_key, cfg, opts, sites):
    batch, masks = _prepare(model, seqs, users, seed, round_key, 0, cfg, sites)
    tokens = batch["tokens"]
    perturbed = _ascend(objective, params_p, batch, opts)
    switched = _switch_mask(tokens, users, seed, round_key, opts.switch_prob)
    onehot = F.one_hot(tokens, perturbed.shape[-1]).to(perturbed.dtype)
    inputs = torch.where(switched.unsqueeze(-1), perturbed, onehot)
    return batch, masks, AdvInputs(tokens, perturbed, switched, inputs)


def _check(model: nn.Module, params: torch.Tensor, sequences, users, cfg: LocalConfig, layout: Layout) -> None:
    if cfg.mode != "paper":
        raise ValueError(f"adversarial training computes paper-mode (FedSGD) updates only, got mode {cfg.mode!r}")
    if len(sequences) != len(users):
        raise ValueError(f"{len(sequences)} sequences for {len(users)} users")
    if params.shape != (layout.dim,):
        raise ValueError(f"expected params of shape [{layout.dim}], got {tuple(params.shape)}")


def adversarial_inputs(
    model: SeqModel,
    params: torch.Tensor,
    sequences: Sequence[np.ndarray],
    users: Sequence[int] | np.ndarray,
    seed: int,
    round_key: int,
    cfg: LocalConfig = DEFAULT_LOCAL,
    opts: AdvTrainConfig = DEFAULT_ADV,
) -> AdvInputs:
    """The perturbed and final inputs of ``users``, collated as one group (no micro-batching)."""
    layout = Layout.of(model)
    _check(model, params, sequences, users, cfg, layout)
    objective = _SoftObjective(model)
    params_p = {f"model.{n}": t for n, t in layout.unflatten(params.detach()).items()}
    sites = model.dropout_sites() if cfg.dropout else {}
    return _inputs_for(objective, params_p, model, list(sequences), [int(u) for u in users],
                       seed, round_key, cfg, opts, sites)[2]


def adversarial_updates(
    model: SeqModel,
    params: torch.Tensor,
    sequences: Sequence[np.ndarray],
    users: Sequence[int] | np.ndarray,
    seed: int,
    round_key: int,
    cfg: LocalConfig = DEFAULT_LOCAL,
    opts: AdvTrainConfig = DEFAULT_ADV,
) -> UpdateBatch:
    """Every user's adversarially trained update at the global weights ``params [D]``.

    Same contract as :func:`fedseq.training.compute_updates` (paper mode): ``sequences[i]`` is user
    ``users[i]``'s training sequence; a user's update depends only on (params, its sequence, seed,
    round_key, its id). ``losses`` is each user's loss on its final adversarial input.
    """
    layout = Layout.of(model)
    _check(model, params, sequences, users, cfg, layout)
    objective = _SoftObjective(model)
    params_p = {f"model.{n}": t for n, t in layout.unflatten(params.detach()).items()}
    sites = model.dropout_sites() if cfg.dropout else {}
    V = model.item_emb.weight.shape[0]
    K = len(users)
    out = torch.empty(K, layout.dim)
    losses = np.zeros(K)

    def one_loss(p, batch, dist, masks):
        one = {k: v.unsqueeze(0) for k, v in batch.items()}
        m = None if masks is None else {k: v.unsqueeze(0) for k, v in masks.items()}
        loss = functional_call(objective, p, (one, dist.unsqueeze(0), m))[0]
        return loss, loss.detach()

    step = vmap(grad(one_loss, has_aux=True), in_dims=(None, 0, 0, 0 if sites else None))
    lengths = [min(len(s), model.cfg.max_len) for s in sequences]
    max_tokens = max(1, min(cfg.max_tokens, opts.max_onehot // V))
    for idx in micro_batches(lengths, cfg.micro_batch, max_tokens):
        ub = [int(users[i]) for i in idx]
        seqs = [sequences[i] for i in idx]
        batch, masks, adv = _inputs_for(objective, params_p, model, seqs, ub, seed, round_key, cfg, opts, sites)
        g, loss = step(params_p, batch, adv.inputs, masks)
        flat = layout.flatten_batch({n: g[f"model.{n}"] for n in layout.names})
        out.index_copy_(0, torch.as_tensor(idx), flat.detach().to(out.device))
        losses[idx] = loss.detach().cpu().numpy()
    n_samples = np.array([len(s) for s in sequences], dtype=np.int64)
    return UpdateBatch(np.asarray(users, dtype=np.int64), out, n_samples, losses)


__all__ = [
    "AdvInputs",
    "AdvTrainConfig",
    "adversarial_inputs",
    "adversarial_updates",
    "pick_adv_users",
    "soft_embed",
]
