"""PoisonFRS (attacker/attacks/poisonfrs.py): the popular items, the goal row, the filler rows,
the noise, and that the server's step with one update lands the rows where the paper's delta
puts them. Tiny real models, exact cases, no mocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny import M
from _tiny import tiny as tiny_model

from attacker.attacks import AttackConfigError, AttackContext, PoisonFRS, make_attack
from attacker.attacks.poisonfrs import filler_items, normalised_noise, popular_items
from fedseq.config import Compat
from fedseq.engine import server_step
from fedseq.popularity import initial_params, item_table_slice
from fedseq.training import LocalConfig, compute_updates

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 4




def tiny(name: str = "sasrec"):
    """A tiny model and weights that have moved from the run's version 0 (seed ``SEED``)."""
    model, v0 = tiny_model(name, SEED)
    moved = v0 + 0.05 * torch.randn(v0.shape, generator=torch.Generator().manual_seed(1))
    return model, moved


def sequences(lengths=(5, 9)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.choice(np.arange(1, M - 1), size=n, replace=False).astype(np.int64) for n in lengths]


def ctx(model, params, users=(40, 41), targets=(29,), round_key=3, lr=0.05):
    return AttackContext(model, params, sequences((5, 9, 7)[:len(users)]), list(users), targets, SEED, round_key,
                         LocalConfig(dropout=False), Compat(), lr=lr)


def table_of(model, params):
    off, rows, width = item_table_slice(model)
    return params[off:off + rows * width].view(rows, width)


def test_popular_items_are_those_least_aligned_with_the_mean_item_row():
    # Prepare: 5 items in 2-d (row 0 the padding, row 6 a non-item token), mean of items 1..5 = (1, 0)
    table = torch.tensor([[9., 9.], [3., 0.], [-1., 1.], [-1., -1.], [2., 0.], [2., 0.], [-50., 0.]])
    # Execute
    two = popular_items(table, 5, 2)
    without = popular_items(table, 5, 2, exclude=[2])
    # Assert: inner products 3, -1, -1, 2, 2: items 2 and 3 tie (lower id first); the padding and
    # the token row never count, not even in the mean
    assert two.tolist() == [2, 3]
    assert without.tolist() == [3, 4]


def test_filler_items_are_the_rows_farthest_from_the_snapshot():
    table = torch.tensor([[0., 0.], [1., 0.], [0., 3.], [2., 0.], [0., 0.]])
    snapshot = torch.tensor([[5., 5.], [0., 0.], [0., 0.], [0., 0.], [0., 2.]])
    # distances of items 1..4: 1, 3, 2, 2 (the padding row's 7.07 never counts)
    assert filler_items(table, snapshot, 4, 3).tolist() == [2, 3, 4]
    assert filler_items(table, snapshot, 4, 2, exclude=[2]).tolist() == [3, 4]
    assert filler_items(table, snapshot, 4, 0).tolist() == []


