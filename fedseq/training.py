"""Per-user updates: many users at once, each a function of (global weights, own data, seed).

Two modes (``--mode``, README "Experiment options"):

* ``paper`` (FedSGD, as the DV-FSR paper and its public code): the update is the gradient of the
  user's local loss at the global weights.
* ``fedavg`` (McMahan et al., AISTATS 2017): the update is ``w_global - w_local`` after
  ``local_epochs`` local steps with SGD or Adam.

Losses: SASRec (Kang & McAuley 2018) binary cross-entropy with one sampled negative per position;
BERT4Rec (Sun et al. 2019) masked-item prediction (cross-entropy over the vocabulary). Users are
computed in length-sorted micro-batches padded only to the micro-batch's longest sequence, with
per-sample gradients from ``torch.func.vmap(grad(...))`` (no model copy per user). Dropout is
seeded per user (:mod:`fedseq.models.common`), so batching never changes a user's update.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .device import model_on, resolve
from .ldp import privatise
from .local import LocalConfig, PieckReg
from .models import BERT4Rec, SASRec, SeqModel
from .models.common import Drop, keep_masks
from .params import Layout

SHARED_NEG_SEED = 2024  # the public code seeds every client's negative sampler with one constant


def user_rng(seed: int, key: int, user: int, stream: int = 0) -> np.random.Generator:
    """The generator for one user's randomness in one round (never shared between users)."""
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, key, user, stream]))


def sample_negatives(
    rng: np.random.Generator, exclude: np.ndarray, n: int, low: int, high: int, distinct: bool = True
) -> np.ndarray:
    """``n`` items uniform in [low, high] not in ``exclude``; distinct from each other when possible.

    Rejection sampling in rounds of ``2 * missing + 8`` draws, keeping first occurrences in draw
    order; the excluded items are a lookup table (not ``np.isin``, which sorts on every call)."""
    ex = np.asarray(exclude)
    bad = np.zeros(high + 1, dtype=bool)  # bad[i]: item i may not be drawn
    bad[ex[(ex >= low) & (ex <= high)]] = True
    available = (high - low + 1) - int(np.count_nonzero(bad))
    if available <= 0:
        raise ValueError(f"no item in [{low}, {high}] outside the user's history to sample as a negative")
    distinct = distinct and available >= n
    out = np.empty(0, dtype=np.int64)
    while len(out) < n:
        cand = rng.integers(low, high + 1, size=2 * (n - len(out)) + 8)
        out = np.concatenate([out, cand[~bad[cand]]])
        if distinct:
            _, idx = np.unique(out, return_index=True)
            out = out[np.sort(idx)]
    return out[:n]


# ----------------------------------------------------------------------------- examples


def sasrec_example(
    model: SASRec, train: np.ndarray, rng: np.random.Generator, cfg: LocalConfig
) -> dict[str, np.ndarray]:
    """tokens = train[:-1], pos = train[1:] (last max_len), one negative per position."""
    seq = train[-(model.cfg.max_len + 1) :]
    tokens, pos = seq[:-1], seq[1:]
    high = model.cfg.num_items + (1 if cfg.neg_from_vocab else 0)
    neg = sample_negatives(rng, train, len(pos), 1, high)
    return {"tokens": tokens, "pos": pos, "neg": neg}


def bert4rec_example(
    model: BERT4Rec, train: np.ndarray, rng: np.random.Generator, cfg: LocalConfig
) -> dict[str, np.ndarray]:
    """Cloze masking of the last ``input_len`` items: each item is a target with probability
    ``mask_prob``; targets become the mask token (80%), a random item (10%) or stay (10%).
    Deliberate departure from the public code: a history that draws no target gets one at a random
    position (the public code's NaN loss there uploads a zero gradient)."""
    c = model.cfg
    seq = train[-c.input_len :]
    n = len(seq)
    chosen = rng.random(n) < c.mask_prob
    if not chosen.any():
        chosen[rng.integers(n)] = True
    how = rng.random(n)
    tokens = seq.copy()
    tokens[chosen & (how < 0.8)] = c.mask_token
    rand = chosen & (how >= 0.8) & (how < 0.9)
    tokens[rand] = rng.integers(1, c.num_items + 1, size=int(rand.sum()))
    where = np.flatnonzero(chosen)
    return {"tokens": tokens, "where": where, "labels": seq[where]}


