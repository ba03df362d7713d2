"""DV-FSR: the dual-view targeted model-poisoning attack on federated sequential recommendation.

Yin et al., "DV-FSR: A Dual-View Target Attack Framework for Federated Sequential
Recommendation", AAAI 2025 (Algorithm 1 and 2, Eq. 4-8); public code ``SeqAttackClient_method1_2_3``.
README "Attacks" lists the attack's options and the paper's ablations.

A malicious user holding a copy of a real user's training sequence x uploads the gradient, at the
global weights, of

    L = 1/s * sum_{r=1..s} [ BCE(sigmoid(f(x'_r)[t]), 1) + w * L_con(a, p, n_1..n_n) ]

* explicit view (Algorithm 2, :func:`substitute`): x'_r = Substitution(x): the gradient of the
  cross-entropy of the target at the last position w.r.t. the input embeddings (token + position,
  dropout on in the blocks, none on the embedding, as in the public code); importance = its L2
  norm per position, zero at padding and the mask token; for each of the top ``num_attack``
  positions i: s_c = cos(e_i - sign(grad_i), E_c) over items c = 1..M, restricted to
  cos(e_i, E_c) >= tau; the top ``top_t`` candidates are tried in place (no dropout) and the one
  giving the target the highest softmax probability at the last position is kept. Each of the s
  repeats runs a fresh substitution (its own dropout masks).
* the target loss BCE(sigmoid(score), 1) = -log sigmoid(score of t at the last position of x'_r)
  (SASRec: last real item; BERT4Rec: an appended mask token);
* implicit view (Eq. 5-7, :func:`contrastive_loss`): logits [cos(a, p), cos(a, n_1), ...,
  cos(a, n_n)], cross-entropy with label 0 (temperature 1); a = the target's embedding, p = the
  mean embedding of the user's training items (the whole sequence, repeats counted, as the code),
  n_j = ``num_negatives`` distinct items drawn uniformly from 1..M outside the user's training
  items and the targets. L_con has no randomness across repeats, so its mean over s is L_con.

:class:`DualViewAttack` has a flag per term, so the ablations are the same code with a term
switched off: C-FSR (no explicit view, :mod:`.c_fsr`), S-FSR (no implicit view, :mod:`.s_fsr`), and
the baselines EB (:mod:`.eb`, one forward of the target loss) and A-ra (:mod:`.a_ra`, s forwards).
With dropout off, grad(dv-fsr) = grad(s-fsr) + w * grad(L_con) exactly (see the tests).

Dropout: every forward uses fedseq's seeded dropout (a function of seed, round, user and repeat)
when the run trains with dropout (``LocalConfig.dropout``), none otherwise.

Deliberate departures from the public code (each documented in the code):

* Candidates are real items 1..M only (the code also offers the mask token M+1), never the item
  already at the position (so a substitution always changes the sequence), and only items passing
  the tau constraint; the code multiplies the scores by the 0/1 constraint and sorts, so when
  fewer than T items pass it also tries arbitrary zero-scored items. Here a position with no
  admissible candidate is left unchanged; option ``fill=zeros`` reproduces the code (zero-scored
  items fill the tries, ties by lowest id). This matters: on a fresh Steam model no item passes
  tau = 0.5 (position embeddings dominate e_i), so the code's substitution is then "the best of
  T low-id items at the most important position".
* L_con's negatives are distinct and exclude the targets (the code draws with replacement).
* -log sigmoid is computed stably (the code's BCELoss clamps the log at -100).

Reference-compatibility switches (:class:`fedseq.config.Compat`, explicit view only):

* ``attack_leak``: the substitution's cross-entropy backward also leaves its parameter gradients
  in place, so the upload adds grad_theta CE of the *last* substitution (input embeddings held
  fixed, dropout masks of that substitution): dense over every item row through the output layer.
* ``attack_eval_mode``: the s attack-loss forwards run without dropout (the code's substitution
  leaves the model in eval mode).
* ``cfsr_label_index`` (C-FSR only): the contrastive label is index 1 (the first negative).

Several targets: each forward's target loss and L_con are averaged over the targets; the
substitution of repeat r aims at target ``targets[r % len(targets)]`` (cycling).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedseq.models import SeqModel
from fedseq.models.common import Drop
from fedseq.training import UpdateBatch, sample_negatives, user_rng

from .base import Attack, AttackConfigError, AttackContext, Option, non_negative, parse_options, positive
from .common import (
    STREAM_ATTACK,
    STREAM_IMPORTANCE,
    STREAM_NEGATIVES,
    Functional,
    attack_sites,
    attack_tokens,
    leaf,
    num_samples,
    seeded_drop,
    target_loss,
    target_tensor,
)

FILLS = ("none", "zeros")
COS_EPS = 1e-6  # nn.CosineSimilarity(eps=1e-6), as in the public code's substitution
TRIAL_TOKENS = 16384  # padded positions per candidate-trial forward chunk


# ----------------------------------------------------------------------------- explicit view


@dataclass(frozen=True)
class Substitution:
    """What :func:`substitute` did, row by row.

    tokens: ``[R, L]`` the substituted sequences.
    positions: ``[R, k]`` the positions chosen, most important first (k = num_attack, capped at L).
    changed: ``[R, k]`` bool, whether position j got a new item (False: no admissible candidate
        or the position is padding/mask because the sequence is shorter than k).
    importance: ``[R, L]`` the L2 norm of the input-embedding gradient (0 at padding and mask).
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    changed: torch.Tensor
    importance: torch.Tensor


