"""The round engine: what a round *is*, computed in one place for every runner.

The orchestrator (over the network), the aggregation server (over the network) and the
in-process runner (``fedseq sim``) all call these functions; they add only transport,
validation and state. A difference between the runners is therefore a bug in a caller, never a
second implementation (tests/test_engine_equal.py runs every rule through both).

- The schedule: :func:`plan_run` lists every round of a run in order (epoch, users, learning
  rate, and the adversarial-training rounds that follow each round when ``adv_train`` is on);
  round ids are global, so round r trains on model version r and produces version r + 1.
  :func:`eval_due` says after which epochs the benign users are evaluated.
- The step: :func:`aggregate_round` applies the rule to the round's stacked updates with the
  round's :class:`RoundContext` (the sample weights, the round id, the parameter layout, the global
  parameters the updates were computed at, and the server's FLTrust root update when the rule
  declares ``needs_root``), steps ``w <- w - lr_step * aggregate`` and refuses, one by one from the largest
  norm, updates whose step would leave the model non-finite or exploding (:data:`WEIGHT_BOUND`).
- The sanity bound: :func:`out_of_bounds` refuses absurd updates (a value beyond
  :data:`UPDATE_BOUND`, or not finite) before any rule sees them. It stops numerical sabotage by an
  insider (an update of 3e38 is finite, and one such update made every later step overflow); it is
  no defense: every attack's updates in docs/results pass it (PoisonFRS's only above lr 6e-5).
- The step scale: every rule declares whether its output is on the scale of the *sum* of the
  round's K updates (the paper's "common" FedAvg) or of *one* update (``mean``: RFA, mixed-RFA,
  median, Krum, ...). :func:`step_lr` multiplies a mean-scale rule's step by K, so swapping the
  rule at the same ``--lr`` trains at the same speed; the compat switch ``literal_step`` (part of
  ``--compat reference``) applies ``lr`` as is, as the paper's code does (a mean-scale rule then
  steps about K times less: mixed-RFA at lr 0.001 barely trains). :func:`stall_warning` names
  that cause when a run's HR@10 does not move.
- The accounting: :func:`malicious_kept` counts the malicious updates the rule kept, by one
  algorithm (the rule never knows who is malicious; only the experiment's report does).

The rule contract (:class:`AggregationRule`, :class:`RoundContext`, :class:`AggregationResult`)
lives here too: the rules themselves (``server/aggregation/``) are plug-ins that the services pass
in. A rule is called ``rule(updates [K, D], ctx)``, reads what it needs from the context, and
declares what the engine must provide as typed attributes of :class:`AggregationRule`
(``needs_root``, ``needs_layout``, ``scale``, ``uses_weights``, ``root_users``).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .adv_train import pick_adv_users
from .config import ExperimentConfig
from .params import Layout
from .privacy import Mechanism

log = logging.getLogger(__name__)

SCHEDULE_KEY = 0x5C4ED  # stream of the epoch shuffles


# ---------------------------------------------------------------------------- the rule contract
@dataclass(frozen=True)
class AggregationResult:
    """What a rule returns.

    vector: ``[D]`` aggregate; the server steps ``w <- w - lr * vector``.
    kept: indices (into the K stacked updates) that the rule kept / gave weight to, or ``None``
        when every update contributed. Used by the experiment's own report to say whether a
        malicious update was among those kept (the rule itself never knows who is malicious).
    info: JSON-serialisable facts about the run of the rule (iterations, clipped count, ...).
    """

    vector: torch.Tensor
    kept: tuple[int, ...] | None = None
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class RoundContext:
    """Everything a rule may read besides the updates, for one call ``rule(updates [K, D], ctx)``.

    weights: ``[K]`` the updates' non-negative sample counts (their aggregation weights).
    round_id: the global round id. A rule that draws random numbers (FLAME's noise, DnC's
        coordinate samples) draws them from (its seed, ``round_id``) only
        (:func:`server.aggregation.base.round_generator`), so every runner, and a resumed run,
        draws the same numbers.
    layout: the flat parameter layout of the ``D`` columns (where the item embedding table sits:
        item-wise sparse aggregation), or None where the columns are not a whole model (a wrapper
        calling its inner rule on a part of the vector).
    params: ``[D]`` the global weights the updates were computed at, or None where unknown.
    root: ``[D]`` the server's root update of this round (FLTrust). :func:`aggregate_round`
        computes it, with the runner's ``root(params, round_id)``, only for a rule whose
        ``needs_root`` is true, and leaves it None otherwise.

    state: what the rule's previous round left for this one (its ``info["state"]``, a small JSON
        dict: ``dp-adaptive``'s clipping norm), or None at the run's start. The runners carry it
        from round to round (:meth:`RoundOutcome.rule_state`); the aggregation server stores it
        with each model version (the round summary) and reads it back when it resumes a run.

    A wrapper passes the context on, or a copy made with :func:`dataclasses.replace` for the part
    of the round it hands its inner rule (the sparse rule: one item row's touchers, their weights
    and the root's row).
    """

    weights: torch.Tensor
    round_id: int = 0
    layout: Layout | None = None
    params: torch.Tensor | None = None
    root: torch.Tensor | None = None
    state: Mapping[str, Any] | None = None


class AggregationRule(ABC):
    """The base of every rule: ``rule(updates [K, D], ctx: RoundContext) -> AggregationResult``.

    A rule reads what it needs from ``ctx`` and declares what the engine must know about it as
    typed attributes, whose defaults are defined here (override a default with a class attribute,
    a dataclass field or a property: a wrapper's properties return its inner rule's):

    - ``name``: the registry name.
    - ``scale``: ``"sum"`` or ``"mean"``, the scale of the output (:func:`step_lr`).
    - ``uses_weights``: whether the rule reads ``ctx.weights`` at all (recorded in every round's
      rule info; README "Security model").
    - ``needs_root``: the rule reads ``ctx.root``, the server's root update (FLTrust): the engine
      computes it before the call, and refuses to run the rule without a root source.
    - ``root_users``: how many users' data the server's root dataset copies (fedseq/root.py);
      read only when ``needs_root``.
    - ``needs_layout``: the rule reads ``ctx.layout`` (item-wise sparse aggregation): the engine
      refuses to run it without one.
    - ``privacy``: the Gaussian mechanism of a differentially private rule
      (:class:`fedseq.privacy.Mechanism`; ``dp-fixed``), from which the run's epsilon is
      reported; None for the others.

    Rules are frozen dataclasses, pure functions of ``(updates, ctx)``.
    """

    name: str

    @property
    def scale(self) -> str:
        return "mean"

    @property
    def uses_weights(self) -> bool:
        return True

    @property
    def needs_root(self) -> bool:
        return False

    @property
    def root_users(self) -> int:
        return 0

    @property
    def needs_layout(self) -> bool:
        return False

    @property
    def privacy(self) -> Mechanism | None:
        return None

    @abstractmethod
    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult: ...


def rule_scale(rule: AggregationRule) -> str:
    """``"sum"`` or ``"mean"``: the scale of ``rule``'s output (``rule.scale``, checked)."""
    if rule.scale not in ("sum", "mean"):
        raise ValueError(f"rule {rule.name!r} declares scale {rule.scale!r}; expected 'sum' or 'mean'")
    return rule.scale


def rule_uses_weights(rule: AggregationRule) -> bool:
    """Whether ``rule`` reads the sample weights at all (``rule.uses_weights``; the base's default is
    that it does). Recorded in every round's rule info: under a rule that ignores them an upload's
    weight could not matter even if it were believed; under one that reads them it is the
    orchestrator's (README "Security model")."""
    return rule.uses_weights


def step_lr(rule: AggregationRule, lr: float, k: int, literal: bool = False) -> float:
    """The learning rate the server steps ``rule``'s output of ``k`` updates with: ``lr`` for a
    sum-scale rule or with ``literal`` (the paper's code), ``lr * k`` for a mean-scale rule, so
    its step matches the sum's at the same ``lr``."""
    return lr if literal or rule_scale(rule) == "sum" else lr * k


def server_step(params: torch.Tensor, aggregate: torch.Tensor, lr: float) -> torch.Tensor:
    """The server's step ``w <- w - lr * aggregate`` on flat ``[D]`` vectors (new tensor)."""
    if params.shape != aggregate.shape:
        raise ValueError(f"params {tuple(params.shape)} and aggregate {tuple(aggregate.shape)} differ")
    return params - lr * aggregate.to(params.dtype)


# ---------------------------------------------------------------------------- the schedule
@dataclass(frozen=True, eq=False)
class RoundPlan:
    """One round of a run.

    round_id: global id; the round trains on model version ``round_id``.
    epoch: 0-based epoch; index: position in the epoch (-1 for an adversarial-training round).
    users: ``[k]`` int64 client ids, sorted (benign ``0..N-1``, malicious ``N..``).
    lr: the epoch's learning rate. adversarial: an adversarial-training round (benign users only).
    """

    round_id: int
    epoch: int
    index: int
    users: np.ndarray
    lr: float
    adversarial: bool = False


def epoch_rounds(cfg: ExperimentConfig, clients: np.ndarray, epoch: int) -> list[np.ndarray]:
    """The rounds of 0-based ``epoch``.

    Paper mode (``fraction == 0``): shuffle every client and cut into rounds of
    ``clients_per_round`` (the last round may be smaller). FedAvg sampling (``fraction > 0``):
    ``ceil(1 / fraction)`` rounds, each an independent sample of ``max(1, fraction * n)`` clients.
    Each round's clients are returned sorted by id.
    """
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed & 0xFFFFFFFF, SCHEDULE_KEY, epoch]))
    clients = np.sort(np.asarray(clients, dtype=np.int64))
    if cfg.fraction <= 0:
        order = rng.permutation(clients)
        B = cfg.clients_per_round
        return [np.sort(order[i : i + B]) for i in range(0, len(order), B)]
    per_round = max(1, int(round(cfg.fraction * len(clients))))
    n_rounds = int(np.ceil(1.0 / cfg.fraction))
    return [np.sort(rng.choice(clients, size=per_round, replace=False)) for _ in range(n_rounds)]


