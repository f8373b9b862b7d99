"""Gates and their penalties: DSelect-k's exact selection, the balance loss, HoME's experts."""

import math

import pytest
import torch
from torch import nn

from mtrec.nn import PLE, CGCLayer, DSelectKGate, ExpertGroup, GateSpec, MMoELayer
from mtrec.nn.gates import importance_cv2, smooth_step, take_penalties


def test_smooth_step_reaches_0_and_1_with_a_flat_gradient_outside_its_band():
    t = torch.tensor([-2.0, -0.5, -0.25, 0.0, 0.25, 0.5, 2.0], requires_grad=True)
    s = smooth_step(t, 1.0)
    assert s[:2].tolist() == [0.0, 0.0] and s[-2:].tolist() == [1.0, 1.0]
    assert s[3].item() == 0.5
    assert torch.all(s[1:] >= s[:-1])  # monotone
    (grad,) = torch.autograd.grad(s.sum(), t)
    assert grad[0].item() == 0.0 and grad[-1].item() == 0.0
    assert grad[3].item() == pytest.approx(1.5)  # the cubic's slope at 0: 3 / (2 gamma)
    # the band scales with gamma
    assert smooth_step(torch.tensor([1.0]), 4.0).item() == pytest.approx(0.84375)


@pytest.mark.parametrize("experts", [1, 2, 3, 5, 8])
def test_dselect_k_gates_are_distributions_over_the_experts(experts):
    torch.manual_seed(0)
    gate = DSelectKGate(6, num_experts=experts, num_gates=3, k=min(2, experts))
    w = gate(torch.randn(10, 6) * 3)
    assert w.shape == (10, 3, experts)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(10, 3))


def test_saturated_dselect_k_selects_exactly_the_encoded_experts():
    # 6 experts, 3 bits, k = 2 selectors; logits far outside the band select one code each.
    gate = DSelectKGate(4, num_experts=6, num_gates=1, k=2)
    with torch.no_grad():
        gate.weight.zero_()
        bits = {5: (1, 0, 1), 2: (0, 1, 0)}  # expert e's code, least significant bit first
        z = [10.0 if b else -10.0 for e in (5, 2) for b in bits[e]]
        gate.bias.copy_(torch.tensor(z + [0.3, -0.2]).view(1, 1, -1))
    w = gate(torch.randn(7, 4))[:, 0]
    mix = torch.softmax(torch.tensor([0.3, -0.2]), 0)
    expected = torch.zeros(6)
    expected[5], expected[2] = mix[0], mix[1]
    torch.testing.assert_close(w, expected.expand(7, -1))
    assert int((w[0] > 0).sum()) == 2  # at most k experts get any weight


def test_dselect_k_refuses_more_selectors_than_experts():
    with pytest.raises(ValueError, match=r"k <= the experts the gate mixes \(3\), got k=4"):
        DSelectKGate(4, num_experts=3, num_gates=1, k=4)
    with pytest.raises(ValueError, match="k <= the experts"):
        MMoELayer(4, num_tasks=2, num_experts=3, expert_hidden=(4,), gate=GateSpec("dselect_k", k=4))
    with pytest.raises(ValueError, match="gate_entropy is DSelect-k's"):
        GateSpec("softmax", entropy=0.1)


def test_the_entropy_penalty_drives_the_selectors_to_one_hot():
    torch.manual_seed(0)
    gate = DSelectKGate(5, num_experts=4, num_gates=2, k=2, entropy=1.0)
    x = torch.randn(64, 5)

    def entropy() -> float:
        _, chosen = gate.selectors(x)
        return float(-(chosen * chosen.clamp_min(1e-12).log()).sum(-1).mean().detach())

    before = entropy()
    gate.eval()
    gate(x)
    assert take_penalties(gate) is None  # evaluation adds no penalty
    gate.train()
    opt = torch.optim.SGD(gate.parameters(), lr=0.5)
    for _ in range(200):
        gate(x)
        penalty = take_penalties(gate)
        assert penalty is not None
        opt.zero_grad()
        penalty.backward()
        opt.step()
    assert before > 1.0
    assert entropy() < 0.05 * before


def test_importance_cv2_is_zero_when_balanced_and_e_minus_1_when_collapsed():
    balanced = torch.full((8, 1, 4), 0.25)
    collapsed = torch.zeros(8, 1, 4)
    collapsed[..., 2] = 1.0
    assert importance_cv2(balanced).item() == pytest.approx(0.0, abs=1e-12)
    assert importance_cv2(collapsed).item() == pytest.approx(3.0)
    assert importance_cv2(torch.ones(5, 2, 1)).tolist() == [0.0, 0.0]  # one expert: nothing to balance


def test_the_balance_penalty_spreads_a_collapsed_gate():
    torch.manual_seed(0)
    layer = MMoELayer(6, num_tasks=2, num_experts=4, expert_hidden=(8,), gate=GateSpec(balance=1.0))
    with torch.no_grad():  # collapse both task gates onto expert 0
        layer.gates.linear.bias.copy_(torch.tensor([4.0, 0, 0, 0] * 2))
    x = torch.randn(128, 6)
    share = lambda: float(layer.gates(x).detach().mean(0).max())  # noqa: E731 - the largest mean expert share
    before = share()
    opt = torch.optim.SGD(layer.gates.parameters(), lr=0.5)
    for _ in range(100):
        layer(x)
        penalty = take_penalties(layer)
        opt.zero_grad()
        penalty.backward()
        opt.step()
    assert before > 0.8
    assert share() < 0.4
    layer.eval()
    layer(x)
    assert take_penalties(layer) is None


