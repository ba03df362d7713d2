"""HidAttack: an epsilon-greedy bandit over attacks, so the malicious updates are diverse.

"HidAttack: An Effective and Undetectable Model Poisoning Attack to Federated Recommenders" (code
waqar-uestc/HidAttack: ``HidAttack.py``, ``client.py``, ``server.py``, ``hyper.py``, read for this
reading; the module holding its attack clients and the paper's text were not available, so this
reading rests on the code that is). Its README: "leveraging a bandit model to generate diverse
poisoned gradients, HidAttack evades existing defenses while significantly enhancing the exposure
rate of targeted items without affecting recommendation accuracy". The stored code:

- four arms, the attacks of Rong et al. (IJCAI 2022, whose code rdz98/PoisonFedDLRS HidAttack's
  follows line for line: the same hyper-parameters, the same client classes): ``A4``/``A3`` model
  poisoning clients (A-hum and A-ra: the target's BCE gradient at approximated user embeddings),
  ``A2`` a fake user holding only the target, ``A1`` a fake user holding the target and
  ``items_limit - 1`` = 29 random items, both training honestly (EB and RA);
- an epsilon-greedy bandit (epsilon = 0.1: explore a uniformly drawn arm, else the arm of the
  highest mean reward) whose reward for an arm is the mean exposure ratio (ER@5/10/20/30) of the
  target over a whole federated run with that arm; 300 pulls, each a fresh run.

fedseq's reading, inside one run, for sequential models:

- **Arms** (option ``arms``, default ``a-ra,eb,ra``): registered attacks, each with its defaults
  and the same context: ``a-ra`` (target BCE over 10 dropout forwards, :mod:`.a_ra`), ``eb`` (the
  target's score pushed up, :mod:`.eb`: a sequence made of the target alone has no next-item pair
  to train on, so A2's "boost the target explicitly" is read as fedseq's explicit boosting), ``ra``
  (honest training on a fabricated profile of ``length`` items, default 30: 29 random items, never
  a target, then the target; drawn once per malicious client from the run seed and its id, so it
  is the same profile in every round, as a fake user's data is). A-hum (hard-user mining: moving a
  random user embedding to where the target scores lowest) has no user embedding to mine in a
  sequential model and is left out. An arm that fabricates users gets the profiles; the others
  the client's copied sequence.
- **Bandit, one pull per malicious client per round.** The reference averages each arm's reward
  over its past pulls. That state needs the weights of earlier rounds, which an attacker worker
  restarted mid-run, or one hosting a shard, has not seen; here an arm's value is recomputed at
  every round from that round's weights: the one-step reward it would earn, the target's exposure
  margin at the weights ``w - lr * u_arm`` (``ctx.lr``, the round's learning rate: the server's
  step with this update alone) on the client's own sequence: mean over the targets of the
  target's score minus the ``top_k``-th highest score (default 10, the ER@10 cut) among the items
  that are neither in the sequence nor targets (above 0: the target is in that view's top-K).
  Then epsilon-greedy: with probability ``epsilon`` (default 0.1) a uniformly drawn arm, else the
  best (ties to the first arm), drawn from (seed, round, user id) only. So a client's update is a
  function of the round's weights, its data, the seed, the round and its id, whatever the batch,
  in both runners and after a restart; the clients of a round differ (their sequences and draws),
  which is the diversity the paper counts on.
- ``num_samples`` is the client's copied sequence length whatever the arm (an arm's own count
  would tell the server which arm sent it); the loss is the chosen arm's.

Options: ``arms`` (distinct attack names, default ``a-ra,eb,ra``; each with its own defaults),
``epsilon`` (in [0, 1], 0.1), ``top_k`` (>= 1, 10), ``length`` (>= 2, 30). Cost: every arm's
update and one extra forward per arm for each malicious client.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedseq.training import UpdateBatch, user_rng

from .base import Attack, AttackConfigError, AttackContext, Option, parse_options, positive
from .common import Functional, attack_tokens, num_samples, target_tensor

ARMS = ("a-ra", "eb", "ra")
STREAM_BANDIT = 5900  # a malicious client's epsilon-greedy draw in a round
PROFILE_KEY = 0x484944  # "HID": the key of the fabricated profiles (fixed over the run: no round key)
STREAM_PROFILE = 5950


def fake_profile(num_items: int, targets: Sequence[int], seed: int, user: int, length: int) -> np.ndarray:
    """The fabricated profile of malicious client ``user`` for an arm that fabricates users:
    ``length - 1`` distinct random items of 1..M (never a target; at most all of them but one, so
    that training has a negative to draw), then the target ``targets[user % len(targets)]``; a
    function of (seed, user) only."""
    rng = user_rng(seed, PROFILE_KEY, user, STREAM_PROFILE)
    pool = np.setdiff1d(np.arange(1, num_items + 1, dtype=np.int64), np.asarray(targets, dtype=np.int64))
    items = rng.choice(pool, size=max(0, min(length - 1, len(pool) - 1)), replace=False).astype(np.int64)
    return np.append(items, np.int64(targets[user % len(targets)]))


@torch.no_grad()
def exposure_margin(model, params: torch.Tensor, sequence: np.ndarray, targets: Sequence[int], top_k: int) -> float:
    """Mean over ``targets`` of the target's score minus the ``top_k``-th highest score among the
    items neither in ``sequence`` nor targets, at the query position of ``sequence`` (no dropout)
    at weights ``params``: above 0 when the target is in the sequence's top-``top_k``."""
    num_items = int(model.cfg.num_items)
    f = Functional(model, params)
    scores = f.scores(f.hidden(attack_tokens(model, [sequence]), None))[0, 1:num_items + 1].double()
    tgt = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    others = torch.ones(num_items, dtype=torch.bool)
    others[torch.as_tensor(np.asarray(sequence, dtype=np.int64)) - 1] = False
    others[tgt - 1] = False
    rest = scores[others]
    if len(rest) == 0:
        return float(scores[tgt - 1].mean())
    cut = rest.topk(min(top_k, len(rest))).values[-1]
    return float((scores[tgt - 1] - cut).mean())


