"""Building blocks on plain tensors: shapes, pooling, gates, routing."""

import pytest
import torch
from torch import nn

from mtrec.nn import MLP, PLE, CGCLayer, ExpertGroup, FusedEmbedding, Gate, MMoELayer, Tower, masked_pool


def test_fused_embedding_reads_each_column_from_its_own_table():
    emb = FusedEmbedding((3, 4), 2, column_tables=(0, 1, 1))
    with torch.no_grad():
        emb.weight.copy_(torch.arange(14, dtype=torch.float32).view(7, 2))
    out = emb(torch.tensor([[2, 0, 3]]))
    # table 0 starts at row 0, table 1 at row 3
    assert out[0, 0].tolist() == [4.0, 5.0]
    assert out[0, 1].tolist() == [6.0, 7.0]
    assert out[0, 2].tolist() == [12.0, 13.0]


def test_fused_embedding_gradient_is_sparse_and_touches_only_used_rows():
    emb = FusedEmbedding((100, 50), 4, column_tables=(0, 1))
    emb(torch.tensor([[5, 7], [5, 1]])).sum().backward()
    grad = emb.weight.grad
    assert grad.is_sparse
    rows = set(grad.coalesce().indices()[0].tolist())
    assert rows == {5, 100 + 7, 100 + 1}


def test_fused_embedding_rejects_bad_tables():
    with pytest.raises(ValueError):
        FusedEmbedding((3,), 2, column_tables=(1,))
    with pytest.raises(ValueError):
        FusedEmbedding((0,), 2, column_tables=(0,))


def test_masked_pool_ignores_padding():
    emb = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [100.0], [100.0]], [[5.0], [5.0], [5.0]]])
    lengths = torch.tensor([2, 1, 0])
    assert masked_pool(emb, lengths, "mean").squeeze(-1).tolist() == [2.0, 2.0, 0.0]
    assert masked_pool(emb, lengths, "sum").squeeze(-1).tolist() == [4.0, 2.0, 0.0]
    with pytest.raises(ValueError):
        masked_pool(emb, lengths, "max")


def test_mlp_and_tower_shapes():
    assert MLP(6, (8, 3))(torch.randn(4, 6)).shape == (4, 3)
    assert MLP(6, ())(torch.randn(4, 6)).shape == (4, 6)
    assert Tower(6, (5,))(torch.randn(4, 6)).shape == (4,)


def test_expert_group_matches_independent_mlps():
    torch.manual_seed(0)
    group = ExpertGroup(3, 5, (7, 4))
    x = torch.randn(6, 5)
    out = group(x)
    assert out.shape == (6, 3, 4)
    for e in range(3):
        h = torch.relu(x @ group.weights[0][e] + group.biases[0][e])
        h = torch.relu(h @ group.weights[1][e] + group.biases[1][e])
        torch.testing.assert_close(out[:, e], h)
    # per-expert inputs
    xe = torch.randn(3, 6, 5)
    out = group(xe)
    for e in range(3):
        h = torch.relu(xe[e] @ group.weights[0][e] + group.biases[0][e])
        h = torch.relu(h @ group.weights[1][e] + group.biases[1][e])
        torch.testing.assert_close(out[:, e], h)


def test_gates_sum_to_one():
    g = Gate(5, num_experts=4, num_gates=3)(torch.randn(8, 5))
    assert g.shape == (8, 3, 4)
    torch.testing.assert_close(g.sum(-1), torch.ones(8, 3))
    layer = MMoELayer(5, num_tasks=2, num_experts=3, expert_hidden=(4,))
    out, gates = layer(torch.randn(7, 5), return_gates=True)
    assert out.shape == (7, 2, 4)
    torch.testing.assert_close(gates.sum(-1), torch.ones(7, 2))
    assert (gates >= 0).all()


def test_mmoe_output_is_gate_weighted_mix_of_experts():
    torch.manual_seed(1)
    layer = MMoELayer(5, num_tasks=2, num_experts=3, expert_hidden=(4,))
    x = torch.randn(6, 5)
    out, gates = layer(x, return_gates=True)
    experts = layer.experts(x)
    expected = torch.einsum("bte,beh->bth", gates, experts)
    torch.testing.assert_close(out, expected)


def _expert_grads(layer: CGCLayer, loss: torch.Tensor) -> torch.Tensor:
    layer.zero_grad()
    loss.backward(retain_graph=True)
    # gradient magnitude per expert of the first expert layer
    return layer.experts.weights[0].grad.abs().sum(dim=(1, 2))


def test_cgc_task_specific_experts_reach_only_their_task():
    torch.manual_seed(2)
    T, S, K = 3, 2, 2
    layer = CGCLayer(6, num_tasks=T, num_shared=S, num_specific=K, expert_hidden=(5,), shared_gate=False)
    task_out, shared_out = layer(torch.randn(10, 6))
    assert task_out.shape == (10, T, 5) and shared_out is None
    for t in range(T):
        g = _expert_grads(layer, task_out[:, t].sum())
        own = set(range(S + t * K, S + (t + 1) * K))
        for e in range(S + T * K):
            if e < S or e in own:
                assert g[e] > 0, f"task {t} should reach expert {e}"
            else:
                assert g[e] == 0, f"task {t} must not reach expert {e}"


def test_cgc_gates_cover_own_and_shared_experts_and_sum_to_one():
    layer = CGCLayer(6, num_tasks=2, num_shared=1, num_specific=2, expert_hidden=(5,), shared_gate=True)
    task_out, shared_out, gates, shared_gates = layer(torch.randn(4, 6), return_gates=True)
    assert gates.shape == (4, 2, 3)
    torch.testing.assert_close(gates.sum(-1), torch.ones(4, 2))
    assert shared_gates.shape == (4, 1, 5)
    assert shared_out.shape == (4, 5)


def test_ple_levels_route_inputs_and_last_level_has_no_shared_gate():
    ple = PLE(6, num_tasks=2, num_levels=3, num_shared=1, num_specific=1, expert_hidden=(8, 4))
    assert [lvl.shared_gate is not None for lvl in ple.levels] == [True, True, False]
    assert ple(torch.randn(5, 6)).shape == (5, 2, 4)
    # level 2 reads per-task inputs: task 0's specific expert sees only task 0's input
    lvl = ple.levels[1]
    x = torch.randn(3, 5, 4, requires_grad=True)
    out, _ = lvl(x)
    out[:, 0].sum().backward()
    assert x.grad[1].abs().sum() == 0  # task 1's input cannot influence task 0
    assert x.grad[0].abs().sum() > 0 and x.grad[2].abs().sum() > 0


def test_blocks_are_plain_modules_usable_in_a_user_pipeline():
    class MyRanker(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(12, 6)
            self.ple = PLE(6, num_tasks=2, num_levels=2, num_shared=1, num_specific=1, expert_hidden=(4,))
            self.towers = nn.ModuleList([Tower(4, (3,)) for _ in range(2)])

        def forward(self, x):
            h = self.ple(self.encoder(x))
            return [tower(h[:, i]) for i, tower in enumerate(self.towers)]

    model = MyRanker()
    outs = model(torch.randn(9, 12))
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())
