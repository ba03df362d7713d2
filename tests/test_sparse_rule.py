"""Item-wise sparse aggregation (server/aggregation/sparse.py, rule ``sparse``): exact outputs on tiny
hand rounds, the batched paths against the per-row reference, the spec syntax, the layout in the
round's context and option errors. Prepare / Execute / Assert."""

from __future__ import annotations

import pytest
import torch

from fedseq.engine import Aggregation, aggregate_round, step_lr
from fedseq.params import Layout
from server.aggregation import (
    ItemRows,
    MissingLayout,
    RoundContext,
    RuleConfigError,
    make_rule,
    parse_rule_spec,
)
from server.aggregation.sparse import touched_rows

# a 4-row x 2-wide item table first, then 3 shared weights: D = 11
LAYOUT = Layout(("item_emb.weight", "w"), ((4, 2), (3,)))
HAND = torch.tensor([
    [1.0, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0],
    [3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0],
    [5.0, 6.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 9.0, 9.0],
])


def sparse(spec: str, **opts: str):
    return make_rule(spec, opts)


def ctx(weights: torch.Tensor, layout: Layout = LAYOUT, **kw) -> RoundContext:
    """A round's context with the parameter layout the sparse rule reads."""
    return RoundContext(weights, layout=layout, **kw)


