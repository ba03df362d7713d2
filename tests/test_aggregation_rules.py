"""Tests for the robust aggregation rules in server.aggregation: exact outputs on tiny hand-made
rounds, reference agreement (NumPy, plain-Python transcriptions of the papers' code), robustness
properties, option validation and the registry.

Every test is Prepare / Execute / Assert.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedseq.params import Layout
from server.aggregation import (
    RULES,
    FLTrust,
    Krum,
    MissingRootUpdate,
    RoundContext,
    RuleConfigError,
    clip_norms,
    coordinate_median,
    fedavg,
    fltrust,
    foolsgold,
    foolsgold_weights,
    geometric_median,
    krum_scores,
    make_rule,
    mixed_rfa,
    multi_krum,
    trimmed_mean,
)
from server.aggregation.base import column_mean64, row_distances, sorted_column_reduce
from server.aggregation.trimmed_mean import trimmed_count

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F64 = torch.float64


def t64(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def ones(k: int) -> torch.Tensor:
    return torch.ones(k)


def random_round(k: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g), torch.randint(1, 50, (k,), generator=g).float()


# ------------------------------------------------------------------------------------ registry


def test_registry_contains_every_rule() -> None:
    # Prepare
    expected = {
        "fedavg", "none", "rfa", "mixed-rfa", "median", "trimmed-mean",
        "krum", "norm-clip", "foolsgold", "fltrust", "sparse", "bulyan", "flame", "dnc", "dp-fixed", "dp-adaptive",
    }  # fmt: skip
    # Execute
    names = set(RULES)
    # Assert
    assert expected <= names


def test_unknown_rule_is_a_config_error_listing_known_rules() -> None:
    # Execute / Assert
    with pytest.raises(RuleConfigError, match=r"unknown aggregation rule 'bogus'.*mixed-rfa"):
        make_rule("bogus")


@pytest.mark.parametrize(
    "name", ["rfa", "mixed-rfa", "median", "trimmed-mean", "krum", "foolsgold", "fltrust"]
)
def test_unknown_option_names_rule_and_option(name: str) -> None:
    # Execute / Assert
    with pytest.raises(RuleConfigError, match=rf"rule '{name}' has no option 'nope'"):
        make_rule(name, {"nope": "1"})


@pytest.mark.parametrize(
    ("name", "options", "pattern"),
    [
        ("rfa", {"maxiter": "abc"}, r"rule 'rfa' option 'maxiter'='abc' is not a valid int"),
        ("rfa", {"maxiter": "-1"}, r"rule 'rfa' option maxiter=-1 is invalid; allowed: an integer >= 0"),
        ("rfa", {"eps": "0"}, r"rule 'rfa' option eps=0.0 is invalid; allowed: a finite float > 0"),
        ("rfa", {"ftol": "-1e-3"}, r"rule 'rfa' option ftol=-0.001 is invalid"),
        ("rfa", {"weighted": "maybe"}, r"not a valid bool"),
        ("mixed-rfa", {"lambda": "1.5"}, r"'mixed-rfa' option lambda=1.5 is invalid; allowed: .*\[0, 1\]"),
        ("mixed-rfa", {"lambda": "nan"}, r"option lambda=nan"),
        ("mixed-rfa", {"eps": "-1"}, r"rule 'mixed-rfa' option eps=-1.0"),
        ("trimmed-mean", {"beta": "0.5"}, r"'trimmed-mean' option beta=0.5 is invalid; allowed: .*\[0, 0.5"),
        ("trimmed-mean", {"beta": "-0.1"}, r"option beta=-0.1"),
        ("krum", {"f": "-1"}, r"rule 'krum' option f=-1 is invalid; allowed: an integer >= 0 or 'auto'"),
        ("krum", {"f": "two"}, r"rule 'krum' option f='two' is invalid"),
        ("krum", {"m": "0"}, r"rule 'krum' option m=0 is invalid; allowed: an integer >= 1"),
        ("foolsgold", {"kappa": "0"}, r"rule 'foolsgold' option kappa=0.0 is invalid"),
        ("foolsgold", {"reduce": "max"}, r"'foolsgold' option reduce='max' is invalid; allowed: 'sum' or"),
        ("fltrust", {"root_users": "0"}, r"rule 'fltrust' option root_users=0 is invalid"),
        ("norm-clip", {}, r"rule 'norm-clip' needs option bound"),
        ("norm-clip", {"bound": "0"}, r"rule 'norm-clip' option bound=0.0 is invalid; allowed: a float > 0"),
        ("norm-clip", {"bound": "1", "inner": "bogus"}, r"unknown aggregation rule 'bogus'"),
        ("norm-clip", {"bound": "1", "inner": "norm-clip"}, r"option inner='norm-clip' is invalid"),
        ("norm-clip", {"bound": "1", "inner": "krum", "inner.beta": "0"}, r"'krum' has no option 'beta'"),
        ("none", {"reduce": "mean"}, r"rule 'none' has no option 'reduce'"),
        ("median", {"beta": "0.1"}, r"rule 'median' has no option 'beta'"),
    ],
)
def test_bad_option_values_are_config_errors(name: str, options: dict[str, str], pattern: str) -> None:
    # Execute / Assert
    with pytest.raises(RuleConfigError, match=pattern):
        make_rule(name, options)


def test_every_rule_returns_a_d_vector_and_json_info() -> None:
    # Prepare
    updates, weights = random_round(9, 40, seed=1)
    options = {"norm-clip": {"bound": "2.0"}, "dp-fixed": {"clip": "2.0", "noise": "0.5"},
               "dp-adaptive": {"noise": "0.5", "count_std": "1.0"}}
    layout = Layout(("item_emb.weight", "w"), ((5, 4), (20,)))  # for the rules that need one (sparse)
    # Execute
    results = {}
    ctx = RoundContext(weights, round_id=7, layout=layout, root=updates[0])
    for name in RULES:
        results[name] = make_rule(name, options.get(name, {}))(updates, ctx)
    # Assert
    for name, res in results.items():
        assert res.vector.shape == (40,), name
        assert res.vector.dtype == torch.float32, name
        assert bool(torch.isfinite(res.vector).all()), name
        json.dumps(dict(res.info))
        assert res.kept is None or all(0 <= i < 9 for i in res.kept), name


def test_none_is_the_plain_sum() -> None:
    # Prepare
    updates = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    # Execute
    res = make_rule("none")(updates, RoundContext(torch.tensor([1.0, 5.0, 9.0])))
    # Assert
    assert torch.equal(res.vector, torch.tensor([4.5, 1.5]))
    assert res.kept is None


# ------------------------------------------------------------------------------------ rfa


def reference_geometric_median(points, alphas, maxiter=4, eps=1e-5, ftol=1e-6):  # type: ignore[no-untyped-def]
    """Plain-Python transcription of the RFA reference algorithm (one point at a time)."""

    def dist(a, b):  # type: ignore[no-untyped-def]
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))

    def wavg(ws):  # type: ignore[no-untyped-def]
        return [sum(w * p[j] for w, p in zip(ws, points, strict=True)) for j in range(len(points[0]))]

    total = sum(alphas)
    alphas = [a / total for a in alphas]
    median = wavg(alphas)
    obj = sum(a * dist(median, p) for a, p in zip(alphas, points, strict=True))
    iterations = 0
    for _ in range(maxiter):
        prev = obj
        betas = [a / max(eps, dist(median, p)) for a, p in zip(alphas, points, strict=True)]
        betas = [b / sum(betas) for b in betas]
        median = wavg(betas)
        iterations += 1
        obj = sum(a * dist(median, p) for a, p in zip(alphas, points, strict=True))
        if abs(prev - obj) <= ftol * obj:
            break
    return median, iterations, obj


def test_rfa_matches_reference_weiszfeld_exactly() -> None:
    # Prepare
    points = [[0.0, 0.0], [1.0, 0.0], [4.0, 3.0], [-2.0, 5.0], [10.0, -7.0]]
    counts = [3.0, 1.0, 2.0, 5.0, 1.0]
    ref, ref_iters, ref_obj = reference_geometric_median(points, counts)
    # Execute
    res = make_rule("rfa")(t64(points), RoundContext(torch.tensor(counts)))
    # Assert
    torch.testing.assert_close(res.vector, t64([ref])[0], rtol=0, atol=1e-12)
    assert res.info["iterations"] == ref_iters
    assert res.info["objective"] == pytest.approx(ref_obj, rel=1e-12)


def test_rfa_one_iteration_by_hand() -> None:
    # Prepare: 1-D points 0, 1, 4 with sample counts 1, 2, 1 -> alpha = 1/4, 1/2, 1/4
    points = t64([[0.0], [1.0], [4.0]])
    weights = torch.tensor([1.0, 2.0, 1.0])
    v0 = 0.25 * 0 + 0.5 * 1 + 0.25 * 4  # 1.5
    b = [0.25 / 1.5, 0.5 / 0.5, 0.25 / 2.5]
    v1 = (b[1] * 1 + b[2] * 4) / sum(b)  # 1.4 / (19 / 15)
    obj1 = 0.25 * abs(v1) + 0.5 * abs(v1 - 1) + 0.25 * abs(v1 - 4)
    # Execute
    gm = geometric_median(points, weights, maxiter=1)
    gm0 = geometric_median(points, weights, maxiter=0)
    # Assert
    assert float(gm0.vector[0]) == pytest.approx(v0, abs=1e-15)
    assert gm0.iterations == 0
    assert float(gm.vector[0]) == pytest.approx(v1, abs=1e-14)
    assert gm.iterations == 1
    assert gm.objective == pytest.approx(obj1, rel=1e-14)
    assert gm.converged is False


def test_gm_of_collinear_points_is_their_median() -> None:
    # Prepare: on a line in 3-D; the 1-D median of 0, 1, 2, 3, 10 is 2
    direction = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    points = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0], dtype=F64)[:, None] * direction
    # Execute
    gm = geometric_median(points, ones(5), maxiter=200, ftol=0.0, eps=1e-12)
    # Assert
    torch.testing.assert_close(gm.vector, 2.0 * direction, rtol=0, atol=1e-9)
    assert gm.converged


def test_gm_of_symmetric_points_is_the_centre() -> None:
    # Prepare: square corners around (1, 2) plus a point at the centre
    points = t64([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [2.0, 3.0], [1.0, 2.0]])
    # Execute
    gm = geometric_median(points, ones(5), maxiter=50)
    # Assert
    torch.testing.assert_close(gm.vector, t64([[1.0, 2.0]])[0], rtol=0, atol=1e-12)


def test_gm_breakdown_minority_moving_far_away_changes_nothing() -> None:
    # Prepare: 11 honest points, 4 outliers along one ray at distance 1e3, then 1e6
    g = torch.Generator().manual_seed(3)
    honest = torch.randn(11, 6, generator=g, dtype=F64)
    ray = torch.ones(6, dtype=F64) / math.sqrt(6)
    near = torch.cat([honest, 1e3 * ray.repeat(4, 1)])
    far = torch.cat([honest, 1e6 * ray.repeat(4, 1)])
    # Execute
    gm_near = geometric_median(near, ones(15), maxiter=500, ftol=0.0).vector
    gm_far = geometric_median(far, ones(15), maxiter=500, ftol=0.0).vector
    # Assert: GM stays with the honest points (moving the outliers 1000x further shifts it by
    # about |GM| / 1e3, the change of their direction seen from it); the mean is dragged away
    torch.testing.assert_close(gm_far, gm_near, rtol=0, atol=2e-3)
    assert float(gm_far.norm()) < 3.0
    assert float(far.mean(dim=0).norm()) > 2e5


def test_rfa_zero_weight_points_are_ignored_and_weighted_false_is_uniform() -> None:
    # Prepare
    points = t64([[0.0], [1.0], [2.0], [100.0]])
    # Execute
    weighted = geometric_median(points, torch.tensor([1.0, 1.0, 1.0, 0.0]), maxiter=100, ftol=0)
    uniform = geometric_median(points, torch.tensor([1.0, 1.0, 1.0, 0.0]), maxiter=0, weighted=False)
    # Assert
    assert float(weighted.vector[0]) == pytest.approx(1.0, abs=1e-9)
    assert float(uniform.vector[0]) == pytest.approx(103.0 / 4, abs=1e-12)


def test_rfa_all_zero_weights_is_an_error() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="sum to zero"):
        make_rule("rfa")(torch.ones(2, 3), RoundContext(torch.zeros(2)))


def test_rfa_identical_points_converge_immediately() -> None:
    # Prepare
    updates = torch.tensor([[1.0, -2.0]]).repeat(4, 1)
    # Execute
    res = make_rule("rfa")(updates, RoundContext(ones(4)))
    # Assert
    assert torch.equal(res.vector, torch.tensor([1.0, -2.0]))
    assert res.info["iterations"] == 1 and res.info["converged"] is True
    assert res.info["objective"] == 0.0


def test_rfa_float32_round_matches_float64_reference() -> None:
    # Prepare: ftol=0 fixes the iteration count (with float32 data the objective's resolution,
    # ~1e-7 relative, is close to ftol=1e-6, so the stopping iteration may differ by one)
    updates, weights = random_round(16, 300, seed=4)
    ref = geometric_median(updates.to(F64), weights, ftol=0.0).vector
    # Execute
    res = make_rule("rfa", {"ftol": "0"})(updates, RoundContext(weights))
    # Assert
    assert res.info["iterations"] == 4
    torch.testing.assert_close(res.vector.to(F64), ref, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ mixed-rfa


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_mixed_rfa_equals_its_formula(lam: float) -> None:
    # Prepare
    updates, weights = random_round(12, 50, seed=5)
    updates = updates.to(F64)
    gm = geometric_median(updates, weights).vector
    expected = lam * updates.sum(dim=0) / 12 + (1 - lam) * gm
    # Execute
    res = make_rule("mixed-rfa", {"lambda": str(lam)})(updates, RoundContext(weights))
    # Assert
    torch.testing.assert_close(res.vector, expected, rtol=0, atol=1e-12)
    assert res.info["lambda"] == lam
    assert res.info["iterations"] >= 1


def test_mixed_rfa_default_is_paper_lambda_and_mean_weighted_uses_counts() -> None:
    # Prepare
    updates = t64([[0.0], [1.0], [4.0]])
    weights = torch.tensor([1.0, 1.0, 2.0])
    gm = geometric_median(updates, weights).vector
    # Execute
    default = make_rule("mixed-rfa")(updates, RoundContext(weights))
    weighted, _ = mixed_rfa(updates, weights, lam=0.5, mean_weighted=True)
    # Assert
    torch.testing.assert_close(default.vector, 0.3 * (5.0 / 3) + 0.7 * gm, rtol=0, atol=1e-12)
    torch.testing.assert_close(weighted, 0.5 * 2.25 + 0.5 * gm, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ median / trimmed mean


def test_median_odd_and_even_k_by_hand() -> None:
    # Prepare
    odd = torch.tensor([[1.0, 10.0], [5.0, -2.0], [3.0, 7.0]])
    even = torch.tensor([[1.0, 10.0], [5.0, -2.0], [3.0, 7.0], [100.0, 0.0]])
    # Execute
    med_odd = make_rule("median")(odd, RoundContext(ones(3))).vector
    med_even = make_rule("median")(even, RoundContext(ones(4))).vector
    # Assert
    assert torch.equal(med_odd, torch.tensor([3.0, 7.0]))
    assert torch.equal(med_even, torch.tensor([4.0, 3.5]))  # mean of the two middle values


def test_trimmed_mean_by_hand() -> None:
    # Prepare: K = 5, beta = 0.2 -> one value trimmed per side
    updates = torch.tensor([[1.0, -50.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]])
    # Execute
    res = make_rule("trimmed-mean", {"beta": "0.2"})(updates, RoundContext(ones(5)))
    # Assert
    assert torch.equal(res.vector, torch.tensor([3.0, 1.0]))
    assert res.info["trimmed_per_side"] == 1 and res.info["kept_per_coordinate"] == 3


def test_trimmed_count_is_floor_of_beta_k() -> None:
    # Execute / Assert
    assert [trimmed_count(10, b) for b in (0.0, 0.05, 0.1, 0.19, 0.2, 0.49)] == [0, 0, 1, 1, 2, 4]
    assert trimmed_count(100, 0.29) == 29
    assert trimmed_count(4, 0.4999999999) == 1  # never trims everything


def numpy_trimmed_mean(a: np.ndarray, beta: float) -> np.ndarray:
    k = a.shape[0]
    t = int(np.floor(beta * k + 1e-9))
    return np.sort(a.astype(np.float64), axis=0)[t : k - t].mean(axis=0)


ROUNDS = st.tuples(
    st.integers(1, 12), st.integers(1, 30), st.integers(0, 2**31 - 1), st.booleans()
)


def make_np_round(k: int, d: int, seed: int, ties: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if ties:
        return rng.integers(-3, 4, size=(k, d)).astype(np.float32)
    return rng.standard_normal((k, d)).astype(np.float32) * 10


@SETTINGS
@given(ROUNDS, st.booleans())
def test_median_matches_numpy(rnd: tuple[int, int, int, bool], use_numpy: bool) -> None:
    # Prepare
    a = make_np_round(*rnd)
    # Execute
    got = coordinate_median(torch.from_numpy(a), use_numpy=use_numpy)
    # Assert
    np.testing.assert_array_equal(got.numpy(), np.median(a, axis=0))


@SETTINGS
@given(ROUNDS, st.floats(0.0, 0.49), st.booleans())
def test_trimmed_mean_matches_numpy(rnd: tuple[int, int, int, bool], beta: float, use_numpy: bool) -> None:
    # Prepare
    a = make_np_round(*rnd)
    # Execute
    got = trimmed_mean(torch.from_numpy(a), beta, use_numpy=use_numpy)
    # Assert
    np.testing.assert_allclose(got.numpy(), numpy_trimmed_mean(a, beta), rtol=1e-6, atol=1e-6)


def test_median_and_trimmed_mean_across_column_chunks() -> None:
    # Prepare: D large enough that the default 4 MiB column chunks split it
    rng = np.random.default_rng(7)
    a = rng.standard_normal((4, 600_000)).astype(np.float32)
    # Execute
    med = coordinate_median(torch.from_numpy(a))
    tm = trimmed_mean(torch.from_numpy(a), 0.25)
    # Assert
    np.testing.assert_array_equal(med.numpy(), np.median(a, axis=0))
    np.testing.assert_allclose(tm.numpy(), numpy_trimmed_mean(a, 0.25), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_numpy", [True, False])
def test_chunk_helpers_match_unchunked(use_numpy: bool) -> None:
    # Prepare: chunk sizes that split K = 7 rows into 3 chunks and D = 1001 columns into 11
    updates, _ = random_round(7, 1001, seed=8)
    point = torch.randn(1001, generator=torch.Generator().manual_seed(9))
    # Execute
    second = sorted_column_reduce(updates, lambda s: s[:, 1], chunk_bytes=7 * 4 * 100, use_numpy=use_numpy)
    dists = row_distances(updates, point, chunk_bytes=1001 * 4 * 3, use_numpy=use_numpy)
    mean = column_mean64(updates, use_numpy=use_numpy)
    # Assert
    assert torch.equal(second, torch.sort(updates, dim=0).values[1])
    torch.testing.assert_close(dists, (updates.to(F64) - point.to(F64)).norm(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(mean, updates.to(F64).mean(dim=0).float(), rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------ krum


KRUM_POINTS = [[0.0], [1.0], [2.5], [3.0], [100.0]]


def test_krum_scores_by_hand() -> None:
    # Prepare: K = 5, f = 1 -> 2 nearest neighbours
    updates = t64(KRUM_POINTS)
    # Execute
    scores = krum_scores(updates, f=1)
    # Assert
    expected = [1 + 6.25, 1 + 2.25, 0.25 + 2.25, 0.25 + 4, 97.0**2 + 97.5**2]
    torch.testing.assert_close(scores, t64([expected])[0], rtol=1e-12, atol=1e-9)


def test_krum_picks_the_central_client_not_the_outlier() -> None:
    # Prepare
    updates = t64(KRUM_POINTS)
    # Execute
    res = make_rule("krum", {"f": "1"})(updates, RoundContext(ones(5)))
    # Assert
    assert res.kept == (2,)
    assert torch.equal(res.vector, t64([[2.5]])[0])
    assert res.info["selected"] == [2] and res.info["neighbours"] == 2 and res.info["f"] == 1


def test_multi_krum_is_the_mean_of_the_selected() -> None:
    # Prepare
    updates = t64(KRUM_POINTS)
    # Execute
    res = make_rule("krum", {"f": "1", "m": "3"})(updates, RoundContext(ones(5)))
    vec, selected, _ = multi_krum(updates, f=1, m=2)
    # Assert
    assert res.kept == (1, 2, 3)
    assert res.info["selected"] == [2, 1, 3]
    torch.testing.assert_close(res.vector, t64([[(1.0 + 2.5 + 3.0) / 3]])[0], rtol=0, atol=1e-15)
    assert selected == [2, 1]
    torch.testing.assert_close(vec, t64([[1.75]])[0], rtol=0, atol=1e-15)


def test_krum_rejects_a_far_outlier_in_high_dimension() -> None:
    # Prepare: 8 honest updates, one huge malicious update
    updates, _ = random_round(9, 2000, seed=10)
    updates[4] *= 50
    # Execute
    res = make_rule("krum", {"m": "8"})(updates, RoundContext(ones(9)))
    # Assert
    assert res.kept is not None and 4 not in res.kept and len(res.kept) == 8


def test_krum_auto_f_and_clamping_and_strict() -> None:
    # Prepare
    updates = t64(KRUM_POINTS + [[2.0]])  # K = 6 -> largest f = 1
    # Execute
    auto = make_rule("krum")(updates, RoundContext(ones(6)))
    clamped = make_rule("krum", {"f": "5"})(updates, RoundContext(ones(6)))
    # Assert
    assert auto.info["f"] == 1 and auto.info["f_requested"] == "auto" and auto.info["f_clamped"] is False
    assert clamped.info["f"] == 1 and clamped.info["f_clamped"] is True
    with pytest.raises(ValueError, match=r"K > 2f \+ 2; got K=6, f=5"):
        make_rule("krum", {"f": "5", "strict": "true"})(updates, RoundContext(ones(6)))


def test_krum_with_fewer_than_three_updates_falls_back_to_mean_or_raises() -> None:
    # Prepare
    updates = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # Execute
    res = Krum()(updates, RoundContext(ones(2)))
    # Assert
    assert torch.equal(res.vector, torch.tensor([2.0, 3.0]))
    assert "fallback" in res.info and res.kept is None
    with pytest.raises(ValueError, match="K >= 3"):
        Krum(strict=True)(updates, RoundContext(ones(2)))


# ------------------------------------------------------------------------------------ norm-clip


def test_norm_clip_clips_exactly_then_sums() -> None:
    # Prepare
    updates = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, -2.0]])
    # Execute
    res = make_rule("norm-clip", {"bound": "1"})(updates, RoundContext(ones(3)))
    clipped, norms, mask = clip_norms(updates, 1.0)
    # Assert
    torch.testing.assert_close(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, -1.0]]))
    torch.testing.assert_close(res.vector, torch.tensor([0.9, 0.2]))
    assert mask.tolist() == [True, False, True]
    assert res.info["clipped"] == 2 and res.info["max_norm_before"] == pytest.approx(5.0)
    assert res.info["inner"] == "fedavg"


def test_norm_clip_without_clipping_does_not_copy() -> None:
    # Prepare
    updates = torch.tensor([[0.3, 0.4]])
    # Execute
    clipped, _, mask = clip_norms(updates, 1.0)
    # Assert
    assert clipped is updates and not bool(mask.any())


def test_norm_clip_passes_inner_options_and_weights() -> None:
    # Prepare
    updates = torch.tensor([[10.0], [1.0], [2.0], [3.0], [-10.0]])
    weights = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0])
    # Execute
    tm_rule = make_rule("norm-clip", {"bound": "5", "inner": "trimmed-mean", "inner.beta": "0.2"})
    avg_rule = make_rule("norm-clip", {"bound": "5", "inner": "fedavg", "inner.reduce": "mean"})
    tm = tm_rule(updates, RoundContext(weights))
    avg = avg_rule(updates, RoundContext(weights))
    # Assert
    assert torch.equal(tm.vector, torch.tensor([2.0]))  # clipped to 5, 1, 2, 3, -5 -> trim -> 2
    torch.testing.assert_close(avg.vector, torch.tensor([(5 + 1 + 4 + 3 - 5) / 6]))
    assert tm.info["inner_info"]["beta"] == 0.2


# ------------------------------------------------------------------------------------ foolsgold


def reference_foolsgold(grads: np.ndarray, kappa: float = 1.0) -> np.ndarray:
    """Transcription of the FoolsGold authors' reference code (loops), on given update vectors."""
    n = grads.shape[0]
    norms = np.linalg.norm(grads, axis=1)
    cs = grads @ grads.T / np.outer(norms, norms) - np.eye(n)
    maxcs = np.max(cs, axis=1)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if maxcs[i] < maxcs[j]:
                cs[i][j] = cs[i][j] * maxcs[i] / maxcs[j]
    wv = 1 - np.max(cs, axis=1)
    wv[wv > 1] = 1
    wv[wv < 0] = 0
    wv = wv / np.max(wv)
    wv[wv == 1] = 0.99
    with np.errstate(divide="ignore"):
        wv = kappa * (np.log(wv / (1 - wv)) + 0.5)
    wv[np.isinf(wv) + wv > 1] = 1
    wv[wv < 0] = 0
    return wv


