"""The round engine's pieces on tiny exact cases: the schedule, the step scale, the overflow
refusal, the malicious accounting and the stall warning (fedseq/engine.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedseq.config import Compat, ExperimentConfig
from fedseq.engine import (
    UPDATE_BOUND,
    WEIGHT_BOUND,
    Aggregation,
    aggregate_round,
    eval_due,
    malicious_kept,
    model_sane,
    out_of_bounds,
    plan_run,
    rule_scale,
    rule_uses_weights,
    stall_warning,
    step_lr,
)
from server.aggregation import make_rule

CFG = ExperimentConfig(dataset="synthetic", epochs=3, clients_per_round=4, lr=0.5, eval_every=2)


def test_mean_scale_rules_step_k_times_their_output_unless_literal():
    # Prepare: four updates; the mean-scale rule's output is their mean
    U = torch.tensor([[1.0, 0.0], [3.0, 2.0], [1.0, 2.0], [3.0, 0.0]])
    w = torch.ones(4)
    params = torch.zeros(2)
    mean, total = make_rule("fedavg", {"reduce": "mean", "weighted": "false"}), make_rule("fedavg")
    # Execute
    scaled = aggregate_round(Aggregation(mean), params, U, w, [0, 1, 2, 3], lr=0.5, round_id=0)
    literal = aggregate_round(Aggregation(mean, literal_step=True), params, U, w, [0, 1, 2, 3], lr=0.5, round_id=0)
    summed = aggregate_round(Aggregation(total), params, U, w, [0, 1, 2, 3], lr=0.5, round_id=0)
    # Assert: mean [2, 1] stepped with lr 0.5 x 4; literally with 0.5; the sum [8, 4] with 0.5
    assert scaled.params.tolist() == [-4.0, -2.0] == summed.params.tolist()
    assert literal.params.tolist() == [-1.0, -0.5]
    assert (scaled.lr_step, literal.lr_step, summed.lr_step) == (2.0, 0.5, 0.5)
    assert scaled.info["scale"] == "mean" and summed.info["scale"] == "sum"


def test_every_rule_declares_its_scale():
    opts = {"norm-clip": {"bound": "1"}}
    scales = {n: rule_scale(make_rule(n, opts.get(n, {}))) for n in
              ("fedavg", "none", "rfa", "mixed-rfa", "median", "trimmed-mean", "krum", "norm-clip", "foolsgold",
               "fltrust")}
    assert scales == {"fedavg": "sum", "none": "sum", "rfa": "mean", "mixed-rfa": "mean", "median": "mean",
                      "trimmed-mean": "mean", "krum": "mean", "norm-clip": "sum", "foolsgold": "mean",
                      "fltrust": "mean"}
    assert rule_scale(make_rule("norm-clip", {"bound": "1", "inner": "rfa"})) == "mean"
    assert step_lr(make_rule("rfa"), 0.01, 64) == pytest.approx(0.64) and step_lr(make_rule("rfa"), 0.01, 64, True) == 0.01


def test_updates_beyond_the_sanity_bound_are_refused_before_the_rule():
    # Prepare: finite float32 updates of 3e38 (one alone would make the next step overflow), a NaN one,
    # and an honest one
    big = torch.full((2,), 3e38)
    U = torch.stack([big, big, torch.tensor([float("nan"), 0.0]), torch.tensor([1.0, 1.0])])
    # Execute
    out = aggregate_round(Aggregation(make_rule("fedavg")), torch.zeros(2), U, torch.ones(4), [5, 7, 8, 9], lr=1.0,
                          round_id=3)
    # Assert: the absurd ones never reach the rule; the honest one is the step
    assert out.out_of_bounds == (5, 7, 8) and out.overflow == () and out.users == (9,)
    assert torch.equal(out.params, torch.tensor([-1.0, -1.0]))
    assert set(out.refused) == {5, 7, 8} and all(r.startswith("out-of-bounds: ") for r in out.refused.values())


def test_only_the_named_rows_are_checked_against_the_bound():
    U = torch.stack([torch.full((2,), 1e6), torch.full((2,), 2e6)])
    assert out_of_bounds(U) == [0, 1]
    assert out_of_bounds(U, rows=[1]) == [1]
    assert out_of_bounds(U, rows=()) == []
    assert out_of_bounds(torch.full((3, 2), UPDATE_BOUND)) == []  # the bound itself is allowed


def test_a_step_that_would_explode_the_model_is_refused_largest_norm_first_and_rerun():
    # Prepare: updates within the sanity bound whose sum steps the weights past WEIGHT_BOUND
    big = torch.full((2,), 6e4)
    U = torch.stack([big, big * 0.9, torch.tensor([1.0, 1.0])])
    # Execute
    out = aggregate_round(Aggregation(make_rule("fedavg")), torch.zeros(2), U, torch.ones(3), [5, 7, 9], lr=1.0, round_id=3)
    # Assert: the largest goes first, then the next, then the step is sane
    assert out.overflow == (5, 7) and out.users == (9,)
    assert model_sane(out.params) and torch.equal(out.params, torch.tensor([-1.0, -1.0]))
    assert out.refused[5].startswith("non-finite: ")
    assert not model_sane(torch.tensor([WEIGHT_BOUND * 1.01])) and not model_sane(torch.tensor([float("inf")]))


def test_the_rule_gets_the_rounds_context_and_the_root_only_when_it_declares_needs_root():
    # Prepare: a rule that records its contexts; a root source that counts its calls
    from dataclasses import dataclass
    from typing import ClassVar

    from fedseq.engine import AggregationResult, AggregationRule, RoundContext
    from fedseq.params import Layout

    seen: list[RoundContext] = []

    @dataclass(frozen=True)
    class Recorder(AggregationRule):
        needs: bool = False
        name: str = "recorder"
        scale: ClassVar[str] = "sum"

        @property
        def needs_root(self) -> bool:
            return self.needs

        def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult:
            seen.append(ctx)
            return AggregationResult(updates.sum(dim=0))

    calls: list[int] = []

    def root(params: torch.Tensor, round_id: int) -> torch.Tensor:
        calls.append(round_id)
        return params + 1.0

    big = torch.full((2,), 6e4)
    U = torch.stack([big, torch.tensor([1.0, 2.0])])  # the first overflows: the rule runs twice
    layout = Layout(("w",), ((2,),))
    params = torch.zeros(2)
    # Execute
    plain = aggregate_round(Aggregation(Recorder(), root, layout), params, U, torch.tensor([3.0, 4.0]), [5, 6], 1.0, 9)
    n_plain = len(seen)
    rooted = aggregate_round(Aggregation(Recorder(needs=True), root, layout), params, U, torch.tensor([3.0, 4.0]),
                             [5, 6], 1.0, 9)
    # Assert: round id, layout, weights (the refused row's removed) and params reach the rule; the root
    # is computed once per round and only for the rule that declares it needs one
    assert plain.overflow == (5,) == rooted.overflow and n_plain == 2 and len(seen) == 4
    assert all(c.round_id == 9 and c.layout is layout and c.params is params for c in seen)
    assert [c.weights.tolist() for c in seen] == [[3.0, 4.0], [4.0]] * 2
    assert [c.root for c in seen[:2]] == [None, None] and calls == [9]
    assert all(c.root is not None and torch.equal(c.root, torch.ones(2)) for c in seen[2:])
    with pytest.raises(ValueError, match="needs a root update"):  # refused when the run's aggregation is made
        Aggregation(Recorder(needs=True), layout=layout)


def test_the_plan_has_every_client_once_per_epoch_and_adversarial_rounds_after_each():
    clients = np.arange(10)
    plain = plan_run(CFG, clients, num_benign=8)
    adv = plan_run(replace(CFG, adv_train=True, adv_train_opts=(("users_per_round", "2"),)), clients, num_benign=8)
    assert [r.round_id for r in plain] == list(range(9))  # 3 rounds (4, 4, 2) x 3 epochs
    for e in range(3):
        assert sorted(np.concatenate([r.users for r in plain if r.epoch == e]).tolist()) == list(range(10))
    assert len(adv) == 18 and all(r.adversarial == (i % 2 == 1) for i, r in enumerate(adv))
    assert all(len(r.users) <= 2 and (r.users < 8).all() for r in adv if r.adversarial)
    assert [r.lr for r in plain][:1] == [0.5]
    assert [eval_due(CFG, e) for e in range(3)] == [False, True, True]  # every 2 epochs and the last


def test_malicious_kept_counts_by_one_rule():
    assert malicious_kept([1, 8, 9], None, {8, 9}) == (2, 2)  # no selection: every aggregated one is kept
    assert malicious_kept([1, 8, 9], [1, 9], {8, 9}) == (2, 1)
    assert malicious_kept([1, 8, 9], [], {8, 9}) == (2, 0)  # an empty selection is not "all"


def test_a_flat_run_warns_and_names_the_literal_step():
    literal = replace(CFG, compat=Compat(literal_step=True), lr=0.001)
    assert stall_warning(literal, "mixed-rfa", "mean", [0.10, 0.10], 64) is None  # too early
    assert stall_warning(literal, "mixed-rfa", "mean", [0.10, 0.20, 0.30], 64) is None  # it trains
    w = stall_warning(literal, "mixed-rfa", "mean", [0.100, 0.101, 0.102], 64)
    assert w is not None and "literal_step" in w and "0.064" in w
    w2 = stall_warning(CFG, "fedavg", "sum", [0.1, 0.1, 0.1], 64)
    assert w2 is not None and "--lr 0.5 is too small" in w2


def test_every_rule_says_whether_it_reads_the_sample_weights():
    from server.aggregation import make_rule

    reads = {name: rule_uses_weights(make_rule(name)) for name in
             ("fedavg", "none", "mean", "rfa", "mixed-rfa", "median", "trimmed-mean", "krum", "bulyan", "dnc")}
    assert reads == {"fedavg": False, "none": False, "mean": False, "rfa": True, "mixed-rfa": True, "median": False,
                     "trimmed-mean": False, "krum": False, "bulyan": False, "dnc": False}
    assert rule_uses_weights(make_rule("fedavg", {"reduce": "mean"}))  # the weighted mean
    # every registered rule says it itself (none falls back to the base's conservative default)
    from server.aggregation import RULES, AggregationRule

    needs = {"norm-clip": {"bound": "1.0"}, "dp-fixed": {"clip": "1.0", "noise": "1.0"}, "dp-adaptive": {"noise": "1.0"}}
    for name in RULES:
        rule = make_rule(name, needs.get(name, {}))
        assert isinstance(rule, AggregationRule), name
        assert type(rule).uses_weights is not AggregationRule.uses_weights, name
        assert type(rule).scale is not AggregationRule.scale, name
    assert not rule_uses_weights(make_rule("foolsgold")) and not rule_uses_weights(make_rule("fltrust"))
    assert rule_uses_weights(make_rule("norm-clip", {"inner": "rfa", "bound": "1.0"}))
    assert not rule_uses_weights(make_rule("sparse", {"inner": "median"}))
    out = aggregate_round(Aggregation(make_rule("median")), torch.zeros(2), torch.ones(3, 2), torch.ones(3), [1, 2, 3], 0.1, 0)
    assert out.info["uses_weights"] is False
