"""Tests for FedAvg / FedSGD aggregation (server.aggregation.fedavg), the server step, the registry's
fedavg and none rules, and the flat parameter layout (fedseq.params).

Every test is Prepare / Execute / Assert, on tiny hand-computed tensors.
"""

from __future__ import annotations

import pytest
import torch

from fedseq.models import build_model
from fedseq.params import Layout, get_vector, set_vector
from server.aggregation import FedAvg, RoundContext, RuleConfigError, fedavg, make_rule, server_step

U = torch.tensor([[1.0, 2.0, -3.0], [4.0, 0.0, 1.0], [-2.0, 6.0, 2.0]], dtype=torch.float64)
W = torch.tensor([1.0, 3.0, 0.0])


# ----------------------------------------------------------------------------- fedavg


def test_fedavg_sum_ignores_weights():
    # Execute
    out = fedavg(U, W, reduce="sum")

    # Assert
    assert out.tolist() == [3.0, 8.0, 0.0]


def test_fedavg_unweighted_mean():
    # Execute
    out = fedavg(U, W, reduce="mean", weighted=False)

    # Assert
    torch.testing.assert_close(out, torch.tensor([1.0, 8.0 / 3.0, 0.0], dtype=torch.float64))


def test_fedavg_weighted_mean():
    # Execute: weights 1, 3, 0 -> (u0 + 3 u1) / 4
    out = fedavg(U, W, reduce="mean", weighted=True)

    # Assert
    torch.testing.assert_close(out, torch.tensor([13.0 / 4, 2.0 / 4, 0.0], dtype=torch.float64))


def test_fedavg_single_update_and_float32():
    # Prepare
    u = torch.tensor([[0.5, -0.25]])

    # Execute / Assert
    assert fedavg(u, torch.tensor([7.0])).tolist() == [0.5, -0.25]
    assert fedavg(u, torch.tensor([7.0]), reduce="mean").dtype == torch.float32


def test_server_step_exact():
    # Prepare
    params = torch.tensor([1.0, 2.0, 3.0])
    agg = torch.tensor([10.0, -20.0, 0.0], dtype=torch.float64)

    # Execute
    new = server_step(params, agg, lr=0.5)

    # Assert: a new float32 tensor, params untouched
    assert new.tolist() == [-4.0, 12.0, 3.0] and new.dtype == torch.float32
    assert params.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("updates,weights,match", [
    (torch.ones(3), torch.ones(3), r"updates must be \[K, D\]"),
    (torch.ones(3, 2), torch.ones(2), r"weights must be \[K=3\]"),
    (torch.ones(3, 2), torch.ones(3, 1), r"weights must be \[K=3\]"),
    (torch.ones(0, 2), torch.ones(0), "empty round"),
    (torch.ones(2, 2), torch.tensor([1.0, -1.0]), "non-negative"),
])
def test_fedavg_input_validation(updates, weights, match):
    with pytest.raises(ValueError, match=match):
        fedavg(updates, weights)


def test_fedavg_bad_reduce_and_zero_weights():
    with pytest.raises(ValueError, match="reduce must be 'sum' or 'mean'"):
        fedavg(U, W, reduce="median")
    with pytest.raises(ValueError, match="positive total weight"):
        fedavg(U, torch.zeros(3), reduce="mean", weighted=True)
    with pytest.raises(ValueError, match="differ"):
        server_step(torch.zeros(3), torch.zeros(4), 0.1)


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("options,expected", [
    ({}, [3.0, 8.0, 0.0]),
    ({"reduce": "sum"}, [3.0, 8.0, 0.0]),
    ({"reduce": "mean", "weighted": "false"}, [1.0, 8.0 / 3.0, 0.0]),
    ({"reduce": "mean"}, [13.0 / 4, 0.5, 0.0]),
])
def test_registry_fedavg_rule_matches_the_function(options, expected):
    # Execute
    res = make_rule("fedavg", options)(U, RoundContext(W))

    # Assert
    torch.testing.assert_close(res.vector, torch.tensor(expected, dtype=torch.float64))
    assert res.kept is None
    assert res.info["reduce"] == options.get("reduce", "sum")


def test_registry_none_rule_is_the_plain_sum():
    # Execute
    rule = make_rule("none")

    # Assert
    assert rule.name == "none"
    assert rule(U, RoundContext(W)).vector.tolist() == [3.0, 8.0, 0.0]
    with pytest.raises(RuleConfigError, match="has no option 'reduce'"):
        make_rule("none", {"reduce": "mean"})


def test_registry_rejects_bad_fedavg_options():
    with pytest.raises(RuleConfigError, match="reduce must be 'sum' or 'mean'"):
        make_rule("fedavg", {"reduce": "max"})
    with pytest.raises(RuleConfigError, match="'weighted'='perhaps' is not a valid bool"):
        make_rule("fedavg", {"weighted": "perhaps"})
    with pytest.raises(RuleConfigError, match="has no option 'lr'"):
        make_rule("fedavg", {"lr": "1"})
    with pytest.raises(RuleConfigError):
        FedAvg(reduce="avg")


# ----------------------------------------------------------------------------- layout


def test_layout_flatten_unflatten_round_trip():
    # Prepare
    layout = Layout(("a", "b", "c"), ((2, 3), (4,), ()))
    tensors = {"c": torch.tensor(9.0), "a": torch.arange(6.0).view(2, 3), "b": torch.tensor([6.0, 7.0, 8.0, 9.5])}

    # Execute
    vec = layout.flatten(tensors)
    back = layout.unflatten(vec)

    # Assert: layout order, not dict order
    assert layout.sizes == (6, 4, 1) and layout.dim == 11
    assert vec.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.5, 9.0]
    assert list(back) == ["a", "b", "c"]
    for n in tensors:
        assert torch.equal(back[n], tensors[n])


def test_layout_batch_and_model_vectors():
    # Prepare
    model = build_model("sasrec", 10, hidden=8, heads=2, ffn=16, max_len=5)
    layout = Layout.of(model)
    vec = torch.arange(layout.dim, dtype=torch.float32)

    # Execute
    set_vector(model, vec)
    got = get_vector(model)
    parts = layout.unflatten(vec)
    batch = layout.flatten_batch({n: torch.stack([t, 2 * t]) for n, t in parts.items()})

    # Assert
    assert layout.dim == sum(p.numel() for p in model.parameters())
    assert layout.names[0] == "item_emb.weight" and layout.shapes[0] == (12, 8)
    assert torch.equal(got, vec)
    assert torch.equal(model.item_emb.weight.detach(), vec[: 12 * 8].view(12, 8))
    assert torch.equal(batch, torch.stack([vec, 2 * vec]))


def test_layout_shape_errors():
    # Prepare
    layout = Layout(("a", "b"), ((2,), (1, 2)))

    # Execute / Assert
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \['z'\]"):
        layout.flatten({"a": torch.zeros(2), "z": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"tensor 'b' has shape \(2,\), the model expects \(1, 2\)"):
        layout.flatten({"a": torch.zeros(2), "b": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"expected a \[4\] vector, got \(5,\)"):
        layout.unflatten(torch.zeros(5))
    with pytest.raises(ValueError, match=r"expected a \[4\] vector, got \(1, 4\)"):
        layout.unflatten(torch.zeros(1, 4))