def sparse_round(k: int, rows: int, width: int, shared: int, seed: int, p: float = 0.3) -> torch.Tensor:
    """Random updates where each item row of each update is touched with probability ``p``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(k, rows * width + shared, generator=g)
    mask = torch.rand(k, rows, generator=g) < p
    u[:, : rows * width] *= mask.repeat_interleave(width, dim=1)
    return u


def test_hand_round_median_per_touched_row_times_touches() -> None:
    # Prepare: row 0 touched by all 3, row 1 by update 2, row 2 by update 0, row 3 by nobody
    rule = sparse("sparse:median")
    # Execute
    res = rule(HAND, ctx(torch.ones(3)))
    # Assert: row 0 = 3 * median((1,1),(3,3),(5,6)); rows 1, 2 = their single toucher's row;
    # row 3 stays zero; shared = 3 * median((1,2,3),(2,2,2),(9,9,9)) = 3 * (2,2,3)
    assert torch.equal(res.vector, torch.tensor([9.0, 9.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 6.0, 6.0, 9.0]))
    assert res.info["rows_touched"] == 3 and res.info["touches"] == 5 and res.info["max_touches"] == 3
    assert rule.scale == "sum"


def test_dense_median_loses_rarely_touched_rows_and_sparse_keeps_them() -> None:
    # Prepare: item row 1 touched by only 1 of 3 updates
    dense = make_rule("median")
    # Execute
    d = dense(HAND, RoundContext(torch.ones(3))).vector
    s = sparse("sparse:median")(HAND, ctx(torch.ones(3))).vector
    # Assert: the dense median zeroes it (the failure sparse aggregation fixes)
    assert torch.equal(d[2:4], torch.zeros(2)) and torch.equal(s[2:4], torch.tensor([1.0, 0.0]))


def test_an_honest_majority_of_a_rows_touchers_wins_the_row() -> None:
    # Prepare: row 0 touched by 3 honest (about 1) and 2 attackers (100); 5 updates
    u = torch.zeros(5, 11)
    u[:3, 0:2] = torch.tensor([[1.0, 1.0], [1.1, 0.9], [0.9, 1.1]])
    u[3:, 0:2] = 100.0
    u[:, 8:] = 1.0
    # Execute
    res = sparse("sparse:median")(u, ctx(torch.ones(5)))
    # Assert: per coordinate the median of the 5 touchers is the largest honest value 1.1 (x 5 touches)
    assert torch.allclose(res.vector[0:2], torch.tensor([5.5, 5.5]))


def test_attackers_outnumbering_a_rows_touchers_own_the_row() -> None:
    # Prepare: the attack surface (Spattack): row 2 touched by 1 honest update and 2 attackers
    u = torch.zeros(6, 11)
    u[:, 0:2] = 1.0  # a popular row: all 6 touch it
    u[0, 4:6] = torch.tensor([1.0, 1.0])
    u[4:, 4:6] = -50.0
    u[:, 8:] = 1.0
    # Execute
    res = sparse("sparse:median")(u, ctx(torch.ones(6)))
    # Assert: the popular row is honest, the rare row the attackers'
    assert torch.equal(res.vector[0:2], torch.tensor([6.0, 6.0]))
    assert torch.equal(res.vector[4:6], torch.tensor([-150.0, -150.0]))


def test_sparse_fedavg_is_exactly_the_plain_sum() -> None:
    # Prepare
    u = sparse_round(9, 4, 2, 3, seed=3)
    # Execute
    res = sparse("sparse:fedavg")(u, ctx(torch.ones(9)))
    mean = sparse("sparse:mean")(u, ctx(torch.ones(9)))
    # Assert: the sum bit for bit; the mean inner rule (mean scale, x touches) up to rounding
    assert torch.equal(res.vector, u.sum(dim=0))
    assert torch.allclose(mean.vector, u.sum(dim=0), atol=1e-5)


@pytest.mark.parametrize("spec,opts,exact", [
    ("sparse:median", {}, True),
    ("sparse:trimmed-mean", {"inner.beta": "0.2"}, False),
    ("sparse:krum", {}, False),
    ("sparse:krum", {"inner.m": "2", "inner.f": "1"}, False),
    ("sparse:rfa", {}, False),
    ("sparse:fedavg", {"inner.reduce": "mean"}, False),
    ("sparse:fedavg", {"inner.reduce": "mean", "inner.weighted": "false"}, False),
])
def test_vectorised_rows_equal_the_per_row_reference(spec: str, opts: dict[str, str], exact: bool) -> None:
    # Prepare: touch counts 0..12 over 30 rows
    layout = Layout(("item_emb.weight", "w"), ((30, 5), (7,)))
    u = sparse_round(12, 30, 5, 7, seed=11, p=0.45)
    w = torch.arange(1.0, 13.0)
    # Execute
    fast = sparse(spec, **opts, vectorised="true")(u, ctx(w, layout))
    slow = sparse(spec, **opts, vectorised="false")(u, ctx(w, layout))
    # Assert
    assert fast.info["vectorised"] and not slow.info["vectorised"]
    if exact:
        assert torch.equal(fast.vector, slow.vector)
    else:
        assert torch.allclose(fast.vector, slow.vector, rtol=1e-5, atol=1e-5)


def test_untouched_rows_stay_zero_and_touch_mask_ignores_signed_zero() -> None:
    # Prepare: -0.0 is not a touch
    u = torch.zeros(2, 11)
    u[0, 2] = -0.0
    u[1, 0] = 1.0
    # Execute
    mask = touched_rows(u, ItemRows.of(LAYOUT))
    res = sparse("sparse:trimmed-mean")(u, ctx(torch.ones(2)))
    # Assert
    assert mask.tolist() == [[False, False, False, False], [True, False, False, False]]
    assert torch.equal(res.vector[2:8], torch.zeros(6))


def test_inner_fltrust_gets_the_roots_row_and_dense_part() -> None:
    # Prepare: the root agrees with update 0 on row 0 and on the shared part
    u = torch.zeros(2, 11)
    u[0, 0:2] = torch.tensor([1.0, 0.0])
    u[1, 0:2] = torch.tensor([-1.0, 0.0])
    u[0, 8:] = torch.tensor([1.0, 0.0, 0.0])
    u[1, 8:] = torch.tensor([-1.0, 0.0, 0.0])
    root = torch.zeros(11)
    root[0], root[8] = 2.0, 2.0
    # Execute
    res = sparse("sparse:fltrust")(u, ctx(torch.ones(2), root=root))
    # Assert: FLTrust keeps update 0 rescaled to the root's norm 2, times the touches / K = 2
    assert torch.allclose(res.vector[0:2], torch.tensor([4.0, 0.0]))
    assert torch.allclose(res.vector[8:], torch.tensor([4.0, 0.0, 0.0]))


def test_engine_passes_the_layout_and_steps_with_lr_as_is() -> None:
    # Prepare
    rule = make_rule("sparse:median")
    params = torch.zeros(11)
    # Execute
    out = aggregate_round(Aggregation(rule, layout=LAYOUT), params, HAND, torch.ones(3), [0, 1, 2], lr=0.5, round_id=0)
    # Assert: scale sum, so the step is lr * aggregate
    assert rule.needs_layout and step_lr(rule, 0.5, 3) == 0.5
    assert torch.equal(out.params, -0.5 * sparse("sparse:median")(HAND, ctx(torch.ones(3))).vector)


def test_engine_refuses_a_layout_rule_without_a_layout() -> None:
    with pytest.raises(ValueError, match="needs the parameter layout"):  # when the run's aggregation is made
        Aggregation(make_rule("sparse"))


def test_a_context_without_a_layout_is_refused() -> None:
    with pytest.raises(MissingLayout, match="needs the model's parameter layout"):
        make_rule("sparse")(HAND, RoundContext(torch.ones(3)))


def test_layout_without_the_table_is_a_config_error() -> None:
    with pytest.raises(RuleConfigError, match="item table 'item_emb.weight'"):
        make_rule("sparse")(HAND, ctx(torch.ones(3), Layout(("w",), ((11,),))))


def test_a_seeded_inner_rule_draws_from_the_contexts_round() -> None:
    # Prepare: FLAME's noise on the dense part and every touched row comes from (seed, round id)
    rule = sparse("sparse:flame", **{"inner.noise": "0.5"})
    u = sparse_round(6, 4, 2, 3, seed=8, p=0.7)
    # Execute
    a, a2, b = (rule(u, ctx(torch.ones(6), round_id=r)).vector for r in (2, 2, 3))
    # Assert
    assert torch.equal(a, a2) and not torch.equal(a, b)


@pytest.mark.parametrize("spec,opts,expected", [
    ("sparse", {}, ("sparse", {})),
    ("sparse:median", {}, ("sparse", {"inner": "median"})),
    ("sparse:trimmed-mean,inner.beta=0.2", {}, ("sparse", {"inner": "trimmed-mean", "inner.beta": "0.2"})),
    ("sparse:inner=krum", {"inner.m": "3"}, ("sparse", {"inner": "krum", "inner.m": "3"})),
    ("trimmed-mean:beta=0.2", {}, ("trimmed-mean", {"beta": "0.2"})),
    ("norm-clip:median,bound=2", {}, ("norm-clip", {"inner": "median", "bound": "2"})),
])
def test_rule_spec_syntax(spec: str, opts: dict[str, str], expected: tuple[str, dict[str, str]]) -> None:
    assert parse_rule_spec(spec, opts) == expected


def test_default_inner_is_median_and_spec_builds_the_inner_rule() -> None:
    # Execute
    a, b = make_rule("sparse"), make_rule("sparse:trimmed-mean", {"inner.beta": "0.25"})
    # Assert
    assert a.inner == "median" and b.inner == "trimmed-mean" and b.inner_rule.beta == 0.25  # type: ignore[attr-defined]


@pytest.mark.parametrize("spec,opts,pattern", [
    ("sparse:sparse", {}, r"rule 'sparse' option inner='sparse' is invalid"),
    ("sparse:bogus", {}, r"unknown aggregation rule 'bogus'"),
    ("sparse:krum", {"inner.beta": "0.1"}, r"rule 'krum' has no option 'beta'"),
    ("sparse", {"bogus": "1"}, r"rule 'sparse' has no option 'bogus'"),
    ("sparse", {"vectorised": "maybe"}, r"'vectorised'='maybe' is not a valid bool"),
    ("sparse", {"table": " "}, r"option table=' ' is invalid"),
    ("median:beta", {}, r"option 'beta' must look like key=value"),
    ("sparse:median", {"inner": "krum"}, r"sets inner='median' and the options set inner='krum'"),
])
def test_bad_sparse_options_are_config_errors(spec: str, opts: dict[str, str], pattern: str) -> None:
    with pytest.raises(RuleConfigError, match=pattern):
        make_rule(spec, opts)


def test_wrappers_report_the_inner_rules_root_users() -> None:
    # the runners' root source reads rule.root_users (fedseq/root.py): a wrapper must pass it on
    assert make_rule("sparse:fltrust", {"inner.root_users": "4"}).root_users == 4
    assert make_rule("norm-clip:fltrust,bound=1,inner.root_users=3").root_users == 3
    assert make_rule("sparse:fltrust").needs_root and not make_rule("sparse:median").needs_root


def test_rows_processed_in_small_blocks_give_the_same_aggregate(monkeypatch) -> None:
    # Prepare: a round with many rows per touch count; blocks of one row each vs one block
    import server.aggregation.sparse as sp

    layout = Layout(("item_emb.weight", "w"), ((40, 3), (5,)))
    u = sparse_round(10, 40, 3, 5, seed=21, p=0.5)
    whole = sparse("sparse:median")(u, ctx(torch.ones(10), layout)).vector
    # Execute
    monkeypatch.setattr(sp, "GROUP_CHUNK_BYTES", 1)
    pieces = sparse("sparse:median")(u, ctx(torch.ones(10), layout)).vector
    # Assert
    assert torch.equal(whole, pieces)


def test_touched_mask_torch_path_equals_numpy_path() -> None:
    # a tensor that requires grad takes the torch path (base.use_numpy_path)
    u = sparse_round(6, 4, 2, 3, seed=5)
    rows = ItemRows.of(LAYOUT)
    assert torch.equal(touched_rows(u, rows), touched_rows(u.clone().requires_grad_(True), rows))
