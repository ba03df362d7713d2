"""Spattack: concentrate the malicious item rows on the items few benign clients touch.

Zhang, Ma, Shi, Li, Li, Shi, Wang, "Rethinking Byzantine Robustness in Federated Recommendation
from Sparse Aggregation Perspective", AAAI 2025 (arXiv:2501.03301; code BUPT-GAMMA/Spattack).
Under item-wise sparse aggregation (:mod:`server.aggregation.sparse`) each item row is aggregated
over only the clients that uploaded it, so a robust rule's "honest majority" holds per item: an
item that few benign clients touch is decided by whoever else touches it. Spattack spends the
malicious clients on exactly those items: every malicious update touches the same small set of
rare item rows (and nothing else of the item table), where the malicious clients outnumber the
benign touchers and the robust rule returns *their* value.

fedseq's form. Each round, every malicious update (all of them the same rows, so they concentrate):

    rows  = the targets + the ``rows`` items with the fewest training interactions
            (ties to the lower id; the targets are excluded from the ``rows``) + with
            ``token_rows=true`` (default) the table's rows of non-item tokens after the items
            (the mask token M + 1): no benign SASRec client ever touches it, so under sparse
            aggregation it is the attackers' alone, and the paper's evaluation protocol reads the
            scores at an appended mask token (README "Reference-compatibility switches"), so it steers every user's query
    goal=promote (default): the base attack's update (``base``, default ``dv-fsr``) on those rows
            times ``factor``; every other item row zero; the shared (Transformer) weights are the
            base's when ``shared=true`` (default) and zero otherwise. A targeted variant: the
            rare rows get the base's push (DV-FSR's dense item gradient moves them below the
            target) and the target row gets its boost, without the other item rows where the
            benign majority would outvote the attackers anyway.
    goal=disrupt: the paper's untargeted goal (prevent convergence): the rare rows get one
            Gaussian row per item, ``factor`` times unit variance, drawn from (seed, round) so that
            all malicious clients of the round upload the *same* values (a median over touchers
            where they are the majority returns exactly them); the shared weights are the
            user's honest update when ``shared=true``, zero otherwise. Item embeddings of the rare
            items random-walk until they crowd into every user's top-K.

Knowledge: the item popularity of the training data (how many training interactions each item
has: the public statistic attacks on recommenders such as PipAttack assume) ranks the items by how
many benign clients touch them; the attack declares ``needs_popularity``, so the adversary counts
it once when it is built (:func:`attacker.population.make_adversary`) and passes it in every
context as ``ctx.popularity``. Without it (a context with ``popularity=None``: a direct call) it
knows nothing and takes every item as equally rare (the lowest ids), so that an update still
depends on nothing but (weights, the user's data, seed, round, user id), whatever the batch. The
base attack gets the same context (and the attack declares its base's ``public_share``).

Options: ``rows`` (int >= 0, default 64), ``goal`` (``promote`` or ``disrupt``), ``factor`` (float > 0,
default 1), ``shared`` (bool, default true), ``token_rows`` (bool, default true), ``base`` (attack name, default ``dv-fsr``, promote only)
with its options as ``base.<key>=value``. Models: SASRec and BERT4Rec (the item table
``item_emb.weight``, one row per token id).

Measured against DV-FSR and Spattack on the synthetic default: docs/results/newer-defenses.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fedseq.data import SeqDataset
from fedseq.popularity import item_table_slice as table_slice
from fedseq.training import UpdateBatch, compute_updates

from .base import (
    Attack,
    AttackConfigError,
    AttackContext,
    Option,
    non_negative,
    parse_options,
    positive,
    sub_options,
)
from .common import num_samples, target_tensor

STREAM_SPATTACK = 5700  # the shared Gaussian rows of goal=disrupt (no user id: common to all attackers)
GOALS = ("promote", "disrupt")


def item_counts(dataset: SeqDataset) -> np.ndarray:
    """Training interactions per item id ``[M + 1]`` (index 0 unused)."""
    counts = np.zeros(dataset.num_items + 1, dtype=np.int64)
    for s in dataset.train:
        np.add.at(counts, np.asarray(s, dtype=np.int64), 1)
    return counts


def rare_items(counts: np.ndarray, k: int, exclude: Sequence[int]) -> np.ndarray:
    """The ``k`` item ids (1..) with the fewest interactions, ties to the lower id, ``exclude`` left out."""
    ids = np.arange(1, len(counts), dtype=np.int64)
    keep = ~np.isin(ids, np.asarray(exclude, dtype=np.int64))
    ids = ids[keep]
    order = np.lexsort((ids, counts[ids]))
    return np.sort(ids[order[:k]])


@dataclass(frozen=True)
class Spattack(Attack):
    base: Attack | None = None  # promote: the attack giving the rows' values
    rows: int = 64
    goal: str = "promote"
    factor: float = 1.0
    shared: bool = True
    token_rows: bool = True
    name: str = "spattack"
    needs_popularity: ClassVar[bool] = True  # ctx.popularity: which items few benign clients touch

    @property
    def public_share(self) -> float:
        return 0.0 if self.base is None else self.base.public_share

    def chosen_rows(self, popularity: np.ndarray | None, num_items: int, targets: Sequence[int],
                    table_rows: int = 0) -> np.ndarray:
        """The table rows every malicious update of the round touches: the targets, the rare items by
        ``popularity`` (training interactions per item id ``[M + 1]``; None: every item equally rare)
        and (``token_rows``) the non-item token rows ``num_items + 1 .. table_rows - 1``."""
        counts = None if popularity is None else np.asarray(popularity, dtype=np.int64)
        if counts is None:
            counts = np.zeros(num_items + 1, dtype=np.int64)
        elif len(counts) != num_items + 1:
            raise ValueError(f"spattack: popularity of {len(counts) - 1} items for a model of {num_items}")
        rare = rare_items(counts, self.rows, targets)
        chosen = np.union1d(np.asarray(targets, dtype=np.int64), rare)
        if self.token_rows and table_rows > num_items + 1:
            chosen = np.union1d(chosen, np.arange(num_items + 1, table_rows, dtype=np.int64))
        return chosen

    def updates(self, ctx: AttackContext) -> UpdateBatch:
        model, targets, seed, round_key = ctx.model, ctx.targets, ctx.seed, ctx.round_key
        users = np.asarray(ctx.users, dtype=np.int64)
        num_items = int(model.cfg.num_items)
        target_tensor(targets, num_items)  # validates the targets
        offset, n_rows, width = table_slice(model)
        chosen = torch.as_tensor(self.chosen_rows(ctx.popularity, num_items, targets, n_rows))
        if self.goal == "promote":
            assert self.base is not None
            ub = self.base.updates(ctx)
        else:
            ub = compute_updates(model, ctx.params, ctx.sequences, users, seed, round_key, ctx.local)
        out = ub.updates if self.shared else torch.zeros_like(ub.updates)
        table = ub.updates[:, offset:offset + n_rows * width].reshape(len(users), n_rows, width)
        if self.goal == "promote":
            values = table[:, chosen] * self.factor
        else:
            shared_rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, round_key, STREAM_SPATTACK]))
            gen = torch.Generator().manual_seed(int(shared_rng.integers(0, 2**62)))
            noise = torch.randn(len(chosen), width, generator=gen) * self.factor
            values = noise.to(out.dtype).expand(len(users), -1, -1)
        out_table = out[:, offset:offset + n_rows * width].view(len(users), n_rows, width)
        out_table.zero_()
        out_table[:, chosen] = values
        return UpdateBatch(users, out, num_samples(ctx.sequences), ub.losses)


def factory(make: Callable[[str, Mapping[str, str]], Attack]) -> Callable[[Mapping[str, str]], Spattack]:
    """The registry entry (``make`` builds the base attack by name)."""

    def from_options(options: Mapping[str, str]) -> Spattack:
        spec = {
            "rows": Option(int, 64, "rare item rows every malicious update touches (besides the targets)",
                           non_negative, ">= 0"),
            "goal": Option(str, "promote", "promote (the base attack's rows) or disrupt (shared Gaussian rows)",
                           lambda g: g in GOALS, "promote or disrupt"),
            "factor": Option(float, 1.0, "multiplier of the chosen rows", positive, "> 0"),
            "shared": Option(bool, True, "keep the shared (non-item) weights of the update"),
            "token_rows": Option(bool, True, "also the table's non-item token rows (the mask token)"),
            "base": Option(str, "dv-fsr", "goal=promote: the attack whose item rows are sent"),
        }
        v, nested = parse_options("spattack", options, spec, passthrough=("base",))
        if v["goal"] == "disrupt" and (nested or "base" in options):
            raise AttackConfigError("attack 'spattack' option base / base.<key> applies to goal=promote only")
        base = make(v["base"], sub_options(nested, "base")) if v["goal"] == "promote" else None
        if base is not None and base.fake_users:
            raise AttackConfigError(f"attack 'spattack' base={v['base']!r} trains on fabricated users; "
                                    "use a model-poisoning base (dv-fsr, eb, a-ra, ...)")
        return Spattack(base=base, rows=v["rows"], goal=v["goal"], factor=v["factor"], shared=v["shared"],
                        token_rows=v["token_rows"])

    return from_options
