"""Defenses from general federated learning (issue 16, part 3): Bulyan, FLAME and DnC. Exact outputs
on tiny hand rounds (what each keeps and removes), an honest majority winning, the seeded randomness
bound to the round id by the engine, and option errors. Prepare / Execute / Assert."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseq.engine import Aggregation, RoundContext, aggregate_round
from server.aggregation import RuleConfigError, make_rule, single_cluster
from server.aggregation.base import round_generator
from server.aggregation.bulyan import closest_to_median_mean
from server.aggregation.dnc import dnc_scores
from server.aggregation.flame import FLAME_KEY, cosine_distances

# 5 honest updates on a line, 2 attackers far away on both sides
LINE = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0], [100.0, 100.0], [-100.0, -100.0]])


def honest_and_sybils(k_honest: int, k_bad: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    honest = torch.ones(k_honest, d) + 0.1 * torch.randn(k_honest, d, generator=g)
    bad = torch.zeros(k_bad, d)
    bad[:, 0] = -30.0  # near-identical sybils pushing one coordinate hard
    bad += 0.01 * torch.randn(k_bad, d, generator=g)
    return torch.cat([honest, bad])


# ------------------------------------------------------------------------------------ Bulyan
def test_bulyan_hand_round_selects_the_honest_five_and_averages_around_the_median() -> None:
    # Prepare: K = 7, f = auto = 1: theta = 5 selected by recursive Krum, beta = 3 per coordinate
    rule = make_rule("bulyan")
    # Execute
    res = rule(LINE, RoundContext(torch.ones(7)))
    # Assert: selection 2, 1, 3, 0, 4 (ties to the lower index); coordinate: mean of 1, 2, 3 = 2
    assert res.info["selected"] == [2, 1, 3, 0, 4] and res.info["theta"] == 5 and res.info["beta"] == 3
    assert res.kept == (0, 1, 2, 3, 4)
    assert torch.equal(res.vector, torch.tensor([2.0, 2.0]))


@pytest.mark.parametrize("row,beta,expected", [
    ([0.0, 1.0, 2.0, 10.0, 11.0], 3, 1.0),  # median 2: the closest are 0, 1, 2
    ([0.0, 1.0, 2.0, 3.0], 2, 1.5),  # even: median 1.5, closest 1 and 2
    ([-9.0, 5.0, 5.5, 6.0, 40.0], 1, 5.5),
])
def test_bulyan_coordinate_step_averages_the_beta_closest_to_the_median(row, beta, expected) -> None:
    # Execute
    got_np = closest_to_median_mean(np.array([row]), beta)
    got_t = closest_to_median_mean(torch.tensor([row]), beta)
    # Assert: the NumPy and torch forms agree
    assert float(got_np[0]) == expected and float(got_t[0]) == expected


def test_bulyan_window_equals_the_sort_by_distance_reference() -> None:
    # Prepare: rows with ties (rounded values) and both parities of theta; the reference sorts each
    # row by distance to its median (stable: ties to the lower position) and averages the beta first
    rng = np.random.default_rng(7)
    for theta, beta in ((5, 3), (6, 2), (9, 1), (10, 10), (130, 4), (131, 5)):
        s = np.sort(np.round(rng.normal(size=(200, theta)), 1), axis=1).astype(np.float32)
        lo, hi = (theta - 1) // 2, theta // 2
        med = (s[:, lo] + s[:, hi]) / 2
        order = np.argsort(np.abs(s - med[:, None]), axis=1, kind="stable")[:, :beta]
        ref = np.take_along_axis(s, order, axis=1).astype(np.float64).mean(axis=1)
        # Execute
        got = closest_to_median_mean(s, beta)
        got_t = closest_to_median_mean(torch.from_numpy(s), beta).numpy()
        # Assert
        assert np.allclose(got, ref, rtol=0, atol=1e-12) and np.allclose(got_t, ref, rtol=0, atol=1e-12)


def test_bulyan_honest_majority_wins_against_sybils() -> None:
    # Prepare: 17 honest around 1, 4 sybils at -30 on coordinate 0 (K = 21 >= 4 * 4 + 3)
    u = honest_and_sybils(17, 4, 6, seed=1)
    # Execute
    res = make_rule("bulyan", {"f": "4"})(u, RoundContext(torch.ones(21)))
    # Assert: the last Krum steps (3 neighbours among 9) may pick a tight sybil, but the selection is
    # mostly honest and the per-coordinate trimming around the median removes it
    assert res.kept is not None and sum(i >= 17 for i in res.kept) <= 1
    assert float((res.vector - 1.0).abs().max()) < 0.2


def test_bulyan_f_is_clamped_or_strict_raises_and_tiny_rounds_fall_back() -> None:
    # Execute
    clamped = make_rule("bulyan", {"f": "5"})(LINE, RoundContext(torch.ones(7)))
    tiny = make_rule("bulyan")(LINE[:2], RoundContext(torch.ones(2)))
    # Assert
    assert clamped.info["f"] == 1 and clamped.info["f_clamped"]
    assert torch.equal(tiny.vector, LINE[:2].mean(dim=0)) and "fallback" in tiny.info
    with pytest.raises(ValueError, match=r"K >= 4f \+ 3"):
        make_rule("bulyan", {"f": "5", "strict": "true"})(LINE, RoundContext(torch.ones(7)))


def test_bulyan_f_zero_is_the_mean() -> None:
    res = make_rule("bulyan", {"f": "0"})(LINE, RoundContext(torch.ones(7)))
    assert torch.allclose(res.vector, LINE.mean(dim=0)) and res.kept is None


# ------------------------------------------------------------------------------------ DnC
def test_dnc_removes_the_sybils_and_returns_the_mean_of_the_rest() -> None:
    # Prepare: 12 honest, 2 sybils; f = 2, every coordinate sampled (b >= D)
    u = honest_and_sybils(12, 2, 8, seed=2)
    # Execute
    res = make_rule("dnc", {"f": "2"})(u, RoundContext(torch.ones(14)))
    # Assert
    assert res.kept == tuple(range(12))
    assert torch.allclose(res.vector, u[:12].mean(dim=0))
    assert res.info["removed_per_iteration"][0] == 2


def test_dnc_scores_are_squared_projections_on_the_top_singular_vector() -> None:
    # Prepare
    u = torch.randn(9, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    c = u - u.mean(dim=0)
    v = torch.linalg.svd(c, full_matrices=False).Vh[0]
    # Execute
    s = dnc_scores(u)
    # Assert
    assert torch.allclose(s, (c @ v) ** 2)


def test_dnc_coordinate_draws_are_seeded_by_seed_and_round() -> None:
    # Prepare: b = 3 of 40 coordinates, a round where which coordinates are drawn matters
    u = torch.randn(10, 40, generator=torch.Generator().manual_seed(5))
    rule = make_rule("dnc", {"f": "3", "b": "3", "niters": "1"})
    # Execute
    a = rule(u, RoundContext(torch.ones(10), round_id=1))
    a2 = rule(u, RoundContext(torch.ones(10), round_id=1))
    draws = {tuple(torch.randperm(40, generator=round_generator(0, 0xD2C, r, 0))[:3].tolist()) for r in range(5)}
    # Assert: deterministic per round; the rounds' subsets differ
    assert torch.equal(a.vector, a2.vector) and a.kept == a2.kept and a.info["round_id"] == 1
    assert len(draws) == 5


def test_dnc_removing_everyone_gives_no_step() -> None:
    res = make_rule("dnc", {"f": "1", "c": "4"})(LINE[:4], RoundContext(torch.ones(4)))
    assert res.info["all_removed"] and torch.equal(res.vector, torch.zeros(2))


# ------------------------------------------------------------------------------------ FLAME
def test_single_cluster_admits_the_tight_majority() -> None:
    # Prepare: 0-3 within 0.1 of each other, 4 and 5 at 0.5 from each other, 0.9 from the rest
    d = np.full((6, 6), 0.9)
    d[:4, :4] = 0.1
    d[4, 5] = d[5, 4] = 0.5
    np.fill_diagonal(d, 0.0)
    # Execute / Assert
    assert single_cluster(d, 4) == [0, 1, 2, 3]


def test_single_cluster_keeps_points_leaving_at_the_final_distance() -> None:
    # Prepare: a chain 0-1-2-3 with gaps 1, 1, 1 (K = 4, min size 3): every point leaves at distance 1
    x = np.array([0.0, 1.0, 2.0, 3.0])
    d = np.abs(x[:, None] - x[None, :])
    # Execute / Assert: HDBSCAN's labelling admits points with lambda >= the root's largest child lambda
    assert single_cluster(d, 3) == [0, 1, 2, 3]


def test_single_cluster_matches_hdbscan_when_installed() -> None:
    # Prepare: the library is not a dependency (it needs SciPy and scikit-learn); checked when present
    hdbscan = pytest.importorskip("hdbscan")
    rng = np.random.default_rng(0)
    for _ in range(60):
        k, d, n_clusters = int(rng.integers(3, 40)), int(rng.integers(2, 20)), int(rng.integers(1, 5))
        centres = rng.normal(size=(n_clusters, d))
        x = centres[rng.integers(0, n_clusters, size=k)] + float(rng.choice([0.05, 0.3, 1.0])) * rng.normal(size=(k, d))
        dist = cosine_distances(torch.tensor(x, dtype=torch.float32))
        # Execute
        labels = hdbscan.HDBSCAN(min_cluster_size=k // 2 + 1, min_samples=1, allow_single_cluster=True,
                                 metric="precomputed").fit_predict(dist)
        # Assert
        values, counts = np.unique(labels[labels >= 0], return_counts=True)
        assert single_cluster(dist, k // 2 + 1) == np.nonzero(labels == values[np.argmax(counts)])[0].tolist()


def test_flame_hand_round_removes_opposite_directions_and_clips_to_the_median_norm() -> None:
    # Prepare: 5 honest along +x (norms 1..5), 2 attackers along -y (norms 10, 20)
    u = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [5.0, 0.0], [0.0, -10.0], [0.0, -20.0]])
    # Execute
    res = make_rule("flame", {"noise": "0"})(u, RoundContext(torch.ones(7)))
    # Assert: median norm 4; clipped honest 1, 2, 3, 4, 4; mean 2.8
    assert res.kept == (0, 1, 2, 3, 4)
    assert res.info["median_norm"] == 4.0 and res.info["clipped"] == 1
    assert torch.allclose(res.vector, torch.tensor([2.8, 0.0]))


def test_flame_noise_is_lambda_times_median_norm_from_the_rounds_generator() -> None:
    # Prepare
    u = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [5.0, 0.0], [0.0, -10.0], [0.0, -20.0]])
    rule = make_rule("flame", {"noise": "0.5", "seed": "9"})
    # Execute
    r3 = aggregate_round(Aggregation(rule), torch.zeros(2), u, torch.ones(7), list(range(7)), lr=1.0, round_id=3)
    r4 = aggregate_round(Aggregation(rule), torch.zeros(2), u, torch.ones(7), list(range(7)), lr=1.0, round_id=4)
    noise3 = (torch.randn(2, generator=round_generator(9, FLAME_KEY, 3), dtype=torch.float64) * 2.0).float()
    # Assert: sigma = 0.5 * 4 = 2; the engine bound the round id; another round, other noise
    assert r3.result is not None and r4.result is not None
    assert torch.allclose(r3.result.vector, torch.tensor([2.8, 0.0]) + noise3)
    assert r3.result.info["round_id"] == 3 and r3.result.info["sigma"] == 2.0
    assert not torch.equal(r3.result.vector, r4.result.vector)


def test_flame_cosine_distance_of_a_zero_update_is_one() -> None:
    d = cosine_distances(torch.tensor([[1.0, 0.0], [0.0, 0.0], [-2.0, 0.0]]))
    assert np.allclose(d, [[0, 1, 2], [1, 0, 1], [2, 1, 0]])


def test_flame_honest_majority_wins_against_sybils() -> None:
    u = honest_and_sybils(9, 4, 6, seed=3)
    res = make_rule("flame", {"noise": "0"})(u, RoundContext(torch.ones(13)))
    assert res.kept is not None and all(i < 9 for i in res.kept) and len(res.kept) >= 7
    assert float((res.vector - 1.0).abs().max()) < 0.2


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("name,options,pattern", [
    ("bulyan", {"f": "-1"}, r"rule 'bulyan' option f=-1 is invalid; allowed: an integer >= 0 or 'auto'"),
    ("bulyan", {"f": "two"}, r"rule 'bulyan' option f='two' is invalid"),
    ("bulyan", {"m": "2"}, r"rule 'bulyan' has no option 'm'"),
    ("dnc", {"c": "0"}, r"rule 'dnc' option c=0.0 is invalid; allowed: a finite float > 0"),
    ("dnc", {"niters": "0"}, r"rule 'dnc' option niters=0 is invalid"),
    ("dnc", {"b": "0"}, r"rule 'dnc' option b=0 is invalid"),
    ("dnc", {"f": "x"}, r"rule 'dnc' option f='x' is invalid"),
    ("dnc", {"seed": "1.5"}, r"rule 'dnc' option 'seed'='1.5' is not a valid int"),
    ("flame", {"noise": "-0.1"}, r"rule 'flame' option noise=-0.1 is invalid; allowed: a finite float >= 0"),
    ("flame", {"noise": "nan"}, r"rule 'flame' option noise=nan"),
    ("flame", {"lambda": "1"}, r"rule 'flame' has no option 'lambda'"),
])
def test_bad_options_are_config_errors(name: str, options: dict[str, str], pattern: str) -> None:
    with pytest.raises(RuleConfigError, match=pattern):
        make_rule(name, options)


@pytest.mark.parametrize("defense, inner", [("flame", False), ("dnc:b=3", False), ("norm-clip:flame,bound=10", True),
                                             ("norm-clip:dnc,bound=10,inner.b=3", True)])
def test_a_runs_seed_reaches_the_rules_draws_unless_its_options_name_one(defense, inner) -> None:
    # Prepare: a round the rules draw on (FLAME's noise, DnC's coordinate subsets)
    from server.aggregation import make_run_rule

    U = torch.randn(12, 6, generator=torch.Generator().manual_seed(5))
    ctx = RoundContext(torch.ones(12), round_id=3)

    def seed_of(rule):
        return (rule.inner_rule if inner else rule).seed

    # Execute
    s0, s7 = make_run_rule(defense, {}, 0), make_run_rule(defense, {}, 7)
    pinned = make_run_rule(defense, {"inner.seed" if inner else "seed": "0"}, 7)

    # Assert: the rule draws from the run's seed, an explicit seed wins, and the draws follow it
    assert (seed_of(s0), seed_of(s7), seed_of(pinned)) == (0, 7, 0)
    assert torch.equal(pinned(U, ctx).vector, s0(U, ctx).vector)
    if "flame" in defense:  # FLAME's noise differs between seeds (DnC's subsets may agree on 6 coordinates)
        assert not torch.equal(s7(U, ctx).vector, s0(U, ctx).vector)