def _left_pad(rows: Sequence[np.ndarray], length: int) -> torch.Tensor:
    out = np.zeros((len(rows), length), dtype=np.int64)
    for i, r in enumerate(rows):
        if len(r):
            out[i, length - len(r) :] = r
    return torch.from_numpy(out)


def collate(model: nn.Module, examples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Left-pad a micro-batch of examples to its longest sequence."""
    L = max(1, max(len(e["tokens"]) for e in examples))
    batch = {"tokens": _left_pad([e["tokens"] for e in examples], L)}
    if isinstance(model, SASRec):
        batch["pos"] = _left_pad([e["pos"] for e in examples], L)
        batch["neg"] = _left_pad([e["neg"] for e in examples], L)
    else:
        K = max(1, max(len(e["where"]) for e in examples))
        where = np.zeros((len(examples), K), dtype=np.int64)
        labels = np.zeros((len(examples), K), dtype=np.int64)
        for i, e in enumerate(examples):
            shift = L - len(e["tokens"])
            where[i, : len(e["where"])] = e["where"] + shift
            labels[i, : len(e["labels"])] = e["labels"]
        batch["where"] = torch.from_numpy(where)
        batch["labels"] = torch.from_numpy(labels)
    return batch


def make_example(model: nn.Module, train: np.ndarray, rng: np.random.Generator, cfg: LocalConfig):
    if isinstance(model, SASRec):
        return sasrec_example(model, train, rng, cfg)
    if isinstance(model, BERT4Rec):
        return bert4rec_example(model, train, rng, cfg)
    raise TypeError(f"no local loss for model {type(model).__name__}")


# ----------------------------------------------------------------------------- losses


def user_losses(
    model: SeqModel, batch: dict[str, torch.Tensor], drop: Drop | None, x: torch.Tensor | None = None,
    reg: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-user local losses ``[B]`` for a collated batch (works for B = 1 inside vmap).

    ``x [B, L, d]``, when given, replaces ``model.embed(tokens)`` as the input embedding (the
    tokens still give the padding masks); adversarial training feeds soft inputs this way."""
    tokens = batch["tokens"]
    h = model(tokens, drop) if x is None else model.encode(tokens, x, drop)  # [B, L, d]
    if isinstance(model, SASRec):
        valid = (tokens != 0).to(h.dtype)  # [B, L]
        count = valid.sum(-1).clamp(min=1.0)
        pos = model.scores(h, batch["pos"].unsqueeze(-1)).squeeze(-1)  # [B, L]
        neg = model.scores(h, batch["neg"].unsqueeze(-1)).squeeze(-1)
        lp = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos), reduction="none")
        ln = F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="none")
        # mean over the 2 * count positive and negative logits (BCEWithLogitsLoss on both, as the reference)
        loss = ((lp * valid).sum(-1) + (ln * valid).sum(-1)) / (2.0 * count)
    else:
        where, labels = batch["where"], batch["labels"]  # [B, K]
        hs = torch.gather(h, 1, where.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [B, K, d]
        logits = model.scores(hs)  # [B, K, V]
        ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=0, reduction="none")  # [B, K]
        real = (labels != 0).to(h.dtype)
        loss = (ce * real).sum(-1) / real.sum(-1).clamp(min=1.0)
    return loss if reg is None else loss + pieck_terms(model, batch, h, reg)


def pieck_terms(model: SeqModel, batch: dict[str, torch.Tensor], h: torch.Tensor,
                reg: dict[str, torch.Tensor]) -> torch.Tensor:
    """``ipe_mu * L_ipe + uea_mu * L_uea`` of :class:`PieckReg` per user, ``[B]``.

    ``reg``: ``pop [s, d]`` the popular rows (constants), ``w [s]`` their weights, ``mu [2]``;
    ``batch["reg_keep"] [B, T]`` marks which of the items ``batch["reg_items"] [B, T]`` (model ids,
    local ones for SASRec) count: real and not popular."""
    pop, w = reg["pop"], reg["w"]
    e = model.item_emb(batch["reg_items"])  # [B, T, d]
    keep = batch["reg_keep"]  # [B, T]
    cos = F.cosine_similarity(e.unsqueeze(2), pop[None, None], dim=-1)  # [B, T, s]
    mean_cos = (cos * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True).clamp(min=1.0)  # [B, s]
    ipe = -(mean_cos * w).sum(-1)  # [B]
    log_p = F.log_softmax(h[:, -1], dim=-1)  # [B, d]: the user's representation
    kl = (log_p.exp().unsqueeze(1) * (log_p.unsqueeze(1) - F.log_softmax(pop, dim=-1)[None])).mean(-1)  # [B, s]
    uea = -(kl * w).sum(-1)
    return reg["mu"][0] * ipe + reg["mu"][1] * uea