@pytest.mark.parametrize("kappa", [1.0, 0.25])
def test_foolsgold_matches_reference_code(kappa: float) -> None:
    # Prepare: correlated updates so that pardoning and the logit both matter
    rng = np.random.default_rng(11)
    base = rng.standard_normal(30)
    grads = base + rng.standard_normal((8, 30)) * rng.uniform(0.3, 3.0, size=(8, 1))
    # Execute
    w = foolsgold_weights(torch.from_numpy(grads), kappa)
    # Assert
    np.testing.assert_allclose(w.numpy(), reference_foolsgold(grads, kappa), rtol=1e-10, atol=1e-12)


def test_foolsgold_zeroes_identical_sybils_and_keeps_diverse_honest() -> None:
    # Prepare: 3 orthogonal honest updates and 3 identical sybil updates
    honest = torch.eye(6)[:3] * torch.tensor([[1.0], [2.0], [3.0]])
    sybil = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]).repeat(3, 1)
    updates = torch.cat([honest, sybil])
    # Execute
    mean = make_rule("foolsgold")(updates, RoundContext(ones(6)))
    total = make_rule("foolsgold", {"reduce": "sum"})(updates, RoundContext(ones(6)))
    # Assert
    assert mean.info["weights"] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert mean.kept == (0, 1, 2) and mean.info["zero_weight"] == 3
    torch.testing.assert_close(mean.vector, torch.tensor([1 / 3, 2 / 3, 1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(total.vector, torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0]))


def test_foolsgold_near_identical_sybils_among_random_honest() -> None:
    # Prepare
    updates, _ = random_round(12, 500, seed=12)
    target = torch.randn(500, generator=torch.Generator().manual_seed(13))
    updates[8:] = target + 0.01 * updates[8:]
    # Execute
    w = foolsgold_weights(updates)
    # Assert
    assert float(w[8:].max()) < 1e-6
    assert float(w[:8].min()) > 0.5


def test_foolsgold_all_identical_gives_no_step() -> None:
    # Prepare
    updates = torch.tensor([[1.0, 2.0]]).repeat(3, 1)
    # Execute
    vec, w = foolsgold(updates)
    # Assert
    assert torch.equal(vec, torch.zeros(2)) and torch.equal(w, torch.zeros(3, dtype=F64))


# ------------------------------------------------------------------------------------ fltrust


def test_fltrust_exact_2d() -> None:
    # Prepare
    root = torch.tensor([1.0, 0.0], dtype=F64)
    updates = t64([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)
    expected = (torch.tensor([1.0, 0.0], dtype=F64) + c * torch.tensor([c, c], dtype=F64)) / (1 + c)
    # Execute
    vec, trust = fltrust(updates, root)
    res = FLTrust()(updates, RoundContext(ones(4), root=root))
    # Assert
    torch.testing.assert_close(vec, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(trust, t64([[1.0, 0.0, 0.0, c]])[0], rtol=0, atol=1e-15)
    assert res.kept == (0, 3) and res.info["zero_trust"] == 2
    torch.testing.assert_close(res.vector, expected, rtol=0, atol=1e-15)


def test_fltrust_rescales_to_root_norm_and_handles_zero_updates() -> None:
    # Prepare
    root = torch.tensor([0.0, 2.0])
    updates = torch.tensor([[0.0, 100.0], [0.0, 0.0]])
    # Execute
    vec, trust = fltrust(updates, root)
    # Assert
    assert torch.equal(vec, torch.tensor([0.0, 2.0]))
    assert trust.tolist() == [1.0, 0.0]


def test_fltrust_all_rejected_gives_no_step() -> None:
    # Prepare
    rule = make_rule("fltrust")
    # Execute
    res = rule(torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), RoundContext(ones(2), root=torch.tensor([1.0, 0.0])))
    # Assert
    assert torch.equal(res.vector, torch.zeros(2)) and res.info["all_rejected"] is True and res.kept == ()


def test_fltrust_without_root_raises_and_reads_the_contexts_root() -> None:
    # Prepare
    updates = torch.tensor([[1.0, 0.0]])
    # Execute
    res = FLTrust()(updates, RoundContext(ones(1), root=torch.tensor([2.0, 0.0])))
    # Assert
    with pytest.raises(MissingRootUpdate, match="needs the server's root update"):
        make_rule("fltrust", {"root_users": "5"})(updates, RoundContext(ones(1)))
    assert torch.equal(res.vector, torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match=r"root update must be \[D=2\]"):
        fltrust(updates, torch.ones(3))


def test_needs_root_and_the_root_through_norm_clip() -> None:
    # Prepare
    clip_fl = make_rule("norm-clip", {"bound": "1", "inner": "fltrust", "inner.root_users": "3"})
    updates = torch.tensor([[3.0, 4.0], [-1.0, 0.0]])
    # Execute
    res = clip_fl(updates, RoundContext(ones(2), root=torch.tensor([0.0, 5.0])))
    # Assert
    assert clip_fl.needs_root and make_rule("fltrust").needs_root and clip_fl.root_users == 3
    assert not any(make_rule(n).needs_root for n in ("fedavg", "rfa", "krum", "foolsgold"))
    rfa = make_rule("rfa")  # a rule that needs no root ignores one in its context
    assert torch.equal(rfa(updates, RoundContext(ones(2), root=torch.zeros(2))).vector,
                       rfa(updates, RoundContext(ones(2))).vector)
    torch.testing.assert_close(res.vector, torch.tensor([3.0, 4.0]))  # rescaled to ||g0|| = 5
    assert res.kept == (0,)


# ------------------------------------------------------------------------------------ input checks


def test_rules_reject_bad_shapes() -> None:
    # Execute / Assert
    for name in ("rfa", "median", "krum", "foolsgold"):
        with pytest.raises(ValueError, match=r"weights must be \[K=3\]"):
            make_rule(name)(torch.ones(3, 2), RoundContext(torch.ones(2)))
    with pytest.raises(ValueError, match="floating-point"):
        coordinate_median(torch.ones(3, 2, dtype=torch.int64))
    assert torch.equal(fedavg(torch.ones(2, 2), torch.ones(2)), torch.full((2,), 2.0))
