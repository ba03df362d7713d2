"""Spattack (attacker/attacks/spattack.py): which rows it touches, what it puts there, that the
malicious clients concentrated on rare rows own those rows under item-wise sparse aggregation, the
popularity the runners pass in its context, and option errors. Tiny real models, no mocks. Prepare / Execute / Assert."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny import M, tiny

from attacker.attacks import AttackConfigError, AttackContext, Spattack, item_counts, make_attack, rare_items
from attacker.attacks.spattack import table_slice
from cli.plugins import prepare
from fedseq.config import Compat, build_config
from fedseq.data import SeqDataset
from fedseq.params import Layout
from fedseq.training import LocalConfig, compute_updates
from server.aggregation import RoundContext, make_rule

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOCAL = LocalConfig()  # seeded dropout: deterministic




def seqs(n: int, seed: int, low: int = 1, high: int = 20) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(np.arange(low, high), size=int(rng.integers(4, 9)), replace=False).astype(np.int64)
            for _ in range(n)]


def item_rows(update: torch.Tensor, model) -> torch.Tensor:
    off, rows, width = table_slice(model)
    return update[..., off:off + rows * width].reshape(*update.shape[:-1], rows, width)


def test_rare_items_fewest_interactions_ties_to_lower_id_targets_excluded() -> None:
    counts = np.array([0, 5, 0, 0, 2, 0, 1])
    assert rare_items(counts, 2, exclude=[2]).tolist() == [3, 5]
    assert rare_items(counts, 4, exclude=[]).tolist() == [2, 3, 5, 6]


def test_item_counts_counts_training_interactions() -> None:
    ds = SeqDataset("t", 4, (np.array([1, 2, 2]), np.array([4])), np.array([3, 1]), np.arange(2))
    assert item_counts(ds).tolist() == [0, 1, 2, 0, 1]


def test_promote_sends_the_base_rows_on_targets_and_rare_items_only() -> None:
    # Prepare: popularity: items 1..19 popular, 20..30 rare; target 29
    model, params = tiny()
    counts = np.zeros(M + 1, dtype=np.int64)
    counts[1:20] = 10
    s, users = seqs(3, 0), [50, 51, 52]
    attack = make_attack("spattack", {"rows": "3", "base": "eb", "factor": "2"})
    base = make_attack("eb").updates(AttackContext(model, params, s, users, (29,), 1, 2, LOCAL, Compat())).updates
    # Execute
    out = attack.updates(AttackContext(model, params, s, users, (29,), 1, 2, LOCAL, Compat(), popularity=counts)).updates
    # Assert: rows 20, 21, 22 (rarest, lower ids), the target 29 and the mask token 31, x 2; every
    # other item row zero; the shared weights are the base's
    chosen = [20, 21, 22, 29, 31]
    rows_out, rows_base = item_rows(out, model), item_rows(base, model)
    assert torch.equal(rows_out[:, chosen], 2 * rows_base[:, chosen])
    others = [r for r in range(rows_out.shape[1]) if r not in chosen]
    assert torch.equal(rows_out[:, others], torch.zeros_like(rows_out[:, others]))
    off, r, w = table_slice(model)
    assert torch.equal(out[:, off + r * w:], base[:, off + r * w:]) and bool(rows_base[:, 29].abs().sum() > 0)


def test_token_rows_false_leaves_the_mask_row_alone() -> None:
    model, params = tiny()
    attack = make_attack("spattack", {"rows": "2", "base": "eb", "token_rows": "false"})
    out = attack.updates(AttackContext(model, params, seqs(2, 1), [60, 61], (29,), 1, 2, LOCAL, Compat())).updates
    touched = (item_rows(out, model)[0].abs().sum(dim=1) > 0).nonzero().flatten().tolist()
    assert 31 not in touched and 29 in touched


def test_shared_false_zeroes_everything_but_the_chosen_rows() -> None:
    model, params = tiny()
    attack = make_attack("spattack", {"rows": "2", "base": "eb", "shared": "false"})
    out = attack.updates(AttackContext(model, params, seqs(2, 1), [60, 61], (29,), 1, 2, LOCAL, Compat())).updates
    off, r, w = table_slice(model)
    assert torch.equal(out[:, off + r * w:], torch.zeros_like(out[:, off + r * w:]))


def test_disrupt_rows_are_shared_by_all_attackers_and_seeded_by_round() -> None:
    # Prepare
    model, params = tiny()
    attack = make_attack("spattack", {"goal": "disrupt", "rows": "4", "factor": "3"})  # no popularity: lowest ids
    s, users = seqs(3, 2), [70, 71, 72]
    # Execute
    a = attack.updates(AttackContext(model, params, s, users, (29,), 1, 5, LOCAL, Compat())).updates
    b = attack.updates(AttackContext(model, params, s[:1], users[:1], (29,), 1, 5, LOCAL, Compat())).updates
    c = attack.updates(AttackContext(model, params, s, users, (29,), 1, 6, LOCAL, Compat())).updates
    honest = compute_updates(model, params, s, users, 1, 5, LOCAL).updates
    # Assert: identical rows for every attacker and batch; another round, other rows; shared = honest
    ra, rc = item_rows(a, model), item_rows(c, model)
    touched = (ra[0].abs().sum(dim=1) > 0).nonzero().flatten().tolist()
    assert touched == [1, 2, 3, 4, 29, 31]  # no popularity: every item equally rare (lowest ids); + mask 31
    assert torch.equal(ra[0], ra[1]) and torch.equal(ra[0], ra[2]) and torch.equal(ra[0], item_rows(b, model)[0])
    assert not torch.equal(ra[0], rc[0])
    off, r, w = table_slice(model)
    assert torch.equal(a[:, off + r * w:], honest[:, off + r * w:])


def test_concentrated_attackers_own_the_rare_rows_under_sparse_median() -> None:
    # Prepare: 12 benign users who use items 1..19; 3 attackers concentrating on the 4 rarest items
    model, params = tiny()
    benign = compute_updates(model, params, seqs(12, 3), list(range(12)), 1, 7, LOCAL).updates
    counts = np.zeros(M + 1, dtype=np.int64)
    counts[1:20] = 10
    attack = make_attack("spattack", {"goal": "disrupt", "rows": "4", "factor": "5"})
    bad = attack.updates(AttackContext(model, params, seqs(3, 4), [12, 13, 14], (29,), 1, 7, LOCAL, Compat(),
                                       popularity=counts)).updates
    u = torch.cat([benign, bad])
    rule = make_rule("sparse:median")
    # Execute
    agg = rule(u, RoundContext(torch.ones(15), layout=Layout.of(model))).vector
    # Assert: on every chosen row fewer benign updates than attackers touch it, and the row is
    # exactly the attackers' value times the touches; a popular row stays benign
    rows_agg, rows_u = item_rows(agg, model), item_rows(u, model)
    benign_touch = (rows_u[:12].abs().sum(dim=2) > 0).sum(dim=0)
    owned = [r for r in (20, 21, 22, 23, 29, 31) if int(benign_touch[r]) < 3]
    assert 31 in owned, "the mask token row: no benign SASRec update touches it"
    for r in owned:
        n = int(benign_touch[r]) + 3
        assert torch.allclose(rows_agg[r], n * rows_u[12, r]), r
    popular = int(torch.argmax(benign_touch))
    assert int(benign_touch[popular]) > 3 and not torch.allclose(rows_agg[popular], rows_u[12, popular])


def test_the_runners_pass_the_training_popularity() -> None:
    cfg = build_config(None, dict(dataset="synthetic", model="sasrec", seed=0, attack="spattack",
                                  attack_opts={"base": "eb"}, malicious_ratio=0.01))
    p = prepare(cfg)
    assert p.adversary is not None and isinstance(p.adversary.attack, Spattack)
    assert p.adversary.attack.needs_popularity and p.adversary.public is None
    counts = item_counts(p.setup.dataset)
    assert p.adversary.popularity is not None and np.array_equal(p.adversary.popularity, counts)
    ctx = p.adversary.context(p.setup, p.setup.initial_params(), p.setup.malicious_users[:1], 3)
    assert ctx.popularity is p.adversary.popularity and ctx.round_key == 3 and ctx.seed == 0
    # a wrapper declares its inner attack's needs, so the adversary fills them for it too
    scaled = make_attack("scale", {"base": "spattack"})
    assert scaled.needs_popularity and not make_attack("scale", {"base": "eb"}).needs_popularity
    assert make_attack("alie", {"direction": "fedrecattack"}).public_share == 0.01


@pytest.mark.parametrize("options,pattern", [
    ({"goal": "x"}, r"goal='x' is invalid; allowed: promote or disrupt"),
    ({"rows": "-1"}, r"rows='-1' is invalid; allowed: >= 0"),
    ({"factor": "0"}, r"factor='0' is invalid; allowed: > 0"),
    ({"goal": "disrupt", "base": "eb"}, r"base / base.<key> applies to goal=promote only"),
    ({"base": "ra"}, r"base='ra' trains on fabricated users"),
    ({"base": "eb", "base.tau": "1"}, r"'eb' has no option 'tau'"),
    ({"bogus": "1"}, r"attack 'spattack' has no option 'bogus'"),
])
def test_bad_options_are_attack_config_errors(options: dict[str, str], pattern: str) -> None:
    with pytest.raises(AttackConfigError, match=pattern):
        make_attack("spattack", options)
