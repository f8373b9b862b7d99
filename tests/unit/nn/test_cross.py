"""DCN-v2 cross layers: the formula, the low-rank form, and copies that share nothing."""

import pytest
import torch

from mtrec.nn.cross import CrossNetwork


def _by_hand(x0: torch.Tensor, matrices: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    h = x0
    for w, b in zip(matrices, biases, strict=True):
        h = x0 * (h @ w + b) + h
    return h


@pytest.mark.parametrize("copies", [1, 3])
def test_full_rank_layers_follow_the_dcn_v2_formula(copies):
    torch.manual_seed(0)
    net = CrossNetwork(5, layers=3, copies=copies)
    x = torch.randn(copies, 7, 5)
    out = net(x[0] if copies == 1 else x)
    for c in range(copies):
        expected = _by_hand(x[c], [w[c] for w in net.weights], [b[c, 0] for b in net.biases])
        torch.testing.assert_close(out if copies == 1 else out[c], expected)


def test_low_rank_layers_are_the_full_formula_with_w_equal_to_u_v():
    torch.manual_seed(0)
    net = CrossNetwork(6, layers=2, rank=2)
    assert [tuple(w.shape) for w in net.weights] == [(1, 6, 2), (1, 2, 6)] * 2
    x = torch.randn(9, 6)
    matrices = [net.weights[0][0] @ net.weights[1][0], net.weights[2][0] @ net.weights[3][0]]
    torch.testing.assert_close(net(x), _by_hand(x, matrices, [b[0, 0] for b in net.biases]))


def test_one_layer_crosses_every_pair_of_inputs():
    """x_1 = x_0 * (W x_0 + b) + x_0: entry i holds x_i * x_j with weight W[j, i] (degree 2)."""
    net = CrossNetwork(3, layers=1)
    with torch.no_grad():
        net.weights[0].zero_()
        net.weights[0][0, 2, 0] = 1.0  # x_0 picks up x_0 * x_2
        net.biases[0].zero_()
    x = torch.tensor([[2.0, 3.0, 5.0]])
    torch.testing.assert_close(net(x), torch.tensor([[2.0 * 5.0 + 2.0, 3.0, 5.0]]))


def test_copies_share_nothing():
    torch.manual_seed(0)
    net = CrossNetwork(4, layers=2, rank=2, copies=3)
    out = net(torch.randn(3, 5, 4))
    out[1].sum().backward()
    for p in [*net.weights, *net.biases]:
        assert p.grad[1].abs().sum() > 0
        assert p.grad[0].abs().sum() == 0 and p.grad[2].abs().sum() == 0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="cross layers need"):
        CrossNetwork(4, layers=0)
    with pytest.raises(ValueError, match="cross layers need"):
        CrossNetwork(4, layers=1, rank=0)
