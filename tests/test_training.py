"""Tests for per-user local training (fedseq.training): batched updates equal per-user updates,
the batched (vmap, local item table) path equals plain autograd / torch optimisers on the model,
negative sampling, BERT4Rec cloze masking, micro-batching, determinism and config validation.

Every test is Prepare / Execute / Assert, on tiny models with real computations.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedseq.models import BERT4Rec, SASRec, build_model
from fedseq.models.common import Drop, keep_masks, reference_init
from fedseq.params import Layout, get_vector
from fedseq.training import (
    LocalConfig,
    bert4rec_example,
    collate,
    compute_updates,
    iter_updates,
    make_example,
    micro_batches,
    sample_negatives,
    sasrec_example,
    user_losses,
    user_rng,
)

M = 20
SEED, ROUND = 3, 17
LENGTHS = (2, 4, 7, 13, 3, 9)  # SASRec max_len 10 and BERT4Rec input_len 8 truncate the long ones
USERS = (5, 0, 42, 7, 1000, 3)


def tiny(name: str) -> SASRec | BERT4Rec:
    extra = {"input_len": 8} if name == "bert4rec" else {}
    model = build_model(name, M, hidden=8, heads=2, ffn=16, max_len=10, **extra)
    reference_init(model, 1)
    return model


def sequences(lengths=LENGTHS, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(np.arange(1, M + 1), size=n, replace=False).astype(np.int64) for n in lengths]


def grads_of(model, loss) -> torch.Tensor:
    g = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                      for x, p in zip(g, model.parameters(), strict=True)])


def key_bias_mask(model) -> torch.Tensor:
    """Coordinates of the attention key biases. Their gradient is exactly zero in exact arithmetic
    (adding q . b_k to every score of a query row leaves its softmax unchanged), so what the float
    computation returns there is rounding noise, which Adam's m / sqrt(v) scales up to +-lr."""
    layout = Layout.of(model)
    return torch.cat([torch.full((size,), name.endswith(".k.bias"))
                      for name, size in zip(layout.names, layout.sizes, strict=True)])


def assert_updates_close(model, got, expected, cfg: LocalConfig, **tol) -> None:
    if cfg.mode == "fedavg" and cfg.optimizer == "adam":
        null = key_bias_mask(model)
        torch.testing.assert_close(got[..., ~null], expected[..., ~null], **tol)
        bound = 3 * cfg.local_lr * cfg.local_epochs
        assert float(got[..., null].abs().max()) <= bound and float(expected[..., null].abs().max()) <= bound
    else:
        torch.testing.assert_close(got, expected, **tol)


def direct_loss(model, seq, user, epoch: int, cfg: LocalConfig) -> torch.Tensor:
    """The user's local loss on the model itself (plain autograd, no vmap, full item table)."""
    ex = make_example(model, seq, user_rng(SEED, ROUND, user, epoch), cfg)
    batch = collate(model, [ex])
    drop = None
    if cfg.dropout:
        dseed = int(user_rng(SEED, ROUND, user, 1000 + epoch).integers(0, 2**32))
        drop = Drop(keep_masks(model.dropout_sites(), torch.tensor([dseed]), batch["tokens"].shape[1]))
    return user_losses(model, batch, drop)[0]


CASES = [
    pytest.param(name, LocalConfig(mode=mode, dropout=dropout, local_epochs=2 if mode == "fedavg" else 1,
                                   optimizer=opt, local_lr=0.05 if opt == "sgd" else 0.01),
                 id=f"{name}-{mode}-{opt}-{'drop' if dropout else 'nodrop'}")
    for name in ("sasrec", "bert4rec")
    for mode, opt in (("paper", "sgd"), ("fedavg", "sgd"), ("fedavg", "adam"))
    for dropout in (True, False)
]


# ----------------------------------------------------------------------------- batched == alone


