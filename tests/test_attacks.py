"""Attacks (attacker/attacks), the malicious population (attacker/population.py) and their
integration in the in-process runner: tiny real models, exact cases, no mocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny import M, tiny

from attacker.attacks import (
    ATTACKS,
    AttackConfigError,
    AttackContext,
    DualViewAttack,
    alie_z,
    contrastive_loss,
    item_counts,
    make_attack,
    max_gamma,
    public_sequences,
    substitute,
)
from attacker.attacks.common import attack_tokens
from attacker.population import (
    fake_population,
    malicious_population,
    population_size,
    random_attack_sequences,
)
from cli.plugins import prepare
from cli.sim import run_inprocess
from fedseq.config import Compat, ConfigError, build_config
from fedseq.data import SeqDataset
from fedseq.engine import UPDATE_BOUND, epoch_rounds, out_of_bounds, plan_run
from fedseq.experiment import all_clients, setup
from fedseq.params import set_vector
from fedseq.training import LocalConfig, compute_updates

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_DROP = LocalConfig(dropout=False)




def sequences(lengths=(5, 9, 15), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(np.arange(1, M - 1), size=n, replace=False).astype(np.int64) for n in lengths]


def input_grad_norms(model, params, tokens, target):
    """Independent reference: L2 norm per position of d CE(target at last position) / d embedding."""
    set_vector(model, params)
    x = model.embed(tokens).detach().requires_grad_(True)
    h = model.encode(tokens, x, None)[:, -1]
    F.cross_entropy(model.scores(h), torch.full((tokens.shape[0],), target), reduction="sum").backward()
    return x.grad.norm(dim=-1)


def target_logprob(model, params, tokens, target):
    set_vector(model, params)
    with torch.no_grad():
        return torch.log_softmax(model.scores(model(tokens)[:, -1]), -1)[:, target]


def tiny_dataset(n_users: int, seed: int = 0) -> SeqDataset:
    rng = np.random.default_rng(seed)
    train = tuple(rng.integers(1, M + 1, size=int(rng.integers(3, 12))).astype(np.int64)
                  for _ in range(n_users))
    test = rng.integers(1, M + 1, size=n_users).astype(np.int64)
    return SeqDataset("tiny", M, train, test, np.arange(n_users, dtype=np.int64))


# ----------------------------------------------------------------------------- substitution


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_substitution_picks_largest_gradient_position_never_pad_or_mask(name):
    # Prepare: short sequences (so there is padding); BERT4Rec inputs end with the mask token
    model, params = tiny(name)
    tokens = attack_tokens(model, sequences((3, 6, 9)))
    target = 29
    raw = input_grad_norms(model, params, tokens, target)
    attackable = (tokens != 0) & (tokens != model.cfg.mask_token)
    expected = (raw * attackable).argmax(dim=1)

    # Execute
    sub = substitute(model, params, tokens, torch.full((3,), target), None, tau=-1.0, top_t=5, num_attack=1)

    # Assert
    pos = sub.positions[:, 0]
    assert torch.equal(pos, expected)
    picked = tokens[torch.arange(3), pos]
    assert bool(((picked != 0) & (picked != model.cfg.mask_token)).all())
    if name == "bert4rec":  # the mask position has a real gradient; it is excluded on purpose
        assert bool((raw[:, -1] > 0).all()) and bool((pos != tokens.shape[1] - 1).all())
    assert bool((sub.importance[~attackable] == 0).all())


def test_substitution_honours_tau():
    # Prepare: a tau that only the ~10% most similar items pass
    model, params = tiny()
    tokens = attack_tokens(model, sequences((9,)))
    pos = int(substitute(model, params, tokens, torch.tensor([29]), tau=-1.0).positions[0, 0])
    set_vector(model, params)
    with torch.no_grad():
        e = model.embed(tokens)[0, pos]
        cos = F.cosine_similarity(e[None], model.item_emb.weight[1 : M + 1])  # item c at c - 1
    tau = float(torch.quantile(cos, 0.9))
    admissible = {c + 1 for c in range(M) if cos[c] >= tau} - {int(tokens[0, pos])}
    assert admissible  # the case is meaningful

    # Execute
    sub = substitute(model, params, tokens, torch.tensor([29]), tau=tau, top_t=10)
    none = substitute(model, params, tokens, torch.tensor([29]), tau=1.0, top_t=10)

    # Assert: the chosen item passes the constraint; with nothing admissible nothing changes
    chosen = int(sub.tokens[0, pos])
    assert chosen in admissible and float(cos[chosen - 1]) >= tau
    assert not bool(none.changed.any()) and torch.equal(none.tokens, tokens)


def test_substitution_fill_zeros_tries_low_ids_when_nothing_passes_tau():
    # Prepare: tau = 1 admits nothing; the public code then tries zero-scored items (lowest ids)
    model, params = tiny()
    tokens = attack_tokens(model, sequences((9,)))
    T = 4

    # Execute
    sub = substitute(model, params, tokens, torch.tensor([29]), tau=1.0, top_t=T, fill="zeros")

    # Assert
    pos = int(sub.positions[0, 0])
    own = int(tokens[0, pos])
    lowest = [c for c in range(1, M + 1) if c != own][:T]
    assert bool(sub.changed.all()) and int(sub.tokens[0, pos]) in lowest
    with pytest.raises(ValueError, match="fill"):
        substitute(model, params, tokens, torch.tensor([29]), fill="random")


@pytest.mark.parametrize("num_attack", [1, 2, 3])
def test_substitution_changes_exactly_num_attack_items(num_attack):
    model, params = tiny()
    tokens = attack_tokens(model, sequences((5, 9, 12)))

    sub = substitute(model, params, tokens, torch.full((3,), 29), tau=-1.0, top_t=4, num_attack=num_attack)

    assert ((sub.tokens != tokens).sum(dim=1) == num_attack).all()
    assert bool(sub.changed.all())
    assert bool((sub.tokens[tokens == 0] == 0).all())  # padding untouched


def test_kept_candidate_is_the_best_tried_and_raises_the_target_score():
    # Prepare: the top-5 candidates by cos(e_i - sign(grad_i), E_c), computed independently
    model, params = tiny()
    tokens = attack_tokens(model, sequences((9,)))
    target, T = 29, 5
    set_vector(model, params)
    x = model.embed(tokens).detach().requires_grad_(True)
    h = model.encode(tokens, x, None)[:, -1]
    F.cross_entropy(model.scores(h), torch.tensor([target])).backward()
    pos = int((x.grad.norm(dim=-1) * (tokens != 0)).argmax())
    with torch.no_grad():
        s = F.cosine_similarity((x[0, pos] - x.grad[0, pos].sign())[None], model.item_emb.weight[1 : M + 1])
        s[int(tokens[0, pos]) - 1] = -math.inf  # never the item itself
        cands = s.topk(T).indices + 1
    trials = tokens.repeat(T, 1)
    trials[:, pos] = cands
    logp = target_logprob(model, params, trials, target)
    original = float(target_logprob(model, params, tokens, target)[0])

    # Execute
    sub = substitute(model, params, tokens, torch.tensor([target]), tau=-1.0, top_t=T)

    # Assert
    kept = int(sub.tokens[0, pos])
    assert kept == int(cands[logp.argmax()])
    assert float(target_logprob(model, params, sub.tokens, target)[0]) > original


# ----------------------------------------------------------------------------- implicit view


def test_contrastive_loss_matches_eq7_by_hand():
    # Prepare: a = (1, 0), p = (1, 1), n1 = (0, 2), n2 = (-3, 0): cosines 1/sqrt(2), 0, -1
    a, p = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    n = torch.tensor([[0.0, 2.0], [-3.0, 0.0]])
    s_pos, s1, s2 = 1 / math.sqrt(2), 0.0, -1.0
    denom = math.exp(s_pos) + math.exp(s1) + math.exp(s2)

    # Execute / Assert: label 0 (the paper) and label 1 (the C-FSR code's index)
    expected0 = -math.log(math.exp(s_pos) / denom)
    expected1 = -math.log(math.exp(s1) / denom)
    assert float(contrastive_loss(a, p, n)) == pytest.approx(expected0, abs=1e-6)
    assert float(contrastive_loss(a, p, n, label=1)) == pytest.approx(expected1, abs=1e-6)


# ----------------------------------------------------------------------------- ablations are the same code


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
@pytest.mark.parametrize("leak", [False, True])
def test_dv_fsr_is_s_fsr_plus_contrastive_and_c_fsr_is_target_loss_plus_contrastive(name, leak):
    # Prepare: dropout off, fixed seeds: every term is deterministic
    model, params = tiny(name)
    seqs, users, targets = sequences(), [40, 41, 42], (29,)
    compat = Compat(attack_leak=leak)
    con_only = DualViewAttack(name="con", explicit=False, bce=False, contrastive=True)

    def grad(attack):
        return attack.updates(AttackContext(model, params, seqs, users, targets, 7, 3, NO_DROP, compat)).updates

    # Execute
    dv, s, c, ara = (grad(make_attack(n)) for n in ("dv-fsr", "s-fsr", "c-fsr", "a-ra"))
    con = grad(con_only)

    # Assert
    assert torch.allclose(dv, s + con, atol=1e-6)
    assert torch.allclose(c, ara + con, atol=1e-6)
    assert not torch.allclose(dv, c, atol=1e-4)  # the substitution does change the target loss


def test_eb_gradient_equals_autograd_of_minus_log_sigmoid():
    for name in ("sasrec", "bert4rec"):
        # Prepare: the same loss written out with the module's own autograd
        model, params = tiny(name)
        seq, target = sequences((9,))[0], 29
        tokens = attack_tokens(model, [seq])
        if name == "bert4rec":
            assert int(tokens[0, -1]) == model.cfg.mask_token
        set_vector(model, params)
        model.zero_grad()
        score = model.scores(model(tokens)[:, -1])[0, target]
        (-torch.log(torch.sigmoid(score))).backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])

        # Execute
        ub = make_attack("eb").updates(AttackContext(model, params, [seq], [50], (target,), 0, 0, NO_DROP, Compat()))

        # Assert
        assert torch.allclose(ub.updates[0], expected, atol=1e-6)
        assert ub.num_samples.tolist() == [9]


def test_attack_leak_makes_the_item_table_gradient_dense():
    # Prepare
    model, params = tiny()
    seqs, targets = sequences((9,)), (29,)
    attack = make_attack("dv-fsr", {"num_negatives": "5"})
    names = [n for n, _ in model.named_parameters()]
    before = names.index("item_emb.weight")
    start = sum(p.numel() for n, p in model.named_parameters() if names.index(n) < before)
    V, d = model.item_emb.weight.shape

    def table_rows(compat):
        g = attack.updates(AttackContext(model, params, seqs, [60], targets, 0, 0, NO_DROP, compat)).updates[0]
        return set(torch.nonzero(g[start : start + V * d].view(V, d).abs().sum(1)).flatten().tolist())

    # Execute
    sparse, dense = table_rows(Compat()), table_rows(Compat(attack_leak=True))

    # Assert: off, only rows of the substituted sequence, the 5 negatives and the target
    assert len(sparse) <= len(seqs[0]) + 1 + 5 + 1
    assert len(dense) >= V - 1


def test_batching_does_not_change_a_users_update_with_dropout_on():
    model, params = tiny()
    seqs, users = sequences(), [70, 71, 72]
    attack = make_attack("dv-fsr", {"repeats": "3"})
    together = attack.updates(AttackContext(model, params, seqs, users, (29,), 5, 2, LocalConfig(), Compat())).updates
    alone = attack.updates(AttackContext(model, params, seqs[1:2], users[1:2], (29,), 5, 2, LocalConfig(), Compat())).updates
    assert torch.allclose(together[1], alone[0], atol=1e-5)


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_every_attack_returns_one_finite_update_per_user(name):
    model, params = tiny(name)
    seqs, users = sequences(), [80, 81, 82]
    for attack_name in sorted(ATTACKS):
        attack = make_attack(attack_name)
        # what the adversary fills in from the data set for an attack that declares it needs it
        data = tiny_dataset(20)
        public = public_sequences(data, attack.public_share, 1) if attack.public_share > 0 else None
        popularity = item_counts(data) if attack.needs_popularity else None
        ctx = AttackContext(model, params, seqs, users, (29, 28), 1, 4, LocalConfig(), Compat.reference(),
                            popularity=popularity, public=public, lr=0.01)
        ub = attack.updates(ctx)
        assert ub.updates.shape == (3, params.shape[0]), attack_name
        assert bool(torch.isfinite(ub.updates).all()), attack_name
        # every attack passes the server's sanity bound with room to spare (it is no defense)
        assert out_of_bounds(ub.updates) == [] and float(ub.updates.abs().max()) < UPDATE_BOUND / 100, attack_name
        assert ub.users.tolist() == users and ub.num_samples.tolist() == [5, 9, 15], attack_name


def test_generic_model_poisoning_attacks():
    # Prepare
    model, params = tiny()
    local = LocalConfig()  # seeded dropout: deterministic
    seqs, users, args = sequences(), [90, 91, 92], ((29,), 3, 1, local, Compat())
    honest = compute_updates(model, params, seqs, users, 3, 1, local).updates
    eb = make_attack("eb").updates(AttackContext(model, params, seqs, users, *args)).updates

    # Execute
    flip = make_attack("sign-flip", {"factor": "2"}).updates(AttackContext(model, params, seqs, users, *args)).updates
    scale = make_attack("scale", {"base": "eb", "factor": "3"})
    scaled = scale.updates(AttackContext(model, params, seqs, users, *args)).updates
    alie = make_attack("alie", {"z": "1.5"})
    out = alie.updates(AttackContext(model, params, seqs, users, *args)).updates
    pool = alie.benign_pool(AttackContext(model, params, seqs, users, *args)).updates
    mu, sd = pool.mean(0), pool.std(0, correction=0)

    # Assert
    assert torch.allclose(flip, -2 * honest)
    assert torch.allclose(scaled, 3 * eb)
    assert torch.allclose(pool[:3], honest)  # view 0: the users' own honest updates
    assert torch.allclose(out, mu + 1.5 * sd * torch.sign(eb), atol=1e-6)
    assert alie_z(256, 1) == 0.0 and alie_z(50, 12) == pytest.approx(0.5828, abs=1e-3)


def test_min_max_and_min_sum_gamma_on_a_hand_case():
    """Three benign updates (0,0), (2,0), (0,2), mean (2/3, 2/3), pushed along (1, 0)."""
    # Prepare
    pool = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([1.0, 0.0])
    # Execute
    g_max, g_sum = max_gamma(pool, p, "min-max"), max_gamma(pool, p, "min-sum")
    # Assert: Min-Max is bound by (0,2): (2/3 + g)^2 + 16/9 = 8 (the largest pairwise distance^2)
    assert g_max == pytest.approx((math.sqrt(56) - 2) / 3)
    m = pool.mean(0) + g_max * p
    assert float(((m - pool) ** 2).sum(1).max()) == pytest.approx(8.0)
    # Min-Sum: sum of squared distances up to the largest row sum of the pairwise matrix (12)
    assert g_sum == pytest.approx(math.sqrt(20 / 9))
    m = pool.mean(0) + g_sum * p
    assert float(((m - pool) ** 2).sum()) == pytest.approx(12.0)
    assert max_gamma(pool, torch.zeros(2), "min-max") == 0.0


@pytest.mark.parametrize("mode", ["min-max", "min-sum"])
def test_min_max_attacks_stay_inside_the_benign_bound_and_push_the_target(mode):
    # Prepare
    model, params = tiny()
    local = LocalConfig()
    seqs, users, args = sequences(), [90, 91, 92], ((29,), 3, 1, local, Compat())
    from attacker.attacks.alie import benign_pool

    pool = benign_pool(AttackContext(model, params, seqs, users, *args), 4).updates
    mu = pool.mean(0)
    pair = torch.cdist(pool.double(), pool.double()) ** 2
    # Execute
    untargeted = make_attack(mode, {"direction": "none"}).updates(AttackContext(model, params, seqs, users, *args)).updates
    targeted = make_attack(mode).updates(AttackContext(model, params, seqs, users, *args)).updates
    push = make_attack("dv-fsr").updates(AttackContext(model, params, seqs, users, *args)).updates
    # Assert: the paper's attack sends one update, -mu's direction, on the bound
    assert torch.equal(untargeted[0], untargeted[1]) and torch.equal(untargeted[0], untargeted[2])
    step = (untargeted[0] - mu).double()
    assert float(torch.nn.functional.cosine_similarity(step, -mu.double(), dim=0)) == pytest.approx(1.0, abs=1e-5)
    for m in (untargeted[0], *targeted):
        d2 = ((m.double() - pool.double()) ** 2).sum(1)
        bound = pair.max() if mode == "min-max" else pair.sum(1).max()
        got = d2.max() if mode == "min-max" else d2.sum()
        assert float(got) == pytest.approx(float(bound), rel=1e-4)
    # targeted: each user's step is along its own DV-FSR update
    for i in range(3):
        cos = torch.nn.functional.cosine_similarity((targeted[i] - mu).double(), push[i].double(), dim=0)
        assert float(cos) == pytest.approx(1.0, abs=1e-4)


def test_min_max_options_are_checked():
    with pytest.raises(AttackConfigError, match="perturbation"):
        make_attack("min-max", {"direction": "none", "perturbation": "sideways"})
    with pytest.raises(AttackConfigError, match="direction"):
        make_attack("min-sum", {"direction": "none", "direction.tau": "0.5"})
    assert make_attack("min-sum", {"direction": "eb"}).direction.name == "eb"


def test_pieck_mines_the_rows_that_moved_most_and_pulls_the_target_to_their_centroid():
    # Prepare: version 0 of seed 5, then items 3 and 7 moved far, item 5 a little, target 29 too
    from attacker.attacks.pieck import initial_params, mine_popular
    from attacker.attacks.spattack import table_slice

    model, init = tiny(seed=5)
    offset, rows, width = table_slice(model)
    params = init.clone()
    table = params[offset:offset + rows * width].view(rows, width)
    table[3] += 1.0
    table[7] -= 1.0
    table[5] += 0.1
    table[29] += 5.0  # the target moved most, but is never its own popular item
    seqs, users = sequences(), [90, 91]
    # Execute
    mined = mine_popular(params, initial_params(model, 5), model, 2, exclude=[29])
    rows_only = make_attack("pieck", {"base": "none", "popular": "2", "factor": "2"})
    ub = rows_only.updates(AttackContext(model, params, seqs[:2], users, (29,), 5, 1, LocalConfig(), Compat()))
    with_base = make_attack("pieck", {"base": "eb", "popular": "2"}).updates(AttackContext(
        model, params, seqs[:2], users, (29,), 5, 1, LocalConfig(), Compat())).updates
    eb = make_attack("eb").updates(AttackContext(model, params, seqs[:2], users, (29,), 5, 1, LocalConfig(),
                                                 Compat())).updates
    # Assert: mining from version 0 (which the call leaves the model without), the pull, the base
    assert mined.tolist() == [3, 7]
    assert torch.equal(initial_params(model, 5), init)
    centroid = (table[3] + table[7]) / 2
    u = ub.updates.view(2, -1)[:, offset:offset + rows * width].view(2, rows, width)
    assert torch.allclose(u[:, 29], 2 * (table[29] - centroid).expand(2, -1))
    assert int((u.abs().sum(2) > 0).sum()) == 2 and float(ub.updates.abs().sum()) == float(u.abs().sum())
    stepped = table[29] - 0.1 * u[0, 29]  # the server's step moves the target toward the centroid
    assert (stepped - centroid).norm() < (table[29] - centroid).norm()
    rows_eb = (with_base - eb)[:, offset:offset + rows * width].view(2, rows, width)
    assert torch.allclose(rows_eb[:, 29], (table[29] - centroid).expand(2, -1), atol=1e-6)
    with pytest.raises(AttackConfigError, match="base"):
        make_attack("pieck", {"base": "none", "base.x": "1"})
    with pytest.raises(AttackConfigError, match="popular"):
        make_attack("pieck", {"popular": "0"})


def test_fedrecattack_lifts_the_target_over_the_public_users_top_items():
    # Prepare: 40 benign users, 10% public (4), a step of the sum of two malicious updates
    from attacker.attacks.common import Functional, attack_tokens
    from attacker.attacks.fedrecattack import public_users

    model, params = tiny()
    data = tiny_dataset(40)
    attack = make_attack("fedrecattack", {"public": "0.1", "batch": "4", "top_k": "5"})
    pub = [np.asarray(data.train[int(u)]) for u in public_users(data, 0.1, 3)]
    public = public_sequences(data, attack.public_share, 3)  # what the adversary passes (ctx.public)

    def margin(p: torch.Tensor) -> float:  # mean over public users of s_target - mean of the top-5 others
        s = Functional(model, p).scores(Functional(model, p).hidden(attack_tokens(model, pub), None))[:, 1:M + 1]
        r = s.clone()
        for i, seq in enumerate(pub):
            r[i, torch.as_tensor(seq - 1)] = -math.inf
        r[:, 28] = -math.inf
        return float((s[:, 28] - r.topk(5, dim=1).values.mean(1)).mean())

    # Execute
    ub = attack.updates(AttackContext(model, params, sequences()[:2], [90, 91], (29,), 3, 1, LocalConfig(), Compat(),
                                      public=public))
    clipped = make_attack("fedrecattack", {"public": "0.1", "clip": "0.01"}).updates(AttackContext(
        model, params, sequences()[:2], [90, 91], (29,), 3, 1, LocalConfig(), Compat(), public=public)).updates
    # Assert
    drawn = public_users(data, 0.1, 3)
    assert len(pub) == 4 and drawn.tolist() == sorted(set(drawn.tolist())) and all(0 <= u < 40 for u in drawn)
    assert attack.public_share == 0.1 and all(np.array_equal(a, b) for a, b in zip(public, pub, strict=True))
    assert any(public_users(data, 0.1, s).tolist() != drawn.tolist() for s in (4, 5, 6))  # the run seed draws them
    assert margin(params - 0.5 * ub.updates.sum(0)) > margin(params)
    assert torch.allclose(clipped.norm(dim=1), torch.full((2,), 0.01), rtol=1e-4)
    with pytest.raises(ValueError, match="public data"):
        make_attack("fedrecattack").updates(AttackContext(model, params, sequences()[:1], [90], (29,), 3, 1,
                                                          LocalConfig(), Compat()))
    with pytest.raises(AttackConfigError, match="public"):
        make_attack("fedrecattack", {"public": "0"})


# ----------------------------------------------------------------------------- population


def test_population_size_rules():
    assert population_size(3753, 0.001)[0] == 3
    assert population_size(3753, 0.0005)[0] == 1
    assert population_size(6040, 0.001)[0] == 6
    m, note = population_size(400, 0.001)
    assert m == 1 and "using 1" in note
    assert population_size(400, 0.0)[0] == 0
    for bad in (-0.1, 1.0, 1.5, float("nan"), "abc"):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            population_size(400, bad)  # type: ignore[arg-type]


def test_malicious_population_copies_distinct_real_users():
    ds = tiny_dataset(200)

    pop = malicious_population(ds, 0.02, seed=3)

    assert pop.ids.tolist() == [200, 201, 202, 203]
    assert len(set(pop.source_users.tolist())) == 4
    for u, s in zip(pop.source_users, pop.sequences, strict=True):
        assert np.array_equal(s, ds.train[int(u)]) and s is not ds.train[int(u)]
    again = malicious_population(ds, 0.02, seed=3)
    assert np.array_equal(again.source_users, pop.source_users)
    assert "floor(200 * 0.02)" in pop.note
    assert pop.sequences_of([202])[0] is pop.sequences[2]


def test_random_attack_profiles_end_with_the_target_and_are_independent():
    seqs = random_attack_sequences(M + 70, 7, 4, seed=1)

    for s in seqs:
        assert len(s) == 50 and s[-1] == 7 and 7 not in s[:-1]
        assert len(set(s.tolist())) == 50 and s.min() >= 1 and s.max() <= M + 70
    firsts = [set(s[:-1].tolist()) for s in seqs]
    assert all(not (firsts[i] <= firsts[j]) for i in range(4) for j in range(4) if i != j)
    # each fake user is a function of (seed, its index) only
    assert np.array_equal(random_attack_sequences(M + 70, 7, 2, seed=1)[1], seqs[1])
    cycled = random_attack_sequences(M + 70, [7, 8], 3, seed=1)
    assert [int(s[-1]) for s in cycled] == [7, 8, 7]


def test_ra_trains_honestly_on_fake_profiles():
    model, params = tiny()
    pop = fake_population(tiny_dataset(300), 0.01, seed=0, targets=[29], length=10)
    attack = make_attack("ra", {"length": "10"})
    assert attack.fake_users and pop.source_users.tolist() == [-1, -1, -1]

    ub = attack.updates(AttackContext(model, params, pop.sequences, pop.ids, (29,), 0, 2, LocalConfig(), Compat()))

    assert torch.equal(ub.updates, compute_updates(model, params, pop.sequences, pop.ids, 0, 2).updates)


# ----------------------------------------------------------------------------- registry


def test_registry_errors_name_what_is_accepted():
    with pytest.raises(AttackConfigError, match="known attacks: a-ra, alie, c-fsr, dv-fsr"):
        make_attack("dvfsr")
    with pytest.raises(AttackConfigError, match="accepted options: .*num_negatives=100"):
        make_attack("dv-fsr", {"temperature": "1"})
    with pytest.raises(AttackConfigError, match="tau='x' is not a valid float"):
        make_attack("dv-fsr", {"tau": "x"})
    with pytest.raises(AttackConfigError, match=r"allowed: in \[-1, 1\]"):
        make_attack("dv-fsr", {"tau": "2"})
    with pytest.raises(AttackConfigError, match="fill='x' is invalid; allowed: none or zeros"):
        make_attack("dv-fsr", {"fill": "x"})
    with pytest.raises(AttackConfigError, match="repeats"):
        make_attack("a-ra", {"repeats": "0"})
    with pytest.raises(AttackConfigError, match="has no option 'tau'"):
        make_attack("c-fsr", {"tau": "0.3"})
    with pytest.raises(AttackConfigError, match="unknown attack 'nope'"):
        make_attack("scale", {"base": "nope"})
    with pytest.raises(AttackConfigError, match="'eb' has no option 'bogus'"):
        make_attack("scale", {"base": "eb", "base.bogus": "1"})
    with pytest.raises(AttackConfigError, match="z="):
        make_attack("alie", {"z": "-1"})
    scaled = make_attack("scale", {"base": "s-fsr", "base.tau": "0.25", "factor": "2"})
    assert scaled.base.tau == 0.25 and scaled.factor == 2.0


# ----------------------------------------------------------------------------- experiment and sim


def test_setup_validates_the_attack_and_adds_the_population():
    base = dict(dataset="synthetic", model="sasrec", seed=0)
    with pytest.raises(ConfigError, match="unknown attack 'dv'"):
        prepare(build_config(None, {**base, "attack": "dv", "malicious_ratio": 0.01}))
    with pytest.raises(ConfigError, match="needs malicious_ratio in"):
        prepare(build_config(None, {**base, "attack": "dv-fsr", "malicious_ratio": 0.0}))
    with pytest.raises(ConfigError, match="has no option"):
        prepare(build_config(None, {**base, "attack": "eb", "attack_opts": {"k": "1"},
                                  "malicious_ratio": 0.01}))
    with pytest.raises(ConfigError, match="outside the catalogue"):
        prepare(build_config(None, {**base, "attack": "eb", "malicious_ratio": 0.01, "targets": [10_000]}))

    p = prepare(build_config(None, {**base, "attack": "dv-fsr", "malicious_ratio": 0.01}))
    s = p.setup
    N = s.dataset.num_users
    assert p.adversary is not None and p.adversary.population.ids.tolist() == list(range(N, N + 4))
    clients = all_clients(s)
    assert clients.tolist() == list(range(N + 4))
    rounds = epoch_rounds(s.cfg, clients, 0)
    assert sorted(np.concatenate(rounds).tolist()) == clients.tolist()
    assert all_clients(setup(build_config(None, base))).tolist() == list(range(N))


def test_the_adversary_fills_each_context_with_what_the_attack_declared():
    # Prepare: 40 benign users, 4 malicious clients; FedRecAttack declares public_share = its option
    from attacker.population import make_adversary
    from fedseq.experiment import Setup
    from fedseq.params import Layout

    model, params = tiny()
    data = tiny_dataset(40)

    def adversary(name: str, opts: dict[str, str]):
        cfg = build_config(None, dict(dataset="synthetic", model="sasrec", seed=3, attack=name, attack_opts=opts,
                                      malicious_ratio=0.1, targets=[29]), environ={})
        s = Setup(cfg, data, model, Layout.of(model), (29,), 4, "")
        adv = make_adversary(s)
        assert adv is not None
        return s, adv

    # Execute
    s, fedrec = adversary("fedrecattack", {"public": "0.1"})
    _, scaled = adversary("scale", {"base": "fedrecattack", "base.public": "0.1", "factor": "2"})
    _, dv = adversary("eb", {})
    ctx = fedrec.context(s, params, s.malicious_users[:2], 5)
    # Assert: the public share's sequences, drawn with the run seed, once; nothing for an attack that needs none
    assert fedrec.public is not None and fedrec.popularity is None
    assert all(np.array_equal(a, b) for a, b in zip(fedrec.public, public_sequences(data, 0.1, 3), strict=True))
    assert ctx.public is fedrec.public and ctx.users.tolist() == [40, 41] and ctx.targets == (29,)
    assert dv.public is None and dv.popularity is None
    # a wrapper gets its base's data: scale x 2 of the same FedRecAttack update
    mal = s.malicious_users
    assert torch.equal(scaled.updates(s, params, mal, 5).updates, 2 * fedrec.updates(s, params, mal, 5).updates)


def test_the_adversary_passes_each_rounds_learning_rate_from_the_plan():
    # Prepare: 2 epochs, the learning rate halved after the first; 44 clients in rounds of 16
    from attacker.population import make_adversary
    from fedseq.experiment import Setup
    from fedseq.params import Layout

    model, params = tiny()
    cfg = build_config(None, dict(dataset="synthetic", model="sasrec", seed=3, attack="eb", malicious_ratio=0.1,
                                  targets=[29], epochs=2, lr=0.2, lr_decay=0.5, lr_decay_every=1,
                                  clients_per_round=16), environ={})
    s = Setup(cfg, tiny_dataset(40), model, Layout.of(model), (29,), 4, "")
    adv = make_adversary(s)
    assert adv is not None
    # Execute
    lrs = [adv.context(s, params, s.malicious_users[:1], r).lr for r in range(7)]
    # Assert: rounds 0-2 are epoch 0, 3-5 epoch 1; a round outside the plan gets the configured lr
    assert lrs == [0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.2]
    assert lrs[:6] == [rp.lr for rp in plan_run(cfg, all_clients(s), 40)]


def _sim(attack: str, epochs: int = 2, **extra):
    # the default synthetic data (400 users: 4 malicious clients at ratio 0.01) with sequences of at
    # most 20 items (they set the training cost), 2 epochs: at seeds 0-3 DV-FSR's ER@10 is 0.30-0.40,
    # and at most 0.0025 without attack
    cfg = build_config(None, dict(dataset="synthetic:max_length=20", model="sasrec", epochs=epochs, clients_per_round=64,
                                  lr=0.01, seed=0, threads=1, attack=attack,
                                  malicious_ratio=0.01 if attack != "none" else 0.0, **extra))
    return run_inprocess(cfg, None, progress=lambda _line: None)


def test_sim_dv_fsr_raises_exposure_and_reports_malicious_updates():
    # Execute
    clean = _sim("none")
    attacked = _sim("dv-fsr")

    # Assert
    last_clean, last_attacked = clean["epochs"][-1], attacked["epochs"][-1]
    assert last_clean["er@10"] <= 0.01
    assert last_attacked["er@10"] > last_clean["er@10"] + 0.05
    assert "malicious_updates" not in last_clean and "attack" not in clean["summary"]
    assert all(e["malicious_updates"] == 4 for e in attacked["epochs"])  # every client once per epoch
    assert attacked["summary"]["malicious_clients"] == 4
    assert "floor(400 * 0.01)" in attacked["summary"]["population"]


def test_sim_reports_how_many_malicious_updates_a_robust_rule_kept():
    res = _sim("scale", epochs=1, defense="krum", defense_opts={"m": "32"},
               attack_opts={"base": "eb", "factor": "50"})
    row = res["epochs"][0]
    assert row["malicious_updates"] == 4 and 0 <= row["malicious_kept"] <= 4


def test_reference_attacker_draw_copies_the_users_the_public_code_copies():
    # Prepare: the public code's draw is random.seed(20000000); random.sample(range(N), m)
    import random

    from attacker.population import malicious_population
    from fedseq.data import synthetic

    ds = synthetic(num_users=500, num_items=120, seed=3)
    expected = random.Random(20000000).sample(range(500), 5)
    # Execute
    pop = malicious_population(ds, 0.01, seed=0, reference_draw=True)
    default = malicious_population(ds, 0.01, seed=0)
    # Assert
    assert pop.source_users.tolist() == expected
    assert [s.tolist() for s in pop.sequences] == [ds.train[u].tolist() for u in expected]
    assert pop.ids.tolist() == list(range(500, 505))
    assert default.source_users.tolist() != expected