def adv_train_on(cfg: ExperimentConfig) -> bool:
    """Whether the run does adversarial training (``adv_train``, unless the compat switch
    ``advtrain_noop`` reproduces the public code, whose adversarial step changes nothing)."""
    return bool(cfg.adv_train and not cfg.compat.advtrain_noop)


def plan_run(cfg: ExperimentConfig, clients: np.ndarray, num_benign: int) -> list[RoundPlan]:
    """Every round of the run, in order. With adversarial training each round is followed by an
    adversarial round (its own round id and model version) of ``adv_users_per_round`` of that
    round's benign users (Yue et al., RecSys 2022; fedseq/adv_train.py). ``max_rounds > 0`` keeps
    only the first that many rounds (the last one kept then ends its epoch)."""
    out: list[RoundPlan] = []
    adv = cfg.adv_config() if adv_train_on(cfg) else None
    for e in range(cfg.epochs):
        lr = cfg.lr_at(e)
        for r, users in enumerate(epoch_rounds(cfg, clients, e)):
            out.append(RoundPlan(len(out), e, r, users, lr))
            if adv is not None:
                benign = users[users < num_benign]
                picked = pick_adv_users(benign, cfg.seed, len(out), adv.users_per_round)
                out.append(RoundPlan(len(out), e, -1, np.asarray(picked, dtype=np.int64), lr, adversarial=True))
        if cfg.max_rounds and len(out) >= cfg.max_rounds:
            return out[: cfg.max_rounds]
    return out