def _cos_rows(u: torch.Tensor, table_n: torch.Tensor) -> torch.Tensor:
    """cos(u_r, E_c) for ``u [R, d]`` against the row-normalised ``table_n [M, d]``: ``[R, M]``."""
    un = u / u.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)
    return un @ table_n.T


@torch.no_grad()
def _target_logprob(f: Functional, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax probability (over the whole vocabulary) of ``targets [N]`` at the last position of
    ``tokens [N, L]``, no dropout, in chunks of at most ``TRIAL_TOKENS`` padded positions."""
    N, L = tokens.shape
    rows = max(1, TRIAL_TOKENS // max(L, 1))
    out = torch.empty(N)
    for s in range(0, N, rows):
        h = f.hidden(tokens[s:s + rows], None)  # [n, d]
        logp = torch.log_softmax(f.scores(h), dim=-1)  # [n, V]
        out[s:s + rows] = logp.gather(1, targets[s:s + rows, None]).squeeze(1)
    return out


def substitute(model: SeqModel, params: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor,
               drop: Drop | None = None, tau: float = 0.5, top_t: int = 10, num_attack: int = 1,
               fill: str = "none") -> Substitution:
    """Algorithm 2 of DV-FSR on every row of ``tokens [R, L]`` (attack inputs, query at the last
    column), row r aiming at item ``targets[r]``. ``drop`` is the dropout of the importance-gradient
    forward (applied in the blocks, not the embedding); candidate trials run without dropout.

    ``fill``: what to try when fewer than ``top_t`` items pass the tau constraint. ``"none"``
    (default): only admissible items (a position with none stays unchanged). ``"zeros"`` (the
    public code): inadmissible items score 0 and fill the remaining tries in id order, so the
    position always changes (on a fresh Steam model no item passes tau = 0.5: the position
    embeddings dominate e_i, so the code then tries the lowest-id items with s_c > 0 ... ).
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    f = Functional(model, params.detach())
    cfg: Any = model.cfg
    M, mask_token = int(cfg.num_items), int(cfg.mask_token)
    R, L = tokens.shape
    targets = targets.to(torch.int64)
    with torch.enable_grad():
        x = f("embed", tokens).detach().requires_grad_(True)  # [R, L, d]
        h = f("encode", tokens, x, drop)[:, -1]  # [R, d]
        ce = F.cross_entropy(f.scores(h), targets, reduction="sum")  # rows independent
        (gx,) = torch.autograd.grad(ce, x)  # [R, L, d]
    x = x.detach()
    attackable = (tokens != 0) & (tokens != mask_token)  # [R, L]
    importance = gx.norm(dim=-1) * attackable
    k = min(num_attack, L)
    order = torch.sort(importance, dim=1, descending=True, stable=True).indices[:, :k]  # [R, k]
    table = f.item_table[1 : M + 1].detach()  # [M, d], item c is row c - 1
    table_n = table / table.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)
    best = tokens.clone()
    rows = torch.arange(R)
    changed = torch.zeros(R, k, dtype=torch.bool)
    T = min(top_t, M)
    for j in range(k):
        pos = order[:, j]  # [R]
        e, g = x[rows, pos], gx[rows, pos]  # [R, d]
        score = _cos_rows(e - torch.sign(g), table_n)  # [R, M]
        admissible = _cos_rows(e, table_n) >= tau  # the similarity constraint
        cur = best[rows, pos]
        own = (cur >= 1) & (cur <= M)
        live = attackable[rows, pos][:, None].expand(R, M).clone()  # [R, M] items that may be tried
        live[rows[own], cur[own] - 1] = False  # never "substitute" an item by itself
        admissible &= live
        if fill == "zeros":  # the code: s * 1(cos >= tau), sorted; ties (the zeros) by lowest id
            ranked = torch.where(admissible, score, torch.zeros(())).masked_fill(~live, -torch.inf)
            order_c = torch.sort(ranked, dim=1, descending=True, stable=True)
            vals, idx = order_c.values[:, :T], order_c.indices[:, :T]
        else:
            vals, idx = score.masked_fill(~admissible, -torch.inf).topk(T, dim=1)  # [R, T]
        tried = vals > -torch.inf
        cand = idx + 1  # item ids
        trial = best[:, None, :].repeat(1, T, 1)  # [R, T, L]
        trial[rows[:, None], torch.arange(T)[None, :], pos[:, None]] = cand
        # identical trial rows (repeats that chose the same position) are scored once
        flat = trial.view(R * T, L)
        uniq, inverse = torch.unique(torch.cat([flat, targets.repeat_interleave(T)[:, None]], 1), dim=0,
                                     return_inverse=True)
        logp = _target_logprob(f, uniq[:, :L], uniq[:, L])[inverse].view(R, T)
        logp = logp.masked_fill(~tried, -torch.inf)
        pick = logp.argmax(dim=1)  # [R]
        has = tried.any(dim=1)
        best[rows[has], pos[has]] = cand[rows, pick][has]
        changed[:, j] = has
    return Substitution(best, order, changed, importance.detach())


