"""FedRecAttack: model poisoning with a small share of public interactions.

Rong, Zhang, He, Chen, "FedRecAttack: Model Poisoning Attack to Federated Recommendation", ICDE
2022. The attacker knows the interactions of a small share of the users (public data: a profile
made public, a leak). With them it stands in for those users' preferences and uploads the
gradient that lifts the target above the items each of them would be recommended:

    L = mean over public users u in the batch, over u's current top-K items i (the target and
        u's own training items left out) of  log(1 + exp(s_ui - s_ut))

at the global model, then clips the gradient to a norm bound (``clip``) so that the update does
not stand out by its size (the paper's stealth constraint; 0 turns it off).

fedseq's reading for sequential models: a public user is a benign user whose training sequence
the attacker knows (``public``: the share of the N benign users, at least one, drawn with the run
seed when the adversary is built (the attack declares ``public_share``, its option ``public``; the
adversary passes their sequences as ``ctx.public``), so every runner and worker knows the same ones); its
"user embedding" is the model's hidden state at the query position of that sequence, and s_ui its
score for item i. Each malicious client in a round uses its own seeded batch of ``batch`` public
users. The malicious clients' own copied histories play no part.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedseq.data import SeqDataset
from fedseq.training import UpdateBatch, user_rng

from .base import Attack, AttackContext, Option, parse_options, positive
from .common import Functional, attack_tokens, leaf, num_samples, target_tensor

PUBLIC_KEY = 0x505542  # seed stream of the public users' draw ("PUB")
STREAM_PUBLIC = 5600  # a malicious client's batch of public users in a round


def public_users(dataset: SeqDataset, share: float, seed: int) -> np.ndarray:
    """The benign users whose training sequences are public: floor(N * share) of them (at least
    one), drawn without replacement with ``seed``, sorted."""
    N = dataset.num_users
    k = min(N, max(1, int(math.floor(N * share + 1e-9))))
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, PUBLIC_KEY]))
    return np.sort(rng.choice(N, size=k, replace=False)).astype(np.int64)


def public_sequences(dataset: SeqDataset, share: float, seed: int) -> tuple[np.ndarray, ...]:
    """The training sequences of the :func:`public_users` of ``dataset`` (``ctx.public``)."""
    return tuple(np.asarray(dataset.train[int(u)], dtype=np.int64) for u in public_users(dataset, share, seed))


@dataclass(frozen=True)
class FedRecAttack(Attack):
    public: float = 0.01
    batch: int = 32
    top_k: int = 10
    clip: float = 0.0
    name: str = "fedrecattack"

    @property
    def public_share(self) -> float:
        """The share of benign users whose sequences the attack knows (option ``public``)."""
        return self.public

    def updates(self, ctx: AttackContext) -> UpdateBatch:
        public = ctx.public
        if not public:
            raise ValueError("fedrecattack: no public data in the context (ctx.public; the adversary fills it "
                             "from the data set because the attack declares public_share)")
        model, params, seed, round_key = ctx.model, ctx.params, ctx.seed, ctx.round_key
        M = int(model.cfg.num_items)
        tgt = target_tensor(ctx.targets, M)  # [nT]
        users = [int(u) for u in ctx.users]
        out = torch.zeros(len(users), params.shape[0])
        losses = np.zeros(len(users))
        for b, u in enumerate(users):
            rng = user_rng(seed, round_key, u, STREAM_PUBLIC)
            pick = rng.choice(len(public), size=min(self.batch, len(public)), replace=False)
            chosen = [public[int(i)] for i in np.sort(pick)]
            tokens = attack_tokens(model, chosen)  # [n, L]
            p = leaf(params)
            f = Functional(model, p)
            scores = f.scores(f.hidden(tokens, None))[:, 1:M + 1]  # [n, M], item i at column i - 1
            with torch.no_grad():
                ranked = scores.detach().clone()
                for r, seq in enumerate(chosen):
                    ranked[r, torch.as_tensor(np.asarray(seq) - 1)] = -math.inf  # what u already has
                ranked[:, tgt - 1] = -math.inf
                top = ranked.topk(min(self.top_k, M - len(tgt)), dim=1).indices  # [n, k]
            s_top = scores.gather(1, top)  # [n, k]
            s_t = scores[:, tgt - 1].mean(1, keepdim=True)  # [n, 1]
            loss = F.softplus(s_top - s_t).mean()
            (g,) = torch.autograd.grad(loss, p)
            if self.clip > 0:
                g = g * min(1.0, self.clip / max(float(g.norm()), 1e-12))
            out[b] = g
            losses[b] = float(loss.detach())
        return UpdateBatch(np.asarray(users, dtype=np.int64), out, num_samples(ctx.sequences), losses)


def from_options(options: Mapping[str, str]) -> FedRecAttack:
    spec = {
        "public": Option(float, 0.01, "share of the benign users whose sequences are public",
                         lambda v: 0 < v <= 1, "in (0, 1]"),
        "batch": Option(int, 32, "public users per malicious update", positive, ">= 1"),
        "top_k": Option(int, 10, "items each public user's target has to beat", positive, ">= 1"),
        "clip": Option(float, 0.0, "L2 bound on the update (0: none)", lambda v: v >= 0, ">= 0"),
    }
    v, _ = parse_options("fedrecattack", options, spec)
    return FedRecAttack(public=v["public"], batch=v["batch"], top_k=v["top_k"], clip=v["clip"])
