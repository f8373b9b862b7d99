"""DIN target attention: the activation unit's formula, the mask, and copies that share nothing."""

import torch

from mtrec.nn.attention import TargetAttention


def _by_hand(att: TargetAttention, history, target, lengths, copy: int = 0):
    L = history.shape[1]
    t = target.unsqueeze(1).expand(-1, L, -1)
    h = torch.cat([history, t, history - t, history * t], dim=-1)
    for i, (w, b) in enumerate(zip(att.weights, att.biases, strict=True)):
        h = h @ w[copy] + b[copy, 0]
        if i < len(att.weights) - 1:
            h = torch.relu(h)
    w = h.squeeze(-1) * (torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1))
    return (w.unsqueeze(-1) * history).sum(1), w


def test_the_pool_is_the_unnormalised_sum_of_the_activation_units_weights():
    torch.manual_seed(0)
    att = TargetAttention(4, hidden=(8, 6))
    history, target, lengths = torch.randn(5, 7, 4), torch.randn(5, 4), torch.tensor([7, 3, 1, 0, 5])
    pooled, weights = _by_hand(att, history, target, lengths)
    torch.testing.assert_close(att.scores(history, target, lengths), weights)
    torch.testing.assert_close(att(history, target, lengths), pooled)
    assert torch.all(att.scores(history, target, lengths)[1, 3:] == 0)  # nothing past a row's length
    assert torch.all(att(history, target, lengths)[3] == 0)  # an empty history pools to zero
    assert not torch.allclose(weights[0].sum(), torch.tensor(1.0))  # not a softmax


def test_the_pool_depends_on_the_candidate():
    torch.manual_seed(0)
    att = TargetAttention(4)
    history = torch.randn(1, 6, 4).expand(2, -1, -1)
    lengths = torch.tensor([6, 6])
    out = att(history, torch.randn(2, 4), lengths)
    assert not torch.allclose(out[0], out[1])  # the same history, two candidates, two vectors


def test_copies_share_nothing():
    torch.manual_seed(0)
    att = TargetAttention(3, hidden=(5,), copies=2)
    history, target, lengths = torch.randn(8, 4, 3), torch.randn(8, 3), torch.full((8,), 4)
    out = att(history, target, lengths)
    torch.testing.assert_close(out[4:], _by_hand(att, history[4:], target[4:], lengths[4:], copy=1)[0])
    out[4:].sum().backward()  # rows 4.. are copy 1's
    for p in [*att.weights, *att.biases]:
        assert p.grad[1].abs().sum() > 0 and p.grad[0].abs().sum() == 0