class _Objective(nn.Module):
    """Wraps a model so ``functional_call`` can swap its parameters for the loss computation."""

    def __init__(self, model: SeqModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None,
                reg: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in batch.items()}
        drop = None if masks is None else Drop({k: v.unsqueeze(0) for k, v in masks.items()})
        return user_losses(self.model, one, drop, reg=reg)[0]


@dataclass
class UpdateBatch:
    """One update per user: ``updates [K, D]`` in the model's :class:`Layout` order."""

    users: np.ndarray  # [K] user ids, in request order
    updates: torch.Tensor  # [K, D]
    num_samples: np.ndarray  # [K] training items per user (the aggregation weight)
    losses: np.ndarray  # [K] local loss at the global weights
    # optional, per user: the item-table rows (global ids, repeats allowed) the update was written
    # into; every other row of its item table is zero. An encoder may use it to find the nonzero
    # rows without scanning the table (fedseq.codec.FlatCodec checks that it covers them all).
    item_rows: list[torch.Tensor] | None = None

    @classmethod
    def empty(cls, dim: int) -> UpdateBatch:
        """No user's update: ``[0, dim]``."""
        return cls(np.zeros(0, dtype=np.int64), torch.zeros(0, dim), np.zeros(0, dtype=np.int64), np.zeros(0))


