"""HidAttack (attacker/attacks/hidattack.py): the fabricated profiles, the one-step exposure
reward, the seeded epsilon-greedy choice, and that every update is one of its arms' updates.
Tiny real models, exact cases, no mocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny import M, tiny

from attacker.attacks import AttackConfigError, AttackContext, HidAttack, make_attack
from attacker.attacks.hidattack import STREAM_BANDIT, exposure_margin, fake_profile
from fedseq.config import Compat
from fedseq.params import set_vector
from fedseq.training import LocalConfig, compute_updates, user_rng

pytestmark = pytest.mark.usefixtures("one_torch_thread")





def ctx(model, params, users=(50, 51, 52), round_key=2, lr=0.5, targets=(29,)):
    rng = np.random.default_rng(0)
    seqs = [rng.choice(np.arange(1, M - 1), size=n, replace=False).astype(np.int64) for n in (5, 9, 7)]
    return AttackContext(model, params, seqs[:len(users)], list(users), targets, 3, round_key,
                         LocalConfig(dropout=False), Compat(), lr=lr)


def test_fake_profiles_are_random_items_then_the_target_fixed_per_user():
    a = fake_profile(M, [29, 28], seed=3, user=51, length=8)
    assert len(a) == 8 and a[-1] == 28 and len(set(a[:-1].tolist())) == 7  # user 51: targets[51 % 2]
    assert not {28, 29} & set(a[:-1].tolist()) and all(1 <= i <= M for i in a)
    assert np.array_equal(a, fake_profile(M, [29, 28], seed=3, user=51, length=8))
    assert not np.array_equal(a, fake_profile(M, [29, 28], seed=3, user=52, length=8))
    # a catalogue too small for the profile: every item but one, so training still has a negative
    assert len(fake_profile(M, [29], 3, 50, 100)) == M - 1


def test_exposure_margin_is_the_targets_score_over_the_kth_competitor():
    # Prepare: an independent forward of the plain model
    model, params = tiny()
    seq = np.array([3, 7, 1, 12], dtype=np.int64)
    set_vector(model, params)
    with torch.no_grad():
        scores = model.scores(model(torch.as_tensor(seq)[None])[:, -1])[0, 1:M + 1].double()
    competitors = sorted((float(scores[i - 1]) for i in range(1, M + 1) if i not in {3, 7, 1, 12, 29}), reverse=True)
    # Execute
    margin = exposure_margin(model, params, seq, [29], 10)
    two = exposure_margin(model, params, seq, [29, 28], 1)
    # Assert
    assert margin == pytest.approx(float(scores[28]) - competitors[9], abs=1e-5)
    rest = sorted((float(scores[i - 1]) for i in range(1, M + 1) if i not in {3, 7, 1, 12, 28, 29}), reverse=True)
    assert two == pytest.approx((float(scores[28]) + float(scores[27])) / 2 - rest[0], abs=1e-5)


def test_choice_is_greedy_but_for_the_seeded_exploration():
    model, params = tiny()
    values = np.array([[0.1, 0.3, 0.3], [2.0, -1.0, 0.0], [-5.0, -4.0, -3.0]])
    c = ctx(model, params)
    greedy = make_attack("hidattack", {"epsilon": "0"}).choose(c, values)
    assert greedy.tolist() == [1, 0, 2]  # ties to the first arm
    explore = make_attack("hidattack", {"epsilon": "1"}).choose(c, values)
    expected = []
    for u in (50, 51, 52):
        rng = user_rng(3, 2, u, STREAM_BANDIT)
        rng.random()
        expected.append(int(rng.integers(3)))
    assert explore.tolist() == expected


def test_each_update_is_the_chosen_arms_and_the_batch_does_not_matter():
    # Prepare
    model, params = tiny()
    attack = make_attack("hidattack", {"epsilon": "0"})
    c = ctx(model, params)
    arms = attack.arm_batches(c)
    values = attack.values(c, arms)
    # Execute
    ub = attack.updates(c)
    alone = attack.updates(ctx(model, params, users=(50,)))
    # Assert: the arm with the best one-step reward, per user; RA trains on the user's fake profile;
    # the aggregation weight is the copied sequence's whatever the arm
    for b in range(3):
        assert torch.equal(ub.updates[b], arms[int(np.argmax(values[b]))].updates[b])
    profiles = [fake_profile(M, (29,), 3, u, 30) for u in (50, 51, 52)]
    ra = compute_updates(model, params, profiles, [50, 51, 52], 3, 2, c.local)
    assert attack.arms == ("a-ra", "eb", "ra") and torch.equal(arms[2].updates, ra.updates)
    assert ub.num_samples.tolist() == [5, 9, 7]
    assert torch.allclose(alone.updates[0], ub.updates[0], atol=1e-5)  # batched forwards round differently
    # the reward is the margin one server step (lr) ahead
    stepped = params - 0.5 * arms[1].updates[2]
    assert values[2, 1] == pytest.approx(exposure_margin(model, stepped, c.sequences[2], [29], 10))


def test_the_best_arm_raises_the_targets_margin_one_step_ahead():
    model, params = tiny()
    c = ctx(model, params)
    ub = make_attack("hidattack", {"epsilon": "0"}).updates(c)
    for b, seq in enumerate(c.sequences):
        before = exposure_margin(model, params, seq, [29], 10)
        assert exposure_margin(model, params - 0.5 * ub.updates[b], seq, [29], 10) > before


def test_options_and_the_missing_learning_rate_are_refused():
    a = make_attack("hidattack", {"arms": "eb, ra", "length": "12"})
    assert isinstance(a, HidAttack) and a.arms == ("eb", "ra") and a.bases[1].profile_length == 12
    with pytest.raises(AttackConfigError, match="unknown attack 'nope'"):
        make_attack("hidattack", {"arms": "eb,nope"})
    for raw in ("eb,eb", "", "eb,hidattack"):
        with pytest.raises(AttackConfigError, match="arms="):
            make_attack("hidattack", {"arms": raw})
    for key, raw in (("epsilon", "1.5"), ("top_k", "0"), ("length", "1")):
        with pytest.raises(AttackConfigError, match=f"{key}="):
            make_attack("hidattack", {key: raw})
    model, params = tiny()
    with pytest.raises(ValueError, match="one server step ahead; the context has lr=None"):
        make_attack("hidattack").updates(ctx(model, params, lr=None))
