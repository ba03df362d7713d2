"""Tests for evaluation (fedseq.metrics): ranks and metric sums on hand-computed cases, the
MetricSums algebra, and the Evaluator's sampled and full protocols on a tiny model whose scores are
set by hand (so every rank is known), checked against brute-force NumPy.

Every test is Prepare / Execute / Assert.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedseq.metrics import (
    EVAL_KEY,
    KS,
    EvalConfig,
    Evaluator,
    MetricSums,
    eval_input,
    metric_sums,
    ranks_from_scores,
    sample_candidates,
)
from fedseq.models import build_model
from fedseq.models.common import reference_init
from fedseq.params import get_vector
from fedseq.training import user_rng

M = 30


# ----------------------------------------------------------------------------- ranks and sums


def test_ranks_count_strictly_higher_scores():
    # Prepare
    scores = torch.tensor([[3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 1.0, 0.0], [0.0, 4.0, 4.0, 9.0]])

    # Execute
    r0 = ranks_from_scores(scores, 0)
    r2 = ranks_from_scores(scores, 2)

    # Assert: ties do not count against the item
    assert r0.tolist() == [1, 0, 3]
    assert r2.tolist() == [2, 0, 1]


def test_metric_sums_on_hand_computed_ranks():
    # Prepare
    test_rank = torch.tensor([0, 3, 10, 9])
    target_ranks = torch.tensor([[0, 7], [4, 25], [29, 30], [5, 100]])

    # Execute
    s = metric_sums(test_rank, target_ranks)

    # Assert: HR@10 hits at ranks 0, 3, 9; NDCG = 1/log2(2 + rank); ER@K averaged over the 2 targets
    assert s.users == 4
    assert s.hr10 == 3.0
    assert s.ndcg10 == pytest.approx(1.0 + 1.0 / math.log2(5) + 1.0 / math.log2(11), abs=1e-12)
    assert s.er == {5: 1.0, 10: 2.0, 20: 2.0, 30: 3.0}


def test_metric_sums_add_average_and_round_trip():
    # Prepare
    a = metric_sums(torch.tensor([0, 20]), torch.tensor([[1], [12]]))
    b = metric_sums(torch.tensor([4]), torch.tensor([[40]]))

    # Execute
    total = a + b
    means = total.means()
    back = MetricSums.from_dict(total.to_dict())

    # Assert
    assert total.users == 3 and total.hr10 == 2.0
    assert means["hr@10"] == pytest.approx(2 / 3)
    assert means["ndcg@10"] == pytest.approx((1.0 + 1.0 / math.log2(6)) / 3)
    assert means == pytest.approx({"hr@10": 2 / 3, "ndcg@10": means["ndcg@10"], "er@5": 1 / 3, "er@10": 1 / 3,
                                   "er@20": 2 / 3, "er@30": 2 / 3})
    assert back == total
    assert MetricSums().means()["hr@10"] == 0.0  # no users: zeros, not a division error


# ----------------------------------------------------------------------------- a model with known scores


def known_scores_model(scores: np.ndarray, name: str = "sasrec"):
    """A model whose last hidden state is the constant e_0 (the last LayerNorm has scale 0 and shift
    e_0), so the score of item i is item_emb[i, 0] = scores[i] whatever the input."""
    extra = {"input_len": 6} if name == "bert4rec" else {}
    model = build_model(name, M, hidden=8, heads=2, ffn=16, max_len=6, **extra)
    reference_init(model, 0)
    with torch.no_grad():
        if name == "sasrec":
            ln = model.blocks[-1].ln3
            ln.a_2.zero_()
            ln.b_2.zero_()
            ln.b_2[0] = 1.0
        else:  # h = GELU(head(x)) with a zero weight and bias b: GELU(b); make it e_0 * GELU(1)
            model.head.weight.zero_()
            model.head.bias.zero_()
            model.head.bias[0] = 1.0
            model.out_bias.zero_()
        model.item_emb.weight[:, 0] = torch.as_tensor(scores, dtype=torch.float32)
    return model


def distinct_scores(seed: int) -> np.ndarray:
    s = np.random.default_rng(seed).permutation(M + 2).astype(np.float64) / 10.0
    return s  # index = item id (0 and M + 1 included)


TRAIN = [np.array([1, 2, 3]), np.array([4, 5, 6, 7, 8, 9, 10]), np.array([11, 12]), np.array([13, 14, 15, 16])]
TEST = [20, 21, 22, 23]
USERS = [0, 1, 2, 3]


def brute_sampled(scores, train, test, users, targets, cfg) -> MetricSums:
    total = MetricSums()
    for u, tr, te in zip(users, train, test, strict=True):
        negs = sample_candidates(user_rng(cfg.seed, EVAL_KEY, u), tr, cfg.num_negatives, M)
        cands = np.concatenate([[te], negs, targets])
        sc = scores[cands].copy()
        for j in [0, *range(len(cands) - len(targets), len(cands))]:
            if cands[j] in tr:
                sc[j] = -1024.0
        ranks = [int((sc > sc[j]).sum()) for j in range(len(cands))]
        t_ranks = ranks[len(cands) - len(targets) :]
        total = total + metric_sums(torch.tensor(ranks[:1]), torch.tensor([t_ranks]))
    return total


def assert_sums_equal(got: MetricSums, expected: MetricSums) -> None:
    assert got.users == expected.users
    assert got.hr10 == pytest.approx(expected.hr10, abs=1e-9)
    assert got.ndcg10 == pytest.approx(expected.ndcg10, abs=1e-9)
    assert got.er == pytest.approx(expected.er, abs=1e-9)


# ----------------------------------------------------------------------------- sampled protocol


def test_sampled_protocol_matches_brute_force():
    # Prepare
    scores = distinct_scores(1)
    model = known_scores_model(scores)
    cfg = EvalConfig(num_negatives=6, seed=5)
    targets = [25, 3]  # 3 is in user 0's training set

    # Execute
    got = Evaluator(model, TRAIN, TEST, USERS, targets, cfg)(get_vector(model))

    # Assert
    assert_sums_equal(got, brute_sampled(scores, TRAIN, TEST, USERS, targets, cfg))
    assert got.users == 4


def test_sampled_test_or_target_in_train_scores_minus_1024():
    # Prepare: item 30 scores highest of all, item 29 second
    scores = np.zeros(M + 2)
    scores[1 : M + 1] = np.linspace(0.0, 1.0, M)
    model = known_scores_model(scores)
    train = [np.array([30, 1, 2]), np.array([4, 5])]
    cfg = EvalConfig(num_negatives=40)  # > 30, so a -1024 item also misses ER@30

    # Execute: user 0's test item 30 is in its training set; target 30 is too, for user 0 only
    got = Evaluator(model, train, [30, 30], [0, 1], [30], cfg)(get_vector(model))

    # Assert: user 0 misses both, user 1 ranks both first
    assert got.hr10 == 1.0 and got.ndcg10 == pytest.approx(1.0)
    assert got.er == {5: 1.0, 10: 1.0, 20: 1.0, 30: 1.0}


def test_sampled_candidates_avoid_training_items_and_are_fixed():
    # Prepare
    scores = distinct_scores(2)
    model = known_scores_model(scores)
    cfg = EvalConfig(num_negatives=200)
    ev = Evaluator(model, TRAIN, TEST, USERS, [25], cfg)
    ev_sub = Evaluator(model, TRAIN[2:], TEST[2:], USERS[2:], [25], cfg)

    # Execute
    first = ev(get_vector(model))
    second = ev(get_vector(model))
    cands = ev._candidates()
    cands_sub = ev_sub._candidates()

    # Assert
    for c, tr in zip(cands, TRAIN, strict=True):
        assert len(c) == 200 and not np.isin(c, tr).any() and c.min() >= 1 and c.max() <= M
    assert first == second
    assert all(np.array_equal(a, b) for a, b in zip(cands[2:], cands_sub, strict=True))  # per (seed, user)
    assert not np.array_equal(cands[0][:50], cands[1][:50])


def test_sample_candidates_draw_with_replacement_outside_train():
    # Prepare
    train = np.arange(1, 28)  # only 28, 29, 30 remain

    # Execute
    c = sample_candidates(np.random.default_rng(0), train, 1000, M)

    # Assert
    assert len(c) == 1000 and set(c.tolist()) == {28, 29, 30}


# ----------------------------------------------------------------------------- full protocol


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_full_protocol_matches_brute_force_over_non_interacted_items(name):
    # Prepare
    scores = distinct_scores(3)
    model = known_scores_model(scores, name)
    targets = [24, 12, 7]  # 12 is in user 2's history, 7 in user 1's
    with torch.no_grad():
        h = model(torch.tensor([[1, 2]]))[0, -1]
        s = (model.scores(h)).numpy().astype(np.float64)  # = scores * GELU(1) for BERT4Rec

    # Execute
    got = Evaluator(model, TRAIN, TEST, USERS, targets, EvalConfig(protocol="full"))(get_vector(model))

    # Assert
    expected = MetricSums()
    for tr, te in zip(TRAIN, TEST, strict=True):
        allowed = np.setdiff1d(np.arange(1, M + 1), tr)
        ranks = [M if item in tr else int((s[allowed] > s[item]).sum()) for item in (te, *targets)]
        expected = expected + metric_sums(torch.tensor(ranks[:1]), torch.tensor([ranks[1:]]))
    assert_sums_equal(got, expected)
    assert np.argsort(s[1 : M + 1]).tolist() == np.argsort(scores[1 : M + 1]).tolist()


def test_full_protocol_scores_the_last_position_of_each_user():
    # Prepare: an ordinary random model; users of different lengths share one padded batch
    model = build_model("sasrec", M, hidden=8, heads=2, ffn=16, max_len=6)
    reference_init(model, 4)
    train = [np.array([3, 9, 1, 27, 8, 14, 2, 6]), np.array([5]), np.array([30, 12, 7])]
    test, targets = [11, 17, 29], [4, 19]

    # Execute
    got = Evaluator(model, train, test, [0, 1, 2], targets, EvalConfig(protocol="full"))(get_vector(model))

    # Assert: each user alone, scored at its last real position, ranks among non-interacted items
    expected = MetricSums()
    for tr, te in zip(train, test, strict=True):
        with torch.no_grad():
            s = model.scores(model(torch.as_tensor(tr[-6:])[None])[0, -1]).numpy()
        allowed = np.setdiff1d(np.arange(1, M + 1), tr)
        ranks = [int((s[allowed] > s[i]).sum()) for i in (te, *targets)]
        expected = expected + metric_sums(torch.tensor(ranks[:1]), torch.tensor([ranks[1:]]))
    assert_sums_equal(got, expected)


def test_seeded_dropout_evaluation_is_deterministic_and_differs_from_eval_mode():
    # Prepare
    model = build_model("sasrec", M, hidden=8, heads=2, ffn=16, max_len=6)
    reference_init(model, 4)
    train = [np.arange(1, 7) + k for k in range(12)]
    test = [20 + k % 10 for k in range(12)]
    ev_drop = Evaluator(model, train, test, range(12), [30], EvalConfig(protocol="full", dropout=True))

    # Execute
    a = ev_drop(get_vector(model))
    b = ev_drop(get_vector(model))

    # Assert
    assert a == b
    assert a.users == 12 and set(a.er) == set(KS)


# ----------------------------------------------------------------------------- eval input


def test_eval_input_sasrec_with_and_without_the_mask_token_query():
    # Prepare
    model = build_model("sasrec", M, hidden=8, heads=2, ffn=16, max_len=4)
    train = np.array([1, 2, 3, 4, 5, 6])

    # Execute
    plain = eval_input(model, train, EvalConfig())
    masked = eval_input(model, train, EvalConfig(mask_token_query=True))

    # Assert
    assert plain.tolist() == [3, 4, 5, 6]
    assert masked.tolist() == [4, 5, 6, M + 1]


def test_eval_input_bert4rec_always_appends_the_mask_token():
    # Prepare
    model = build_model("bert4rec", M, hidden=8, heads=2, ffn=16, max_len=10, input_len=3)

    # Execute
    out = eval_input(model, np.array([7, 8, 9, 10]), EvalConfig())
    short = eval_input(model, np.array([7]), EvalConfig(mask_token_query=False))

    # Assert: input_len items in all
    assert out.tolist() == [9, 10, M + 1]
    assert short.tolist() == [7, M + 1]


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("targets,match", [([0], "outside the catalogue"), ([M + 1], "outside the catalogue"),
                                           ([], "at least one target")])
def test_bad_targets_raise(targets, match):
    model = build_model("sasrec", M, hidden=8, heads=2, ffn=16, max_len=6)
    with pytest.raises(ValueError, match=match):
        Evaluator(model, TRAIN, TEST, USERS, targets)


def test_eval_config_validation():
    with pytest.raises(ValueError, match="protocol must be"):
        EvalConfig(protocol="leave-one-out")
    with pytest.raises(ValueError, match="num_negatives"):
        EvalConfig(num_negatives=0)


def test_a_nan_score_ranks_worst_and_never_looks_perfect():
    # Prepare: a broken model's scores over 12 candidates (NaN compares false, so a NaN would
    # otherwise rank 0: a hit)
    nan = float("nan")
    scores = torch.arange(12, dtype=torch.float32).repeat(3, 1)  # item 0 scores lowest: rank 11
    scores[0, 0] = nan                # the ranked item itself is NaN
    scores[1, 0] = 20.0
    scores[1, 5] = nan                # another item is NaN: below every number
    scores[2, :] = nan                # everything is NaN
    # Execute
    ranks = ranks_from_scores(scores, 0)
    sums = metric_sums(ranks, ranks[:, None])
    # Assert: worst rank (C - 1) for a NaN item; only the healthy row hits
    assert ranks.tolist() == [11, 0, 11]
    assert sums.hr10 == 1.0 and sums.er[10] == 1.0 and sums.users == 3
    assert ranks_from_scores(torch.tensor([[1.0, 2.0, 0.5]]), 0).tolist() == [1]  # unchanged without NaN