def micro_batches(lengths: Sequence[int], max_users: int, max_tokens: int) -> list[np.ndarray]:
    """Group indices, sorted by length, so each group pads to its own longest sequence and holds at
    most ``max_users`` users and ``max_tokens`` padded positions (a long user may exceed it alone)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    groups: list[np.ndarray] = []
    cur: list[int] = []
    for i in order:
        longest = max(int(lengths[i]), 1)  # sorted: the newest member is the longest
        if cur and (len(cur) + 1 > max_users or (len(cur) + 1) * longest > max_tokens):
            groups.append(np.asarray(cur))
            cur = []
        cur.append(int(i))
    if cur:
        groups.append(np.asarray(cur))
    return groups


ITEM_TABLE = "item_emb.weight"


class UpdateMatrix:
    """A ``[K, D]`` update matrix that is written again and again (a round's, a micro-batch's):
    after the first use its pages are warm, so writing the next updates costs no page faults
    and no full clear. Every tensor of a benign update is written whole but a localised item
    table (SASRec: only the rows a user's items name), so a row only needs its previous
    occupant's item rows cleared (:meth:`prepare`); a row written whole by someone else (an
    attacker's update copied in: :meth:`put`) is cleared whole before a localised write.

    ``table``: ``(offset, rows, width)`` of the localised item table in the layout (None: the
    model writes every tensor whole, BERT4Rec)."""

    ALL = None  # a row's item table may hold anything: clear it whole

    def __init__(self, dim: int, table: tuple[int, int, int] | None, buf: torch.Tensor | None = None) -> None:
        """``buf``: a zeroed ``[rows, dim]`` float32 tensor to write into (e.g. shared memory that
        other processes write rows of: :mod:`fedseq.compute_pool`); it never grows, so :meth:`take`
        of more rows than it has fails. None: a private matrix that grows as needed."""
        self.dim = dim
        self.table = table
        self._fixed = buf is not None
        if buf is not None and (buf.dtype != torch.float32 or buf.dim() != 2 or buf.shape[1] != dim
                                or not buf.is_contiguous()):
            raise ValueError(f"UpdateMatrix: buf must be a contiguous float32 [rows, {dim}] tensor")
        self._buf = buf if buf is not None else _zeros(0, dim)
        empty = torch.zeros(0, dtype=torch.int64)
        # per row: item rows written there (ALL: unknown)
        self._dirty: list[torch.Tensor | None] = [empty] * self._buf.shape[0]
        self.current = self._buf  # the rows of the last take()

    @classmethod
    def of(cls, model: SeqModel) -> UpdateMatrix:
        from .popularity import item_table_slice

        return cls(Layout.of(model).dim, item_table_slice(model) if isinstance(model, SASRec) else None)

    def take(self, k: int) -> torch.Tensor:
        """The first ``k`` rows, ``[k, D]`` (a fresh zeroed matrix when it has fewer rows)."""
        if self._buf.shape[0] < k:
            if self._fixed:
                raise ValueError(f"UpdateMatrix: {k} rows asked of a fixed buffer of {self._buf.shape[0]}")
            self._buf = _zeros(k, self.dim)
            self._dirty = [torch.zeros(0, dtype=torch.int64) for _ in range(k)]
        self.current = self._buf[:k]
        return self.current

    def prepare(self, rows: Sequence[int], item_rows: Sequence[torch.Tensor] | None) -> None:
        """Before a localised write of ``item_rows[j]`` into row ``rows[j]``: clear what the row's
        previous occupant left in its item table, and remember the new rows."""
        if self.table is None or item_rows is None:
            return
        self.clear(rows)
        self.record(rows, item_rows)

    def clear(self, rows: Sequence[int]) -> None:
        """Clear what each row's previous occupant left in its item table (nothing for a model
        that writes every tensor whole); the rows are then clean until :meth:`record`."""
        if self.table is None:
            return
        offset, V, d = self.table
        view = self._buf[:, offset:offset + V * d].view(self._buf.shape[0], V, d)
        empty = torch.zeros(0, dtype=torch.int64)
        for r in rows:
            old = self._dirty[r]
            if old is self.ALL:
                view[r].zero_()
            elif len(old):
                view[r, old] = 0.0
            self._dirty[r] = empty

    def record(self, rows: Sequence[int], item_rows: Sequence[torch.Tensor]) -> None:
        """Remember that ``item_rows[j]`` were written into row ``rows[j]`` (by this process or
        another one writing the same memory)."""
        if self.table is None:
            return
        for j, r in enumerate(rows):
            self._dirty[r] = item_rows[j]

    def put(self, row: int, update: torch.Tensor) -> None:
        """Write a whole update into ``row`` (its item table may hold anything afterwards)."""
        self._buf[row].copy_(update)
        self._dirty[row] = self.ALL

    def mark_whole(self, rows: Sequence[int]) -> None:
        """Rows written whole in place (local DP noise): their item tables may hold anything."""
        for r in rows:
            self._dirty[r] = self.ALL


def compute_updates(
    model: SeqModel,
    params: torch.Tensor,
    sequences: Sequence[np.ndarray],
    users: Sequence[int] | np.ndarray,
    seed: int,
    round_key: int,
    cfg: LocalConfig = LocalConfig(),
    into: tuple[UpdateMatrix, np.ndarray] | None = None,
) -> UpdateBatch:
    """Compute every user's update at the global weights ``params [D]``.

    ``sequences[i]`` is user ``users[i]``'s training sequence. The randomness of user u in round
    ``round_key`` (negatives, masking, dropout) comes from ``(seed, round_key, u)`` only.

    SASRec's loss reads only the item rows a user's sequence and negatives name, so each user gets
    a local item table of just those rows (per-sample gradients of the full 5,000-row table would
    dominate the cost); the rows' gradients are scattered back into the dense update.

    ``into=(matrix, at)``: write user ``i``'s update into row ``at[i]`` of ``matrix``'s current
    rows (:meth:`UpdateMatrix.take`; a runner that reuses one matrix every round) instead of a
    fresh ``[K, D]`` matrix; the result's ``updates`` is then that ``[k, D]`` matrix, whose other
    rows are the caller's.
    """
    layout = Layout.of(model)
    K = len(users)
    matrix, at = into if into is not None else (UpdateMatrix.of(model), np.arange(K))
    at = np.asarray(at, dtype=np.int64)
    out = matrix.current if into is not None else matrix.take(K)
    if len(at) != K or (K and not 0 <= int(at.min()) <= int(at.max()) < out.shape[0]):
        raise ValueError(f"into: {len(at)} rows for {K} users, within the matrix's {out.shape[0]} rows")
    losses = np.zeros(K)
    item_rows: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int64)] * K  # only SASRec localises rows
    for idx, grads, rows, loss in _micro_batch_grads(model, params, sequences, users, seed, round_key, cfg):
        dest = at[idx]
        matrix.prepare(dest.tolist(), None if rows is None else [rows[j] for j in range(len(idx))])
        _scatter(out, torch.as_tensor(dest), grads, layout, rows)
        if rows is not None:
            for j, i in enumerate(idx):
                item_rows[i] = rows[j]
        losses[idx] = loss
    n_samples = np.array([len(s) for s in sequences], dtype=np.int64)
    if cfg.ldp is not None:  # the noise fills every coordinate: the rows are no longer localised
        privatise(out, at.tolist(), [int(u) for u in users], round_key, cfg.ldp)
        matrix.mark_whole(at.tolist())
        return UpdateBatch(np.asarray(users, dtype=np.int64), out, n_samples, losses, None)
    return UpdateBatch(np.asarray(users, dtype=np.int64), out, n_samples, losses,
                       item_rows if isinstance(model, SASRec) else None)


def iter_updates(
    model: SeqModel,
    params: torch.Tensor,
    sequences: Sequence[np.ndarray],
    users: Sequence[int] | np.ndarray,
    seed: int,
    round_key: int,
    cfg: LocalConfig = LocalConfig(),
) -> Iterator[UpdateBatch]:
    """:func:`compute_updates`, one micro-batch at a time: each item is an :class:`UpdateBatch` of
    that micro-batch's users (in micro-batch order, not request order) whose rows are exactly
    their rows of ``compute_updates``'s result. A consumer that sends updates as they come (a
    worker) never holds the whole ``[K, D]`` matrix, and can send one micro-batch while the next
    is computed.

    The ``updates`` tensor is a view of one :class:`UpdateMatrix` that the next item overwrites:
    use (or copy) each item before asking for the next."""
    layout = Layout.of(model)
    users = np.asarray(users, dtype=np.int64)
    n_samples = np.array([len(s) for s in sequences], dtype=np.int64)
    matrix = UpdateMatrix.of(model)
    for idx, grads, rows, loss in _micro_batch_grads(model, params, sequences, users, seed, round_key, cfg):
        b = len(idx)
        buf = matrix.take(b)
        item_rows = None if rows is None else [rows[j] for j in range(b)]
        matrix.prepare(range(b), item_rows)
        _scatter(buf, torch.arange(b), grads, layout, rows)
        if cfg.ldp is not None:  # as compute_updates: noised, whole rows
            privatise(buf, list(range(b)), users[idx].tolist(), round_key, cfg.ldp)
            matrix.mark_whole(range(b))
            item_rows = None
        yield UpdateBatch(users[idx], buf, n_samples[idx], np.asarray(loss, dtype=np.float64), item_rows)


def _micro_batch_grads(
    model: SeqModel,
    params: torch.Tensor,
    sequences: Sequence[np.ndarray],
    users: Sequence[int] | np.ndarray,
    seed: int,
    round_key: int,
    cfg: LocalConfig,
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor], torch.Tensor | None, np.ndarray]]:
    """Per micro-batch: ``(idx, grads, rows, losses)``: the positions in ``users`` of its users,
    their updates per parameter (``{model.name: [B, ...]}``, on the CPU; a localised item table's
    as ``[B, R, d]`` for the global rows ``rows [B, R]``, else ``rows`` is None) and local losses."""
    layout = Layout.of(model)
    dev = resolve(cfg.device)
    objective = _Objective(cast(SeqModel, model_on(model, dev)))  # functional_call swaps in global_p: the copy's weights are unused
    global_p = {f"model.{n}": t for n, t in layout.unflatten(params.detach().to(dev)).items()}
    local_rows = isinstance(model, SASRec)
    table_key = f"model.{ITEM_TABLE}"
    shared_p = {k: v for k, v in global_p.items() if not (local_rows and k == table_key)}
    sites = model.dropout_sites() if cfg.dropout else {}
    lengths = [min(len(s), model.cfg.max_len) for s in sequences]
    # masks is None when dropout is off: vmap cannot map dim 0 of a None argument
    step = vmap(grad(_objective_fn(objective), argnums=(0, 1), has_aux=True),
                in_dims=(None, 0, 0, 0 if sites else None, None))
    reg, popular = _pieck_inputs(model, params, cfg.pieck, dev) if cfg.pieck is not None else (None, None)
    epochs = 1 if cfg.mode == "paper" else cfg.local_epochs
    for idx in micro_batches(lengths, cfg.micro_batch, cfg.max_tokens):
        ub = [int(users[i]) for i in idx]
        seqs = [sequences[i] for i in idx]
        prepared = [_prepare(model, seqs, ub, seed, round_key, e, cfg, sites, dev) for e in range(epochs)]
        if popular is not None:  # on global ids, before the item ids go local
            for batch, _ in prepared:
                _mark_reg_items(model, batch, popular)
        rows = _localise([p[0] for p in prepared]) if local_rows else None  # on dev
        user_p: dict[str, torch.Tensor] = {}
        if rows is not None:
            user_p[table_key] = global_p[table_key][rows]  # [B, R, d]
        if cfg.mode == "paper":
            batch, masks = prepared[0]
            (g_shared, g_own), loss = step(shared_p, user_p, batch, masks, reg)
            grads = {**g_shared, **g_own}
        else:
            for name in shared_p:
                user_p[name] = shared_p[name].unsqueeze(0).repeat(len(idx), *([1] * shared_p[name].dim()))
            start_p = {k: v.clone() for k, v in user_p.items()}
            state = {n: (torch.zeros_like(t), torch.zeros_like(t)) for n, t in user_p.items()}
            loss = None
            for e, (batch, masks) in enumerate(prepared):
                (_, g), lo = step({}, user_p, batch, masks, reg)
                loss = lo if loss is None else loss
                _local_step(user_p, g, state, cfg, e + 1)
            grads = {k: start_p[k] - user_p[k] for k in user_p}
        if dev.type != "cpu":  # the update matrix (encoding, aggregation) lives on the CPU
            grads = {k: g.cpu() for k, g in grads.items()}
            rows = None if rows is None else rows.cpu()
        yield idx, grads, rows, loss.detach().cpu().numpy()


def _pieck_inputs(model: SeqModel, params: torch.Tensor, pr: PieckReg,
                  dev: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The round's :class:`PieckReg` constants (popular rows, weights, mu) and the popular ids."""
    from .popularity import initial_params, item_table_slice, mine_popular

    ids = mine_popular(params, initial_params(model, pr.init_seed), model, pr.size)  # most moved first
    offset, rows, width = item_table_slice(model)
    pop = params[offset:offset + rows * width].view(rows, width)[torch.as_tensor(ids)].detach()  # [s, d]
    e = np.exp(np.arange(len(ids), 0, -1, dtype=np.float64))
    w = torch.as_tensor(e / e.sum(), dtype=pop.dtype)
    reg = {"pop": pop, "w": w, "mu": torch.tensor([pr.ipe_mu, pr.uea_mu], dtype=pop.dtype)}
    return {k: v.to(dev) for k, v in reg.items()}, torch.as_tensor(ids).to(dev)


