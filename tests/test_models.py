"""Tests for the sequential recommenders (fedseq.models): the BERT-pytorch LayerNorm, position ids
of left-padded rows, causality / bidirectionality, padding invariance, tied output weights, the
reference parameter count and initialisation, and seeded dropout.

Every test is Prepare / Execute / Assert, on tiny models with real computations.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedseq.models import BERT4Rec, SASRec, build_model
from fedseq.models.common import Drop, DropSite, LayerNorm, keep_masks, layer_norm, position_ids, reference_init

M = 20  # items 1..20, mask token 21


def fresh(name: str) -> SASRec | BERT4Rec:
    extra = {"input_len": 10} if name == "bert4rec" else {}
    return build_model(name, M, hidden=8, heads=2, ffn=16, max_len=10, **extra)


def tiny(name: str, seed: int = 0) -> SASRec | BERT4Rec:
    model = fresh(name)
    reference_init(model, seed)
    return model


def left_pad(items: list[int], length: int) -> torch.Tensor:
    return torch.tensor([[0] * (length - len(items)) + items])


# ----------------------------------------------------------------------------- LayerNorm


def test_layer_norm_uses_unbiased_std_and_eps_outside_the_sqrt():
    # Prepare: x = [1, 2, 3, 4]: mean 2.5, unbiased std sqrt(5/3); a large eps makes its placement visible
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    w = torch.full((4,), 2.0, dtype=torch.float64)
    b = torch.ones(4, dtype=torch.float64)
    eps = 0.5
    std = math.sqrt(5.0 / 3.0)
    expected = torch.tensor([[2 * d / (std + eps) + 1 for d in (-1.5, -0.5, 0.5, 1.5)]], dtype=torch.float64)

    # Execute
    out = layer_norm(x, w, b, eps)

    # Assert: not torch's (biased variance, eps inside the sqrt)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch_ln = F.layer_norm(x, (4,), w, b, eps)
    assert not torch.allclose(out, torch_ln, atol=1e-3)


def test_layer_norm_module_starts_at_identity_scale_and_zero_shift():
    # Prepare
    ln = LayerNorm(3)
    x = torch.tensor([[0.0, 3.0, 6.0]])

    # Execute
    out = ln(x)

    # Assert: (x - 3) / (3 + 1e-6), unbiased std of [0, 3, 6] is 3
    torch.testing.assert_close(out, torch.tensor([[-3.0, 0.0, 3.0]]) / (3.0 + 1e-6))
    assert ln.eps == 1e-6


# ----------------------------------------------------------------------------- position ids


def test_position_ids_of_left_padded_rows():
    # Prepare
    tokens = torch.tensor([[0, 0, 5, 7], [3, 4, 9, 1], [0, 0, 0, 2]])

    # Execute
    pos = position_ids(tokens)

    # Assert
    assert pos.tolist() == [[0, 0, 1, 2], [1, 2, 3, 4], [0, 0, 0, 1]]


# ----------------------------------------------------------------------------- attention direction


def test_sasrec_is_causal():
    # Prepare: two sequences that agree on the first 3 items and differ after
    model = tiny("sasrec")
    a = left_pad([3, 8, 1, 4, 6], 7)
    b = left_pad([3, 8, 1, 17, 12], 7)

    # Execute
    with torch.no_grad():
        ha, hb = model(a), model(b)

    # Assert: the real positions up to the last shared item (indices 2..4) are unchanged, the next
    # one changes (padding rows attend uniformly to everything and carry no meaning)
    torch.testing.assert_close(ha[:, 2:5], hb[:, 2:5], rtol=0, atol=1e-6)
    assert (ha[0, 5] - hb[0, 5]).abs().max() > 1e-4


def test_bert4rec_is_bidirectional():
    # Prepare
    model = tiny("bert4rec")
    a = left_pad([3, 8, 1, 4, 6], 7)
    b = left_pad([3, 8, 1, 4, 17], 7)

    # Execute
    with torch.no_grad():
        ha, hb = model(a), model(b)

    # Assert: changing the last item changes the output at every earlier real position
    for t in range(2, 6):
        assert (ha[0, t] - hb[0, t]).abs().max() > 1e-5, t


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_padding_invariance(name):
    # Prepare: the same two users, left-padded to L = 5 and to L + 5 = 10
    model = tiny(name)
    rows = [[4, 9, 2], [7, 1, 13, 5, 20]]
    short = torch.cat([left_pad(r, 5) for r in rows])
    long = torch.cat([left_pad(r, 10) for r in rows])

    # Execute
    with torch.no_grad():
        hs, hl = model(short), model(long)

    # Assert: every real position has the same hidden state
    for i, r in enumerate(rows):
        n = len(r)
        torch.testing.assert_close(hs[i, -n:], hl[i, -n:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_padding_invariance_with_seeded_dropout(name):
    # Prepare: seeded masks depend on the position counted from the end, not on L
    model = tiny(name)
    sites = model.dropout_sites()
    seeds = torch.tensor([12345])
    r = [4, 9, 2, 11]

    # Execute
    with torch.no_grad():
        hs = model(left_pad(r, 5), Drop(keep_masks(sites, seeds, 5)))
        hl = model(left_pad(r, 10), Drop(keep_masks(sites, seeds, 10)))
        h0 = model(left_pad(r, 5))

    # Assert: same output, and dropout did change it
    torch.testing.assert_close(hs[0, -4:], hl[0, -4:], rtol=0, atol=1e-6)
    assert (hs[0, -4:] - h0[0, -4:]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- tied weights


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_scores_are_tied_to_the_item_table(name):
    # Prepare
    model = tiny(name)
    with torch.no_grad():
        if isinstance(model, BERT4Rec):
            model.out_bias.copy_(torch.randn(model.cfg.vocab, generator=torch.Generator().manual_seed(1)))
    h = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    items = torch.tensor([[[1, 5, 21], [2, 2, 7], [0, 9, 3]], [[4, 4, 4], [20, 1, 6], [8, 10, 12]]])

    # Execute
    with torch.no_grad():
        full = model.scores(h)
        some = model.scores(h, items)

    # Assert
    expected = h @ model.item_emb.weight.T
    if isinstance(model, BERT4Rec):
        expected = expected + model.out_bias
    assert full.shape == (2, 3, M + 2)
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(some, torch.gather(full, -1, items), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- size and init


def test_sasrec_parameter_count_matches_the_reference_dense_update():
    # Prepare
    model = build_model("sasrec", 5135)

    # Execute
    count = sum(p.numel() for p in model.parameters())

    # Assert: 433,536 float32 parameters = 1,734,144 bytes
    assert count == 433_536
    assert count * 4 == 1_734_144


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_reference_init_is_deterministic_and_leaves_layer_norm_alone(name):
    # Prepare
    a, b, c = fresh(name), fresh(name), fresh(name)

    # Execute
    reference_init(a, 7)
    reference_init(b, 7)
    reference_init(c, 8)

    # Assert
    pa, pb, pc = dict(a.named_parameters()), dict(b.named_parameters()), dict(c.named_parameters())
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
        if n.endswith("a_2"):
            assert torch.equal(pa[n], torch.ones_like(pa[n])), n
        elif n.endswith("b_2"):
            assert torch.equal(pa[n], torch.zeros_like(pa[n])), n
        else:
            assert not torch.equal(pa[n], pc[n]), n
            if pa[n].dim() == 1:  # truncated normal, std 0.02, clipped at 0.04
                assert pa[n].abs().max() <= 0.04 + 1e-7, n


# ----------------------------------------------------------------------------- seeded dropout


def test_keep_masks_do_not_depend_on_the_padded_length():
    # Prepare
    sites = {"s": DropSite(0.3, "seq", 4), "a": DropSite(0.3, "attn", 2)}
    seeds = torch.tensor([11, 2**32 - 1])
    n = 5

    # Execute
    m6 = keep_masks(sites, seeds, 6)
    m9 = keep_masks(sites, seeds, 9)

    # Assert: the last n positions agree (and the attention's last n x n block)
    assert m6["s"].shape == (2, 6, 4) and m9["a"].shape == (2, 2, 9, 9)
    assert torch.equal(m6["s"][:, -n:], m9["s"][:, -n:])
    assert torch.equal(m6["a"][:, :, -n:, -n:], m9["a"][:, :, -n:, -n:])


def _hash_definition(sites, seeds, length):
    """The masks straight from their definition (common.py's docstring): the fast path must equal it."""
    from fedseq.models.common import _M32, _mix32, _site_code

    out = {}
    seeds = seeds.to(torch.int64) & _M32
    from_end = torch.arange(length - 1, -1, -1, dtype=torch.int64)
    for name, site in sites.items():
        if site.p <= 0.0:
            continue
        base = _mix32(torch.tensor(_site_code(name), dtype=torch.int64) ^ 0x5BD1E995)
        if site.kind == "seq":
            pc = _mix32(base ^ _mix32(from_end[:, None] * 65599 + torch.arange(site.channels)[None, :]))
            h = _mix32(pc[None] ^ _mix32(seeds)[:, None, None])
        else:
            q, k = from_end[:, None], from_end[None, :]
            hh = torch.arange(site.channels, dtype=torch.int64)[:, None, None]
            h = _mix32(_mix32(base ^ _mix32((q * 4099 + k) * 131 + hh))[None] ^ _mix32(seeds)[:, None, None, None])
        out[name] = ((h.to(torch.float64) / 4294967296.0) >= site.p).to(torch.float32) / (1.0 - site.p)
    return out


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 1.0 / 3.0])
def test_keep_masks_equal_their_hash_definition_bit_for_bit(p):
    # Prepare
    sites = {"emb": DropSite(p, "seq", 64), "b0.attn": DropSite(p, "attn", 2), "b1.ffn_in": DropSite(p, "seq", 7)}
    seeds = torch.tensor([0, 1, 12345, 2**31, 2**32 - 1, 987654321])

    for length in (1, 7, 50):
        # Execute
        got = keep_masks(sites, seeds, length)
        want = _hash_definition(sites, seeds, length)

        # Assert
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (name, length)