# ----------------------------------------------------------------------------- implicit view


def contrastive_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                     label: int = 0) -> torch.Tensor:
    """Eq. 5-7: cross-entropy of logits ``[cos(a, p), cos(a, n_1), ..., cos(a, n_n)]`` with ``label``
    (0 = the positive; ``anchor [d]``, ``positive [d]``, ``negatives [n, d]``). Scalar."""
    pos = F.cosine_similarity(anchor[None], positive[None])  # [1]
    neg = F.cosine_similarity(anchor[None], negatives)  # [n]
    logits = torch.cat([pos, neg])[None]  # [1, 1 + n]
    return F.cross_entropy(logits, torch.tensor([label]))


def user_contrastive(table: torch.Tensor, train: np.ndarray, targets: torch.Tensor, negatives: np.ndarray,
                     label: int = 0) -> torch.Tensor:
    """L_con of one user, averaged over the targets: a = E[t], p = mean E[train], n = E[negatives]."""
    p = table[torch.as_tensor(np.asarray(train, dtype=np.int64))].mean(0)
    n = table[torch.as_tensor(np.asarray(negatives, dtype=np.int64))]
    return torch.stack([contrastive_loss(table[t], p, n, label) for t in targets.tolist()]).mean()


def contrastive_negatives(seed: int, round_key: int, user: int, train: np.ndarray, targets: torch.Tensor,
                          n: int, num_items: int) -> np.ndarray:
    """The ``n`` L_con negatives of one user in one round (distinct, outside its items and the targets)."""
    rng = user_rng(seed, round_key, user, STREAM_NEGATIVES)
    exclude = np.concatenate([np.asarray(train, dtype=np.int64), targets.numpy()])
    return sample_negatives(rng, exclude, n, 1, num_items)


# ----------------------------------------------------------------------------- the attack