def test_noise_rows_are_normalised_to_mean_zero_and_unit_std():
    x = normalised_noise(5, 8, torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(1), torch.zeros(5, dtype=x.dtype), atol=1e-12)
    assert torch.allclose(x.std(1), torch.ones(5, dtype=x.dtype))


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_the_servers_step_lands_the_target_on_scale_times_the_popular_centroid(name):
    # Prepare: without noise, one update, the round's learning rate
    model, params = tiny(name)
    attack = make_attack("poisonfrs", {"noise": "0", "items_limit": "6", "k": "3"})
    lr = 0.05
    table = table_of(model, params).double()
    snapshot = table_of(model, initial_params(model, SEED)).double()
    items = table[1:M + 1]
    least = (torch.argsort(items @ items.mean(0), stable=True) + 1).tolist()
    popular = [i for i in least if i != 29][:3]
    goal = 10 * table[popular].mean(0)
    farthest = (torch.argsort(-(snapshot[1:M + 1] - items).norm(dim=1), stable=True) + 1).tolist()
    fillers = [i for i in farthest if i != 29][:5]
    # Execute
    ub = attack.updates(ctx(model, params, lr=lr))
    after = server_step(params, ub.updates[0], lr)
    # Assert: the target row on its goal, the 5 fillers back on version 0, nothing else moved
    new = table_of(model, after).double()
    assert torch.allclose(new[29], goal, atol=1e-5)
    assert torch.allclose(new[fillers], snapshot[fillers], atol=1e-5)
    moved = torch.nonzero((after - params).abs() > 0).flatten()
    off, _, width = item_table_slice(model)
    assert sorted({(int(i) - off) // width for i in moved}) == sorted(fillers + [29])
    assert torch.equal(ub.updates[0], ub.updates[1])  # without noise the users agree
    assert ub.num_samples.tolist() == [5, 9] and ub.losses.tolist() == [0.0, 0.0]


def test_alpha_and_scale_size_the_target_rows_delta():
    model, params = tiny()
    base = make_attack("poisonfrs", {"noise": "0"}).updates(ctx(model, params)).updates[0]
    half = make_attack("poisonfrs", {"noise": "0", "alpha": "0.5", "scale": "4"}).updates(ctx(model, params)).updates[0]
    table = table_of(model, params).double()
    popular = popular_items(table, M, 5, [29])
    m = table[torch.as_tensor(popular)].mean(0)
    off, _, width = item_table_slice(model)
    row = slice(off + 29 * width, off + 30 * width)
    assert torch.allclose(base[row].double(), -(10 * m - table[29]) / 0.05, atol=1e-3)
    assert torch.allclose(half[row].double(), -0.5 * (4 * m - table[29]) / 0.05, atol=1e-3)


def test_noise_is_per_user_seeded_and_row_normalised():
    # Prepare
    model, params = tiny()
    attack = make_attack("poisonfrs", {"items_limit": "12", "noise": "1"})
    quiet = make_attack("poisonfrs", {"items_limit": "12", "noise": "0"})
    # Execute
    both = attack.updates(ctx(model, params)).updates
    alone = attack.updates(ctx(model, params, users=(41,))).updates
    other_round = attack.updates(ctx(model, params, round_key=4)).updates
    plain = quiet.updates(ctx(model, params)).updates
    # Assert: the noise rows (in the reference's units: -lr * update) are N(0, 1) rows normalised,
    # the user's own whatever the batch, different per user and per round
    noise = -0.05 * (both - plain)
    off, rows, width = item_table_slice(model)
    per_row = noise[:, off:off + rows * width].view(2, rows, width)
    touched = per_row.abs().sum(-1) > 0
    assert touched.sum(1).tolist() == [12, 12] and bool(touched[:, 29].all())
    assert torch.allclose(per_row[touched].mean(-1), torch.zeros(24), atol=1e-5)
    assert torch.allclose(per_row[touched].std(-1), torch.ones(24), atol=1e-4)
    assert torch.equal(alone[0], both[1])
    assert not torch.equal(both[0] - plain[0], both[1] - plain[1])
    assert not torch.equal(other_round[0], both[0])


def test_before_start_the_client_sends_its_honest_update():
    model, params = tiny()
    c = ctx(model, params, round_key=2)
    early = make_attack("poisonfrs", {"start": "3"}).updates(c)
    honest = compute_updates(model, params, c.sequences, c.users, SEED, 2, c.local)
    assert torch.equal(early.updates, honest.updates)
    late = make_attack("poisonfrs", {"start": "2"}).updates(c)
    assert not torch.equal(late.updates, honest.updates)


def test_options_and_the_missing_learning_rate_are_refused():
    assert make_attack("poisonfrs") == PoisonFRS(scale=10.0, k=5, alpha=1.0, items_limit=60, noise=0.07, start=0)
    for key, raw in (("k", "0"), ("scale", "-1"), ("alpha", "0"), ("items_limit", "0"), ("noise", "-0.1"),
                     ("start", "-1"), ("k", "x")):
        with pytest.raises(AttackConfigError, match=f"{key}="):
            make_attack("poisonfrs", {key: raw})
    with pytest.raises(AttackConfigError, match="has no option 'lambda'; accepted options: alpha=1.0"):
        make_attack("poisonfrs", {"lambda": "10"})
    model, params = tiny()
    with pytest.raises(ValueError, match="learning rate; the context has lr=None"):
        make_attack("poisonfrs").updates(ctx(model, params, lr=None))