def test_keep_masks_differ_between_seeds_and_sites_and_are_scaled():
    # Prepare
    p = 0.25
    sites = {"x": DropSite(p, "seq", 16), "y": DropSite(p, "seq", 16), "off": DropSite(0.0, "seq", 16)}

    # Execute
    m = keep_masks(sites, torch.tensor([1, 2, 1]), 12)

    # Assert
    assert not torch.equal(m["x"][0], m["x"][1])
    assert torch.equal(m["x"][0], m["x"][2])
    assert not torch.equal(m["x"], m["y"])
    assert "off" not in m
    assert m["x"].unique().tolist() == [0.0, pytest.approx(1.0 / (1.0 - p))]


def test_keep_rate_is_close_to_one_minus_p():
    # Prepare: 64 users x 100 positions x 64 channels = 409,600 elements
    p = 0.1
    sites = {"emb": DropSite(p, "seq", 64), "att": DropSite(p, "attn", 2)}
    seeds = torch.arange(64) * 7919

    # Execute
    m = keep_masks(sites, seeds, 100)

    # Assert: binomial std is about 0.0005
    assert abs(float((m["emb"] > 0).float().mean()) - (1 - p)) < 0.003
    assert abs(float((m["att"] > 0).float().mean()) - (1 - p)) < 0.003


