"""Tests for client-side adversarial training (fedseq.adv_train): without perturbation the update
is the benign one, the perturbed inputs are distributions, the ascent step raises the loss, the
update is the gradient of the loss on the adversarial input, batching and determinism, user
picking and config validation.

Every test is Prepare / Execute / Assert, on tiny models with real computations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedseq.adv_train import (
    AdvTrainConfig,
    adversarial_inputs,
    adversarial_updates,
    pick_adv_users,
    soft_embed,
)
from fedseq.models import BERT4Rec, SASRec, build_model
from fedseq.models.common import position_ids, reference_init
from fedseq.params import get_vector, set_vector
from fedseq.training import LocalConfig, _prepare, compute_updates, user_losses

M = 20
SEED, ROUND = 3, 17
LENGTHS = (2, 4, 7, 13, 3, 9)  # SASRec max_len 10 and BERT4Rec input_len 8 truncate the long ones
USERS = (5, 0, 42, 7, 1000, 3)
MODELS = ("sasrec", "bert4rec")


def tiny(name: str) -> SASRec | BERT4Rec:
    extra = {"input_len": 8} if name == "bert4rec" else {}
    model = build_model(name, M, hidden=8, heads=2, ffn=16, max_len=10, **extra)
    reference_init(model, 1)
    return model


def sequences(lengths=LENGTHS, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(np.arange(1, M + 1), size=n, replace=False).astype(np.int64) for n in lengths]


# ----------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("opts", [AdvTrainConfig(steps=0), AdvTrainConfig(switch_prob=0.0)], ids=["steps0", "switch0"])
@pytest.mark.parametrize("dropout", [False, True])
def test_no_perturbation_equals_benign_update(name, opts, dropout):
    # Prepare
    model, seqs = tiny(name), sequences()
    params, cfg = get_vector(model), LocalConfig(dropout=dropout)
    # Execute
    benign = compute_updates(model, params, seqs, USERS, SEED, ROUND, cfg)
    adv = adversarial_updates(model, params, seqs, USERS, SEED, ROUND, cfg, opts)
    # Assert
    torch.testing.assert_close(adv.updates, benign.updates, atol=1e-6, rtol=0)
    np.testing.assert_allclose(adv.losses, benign.losses, atol=1e-6)
    np.testing.assert_array_equal(adv.users, benign.users)
    np.testing.assert_array_equal(adv.num_samples, benign.num_samples)


@pytest.mark.parametrize("name", MODELS)
def test_perturbation_changes_the_update(name):
    # Prepare
    model, seqs = tiny(name), sequences()
    params, cfg = get_vector(model), LocalConfig(dropout=False)
    # Execute
    benign = compute_updates(model, params, seqs, USERS, SEED, ROUND, cfg)
    adv = adversarial_updates(model, params, seqs, USERS, SEED, ROUND, cfg, AdvTrainConfig(switch_prob=1.0))
    # Assert: every user with at least one input position is perturbed
    diff = (adv.updates - benign.updates).abs().amax(dim=1)
    assert bool((diff > 1e-4).all())
    assert bool(torch.isfinite(adv.updates).all())


@pytest.mark.parametrize("name", MODELS)
def test_update_is_the_gradient_of_the_loss_on_the_adversarial_input(name):
    # Prepare: plain autograd on the model itself, input embedding built by hand
    model, seqs = tiny(name), sequences()
    params, cfg = get_vector(model), LocalConfig(dropout=False)
    set_vector(model, params)
    # Execute
    upd = adversarial_updates(model, params, seqs, USERS, SEED, ROUND, cfg)
    expected = []
    for u, s in zip(USERS, seqs, strict=True):
        inp = adversarial_inputs(model, params, [s], [u], SEED, ROUND, cfg)
        batch, _ = _prepare(model, [s], [u], SEED, ROUND, 0, cfg, {})
        tokens = batch["tokens"]
        E = model.item_emb.weight
        soft = inp.inputs @ E + model.pos_emb(position_ids(tokens))
        x = torch.where((tokens != 0)[..., None], soft, model.embed(tokens))
        loss = user_losses(model, batch, None, x=x)[0]
        g = torch.autograd.grad(loss, list(model.parameters()))
        expected.append(torch.cat([t.reshape(-1) for t in g]))
    # Assert
    torch.testing.assert_close(upd.updates, torch.stack(expected), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- the perturbation


@pytest.mark.parametrize("name", MODELS)
def test_perturbed_rows_are_distributions_and_padding_is_untouched(name):
    # Prepare
    model, seqs = tiny(name), sequences()
    params, cfg = get_vector(model), LocalConfig(dropout=False)
    # Execute
    inp = adversarial_inputs(model, params, seqs, USERS, SEED, ROUND, cfg)
    # Assert
    V = model.cfg.vocab
    real = inp.tokens != 0
    onehot = F.one_hot(inp.tokens, V).float()
    assert inp.perturbed.shape == inp.inputs.shape == (len(USERS), inp.tokens.shape[1], V)
    for dist in (inp.perturbed, inp.inputs):
        assert float(dist.min()) >= 0.0
        torch.testing.assert_close(dist.sum(-1), torch.ones_like(dist.sum(-1)), atol=1e-5, rtol=0)
        assert torch.equal(dist[~real], onehot[~real])  # padding rows: one-hot at item 0
        assert float(dist[real][:, 0].abs().max()) == 0.0  # no mass on the padding item
    assert not bool(inp.switched[~real].any())
    assert torch.equal(inp.inputs[~inp.switched], onehot[~inp.switched])
    assert torch.equal(inp.inputs[inp.switched], inp.perturbed[inp.switched])
    assert float((inp.perturbed[real] - onehot[real]).abs().amax()) > 0.1  # it did move


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("steps", [1, 3])
def test_ascent_increases_every_users_loss(name, steps):
    # Prepare
    model, seqs = tiny(name), sequences()
    params, cfg = get_vector(model), LocalConfig(dropout=False)
    set_vector(model, params)
    batch, _ = _prepare(model, seqs, list(USERS), SEED, ROUND, 0, cfg, {})
    opts = AdvTrainConfig(steps=steps, switch_prob=1.0)
    # Execute
    inp = adversarial_inputs(model, params, seqs, USERS, SEED, ROUND, cfg, opts)
    with torch.no_grad():
        clean = user_losses(model, batch, None)
        onehot = user_losses(model, batch, None, x=soft_embed(model, batch["tokens"], F.one_hot(inp.tokens, M + 2).float()))
        adv = user_losses(model, batch, None, x=soft_embed(model, batch["tokens"], inp.inputs))
    # Assert
    torch.testing.assert_close(onehot, clean, atol=1e-6, rtol=0)
    assert bool((adv > clean + 1e-4).all()), (clean, adv)


def test_switch_probability_extremes_and_rate():
    # Prepare
    model = tiny("sasrec")
    seqs = sequences(lengths=(11,) * 40, seed=5)
    users = list(range(40))
    params, cfg = get_vector(model), LocalConfig(dropout=False)
    # Execute
    none = adversarial_inputs(model, params, seqs, users, SEED, ROUND, cfg, AdvTrainConfig(steps=0, switch_prob=0.0))
    every = adversarial_inputs(model, params, seqs, users, SEED, ROUND, cfg, AdvTrainConfig(steps=0, switch_prob=1.0))
    half = adversarial_inputs(model, params, seqs, users, SEED, ROUND, cfg, AdvTrainConfig(steps=0, switch_prob=0.5))
    # Assert
    real = every.tokens != 0
    assert not bool(none.switched.any())
    assert torch.equal(every.switched, real)
    rate = float(half.switched[real].float().mean())
    assert 0.4 < rate < 0.6  # 400 draws


# ----------------------------------------------------------------------------- batching, determinism


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("micro_batch", [64, 2])
def test_batched_equals_one_user_at_a_time(name, micro_batch):
    # Prepare
    model, seqs = tiny(name), sequences()
    params, cfg = get_vector(model), LocalConfig(dropout=True, micro_batch=micro_batch)
    # Execute
    batched = adversarial_updates(model, params, seqs, USERS, SEED, ROUND, cfg)
    single = [adversarial_updates(model, params, [s], [u], SEED, ROUND, cfg) for u, s in zip(USERS, seqs, strict=True)]
    # Assert
    torch.testing.assert_close(batched.updates, torch.cat([s.updates for s in single]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(batched.losses, np.concatenate([s.losses for s in single]), atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_deterministic_in_the_seed(name):
    # Prepare
    model, seqs = tiny(name), sequences()
    params, cfg = get_vector(model), LocalConfig(dropout=True)
    # Execute
    a = adversarial_updates(model, params, seqs, USERS, SEED, ROUND, cfg)
    b = adversarial_updates(model, params, seqs, USERS, SEED, ROUND, cfg)
    c = adversarial_updates(model, params, seqs, USERS, SEED + 1, ROUND, cfg)
    d = adversarial_updates(model, params, seqs, USERS, SEED, ROUND + 1, cfg)
    # Assert
    assert torch.equal(a.updates, b.updates)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert not torch.allclose(a.updates, c.updates)
    assert not torch.allclose(a.updates, d.updates)


# ----------------------------------------------------------------------------- picking users


def test_pick_adv_users_is_a_deterministic_subset_of_the_right_size():
    # Prepare
    round_users = np.array([11, 4, 97, 23, 8, 61, 30, 2, 75, 40])
    # Execute
    a = pick_adv_users(round_users, SEED, ROUND, 4)
    b = pick_adv_users(round_users, SEED, ROUND, 4)
    others = [tuple(pick_adv_users(round_users, SEED, r, 4)) for r in range(20)]
    every = pick_adv_users(round_users, SEED, ROUND, 32)
    none = pick_adv_users(round_users, SEED, ROUND, 0)
    # Assert
    np.testing.assert_array_equal(a, b)
    assert len(a) == 4 and len(set(a.tolist())) == 4
    assert set(a.tolist()) <= set(round_users.tolist())
    positions = [int(np.flatnonzero(round_users == u)[0]) for u in a]
    assert positions == sorted(positions)  # in the round's order
    assert len(set(others)) > 1  # depends on the round
    np.testing.assert_array_equal(every, round_users)  # min(k, n)
    assert none.shape == (0,)
    assert pick_adv_users([], SEED, ROUND, 32).shape == (0,)
    with pytest.raises(ValueError, match="k must be"):
        pick_adv_users(round_users, SEED, ROUND, -1)


# ----------------------------------------------------------------------------- validation


def test_config_defaults_are_the_reference():
    # Prepare / Execute
    opts = AdvTrainConfig()
    # Assert
    assert (opts.steps, opts.step_size, opts.switch_prob, opts.users_per_round) == (3, 1.0, 0.5, 32)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": -1}, "steps must be >= 0"),
    ({"steps": 1.5}, "steps must be an integer"),
    ({"step_size": 0.0}, "step_size must be > 0"),
    ({"step_size": float("nan")}, "step_size must be a finite number"),
    ({"switch_prob": 1.5}, r"switch_prob must be in \[0, 1\]"),
    ({"switch_prob": -0.1}, r"switch_prob must be in \[0, 1\]"),
    ({"users_per_round": 0}, "users_per_round must be >= 1"),
    ({"users_per_round": True}, "users_per_round must be an integer"),
    ({"max_onehot": 0}, "max_onehot must be >= 1"),
])
def test_config_validation(kwargs, message):
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=message):
        AdvTrainConfig(**kwargs)


def test_rejects_bad_calls():
    # Prepare
    model, seqs = tiny("sasrec"), sequences()
    params = get_vector(model)
    # Execute / Assert
    with pytest.raises(ValueError, match="paper-mode"):
        adversarial_updates(model, params, seqs, USERS, SEED, ROUND, LocalConfig(mode="fedavg"))
    with pytest.raises(ValueError, match="sequences for"):
        adversarial_updates(model, params, seqs[:2], USERS, SEED, ROUND)
    with pytest.raises(ValueError, match="expected params"):
        adversarial_updates(model, params[:-1], seqs, USERS, SEED, ROUND)