def privacy_summary(mech: Mechanism | None, plan: Sequence[RoundPlan], num_clients: int) -> dict[str, Any] | None:
    """The run's privacy for its results bundle (``summary.privacy``; fedseq/privacy.py), from the
    rule's mechanism and the run's plan (how many rounds each client is in); None without a
    differentially private rule. Both runners report it from the same plan."""
    if mech is None:
        return None
    from . import privacy

    sizes = [len(rp.users) for rp in plan if not rp.adversarial]
    return privacy.report(mech, [rp.users for rp in plan], num_clients, max(sizes, default=0))


def last_of_epoch(plan: Sequence[RoundPlan], i: int) -> bool:
    """Whether ``plan[i]`` is the last round of its epoch."""
    return i + 1 == len(plan) or plan[i + 1].epoch != plan[i].epoch


def eval_due(cfg: ExperimentConfig, epoch: int) -> bool:
    """Whether the benign users are evaluated after 0-based ``epoch``: every ``eval_every``
    epochs and after the last one."""
    return (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs


# ---------------------------------------------------------------------------- the step
RootUpdate = Callable[[torch.Tensor, int], torch.Tensor]  # (params [D], round id) -> root update [D]

# The absolute per-update sanity bound: no coordinate of an update may exceed the largest finite
# float16 value. It is derived from the codecs: dense-fp16 and sparse-fp16 cannot carry a larger
# value at all, so an update beyond it is one that no fedseq codec carries whole, and far beyond any
# gradient of these models: the largest coordinate of the gradient attacks' updates at version 0
# of Steam SASRec (seed 0, 0.1%) is 31 (scale, x10 of DV-FSR's 3.1). PoisonFRS sizes its rows by
# 1 / lr (attacker/attacks/poisonfrs.py), so its coordinates grow as the lr shrinks: no update of its
# 51 runs in docs/results/matrix.md (lr 0.01) was refused, and below lr 6e-5 they would be.
# tests/test_attacks.py checks every attack stays 100x below the bound at lr 0.01.
UPDATE_BOUND = 65504.0
# The model bound: a step that would leave any weight beyond it (or not finite) is refused. The
# largest weight over every round of Steam SASRec under the scale attack (x10) at 1% for 3 epochs
# was 1.05, and 1.10 on the synthetic default under DV-FSR for 8 epochs (seed 0 each); 1e4 leaves
# honest training four orders of magnitude of room while keeping every score, softmax and norm of
# the models finite in float32.
WEIGHT_BOUND = 1.0e4


def out_of_bounds(updates: torch.Tensor, rows: Iterable[int] | None = None) -> list[int]:
    """The rows of ``updates [K, D]`` (all, or only ``rows``) that are not finite or hold a value
    beyond :data:`UPDATE_BOUND` in magnitude. One max/min pass over the rows checked; the per-row
    pass only when that finds something."""
    idx = list(range(updates.shape[0])) if rows is None else [int(r) for r in rows]
    if not idx or updates.shape[1] == 0:
        return []
    U = updates if rows is None else updates[torch.as_tensor(idx, dtype=torch.long)]
    hi, lo = U.max(), U.min()
    if bool(torch.isfinite(hi)) and bool(torch.isfinite(lo)) and float(hi) <= UPDATE_BOUND \
            and float(lo) >= -UPDATE_BOUND:
        return []
    bad = ~torch.isfinite(U).all(dim=1) | (U.abs().nan_to_num(nan=math.inf).amax(dim=1) > UPDATE_BOUND)
    return [idx[i] for i in torch.nonzero(bad).flatten().tolist()]


def model_sane(params: torch.Tensor) -> bool:
    """Whether weights ``params [D]`` are all finite and within :data:`WEIGHT_BOUND`."""
    if params.numel() == 0:
        return True
    hi, lo = params.max(), params.min()
    return bool(torch.isfinite(hi)) and bool(torch.isfinite(lo)) and float(hi) <= WEIGHT_BOUND \
        and float(lo) >= -WEIGHT_BOUND


@dataclass(frozen=True, eq=False)
class RoundOutcome:
    """What :func:`aggregate_round` did.

    params: ``[D]`` weights after the step (the old ones when nothing was aggregated).
    users: the users whose updates were aggregated (sorted; those refused removed).
    kept_users: the users the rule kept, or ``None`` when every aggregated update contributed.
    overflow: users refused because the step with their update would leave the model non-finite
        or beyond :data:`WEIGHT_BOUND` (the largest norms first).
    out_of_bounds: users refused by the sanity bound (:func:`out_of_bounds`) before the rule ran.
    result: the rule's result (None when no update was aggregated).
    lr_step: the learning rate the step used (:func:`step_lr`; 0 when nothing was aggregated).
    """

    params: torch.Tensor
    users: tuple[int, ...]
    kept_users: tuple[int, ...] | None
    overflow: tuple[int, ...] = ()
    result: AggregationResult | None = None
    lr_step: float = 0.0
    scale: str = "sum"  # the rule's output scale (rule_scale)
    out_of_bounds: tuple[int, ...] = ()
    uses_weights: bool = True  # the rule reads the sample weights (rule_uses_weights)

    @property
    def refused(self) -> dict[int, str]:
        """Every update the engine refused, with its reason word and why (server/intake.py words)."""
        out = {u: f"out-of-bounds: the update of user {u} holds a value beyond {UPDATE_BOUND:g} or not finite"
               for u in self.out_of_bounds}
        out.update({u: f"non-finite: the step with the update of user {u} (largest norm) leaves the model "
                       f"non-finite or beyond {WEIGHT_BOUND:g}" for u in self.overflow})
        return out

    def rule_state(self, previous: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """The rule state the next round gets (:attr:`RoundContext.state`): what the rule left in
        its info, else ``previous`` (a rule without state, or a round that aggregated nothing)."""
        if self.result is None:
            return previous
        return self.result.info.get("state", previous)

    @property
    def info(self) -> dict[str, Any]:
        """The rule's record of the round, with the step's learning rate."""
        return {} if self.result is None else {**self.result.info, "lr_step": self.lr_step, "scale": self.scale,
                                                 "uses_weights": self.uses_weights}


@dataclass(frozen=True)
class Aggregation:
    """A run's aggregation, the same every round: its ``rule`` and what the runner gives it.

    root: the runner's root update ``root(params, round_id) -> [D]`` (fedseq/root.py: FLTrust's
        update from the server's own data), or None.
    layout: the model's flat parameter layout (where the item table sits), or None.
    literal_step: the compat switch that steps with ``lr`` as is (:func:`step_lr`).

    A rule that declares ``needs_root`` or ``needs_layout`` and gets none is refused here, when the
    run starts, with a ValueError."""

    rule: AggregationRule
    root: RootUpdate | None = None
    layout: Layout | None = None
    literal_step: bool = False

    def __post_init__(self) -> None:
        if self.rule.needs_root and self.root is None:
            raise ValueError(f"rule {self.rule.name!r} needs a root update and the runner gave none")
        if self.rule.needs_layout and self.layout is None:
            raise ValueError(f"rule {self.rule.name!r} needs the parameter layout and the runner gave none")


def aggregate_round(agg: Aggregation, params: torch.Tensor, updates: torch.Tensor, weights: torch.Tensor,
                    users: Sequence[int], lr: float, round_id: int,
                    bound_rows: Iterable[int] | None = None, state: Mapping[str, Any] | None = None) -> RoundOutcome:
    """One round's aggregation and step, with the run's :class:`Aggregation` ``agg``.

    ``updates [K, D]`` holds the updates of ``users`` (sorted ids) in that order, ``weights [K]``
    their sample counts. The rule is called with the round's :class:`RoundContext`: the weights,
    ``round_id``, the parameter layout, ``params``, and, only for a rule that declares
    ``needs_root`` (FLTrust), the root update ``agg.root(params, round_id)``, computed once per
    round, and ``state``, what the rule's previous round left (:meth:`RoundOutcome.rule_state`).
    The step's learning rate is :func:`step_lr` of the rule's scale (``lr`` as is with
    ``agg.literal_step``).

    First the sanity bound (:func:`out_of_bounds`) refuses absurd rows: ``bound_rows`` names the
    rows to check (None: all). The server passes ``()``: it checked every row with the same
    function as it was decoded; the in-process runner passes its malicious rows, the only ones that
    do not come from its own training code. Then a step that would leave the model non-finite or
    beyond :data:`WEIGHT_BOUND` (finite updates can still overflow together) never becomes a
    version: the updates of the largest norm are refused one by one and the rule is run again
    without them (the same context, those rows' weights removed), until the step is sane, or all
    are refused and the weights stay."""
    users = [int(u) for u in users]
    bad = out_of_bounds(updates, bound_rows)
    if bad:
        log.warning("round %d: refusing %d update(s) beyond the sanity bound %g: users %s", round_id, len(bad),
                    UPDATE_BOUND, [users[i] for i in bad][:10])
        keep_rows = torch.ones(updates.shape[0], dtype=torch.bool)
        keep_rows[torch.as_tensor(bad, dtype=torch.long)] = False
        refused_bound = tuple(users[i] for i in bad)
        updates, weights = updates[keep_rows], weights[keep_rows]
        users = [u for i, u in enumerate(users) if bool(keep_rows[i])]
    else:
        refused_bound = ()
    rule = agg.rule
    round_root = agg.root(params, round_id) if agg.root is not None and rule.needs_root else None
    ctx = RoundContext(weights, int(round_id), agg.layout, params, round_root, state)
    overflow: list[int] = []
    U = updates
    while users:
        res = rule(U, ctx)
        lr_step = step_lr(rule, lr, len(users), agg.literal_step)
        new = server_step(params, res.vector, lr_step)
        if model_sane(new):
            kept = None if res.kept is None else tuple(users[i] for i in res.kept)
            return RoundOutcome(new, tuple(users), kept, tuple(overflow), res, lr_step, rule_scale(rule),
                                refused_bound, rule_uses_weights(rule))
        worst = int(U.double().norm(dim=1).argmax())
        log.warning("round %d: the step is not finite or exceeds the model bound %g; refusing the update of "
                    "user %d (largest norm) and aggregating again", round_id, WEIGHT_BOUND, users[worst])
        overflow.append(users.pop(worst))
        keep = torch.ones(U.shape[0], dtype=torch.bool)
        keep[worst] = False
        U, ctx = U[keep], replace(ctx, weights=ctx.weights[keep])
    return RoundOutcome(params, (), None, tuple(overflow), None, out_of_bounds=refused_bound)


# ---------------------------------------------------------------------------- the accounting
def malicious_kept(aggregated: Iterable[int], kept_users: Iterable[int] | None, malicious: set[int]) -> tuple[int, int]:
    """``(malicious updates aggregated, malicious updates the rule kept)`` of a round: every
    aggregated malicious update counts as kept when the rule reports no selection."""
    mal = [u for u in aggregated if u in malicious]
    if kept_users is None:
        return len(mal), len(mal)
    kept = set(kept_users)
    return len(mal), sum(1 for u in mal if u in kept)


STALL_EPOCHS = 3  # evaluated epochs without HR@10 moving before a run warns
STALL_DELTA = 0.005


def stall_warning(cfg: ExperimentConfig, rule: str, scale: str, hr10: Sequence[float], k: int) -> str | None:
    """A warning when the run's HR@10 (``hr10``: one value per evaluated epoch so far) has not
    moved by :data:`STALL_DELTA` over its first :data:`STALL_EPOCHS` evaluations, naming the
    likely cause (``rule`` and its ``scale``; ``k``: updates per round); None while it trains or
    it is too early to say."""
    if len(hr10) != STALL_EPOCHS or max(hr10) - min(hr10) >= STALL_DELTA:
        return None
    head = (f"HR@10 has not moved in {len(hr10)} evaluated epochs ({hr10[0]:.4f} -> {hr10[-1]:.4f}): the model is "
            "not training. Likely cause: ")
    if scale == "mean" and cfg.compat.literal_step:
        return head + (f"rule {rule!r} returns a mean-scale step and the compat switch literal_step applies "
                       f"--lr {cfg.lr:g} to it as is, about {k} times smaller than the sum's step; drop literal_step "
                       f"(the step is then scaled by the round's updates) or raise --lr to about {cfg.lr * k:g}.")
    return head + (f"--lr {cfg.lr:g} is too small for this data and rule {rule!r} ({scale}-scale "
                   "step), or the data has too little signal; raise --lr.")