@dataclass(frozen=True)
class DualViewAttack(Attack):
    """DV-FSR and its ablations: the target loss (``bce``), optionally after the explicit view's
    substitution (``explicit``), plus the implicit view's L_con (``contrastive``)."""

    name: str = "dv-fsr"
    explicit: bool = True
    contrastive: bool = True
    bce: bool = True
    repeats: int = 10
    tau: float = 0.5
    top_t: int = 10
    num_negatives: int = 100
    num_attack: int = 1
    con_weight: float = 1.0
    fill: str = "none"  # see substitute()
    cfsr_label: bool = False  # honour Compat.cfsr_label_index (C-FSR)

    def __post_init__(self) -> None:
        who = f"attack {self.name!r}"
        if not (self.bce or self.contrastive):
            raise AttackConfigError(f"{who}: at least one of the target loss and L_con is needed")
        if self.explicit and not self.bce:
            raise AttackConfigError(f"{who}: the explicit view feeds the target loss; enable bce")
        if self.repeats < 1 or self.top_t < 1 or self.num_negatives < 1 or self.num_attack < 1:
            raise AttackConfigError(f"{who}: repeats, top_t, num_negatives and num_attack must be >= 1")
        if not -1.0 <= self.tau <= 1.0:
            raise AttackConfigError(f"{who}: tau must be in [-1, 1], got {self.tau}")
        if self.fill not in FILLS:
            raise AttackConfigError(f"{who}: fill must be one of {FILLS}, got {self.fill!r}")

    def updates(self, ctx: AttackContext) -> UpdateBatch:
        model, params, sequences = ctx.model, ctx.params, ctx.sequences
        seed, round_key, local, compat = ctx.seed, ctx.round_key, ctx.local, ctx.compat
        cfg: Any = model.cfg
        M = int(cfg.num_items)
        tgt = target_tensor(ctx.targets, M)  # [nT]
        users = [int(u) for u in ctx.users]
        B, S, nT = len(users), self.repeats, len(tgt)
        D = params.shape[0]
        out = torch.zeros(B, D)
        losses = np.zeros(B)
        if B == 0:
            return UpdateBatch(np.zeros(0, dtype=np.int64), out, np.zeros(0, dtype=np.int64), losses)
        tokens = attack_tokens(model, sequences)  # [B, L]
        L = tokens.shape[1]
        row_targets = tgt[torch.arange(S) % nT]  # [S] the substitution target of each repeat
        imp_sites = attack_sites(model, local.dropout, without=("emb",))
        imp_streams = [STREAM_IMPORTANCE + r for r in range(S)]
        if self.explicit:
            drop = seeded_drop(imp_sites, seed, round_key, np.repeat(users, S), imp_streams * B, L)
            sub = substitute(model, params, tokens.repeat_interleave(S, dim=0), row_targets.repeat(B), drop,
                             self.tau, self.top_t, self.num_attack,
                             "zeros" if compat.substitution_fill and self.fill == "none" else self.fill)
            inputs = sub.tokens.view(B, S, L)
        else:
            inputs = tokens[:, None, :].expand(B, S, L)
        eval_mode = self.explicit and compat.attack_eval_mode
        leak = self.explicit and compat.attack_leak
        label = 1 if (self.cfsr_label and compat.cfsr_label_index) else 0
        sites = {} if eval_mode else attack_sites(model, local.dropout)
        for b, u in enumerate(users):
            p = leaf(params)
            f = Functional(model, p)
            total = torch.zeros(())
            if self.bce:
                drop = seeded_drop(sites, seed, round_key, [u] * S, [STREAM_ATTACK + r for r in range(S)], L)
                h = f.hidden(inputs[b], drop)  # [S, d]
                total = total + target_loss(f.scores(h, tgt[None].expand(S, nT))).mean()
            if self.contrastive:
                negs = contrastive_negatives(seed, round_key, u, sequences[b], tgt, self.num_negatives, M)
                con = user_contrastive(f.item_table, sequences[b], tgt, negs, label)
                total = total + self.con_weight * con
            losses[b] = float(total.detach())
            if leak:
                total = total + self._leak(f, tokens[b : b + 1], row_targets[-1:], imp_sites, seed, round_key,
                                           u, S)
            (g,) = torch.autograd.grad(total, p)
            out[b] = g
        return UpdateBatch(np.asarray(users, dtype=np.int64), out, num_samples(sequences), losses)

    @staticmethod
    def _leak(f: Functional, tokens: torch.Tensor, target: torch.Tensor, imp_sites, seed: int, round_key: int,
              user: int, S: int) -> torch.Tensor:
        """The last substitution's cross-entropy, differentiable in the parameters only (its input
        embeddings are fixed), with that substitution's dropout: the ``attack_leak`` term."""
        drop = seeded_drop(imp_sites, seed, round_key, [user], [STREAM_IMPORTANCE + S - 1], tokens.shape[1])
        x = f("embed", tokens).detach()
        h = f("encode", tokens, x, drop)[:, -1]
        return F.cross_entropy(f.scores(h), target)


# ----------------------------------------------------------------------------- factory

OPTIONS: dict[str, Option] = {
    "tau": Option(float, 0.5, "minimum cos(e_i, E_c) of a substitute", lambda v: -1 <= v <= 1, "in [-1, 1]"),
    "top_t": Option(int, 10, "candidates tried per substituted position", positive, ">= 1"),
    "num_negatives": Option(int, 100, "L_con negatives", positive, ">= 1"),
    "num_attack": Option(int, 1, "positions substituted", positive, ">= 1"),
    "repeats": Option(int, 10, "s, substitutions/forwards averaged", positive, ">= 1"),
    "con_weight": Option(float, 1.0, "weight of L_con", non_negative, ">= 0"),
    "fill": Option(str, "none", "tries when < top_t items pass tau: none | zeros (the public code)",
                   lambda v: v in FILLS, "none or zeros"),
}


def from_options(options: Mapping[str, str]) -> DualViewAttack:
    """``dv-fsr`` with the paper's defaults (tau 0.5, T 10, n 100, one position, s 10, w 1)."""
    v, _ = parse_options("dv-fsr", options, OPTIONS)
    return DualViewAttack(name="dv-fsr", **v)