@pytest.mark.parametrize("name,cfg", CASES)
def test_batched_updates_equal_per_user_updates(name, cfg):
    # Prepare
    model = tiny(name)
    params = get_vector(model)
    seqs = sequences()

    # Execute: all six at once, and each one alone
    batched = compute_updates(model, params, seqs, USERS, SEED, ROUND, cfg)
    alone = [compute_updates(model, params, [s], [u], SEED, ROUND, cfg) for s, u in zip(seqs, USERS, strict=True)]

    # Assert
    assert batched.users.tolist() == list(USERS)
    assert batched.num_samples.tolist() == list(LENGTHS)
    for i, one in enumerate(alone):
        assert float(one.updates[0].abs().max()) > 0
        assert_updates_close(model, batched.updates[i], one.updates[0], cfg, rtol=0, atol=1e-5)
        assert batched.losses[i] == pytest.approx(one.losses[0], abs=1e-5)


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_tiny_micro_batches_give_the_same_updates(name):
    # Prepare: micro-batches of 2 users (different partners and padding than one batch of 6)
    model = tiny(name)
    params = get_vector(model)
    seqs = sequences()

    # Execute
    big = compute_updates(model, params, seqs, USERS, SEED, ROUND, LocalConfig())
    small = compute_updates(model, params, seqs, USERS, SEED, ROUND, LocalConfig(micro_batch=2, max_tokens=12))

    # Assert
    torch.testing.assert_close(big.updates, small.updates, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,cfg", [c for c in CASES if "adam" not in c.id and "nodrop" not in c.id])
def test_updates_a_micro_batch_at_a_time_are_the_same_rows_bit_for_bit(name, cfg):
    # Prepare: micro-batches of 1-3 users, so the reused buffer's rows change users (and the last
    # micro-batch is smaller than the first), with more users than LENGTHS
    model = tiny(name)
    params = get_vector(model)
    lengths = LENGTHS + (5, 1, 8, 2)
    seqs = sequences(lengths, seed=1)
    users = USERS + (11, 12, 13, 14)
    small = LocalConfig(mode=cfg.mode, dropout=cfg.dropout, local_epochs=cfg.local_epochs, optimizer=cfg.optimizer,
                        local_lr=cfg.local_lr, micro_batch=3, max_tokens=24)

    # Execute: use each piece before asking for the next (the contract)
    whole = compute_updates(model, params, seqs, users, SEED, ROUND, small)
    got: dict[int, tuple] = {}
    pieces = 0
    for ub in iter_updates(model, params, seqs, users, SEED, ROUND, small):
        pieces += 1
        for j, u in enumerate(ub.users.tolist()):
            rows = None if ub.item_rows is None else ub.item_rows[j].clone()
            got[u] = (ub.updates[j].clone(), int(ub.num_samples[j]), float(ub.losses[j]), rows)

    # Assert: every user once, its row of the whole matrix to the last bit, the same item rows
    assert pieces > 2 and sorted(got) == sorted(users)
    for i, u in enumerate(users):
        row, n, loss, rows = got[u]
        assert torch.equal(row, whole.updates[i]) and n == lengths[i] and loss == whole.losses[i]
        if name == "sasrec":
            assert torch.equal(rows, whole.item_rows[i])
        else:
            assert rows is None and whole.item_rows is None


@pytest.mark.parametrize("attack", ["dv-fsr", "none"])
def test_rounds_written_into_one_reused_matrix_equal_fresh_matrices_bit_for_bit(attack):
    # Prepare: the in-process runner's round updates on a small synthetic run, rounds of changing
    # users (benign rows follow attackers' whole rows and vice versa), one matrix for all rounds
    from cli.plugins import prepare
    from cli.sim import round_updates
    from fedseq.config import ExperimentConfig
    from fedseq.training import UpdateMatrix

    cfg = ExperimentConfig(dataset="synthetic:users=40,items=60,max_length=12", clients_per_round=9,
                           num_negatives=20, attack=attack, malicious_ratio=0.1 if attack != "none" else 0.0)
    p = prepare(cfg)
    s = p.setup
    params = s.initial_params()
    everyone = np.arange(s.dataset.num_users + len(s.malicious_users))
    matrix = UpdateMatrix.of(s.model)
    rng = np.random.default_rng(0)
    for r in range(6):
        users = np.sort(rng.choice(everyone, size=9 - (r % 3), replace=False))
        # Execute
        fresh = round_updates(s, p.adversary, params, users, r, cfg.local())
        reused = round_updates(s, p.adversary, params, users, r, cfg.local(), matrix)
        # Assert
        assert reused.users.tolist() == fresh.users.tolist() == users.tolist()
        assert torch.equal(reused.updates, fresh.updates), r
        assert reused.num_samples.tolist() == fresh.num_samples.tolist()
        assert np.array_equal(reused.losses, fresh.losses)
        params = params - 0.05 * fresh.updates.sum(0)  # the next round sees other weights


# ----------------------------------------------------------------------------- against plain autograd


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
@pytest.mark.parametrize("dropout", [False, True])
def test_paper_update_equals_autograd_of_the_user_loss(name, dropout):
    # Prepare
    model = tiny(name)
    cfg = LocalConfig(dropout=dropout)
    seqs = sequences()
    i = 3  # the longest user (truncated)

    # Execute
    up = compute_updates(model, get_vector(model), seqs, USERS, SEED, ROUND, cfg)
    loss = direct_loss(model, seqs[i], USERS[i], 0, cfg)
    expected = grads_of(model, loss)

    # Assert
    torch.testing.assert_close(up.updates[i], expected, rtol=1e-4, atol=1e-6)
    assert up.losses[i] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert float(up.updates[i][key_bias_mask(model)].abs().max()) < 1e-6  # see key_bias_mask


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_fedavg_update_equals_torch_optimiser_steps(name, opt):
    # Prepare: two local epochs on a copy of the model with torch's own optimiser
    model = tiny(name)
    cfg = LocalConfig(mode="fedavg", optimizer=opt, local_epochs=2, local_lr=0.01, dropout=False)
    seqs = sequences()
    i = 2
    local = copy.deepcopy(model)
    cls = torch.optim.SGD if opt == "sgd" else torch.optim.Adam
    optim = cls(local.parameters(), lr=cfg.local_lr)

    # Execute
    up = compute_updates(model, get_vector(model), seqs, USERS, SEED, ROUND, cfg)
    for epoch in range(2):
        optim.zero_grad()
        direct_loss(local, seqs[i], USERS[i], epoch, cfg).backward()
        optim.step()
    expected = get_vector(model) - get_vector(local)

    # Assert: update = w_global - w_local
    assert_updates_close(model, up.updates[i], expected, cfg, rtol=1e-3, atol=2e-6)


def test_one_sgd_epoch_is_lr_times_the_paper_gradient():
    # Prepare
    model = tiny("sasrec")
    params = get_vector(model)
    seqs = sequences()

    # Execute
    paper = compute_updates(model, params, seqs, USERS, SEED, ROUND, LocalConfig())
    fedavg = compute_updates(model, params, seqs, USERS, SEED, ROUND,
                             LocalConfig(mode="fedavg", local_epochs=1, local_lr=0.1))

    # Assert
    torch.testing.assert_close(fedavg.updates, 0.1 * paper.updates, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(fedavg.losses, paper.losses, rtol=1e-6)


def test_sasrec_item_rows_touched_are_only_the_users_items():
    # Prepare
    model = tiny("sasrec")
    cfg = LocalConfig(dropout=False)
    seqs = sequences()
    layout = Layout.of(model)

    # Execute
    up = compute_updates(model, get_vector(model), seqs, USERS, SEED, ROUND, cfg)

    # Assert
    for i, (s, u) in enumerate(zip(seqs, USERS, strict=True)):
        ex = sasrec_example(model, s, user_rng(SEED, ROUND, u, 0), cfg)
        table = layout.unflatten(up.updates[i])["item_emb.weight"]
        named = set(ex["tokens"].tolist()) | set(ex["pos"].tolist()) | set(ex["neg"].tolist())
        nonzero = set(torch.nonzero(table.abs().sum(1)).flatten().tolist())
        assert nonzero <= named, i
        assert set(ex["pos"].tolist()) | set(ex["neg"].tolist()) <= nonzero, i
        assert 0 not in nonzero


def test_single_item_user_gets_a_zero_sasrec_update():
    # Prepare: a one-item history has no (input, next item) pair
    model = tiny("sasrec")

    # Execute
    up = compute_updates(model, get_vector(model), [np.array([4]), sequences()[2]], [0, 1], SEED, ROUND)

    # Assert
    assert torch.equal(up.updates[0], torch.zeros_like(up.updates[0]))
    assert up.losses[0] == 0.0
    assert float(up.updates[1].abs().max()) > 0


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_update_is_a_function_of_seed_round_and_user(name):
    # Prepare
    model = tiny(name)
    params = get_vector(model)
    s = sequences()[3]
    others = sequences(seed=9)
    before = s.copy()

    def one(seed=SEED, rk=ROUND, user=7, partners=()):
        seqs = [s, *partners]
        users = [user, *range(100, 100 + len(partners))]
        return compute_updates(model, params, seqs, users, seed, rk).updates[0]

    # Execute
    base = one()

    # Assert
    assert torch.equal(base, one())
    assert not torch.allclose(base, one(seed=SEED + 1), atol=1e-4)
    assert not torch.allclose(base, one(rk=ROUND + 1), atol=1e-4)
    assert not torch.allclose(base, one(user=8), atol=1e-4)
    torch.testing.assert_close(base, one(partners=others[:2]), rtol=0, atol=1e-5)
    torch.testing.assert_close(base, one(partners=others[3:]), rtol=0, atol=1e-5)
    assert np.array_equal(s, before)  # the user's data is not modified


# ----------------------------------------------------------------------------- negatives


def test_sample_negatives_avoid_history_and_are_distinct():
    # Prepare
    exclude = np.array([1, 2, 3, 5, 8, 13, 3, 0])

    for k in range(50):
        # Execute
        neg = sample_negatives(np.random.default_rng(k), exclude, 10, 1, 20)

        # Assert: 14 items available, 10 drawn, all distinct
        assert len(neg) == 10 and len(set(neg.tolist())) == 10
        assert not np.isin(neg, exclude).any()
        assert neg.min() >= 1 and neg.max() <= 20


def test_sample_negatives_repeat_only_when_too_few_items_and_fail_when_none():
    # Execute
    neg = sample_negatives(np.random.default_rng(0), np.arange(1, 18), 10, 1, 20)

    # Assert: only 18, 19, 20 are available
    assert len(neg) == 10 and set(neg.tolist()) == {18, 19, 20}
    with pytest.raises(ValueError, match="no item in"):
        sample_negatives(np.random.default_rng(0), np.arange(1, 21), 3, 1, 20)


def test_sasrec_negatives_and_the_compat_vocab_range():
    # Prepare
    model = tiny("sasrec")
    train = np.arange(1, 11)  # items 1..10: 10 of 20 available
    draws_default, draws_compat = [], []

    # Execute
    for k in range(200):
        rng = np.random.default_rng(k)
        draws_default.append(sasrec_example(model, train, rng, LocalConfig())["neg"])
        rng = np.random.default_rng(k)
        draws_compat.append(sasrec_example(model, train, rng, LocalConfig(neg_from_vocab=True))["neg"])

    # Assert
    d, c = np.concatenate(draws_default), np.concatenate(draws_compat)
    assert not np.isin(d, train).any() and not np.isin(c, train).any()
    assert d.max() <= M and (d == M + 1).sum() == 0
    assert c.max() == M + 1  # the mask token can be a negative under the compat switch
    ex = sasrec_example(model, train, np.random.default_rng(0), LocalConfig())
    assert ex["tokens"].tolist() == list(range(1, 10)) and ex["pos"].tolist() == list(range(2, 11))


# ----------------------------------------------------------------------------- BERT4Rec masking


def test_bert4rec_masking_always_has_a_target():
    # Prepare: a two-item history usually draws no target at p = 0.15
    model = tiny("bert4rec")

    for k in range(300):
        # Execute
        ex = bert4rec_example(model, np.array([4, 9]), np.random.default_rng(k), LocalConfig())

        # Assert
        assert len(ex["where"]) >= 1
        assert ex["labels"].tolist() == [[4, 9][w] for w in ex["where"]]


def test_bert4rec_masking_proportions():
    # Prepare: a 50-item input over 1,000 items, 2,000 draws
    model = build_model("bert4rec", 1000, hidden=8, heads=2, ffn=16, max_len=50, input_len=50)
    seq = np.arange(101, 161)  # 60 distinct items; the last 50 are used
    chosen = masked = kept = replaced = 0
    outside = 0

    # Execute
    for k in range(2000):
        ex = bert4rec_example(model, seq, np.random.default_rng(k), LocalConfig())
        tok, where = ex["tokens"], ex["where"]
        orig = seq[-50:]
        assert len(tok) == 50
        is_t = np.zeros(50, dtype=bool)
        is_t[where] = True
        outside += int((tok[~is_t] != orig[~is_t]).sum())
        chosen += len(where)
        masked += int((tok[where] == model.cfg.mask_token).sum())
        kept += int((tok[where] == orig[where]).sum())
        replaced += int(((tok[where] != orig[where]) & (tok[where] != model.cfg.mask_token)).sum())

    # Assert
    assert outside == 0
    assert chosen / (2000 * 50) == pytest.approx(0.15, abs=0.01)
    assert masked / chosen == pytest.approx(0.8, abs=0.02)
    assert kept / chosen == pytest.approx(0.1, abs=0.015)
    assert replaced / chosen == pytest.approx(0.1, abs=0.015)


# ----------------------------------------------------------------------------- micro-batches


@pytest.mark.parametrize("max_users,max_tokens", [(3, 20), (1, 100), (64, 4096), (4, 1)])
def test_micro_batches_respect_limits_and_cover_every_index_once(max_users, max_tokens):
    # Prepare
    lengths = [5, 1, 9, 3, 3, 7, 0, 12, 2, 30]

    # Execute
    groups = micro_batches(lengths, max_users, max_tokens)

    # Assert
    flat = np.concatenate(groups).tolist()
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)  # length-sorted
    for g in groups:
        assert 1 <= len(g) <= max_users
        if len(g) > 1:
            assert len(g) * max(max(lengths[i] for i in g), 1) <= max_tokens


def test_micro_batches_pack_greedily():
    # Execute
    groups = micro_batches([4, 4, 4, 4, 4], max_users=10, max_tokens=8)

    # Assert
    assert [len(g) for g in groups] == [2, 2, 1]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "fedprox"}, "mode must be"),
        ({"optimizer": "rmsprop"}, "optimizer must be"),
        ({"local_epochs": 0}, "local_epochs"),
        ({"micro_batch": 0}, "micro_batch"),
        ({"max_tokens": 0}, "local_epochs and micro_batch"),
        ({"local_lr": 0.0}, "local_lr"),
    ],
)
def test_local_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalConfig(**kwargs)