@pytest.mark.parametrize("kind", ["softmax", "dselect_k"])
def test_cgc_and_ple_take_either_gate_and_every_level_adds_its_penalty(kind):
    torch.manual_seed(0)
    spec = GateSpec(kind, k=2, balance=0.5, entropy=0.1 if kind == "dselect_k" else 0.0)
    ple = PLE(6, num_tasks=2, num_levels=2, num_shared=2, num_specific=1, expert_hidden=(8,), gate=spec)
    x = torch.randn(32, 6)
    out = ple(x)
    assert out.shape == (32, 2, 8)
    parts = []
    for level in ple.levels:
        parts.append(level.penalty.take())
        if kind == "dselect_k":
            parts.append(level.dselect.penalty.take())  # the task gates' selector entropy
            if level.shared_gate is not None:
                parts.append(level.shared_gate.penalty.take())  # the shared gate's
    assert all(p is not None and p.item() > 0 for p in parts)
    ple(x)
    total = take_penalties(ple)
    torch.testing.assert_close(total, sum(parts))
    # the penalty reaches the gates
    total.backward()
    gate_param = ple.levels[0].dselect.weight if kind == "dselect_k" else ple.levels[0].gate_weight
    assert gate_param.grad is not None and gate_param.grad.abs().sum() > 0


def test_cgc_dselect_k_reads_per_task_inputs():
    torch.manual_seed(0)
    layer = CGCLayer(
        5, num_tasks=2, num_shared=1, num_specific=2, expert_hidden=(4,), shared_gate=True, gate=GateSpec("dselect_k")
    )
    task_out, shared_out, gates, shared_gates = layer(torch.randn(3, 9, 5), return_gates=True)
    assert task_out.shape == (9, 2, 4) and shared_out.shape == (9, 4)
    torch.testing.assert_close(gates.sum(-1), torch.ones(9, 2))
    assert shared_gates.shape == (9, 1, 5)


def test_softmax_layers_keep_their_parameter_names():
    """Model directories saved before the gate options load: a softmax layer's state is as it was."""
    mmoe = MMoELayer(4, num_tasks=2, num_experts=3, expert_hidden=(4,))
    assert set(mmoe.state_dict()) == {
        "experts.weights.0",
        "experts.biases.0",
        "gates.linear.weight",
        "gates.linear.bias",
    }
    cgc = CGCLayer(4, num_tasks=2, num_shared=1, num_specific=1, expert_hidden=(4,), shared_gate=True)
    assert set(cgc.state_dict()) == {
        "experts.weights.0",
        "experts.biases.0",
        "gate_weight",
        "gate_bias",
        "shared_gate.linear.weight",
        "shared_gate.linear.bias",
    }


@pytest.mark.parametrize("train", [True, False])
def test_normalised_experts_are_independent_linear_batchnorm_swish_stacks(train):
    """HoME's expert normalisation: each expert is its own Linear -> BatchNorm -> Swish stack."""
    torch.manual_seed(0)
    E, hidden = 3, (6, 4)
    group = ExpertGroup(E, 5, hidden, norm=True)
    loops = []
    for e in range(E):
        layers: list[nn.Module] = []
        width = 5
        for i, h in enumerate(hidden):
            linear = nn.Linear(width, h)
            with torch.no_grad():
                linear.weight.copy_(group.weights[i][e].T)
                linear.bias.copy_(group.biases[i][e, 0])
            layers += [linear, nn.BatchNorm1d(h), nn.SiLU()]
            width = h
        loops.append(nn.Sequential(*layers))
    x = torch.randn(16, 5) * 2 + 1
    group.train()  # one training pass, so that eval runs on updated running statistics
    for net in loops:
        net.train()
    group(x)
    for net in loops:
        net(x)
    group.train(train)
    for net in loops:
        net.train(train)
    expected = torch.stack([net(x) for net in loops], dim=1)
    torch.testing.assert_close(group(x), expected)
    if train:  # normalised pre-activations: each unit's output is Swish of a zero-mean, unit-variance input
        pre = group.norms[0](torch.randn(64, E * hidden[0]) * 5 + 3).detach()
        assert pre.mean(0).abs().max() < 1e-5
        assert math.isclose(float(pre.var(0, unbiased=False).mean()), 1.0, rel_tol=1e-3)


def test_expert_norm_trains_on_a_batch_of_one_row_with_the_running_statistics():
    """A last training batch of one row (3,593 rows in batches of 512) has no batch statistics:
    it is normalised with the running ones, as in evaluation, and leaves them as they are."""
    torch.manual_seed(0)
    group = ExpertGroup(3, 5, (4,), norm=True)
    group.train()
    group(torch.randn(64, 5))  # some running statistics
    before = [b.clone() for b in group.norms[0].buffers()]
    x = torch.randn(1, 5)
    out = group(x)
    assert torch.isfinite(out).all()
    assert all(torch.equal(a, b) for a, b in zip(before, group.norms[0].buffers(), strict=True))
    group.eval()
    torch.testing.assert_close(out, group(x))