def test_keep_masks_unknown_kind():
    with pytest.raises(ValueError, match="unknown dropout site kind"):
        keep_masks({"z": DropSite(0.1, "conv", 3)}, torch.tensor([0]), 4)


# ----------------------------------------------------------------------------- registry


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match=r"unknown model 'gru4rec'.*bert4rec, sasrec"):
        build_model("gru4rec", 10)


def test_build_model_passes_overrides_and_validates():
    # Execute
    m = build_model("bert4rec", 30, hidden=8, heads=2, ffn=16, max_len=10, input_len=4)

    # Assert
    assert isinstance(m, BERT4Rec) and m.cfg.input_len == 4 and m.cfg.mask_token == 31
    assert m.item_emb.weight.shape == (32, 8)
    with pytest.raises(ValueError, match="divisible"):
        build_model("sasrec", 10, hidden=9, heads=2)
    with pytest.raises(ValueError, match="input_len"):
        build_model("bert4rec", 10, max_len=10)  # default input_len 50 > max_len


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_both_configs_share_the_vocabulary_convention_and_checks(name):
    cfg = build_model(name, 30, hidden=8, heads=2, ffn=16).cfg
    assert (cfg.vocab, cfg.mask_token) == (32, 31)
    with pytest.raises(ValueError, match="dropout must be in"):
        build_model(name, 30, dropout=1.0)
    with pytest.raises(ValueError, match="divisible by heads"):
        build_model(name, 30, hidden=9, heads=2)