def test_make_example_rejects_unknown_models():
    with pytest.raises(TypeError, match="no local loss"):
        make_example(torch.nn.Linear(2, 2), np.array([1, 2]), np.random.default_rng(0), LocalConfig())


def test_zero_dropout_rates_equal_dropout_off():
    # Prepare: dropout "on" with every site at p = 0 produces no masks at all
    model = build_model("sasrec", M, hidden=8, heads=2, ffn=16, max_len=10, dropout=0.0, attn_dropout=0.0)
    reference_init(model, 1)
    params = get_vector(model)
    seqs = sequences()

    # Execute
    on = compute_updates(model, params, seqs, USERS, SEED, ROUND, LocalConfig(dropout=True))
    off = compute_updates(model, params, seqs, USERS, SEED, ROUND, LocalConfig(dropout=False))

    # Assert
    torch.testing.assert_close(on.updates, off.updates, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- PIECK's client-side defense


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
@pytest.mark.parametrize("dropout", [False, True])
def test_pieck_regularised_update_equals_autograd_of_the_written_out_loss(name, dropout):
    # Prepare: global weights where items 4, 9, 2 moved most since version 0 (seed 1), in that order
    from fedseq.popularity import initial_params, item_table_slice
    from fedseq.training import PieckReg

    model = tiny(name)  # version 0 of seed 1
    init = initial_params(model, 1)
    params = init.clone()
    offset, rows, width = item_table_slice(model)
    table = params[offset:offset + rows * width].view(rows, width)
    for item, amount in ((4, 0.9), (9, 0.6), (2, 0.3)):
        table[item] += amount
    pr = PieckReg(size=3, ipe_mu=2.0, uea_mu=3.0, init_seed=1)
    cfg = LocalConfig(dropout=dropout, pieck=pr)
    seqs = sequences()
    i = 3

    # Execute
    up = compute_updates(model, params, seqs, USERS, SEED, ROUND, cfg)
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p, v in zip(probe.parameters(), Layout.of(probe).unflatten(params).values(), strict=True):
            p.copy_(v)
    ex = make_example(probe, seqs[i], user_rng(SEED, ROUND, USERS[i], 0), cfg)
    batch = collate(probe, [ex])
    drop = None
    if dropout:
        dseed = int(user_rng(SEED, ROUND, USERS[i], 1000).integers(0, 2**32))
        drop = Drop(keep_masks(probe.dropout_sites(), torch.tensor([dseed]), batch["tokens"].shape[1]))
    h = probe(batch["tokens"], drop)  # [1, L, d]
    base = user_losses(probe, batch, drop)[0]
    # the loss written out: popular rows most moved first, weights exp(3, 2, 1) / sum
    pop = table[[4, 9, 2]].detach()
    w = torch.tensor([np.e**3, np.e**2, np.e]) / (np.e**3 + np.e**2 + np.e)
    if name == "sasrec":
        items = torch.cat([batch["pos"][0], batch["neg"][0]])
    else:
        items = batch["tokens"][0]
        items = items[items != probe.cfg.mask_token]
    items = items[(items != 0) & ~torch.isin(items, torch.tensor([4, 9, 2]))]
    e = probe.item_emb(items)  # [n, d]
    ipe = -sum(w[j] * torch.nn.functional.cosine_similarity(e, pop[j][None], dim=-1).mean() for j in range(3))
    p = torch.softmax(h[0, -1], -1)
    uea = -sum(w[j] * (p * (p.log() - torch.log_softmax(pop[j], -1))).mean() for j in range(3))
    expected = grads_of(probe, base + 2.0 * ipe + 3.0 * uea)

    # Assert
    torch.testing.assert_close(up.updates[i], expected, rtol=1e-4, atol=2e-5)
    assert up.losses[i] == pytest.approx(float((base + 2.0 * ipe + 3.0 * uea).detach()), abs=1e-5)


def test_pieck_reg_is_off_by_default_and_the_defense_name_turns_it_on():
    from fedseq.config import ConfigError, build_config
    from fedseq.training import PieckReg

    # Execute
    plain = build_config(None, {"dataset": "synthetic"})
    on = build_config(None, {"dataset": "synthetic", "defense": "pieck-reg", "defense_opts": {"size": "5"}})

    # Assert
    assert plain.local().pieck is None and not plain.pieck_reg
    assert on.defense == "fedavg" and on.local().pieck == PieckReg(size=5, init_seed=on.seed)
    with pytest.raises(ConfigError, match="pieck-reg has no option 'k'"):
        build_config(None, {"dataset": "synthetic", "defense": "pieck-reg", "defense_opts": {"k": "5"}})
    with pytest.raises(ConfigError, match="size must be >= 1"):
        build_config(None, {"dataset": "synthetic", "defense": "pieck-reg", "defense_opts": {"size": "0"}})