@dataclass(frozen=True)
class HidAttack(Attack):
    arms: tuple[str, ...] = ARMS
    bases: tuple[Attack, ...] = ()  # the arms' attacks, in the order of ``arms``
    epsilon: float = 0.1
    top_k: int = 10
    length: int = 30
    name: str = "hidattack"

    @property
    def needs_popularity(self) -> bool:
        return any(b.needs_popularity for b in self.bases)

    @property
    def public_share(self) -> float:
        return max((b.public_share for b in self.bases), default=0.0)

    def arm_batches(self, ctx: AttackContext) -> list[UpdateBatch]:
        """Every arm's updates of the context's users (an arm that fabricates users gets their
        :func:`fake_profile`)."""
        out = []
        num_items = int(ctx.model.cfg.num_items)
        for base in self.bases:
            arm_ctx = ctx
            if base.fake_users:
                profiles = [fake_profile(num_items, ctx.targets, ctx.seed, int(u), self.length) for u in ctx.users]
                arm_ctx = replace(ctx, sequences=profiles)
            out.append(base.updates(arm_ctx))
        return out

    def values(self, ctx: AttackContext, batches: Sequence[UpdateBatch]) -> np.ndarray:
        """``[B, A]``: each arm's one-step reward for each user (:func:`exposure_margin` of the
        user's own sequence at ``params - lr * update``)."""
        if ctx.lr is None or not ctx.lr > 0:
            raise ValueError(f"hidattack rates its arms one server step ahead; the context has lr={ctx.lr!r} "
                             "(attacker.population.Adversary.context fills it)")
        out = np.zeros((len(ctx.users), len(batches)))
        for a, batch in enumerate(batches):
            for b, seq in enumerate(ctx.sequences):
                stepped = ctx.params - ctx.lr * batch.updates[b].to(ctx.params.dtype)
                out[b, a] = exposure_margin(ctx.model, stepped, seq, ctx.targets, self.top_k)
        return out

    def choose(self, ctx: AttackContext, values: np.ndarray) -> np.ndarray:
        """``[B]`` the arm each user pulls: epsilon-greedy over ``values [B, A]``, the draw from
        (seed, round key, user id)."""
        picks = np.zeros(len(ctx.users), dtype=np.int64)
        for b, u in enumerate(np.asarray(ctx.users).tolist()):
            rng = user_rng(ctx.seed, ctx.round_key, int(u), STREAM_BANDIT)
            explore = rng.random() < self.epsilon
            picks[b] = int(rng.integers(values.shape[1])) if explore else int(np.argmax(values[b]))
        return picks

    def updates(self, ctx: AttackContext) -> UpdateBatch:
        target_tensor(ctx.targets, int(ctx.model.cfg.num_items))  # validates the targets
        users = np.asarray(ctx.users, dtype=np.int64)
        if len(users) == 0:
            return UpdateBatch(users, torch.zeros(0, ctx.params.shape[0]), num_samples(ctx.sequences), np.zeros(0))
        batches = self.arm_batches(ctx)
        picks = self.choose(ctx, self.values(ctx, batches))
        out = torch.stack([batches[a].updates[b] for b, a in enumerate(picks.tolist())])
        losses = np.array([float(batches[a].losses[b]) for b, a in enumerate(picks.tolist())])
        return UpdateBatch(users, out, num_samples(ctx.sequences), losses)


def factory(make: Callable[[str, Mapping[str, str]], Attack]) -> Callable[[Mapping[str, str]], HidAttack]:
    """The registry entry (``make`` builds the arms by name)."""

    def from_options(options: Mapping[str, str]) -> HidAttack:
        spec = {
            "arms": Option(str, ",".join(ARMS), "comma list of the attacks the bandit pulls"),
            "epsilon": Option(float, 0.1, "probability of pulling a uniformly drawn arm", lambda e: 0 <= e <= 1,
                              "in [0, 1]"),
            "top_k": Option(int, 10, "the top-K cut of the arms' one-step reward", positive, ">= 1"),
            "length": Option(int, 30, "items of a fabricated profile (arm ra), the target included",
                             lambda n: n >= 2, ">= 2"),
        }
        v, _ = parse_options("hidattack", options, spec)
        names = tuple(a.strip() for a in v["arms"].split(",") if a.strip())
        if not names or len(set(names)) != len(names) or "hidattack" in names:
            raise AttackConfigError(f"attack 'hidattack' option arms={v['arms']!r} is invalid; allowed: distinct "
                                    "attack names, at least one, not hidattack")
        bases = tuple(make(a, {"length": str(v["length"])} if a == "ra" else {}) for a in names)
        return HidAttack(arms=names, bases=bases, epsilon=v["epsilon"], top_k=v["top_k"], length=v["length"])

    return from_options
