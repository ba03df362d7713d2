"""PIECK-IPE: the popular-item-embedding attack, item popularity enhancement.

Zhang, Yin, Chen, Hung, Nguyen, Cui et al., "Preventing the Popular Item Embedding Based Attack in
Federated Recommendations", ICDE 2024. Its observation: in federated recommendation the embeddings
of popular items get the largest updates, so a malicious client with no data knowledge can mine
which items are popular from how far their embeddings moved, and promote a target by making its
embedding look like theirs (IPE, item popularity enhancement; the paper's UEA variant instead
approximates user embeddings and is not implemented here).

fedseq's reading, for sequential models:

1. **Mining** (stateless): the paper tracks embedding changes over the rounds a client takes part
   in; fedseq takes their sum, the distance each item row has moved since version 0, which every
   client can compute because version 0 is the run's seeded initialisation
   (:func:`fedseq.models.common.reference_init` with the run seed). So both runners, and every
   attacker worker whichever rounds it saw, mine the same set: the ``popular`` items (ids 1..M, the
   targets excluded) whose rows moved the most.
2. **Enhancement**: the target row's update is ``factor * (e_t - c)`` with ``c`` the mean of the
   mined popular rows: the gradient of ``factor/2 * ||e_t - c||^2``, so the server's step (``w -
   lr * aggregate``) pulls the target toward the popular items' centroid, where the users' sequence
   representations already score high. With several targets each gets its own row.
3. It rides on a base attack (option ``base``, default ``dv-fsr``; ``none`` sends the target rows
   only): the malicious update is the base attack's update plus the enhancement rows. The base
   gets the same context, and the attack declares the data its base needs (``needs_popularity``,
   ``public_share``).

The paper's defense (a client-side regulariser against the popularity pattern) is not implemented.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedseq.popularity import initial_params, mine_popular
from fedseq.popularity import item_table_slice as table_slice
from fedseq.training import UpdateBatch

from .base import Attack, AttackConfigError, AttackContext, Option, parse_options, positive, sub_options
from .common import num_samples, target_tensor


@dataclass(frozen=True)
class PieckIPE(Attack):
    popular: int = 10
    factor: float = 1.0
    base: Attack | None = None  # None: the enhancement rows alone
    name: str = "pieck"

    @property
    def needs_popularity(self) -> bool:
        return self.base is not None and self.base.needs_popularity

    @property
    def public_share(self) -> float:
        return 0.0 if self.base is None else self.base.public_share

    def updates(self, ctx: AttackContext) -> UpdateBatch:
        model, params, seed = ctx.model, ctx.params, ctx.seed
        B = len(ctx.users)
        num_items = int(model.cfg.num_items)
        tgt = target_tensor(ctx.targets, num_items)  # validates
        if self.base is not None:
            out = self.base.updates(ctx)
            batch = UpdateBatch(out.users, out.updates.clone(), out.num_samples, out.losses)
        else:
            batch = UpdateBatch(np.asarray(ctx.users, dtype=np.int64), torch.zeros(B, params.shape[0]),
                                num_samples(ctx.sequences), np.zeros(B))
        if B == 0:
            return batch
        offset, rows, width = table_slice(model)
        popular = np.sort(mine_popular(params, initial_params(model, seed), model, self.popular, tgt.tolist()))
        table = params[offset:offset + rows * width].view(rows, width)
        centroid = table[torch.as_tensor(popular)].mean(0)  # [H]
        view = batch.updates[:, offset:offset + rows * width].view(B, rows, width)
        for t in tgt.tolist():
            view[:, t] += self.factor * (table[t] - centroid)
        return batch


def factory(make: Callable[[str, Mapping[str, str]], Attack]) -> Callable[[Mapping[str, str]], PieckIPE]:
    """The registry entry (``make`` builds the base attack by name)."""

    def from_options(options: Mapping[str, str]) -> PieckIPE:
        spec = {
            "popular": Option(int, 10, "how many mined popular items make the centroid", positive, ">= 1"),
            "factor": Option(float, 1.0, "scale of the enhancement rows", lambda v: v > 0, "> 0"),
            "base": Option(str, "dv-fsr", "attack whose update the rows ride on, or 'none'"),
        }
        v, nested = parse_options("pieck", options, spec, passthrough=("base",))
        base = None
        if v["base"] != "none":
            base = make(v["base"], sub_options(nested, "base"))
        elif nested:
            raise AttackConfigError("attack 'pieck': base.<key> options need a base attack")
        return PieckIPE(popular=v["popular"], factor=v["factor"], base=base)

    return from_options
