"""PEPNet's blocks (Chang et al., KDD 2023): the Gate NU formula, EPNet's and PPNet's stop-gradients,
and PPNet's per-task gates on every layer input."""

import pytest
import torch

from mtrec.nn.pepnet import EPNet, GateNU, PEPNet, PPNet


def _gate_by_hand(gate: GateNU, x: torch.Tensor, copy: int) -> torch.Tensor:
    """``gamma * sigmoid(relu(x W1 + b1) W2 + b2)`` for one copy, written out."""
    w1, w2 = gate.weights[0][copy], gate.weights[1][copy]
    b1, b2 = gate.biases[0][copy, 0], gate.biases[1][copy, 0]
    return gate.gamma * torch.sigmoid(torch.relu(x @ w1 + b1) @ w2 + b2)


def test_gate_nu_is_gamma_times_a_sigmoid_of_a_relu_layer():
    torch.manual_seed(0)
    gate = GateNU(5, 3, hidden=7, gamma=2.0, copies=2)
    x = torch.randn(11, 5)
    delta = gate(x)
    assert delta.shape == (11, 2, 3)
    for c in range(2):
        torch.testing.assert_close(delta[:, c], _gate_by_hand(gate, x, c))
    assert ((delta > 0) & (delta < 2)).all()
    # the scale runs over (0, gamma): large logits saturate at the ends, zero logits give gamma / 2 = 1
    with torch.no_grad():
        gate.weights[1].zero_()
        gate.biases[1].fill_(0.0)
    torch.testing.assert_close(gate(x), torch.ones(11, 2, 3))
    with torch.no_grad():
        gate.biases[1].fill_(50.0)
    torch.testing.assert_close(gate(x), torch.full((11, 2, 3), 2.0))
    with pytest.raises(ValueError, match="gamma > 0"):
        GateNU(5, 3, gamma=0.0)


def test_epnet_scales_the_input_by_a_gate_on_domain_and_detached_input():
    torch.manual_seed(0)
    net = EPNet(6, 4, hidden=8)
    e = torch.randn(9, 6, requires_grad=True)
    domain = torch.randn(9, 4, requires_grad=True)
    out = net(e, domain)
    delta = _gate_by_hand(net.gate, torch.cat([domain, e], dim=1), 0)
    torch.testing.assert_close(out, delta * e)
    # stop-gradient: d out / d e is the gate alone (no term through the gate's input) ...
    weights = torch.randn(9, 6)
    (grad_e, grad_domain) = torch.autograd.grad((out * weights).sum(), [e, domain])
    torch.testing.assert_close(grad_e, delta.detach() * weights)
    # ... which a gate reading e itself would not give; the domain vectors do learn through it
    live = _gate_by_hand(net.gate, torch.cat([domain, e], dim=1), 0) * e
    (grad_live,) = torch.autograd.grad((live * weights).sum(), [e])
    assert not torch.allclose(grad_live, grad_e)
    assert grad_domain.abs().sum() > 0


def _ppnet_by_hand(net: PPNet, x: torch.Tensor, prior: torch.Tensor, task: int) -> torch.Tensor:
    """Task ``task``'s tower: each layer's input scaled by the task's own gate, then the head's."""
    gate_in = torch.cat([prior, x], dim=1).detach()
    h = x
    for layer, gate in enumerate(net.gates):
        h = h * _gate_by_hand(gate, gate_in, task)
        if layer < len(net.weights):
            h = torch.relu(h @ net.weights[layer][task] + net.biases[layer][task, 0])
    return h


@pytest.mark.parametrize("hidden", [(8, 5), ()])
def test_ppnet_gates_every_layer_input_of_each_task_by_its_own_gate(hidden):
    torch.manual_seed(0)
    net = PPNet(6, 4, 3, hidden=hidden, gate_hidden=7)
    assert [g.out_dim for g in net.gates] == [6, *hidden]  # one gate per layer input, the head's included
    x, prior = torch.randn(10, 6), torch.randn(10, 4)
    out = net(x, prior)
    assert out.shape == (10, 3, net.out_dim)
    for t in range(3):
        torch.testing.assert_close(out[:, t], _ppnet_by_hand(net, x, prior, t))


def test_ppnet_output_follows_the_prior_with_the_input_fixed():
    torch.manual_seed(0)
    net = PPNet(6, 4, 3, hidden=(8,), gate_hidden=7)
    x, prior = torch.randn(10, 6), torch.randn(10, 4)
    other = prior.clone()
    other[0] += 1.0  # one row's prior vector changes
    a, b = net(x, prior), net(x, other)
    for t in range(3):
        assert not torch.allclose(a[0, t], b[0, t]), t
        torch.testing.assert_close(a[1:, t], b[1:, t])


def test_ppnet_task_losses_reach_their_own_gates_and_towers_only():
    torch.manual_seed(0)
    net = PPNet(6, 4, 3, hidden=(8, 5), gate_hidden=7)
    x, prior = torch.randn(10, 6, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    out = net(x, prior)
    params = [p for g in net.gates for p in (*g.weights, *g.biases)] + [*net.weights, *net.biases]
    grads = torch.autograd.grad(out[:, 0].sum(), params)
    for p, g in zip(params, grads, strict=True):
        assert g[0].abs().sum() > 0, tuple(p.shape)  # task 0's gates and tower learn ...
        assert g[1:].abs().sum() == 0, tuple(p.shape)  # ... task 1's and 2's get nothing
    # stop-gradient: x reaches the loss through the tower's main path only (the gates as constants)
    weights = torch.randn(10, 3, net.out_dim)
    (grad_x,) = torch.autograd.grad((net(x, prior) * weights).sum(), [x])
    deltas = [g(torch.cat([prior, x], dim=1)).detach() for g in net.gates]
    h = x.unsqueeze(1).expand(-1, 3, -1)
    for layer, delta in enumerate(deltas):
        h = h * delta
        if layer < len(net.weights):
            h = torch.relu(torch.einsum("bti,tio->bto", h, net.weights[layer]) + net.biases[layer].transpose(0, 1))
    (expected,) = torch.autograd.grad((h * weights).sum(), [x])
    torch.testing.assert_close(grad_x, expected)


def test_pepnet_is_ppnet_on_epnets_output():
    torch.manual_seed(0)
    net = PEPNet(EPNet(6, 4, hidden=8), PPNet(6, 2, 3, hidden=(5,), gate_hidden=8))
    e, domain, prior = torch.randn(4, 6), torch.randn(4, 4), torch.randn(4, 2)
    torch.testing.assert_close(net(e, domain, prior), net.ppnet(net.epnet(e, domain), prior))
    assert net.out_dim == 5
    gate = net.epnet.gate
    assert net.last_shared_parameters() == [gate.weights[1], gate.biases[1]]