def _mark_reg_items(model: SeqModel, batch: dict[str, torch.Tensor], popular: torch.Tensor) -> None:
    """Add ``reg_items [B, T]`` (the items :func:`pieck_terms` averages over, still global ids) and
    ``reg_keep [B, T]`` (1 where real and not popular) to a collated batch."""
    if isinstance(model, SASRec):
        items = torch.cat([batch["pos"], batch["neg"]], dim=1)  # [B, 2L]
        real = items != 0
    else:
        items = batch["tokens"].clone()  # the inputs: masked positions hold the mask token, not an item
        real = (items != 0) & (items != model.cfg.mask_token)
        items[~real] = 0
    batch["reg_items"] = items
    batch["reg_keep"] = (real & ~torch.isin(items, popular)).to(torch.float32)


def _zeros(*shape: int) -> torch.Tensor:
    """A zero float32 tensor from ``calloc``: fresh zero pages, so the rows a user never touches
    cost no fill now (``torch.zeros`` writes every element first, then the rows are written again)."""
    return torch.from_numpy(np.zeros(shape, dtype=np.float32))


def _localise(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Rewrite item ids in ``batches`` (in place) to per-user local ids; return ``rows [B, R]``,
    the global item id of each local row (row 0 is the padding row; unused trailing rows are 0).
    Local id ``j >= 1`` is the rank of the item among the user's distinct items, so local rows
    are sorted by global id. All users at once: a row-wise sort, no Python loop per user."""
    keys = ("tokens", "pos", "neg") + (("reg_items",) if "reg_items" in batches[0] else ())
    ids = torch.cat([bt[k] for bt in batches for k in keys], dim=1)  # [B, T]
    srt = ids.sort(dim=1).values
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    first &= srt != 0  # [B, T]: the first copy of each distinct nonzero item
    slot = torch.cumsum(first, dim=1) * first  # [B, T]: its local id (1..n), 0 elsewhere
    R = 1 + int(slot.max()) if slot.numel() else 1
    rows = torch.zeros(ids.shape[0], R, dtype=torch.int64, device=ids.device)
    rows.scatter_(1, slot, srt * first)  # [B, R]; slot 0 collects only zeros
    # search table: the padding row, the sorted distinct items, then a sentinel above every item
    table = torch.where((rows == 0) & (torch.arange(R, device=ids.device) > 0), torch.iinfo(torch.int64).max, rows)
    for bt in batches:
        for k in keys:
            x = bt[k]
            x.copy_(torch.searchsorted(table, x) * (x != 0))
    return rows


def _scatter(out: torch.Tensor, idx: torch.Tensor, grads: dict[str, torch.Tensor], layout: Layout,
             rows: torch.Tensor | None) -> None:
    """Write per-user ``grads`` (``{model.name: [B, ...]}``) into rows ``idx`` of ``out [K, D]``
    (zero-initialised). A localised item table's gradient ``[B, R, d]`` goes straight into the
    ``R`` rows it names (slot 0 and unused slots name the padding row, whose gradient is zero): no
    dense ``[B, V, d]`` intermediate, no second copy of the batch's rows."""
    offset = 0
    for name, shape, size in zip(layout.names, layout.shapes, layout.sizes, strict=True):
        g = grads[f"model.{name}"]
        if rows is not None and name == ITEM_TABLE:
            V, d = shape
            table = out[:, offset : offset + size].view(out.shape[0], V, d)  # [K, V, d], a view of out
            # a user's rows are distinct but for row 0, where every write is the padding row's zero gradient
            table.index_put_((idx[:, None].expand_as(rows), rows), g)
        else:
            out[idx, offset : offset + size] = g.reshape(len(idx), -1)
        offset += size


def _objective_fn(objective: _Objective):
    def f(shared, own, batch, masks, reg=None):
        loss = functional_call(objective, {**shared, **own}, (batch, masks, reg))
        return loss, loss.detach()

    return f


def _prepare(model, seqs, users, seed, round_key, local_epoch, cfg: LocalConfig, sites,
             device: torch.device | None = None):
    """A micro-batch's collated examples and dropout masks (on ``device``; default the CPU)."""
    examples = []
    for u, s in zip(users, seqs, strict=True):
        rng = user_rng(seed, round_key, u, local_epoch)
        if cfg.shared_neg_seed:
            rng = user_rng(SHARED_NEG_SEED, round_key, 0, local_epoch)
        examples.append(make_example(model, s, rng, cfg))
    batch = collate(model, examples)
    if device is not None and device.type != "cpu":
        batch = {k: v.to(device) for k, v in batch.items()}
    if not sites:
        return batch, None
    dseeds = torch.tensor(
        [int(user_rng(seed, round_key, u, 1000 + local_epoch).integers(0, 2**32)) for u in users], dtype=torch.int64,
        device=device,
    )
    return batch, keep_masks(sites, dseeds, batch["tokens"].shape[1])


def _local_step(local, g, state, cfg: LocalConfig, t: int) -> None:
    with torch.no_grad():
        for n, p in local.items():
            if cfg.optimizer == "sgd":
                p.sub_(cfg.local_lr * g[n])
            else:
                m, v = state[n]
                m.mul_(0.9).add_(g[n], alpha=0.1)
                v.mul_(0.999).addcmul_(g[n], g[n], value=0.001)
                mhat = m / (1 - 0.9**t)
                vhat = v / (1 - 0.999**t)
                p.sub_(cfg.local_lr * mhat / (vhat.sqrt() + 1e-8))
