"""PoisonFRS: drag the target's embedding row onto a scaled centroid of the popular items.

Yin, Xu, Fang, Gong, "Poisoning Federated Recommender Systems with Fake Users", The Web Conference
(WWW) 2024, pp. 3555-3565 (doi 10.1145/3589334.3645492; code mingyin1/PoisonFRS, ``Attack/our.py``
and ``FedRec/server.py``, read for this reading). Fake users with no data, no knowledge beyond the
global item embeddings they download, each round upload item-row deltas that the server adds
(``FedRec/server.py`` adds the per-item mean of the uploaded deltas, no learning rate):

1. **Popular items** (``k``, default 5): the items whose embeddings have the *smallest* inner
   product with the mean item embedding (the reference's ``compute_k_popularities``: the mean is
   dominated by the long tail, which training pushes away from the users, so the items most
   opposed to it are the ones users like).
2. **Goal**: the target row should equal ``scale * m`` (the reference's Lambda, default 10), m the
   mean of the popular items' rows; its delta is ``alpha * (goal - e_t)`` (alpha default 1: one
   server step lands the row on the goal).
3. **Filler rows**: so that a fake upload touches as many rows as a real one, ``items_limit``
   (default 60) rows in all: the targets and the rows farthest from a frozen snapshot of the table,
   each with the delta ``snapshot - e_i`` (it pulls them back to the snapshot).
4. **Noise**: every uploaded row (fillers and targets) gets a row of N(0, 1) noise normalised to
   mean 0 and standard deviation 1, times ``noise``, drawn per user (the reference's 1 per client;
   fedseq's default 0.07 is what a row keeps of it in the reference's setting: see Noise below).

fedseq's reading for sequential models (SASRec, BERT4Rec: the table ``item_emb.weight`` in the flat
weights, one row per token id; the items are rows 1..M):

- **Convention.** The reference's delta is a step the server adds; fedseq's server steps ``w <- w -
  lr * aggregate`` with the round's learning rate (``ctx.lr``: the run's ``lr_at(epoch)``, which
  every participant knows). So a row's update is ``-delta / lr``: under the sum rule (``fedavg``,
  the paper's "common"), an upload alone on a row moves it exactly by the reference's delta, and
  the target row lands on its goal (plus the noise). The rest of the update (other rows, the
  Transformer) is zero, as the reference's fakes upload item rows only. Differences from the
  reference's server: it averages each row over its uploaders, fedseq's rules sum them, so a row
  that benign clients touch too is not diluted by their number, and several PoisonFRS clients in
  one round move a row several times as far (``alpha`` scales the target rows down; the noise of
  one client is not averaged away). The update scales with ``1 / lr``: the noise alone reaches
  about ``4 * noise / lr`` per coordinate, so below lr = 6e-5 (``noise=1``) updates exceed the
  server's sanity bound (fedseq/engine.py ``UPDATE_BOUND``) and are refused.
- **State.** The reference freezes the snapshot and the popular items at its first attack round
  (``attack_round`` = 50 epochs) and, with ``--adapt`` (off by default), doubles Lambda while the
  target's distance to its goal shrinks. An attack update in fedseq is a function of the round's
  weights, the user, the seed and the round only (an attacker worker may be restarted, shards see
  different rounds), so: the attack acts from round id ``start`` (default 0, as fedseq's other
  attacks; the reference's 50 are 50 of its rounds, one batch of 4,000 clients per epoch), and
  before it a client sends its copied user's honest update (the reference's fakes upload nothing
  before then; a fedseq client has to upload, and an honest update tells it apart least); the
  snapshot is version 0, the run's seeded initialisation (:func:`fedseq.popularity.initial_params`),
  which is the reference's frozen snapshot when its attack starts at round 0, and which every
  participant can recompute (with ``start`` > 0 the fillers still go back to version 0, not to the
  weights of round ``start``); the popular items and the goal are recomputed from each round's
  weights (the reference keeps those of its first attack round); Lambda is fixed (no ``adapt``).
- **Noise.** ``noise=1`` is the reference's value for one client's rows. The reference's server
  averages a row over its uploaders, and its default runs have about 5% fake clients in a round
  of 4,000, so the noise a row keeps is about 1/14 of that; in fedseq a round holds a few
  malicious clients at most and the sum keeps each one's noise whole: with ``noise=1`` it
  dominates the rows it touches (64-d rows of norm about 8 against item rows of norm about 0.6 on
  the synthetic default), and the popular items mined in the next round are then noisy filler
  rows. So the default is ``noise=0.07``, what a row keeps in the reference's setting (1/14);
  ``noise=1`` is the reference's literal per-client value.
- **Rows.** The mean, the popular items and the fillers are over the items 1..M (not the padding
  row, not BERT4Rec's mask token), the targets left out of the popular items and the fillers;
  ``items_limit - len(targets)`` fillers (the reference takes that many rows and then removes any
  target among them); ties go to the lower id. Several targets all get the same goal.
- ``num_samples`` is the malicious client's copied sequence length, like every attack here; the
  reported loss is zero.

Options (the reference's defaults but ``noise``): ``scale`` (Lambda, > 0, 10), ``k`` (>= 1, 5),
``alpha`` (> 0, 1), ``items_limit`` (>= 1, 60), ``noise`` (>= 0, 0.07; the reference's 1 after its
per-row averaging, above), ``start`` (round id >= 0, 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedseq.popularity import initial_params
from fedseq.popularity import item_table_slice as table_slice
from fedseq.training import UpdateBatch, compute_updates, user_rng

from .base import Attack, AttackContext, Option, non_negative, parse_options, positive
from .common import num_samples, target_tensor

STREAM_POISONFRS = 5800  # a malicious client's noise rows in a round


def popular_items(table: torch.Tensor, num_items: int, k: int, exclude: Sequence[int] = ()) -> np.ndarray:
    """The ``k`` item ids (1..M, not in ``exclude``) whose rows of ``table [R, W]`` have the smallest
    inner product with the mean row of the items 1..M, smallest first (ties to the lower id)."""
    items = table[1:num_items + 1].double()
    inner = (items @ items.mean(0)).numpy()
    ids = np.arange(1, num_items + 1)
    keep = ~np.isin(ids, np.asarray(exclude, dtype=np.int64))
    order = np.lexsort((ids[keep], inner[keep]))
    return ids[keep][order[:k]]


def filler_items(table: torch.Tensor, snapshot: torch.Tensor, num_items: int, n: int,
                 exclude: Sequence[int] = ()) -> np.ndarray:
    """The ``n`` item ids (1..M, not in ``exclude``) whose rows of ``table`` are farthest (L2) from
    those of ``snapshot``, farthest first (ties to the lower id)."""
    dist = (snapshot[1:num_items + 1] - table[1:num_items + 1]).double().norm(dim=1).numpy()
    ids = np.arange(1, num_items + 1)
    keep = ~np.isin(ids, np.asarray(exclude, dtype=np.int64))
    order = np.lexsort((ids[keep], -dist[keep]))
    return ids[keep][order[:max(0, n)]]


def normalised_noise(rows: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """``[rows, width]`` N(0, 1) draws, each row shifted and scaled to mean 0 and (unbiased)
    standard deviation 1, as the reference normalises its noise."""
    x = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    if width < 2:
        return torch.zeros(rows, width, dtype=torch.float64)
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)


@dataclass(frozen=True)
class PoisonFRS(Attack):
    scale: float = 10.0  # Lambda
    k: int = 5
    alpha: float = 1.0
    items_limit: int = 60
    noise: float = 0.07  # the reference's 1 per client, as much as its per-row mean keeps (docstring)
    start: int = 0  # the first round id that attacks
    name: str = "poisonfrs"

    def plan(self, table: torch.Tensor, snapshot: torch.Tensor, num_items: int,
             targets: Sequence[int]) -> tuple[np.ndarray, torch.Tensor, np.ndarray, torch.Tensor]:
        """``(popular items, goal row [W], filler items, delta [R, W] before the noise)`` at item
        table ``table [R, W]`` with the frozen ``snapshot`` (same shape)."""
        popular = popular_items(table, num_items, self.k, targets)
        goal = self.scale * table[torch.as_tensor(popular)].mean(0)
        fillers = filler_items(table, snapshot, num_items, self.items_limit - len(targets), targets)
        delta = torch.zeros_like(table)
        f = torch.as_tensor(fillers, dtype=torch.long)
        delta[f] = snapshot[f] - table[f]
        for t in targets:
            delta[t] = self.alpha * (goal - table[t])
        return popular, goal, fillers, delta

    def updates(self, ctx: AttackContext) -> UpdateBatch:
        if ctx.lr is None or not ctx.lr > 0:
            raise ValueError(f"poisonfrs sizes its rows by the round's learning rate; the context has lr={ctx.lr!r} "
                             "(attacker.population.Adversary.context fills it)")
        model, params, seed, round_key = ctx.model, ctx.params, ctx.seed, ctx.round_key
        num_items = int(model.cfg.num_items)
        targets = [int(t) for t in torch.unique(target_tensor(ctx.targets, num_items)).tolist()]
        users = np.asarray(ctx.users, dtype=np.int64)
        if round_key < self.start:  # not attacking yet: the copied user's honest update
            honest = compute_updates(model, params, ctx.sequences, users, seed, round_key, ctx.local)
            return UpdateBatch(users, honest.updates, num_samples(ctx.sequences), honest.losses)
        offset, rows, width = table_slice(model)
        span = slice(offset, offset + rows * width)
        table = params[span].view(rows, width).double()
        snapshot = initial_params(model, seed)[span].view(rows, width).double()
        _, _, fillers, delta = self.plan(table, snapshot, num_items, targets)
        touched = torch.as_tensor(np.concatenate([fillers, targets]), dtype=torch.long)
        out = torch.zeros(len(users), params.shape[0], dtype=params.dtype)
        for b, u in enumerate(users.tolist()):
            rng = user_rng(seed, round_key, u, STREAM_POISONFRS)
            gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
            d = delta.clone()
            d[touched] += self.noise * normalised_noise(len(touched), width, gen)
            out[b, span] = (-d / ctx.lr).reshape(-1).to(params.dtype)
        return UpdateBatch(users, out, num_samples(ctx.sequences), np.zeros(len(users)))


def from_options(options: Mapping[str, str]) -> PoisonFRS:
    spec = {
        "scale": Option(float, 10.0, "Lambda: the target row's goal is scale x the popular items' mean row",
                        positive, "> 0"),
        "k": Option(int, 5, "popular items (smallest inner product with the mean item row)", positive, ">= 1"),
        "alpha": Option(float, 1.0, "share of the way to the goal one step takes the target rows", positive, "> 0"),
        "items_limit": Option(int, 60, "item rows each update touches, the targets included", positive, ">= 1"),
        "noise": Option(float, 0.07, "scale of the row-normalised N(0, 1) noise on every touched row",
                        non_negative, ">= 0"),
        "start": Option(int, 0, "first round id that attacks (before it: honest updates)", non_negative, ">= 0"),
    }
    v, _ = parse_options("poisonfrs", options, spec)
    return PoisonFRS(scale=v["scale"], k=v["k"], alpha=v["alpha"], items_limit=v["items_limit"], noise=v["noise"],
                     start=v["start"])
