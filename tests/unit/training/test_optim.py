"""LazyAdam: SparseAdam's row-wise update computed from a dense gradient."""

from __future__ import annotations

import copy as copy_module

import pytest
import torch

from mtrec.training.optim import LazyAdam


def _pair(rows: int = 60, dim: int = 4, lr: float = 0.01):
    torch.manual_seed(0)
    w0 = torch.randn(rows, dim)
    sparse = torch.nn.Embedding(rows, dim, sparse=True)
    dense = torch.nn.Embedding(rows, dim, sparse=False)
    sparse.weight.data.copy_(w0)
    dense.weight.data.copy_(w0)
    return (
        w0,
        (sparse, torch.optim.SparseAdam(sparse.parameters(), lr=lr)),
        (dense, LazyAdam(dense.parameters(), lr=lr)),
    )


def test_lazy_adam_follows_sparse_adam_step_for_step():
    w0, (sp, sp_opt), (de, de_opt) = _pair()
    g = torch.Generator().manual_seed(1)
    seen = torch.zeros(60, dtype=torch.bool)
    for step in range(40):
        # Repeated ids within a batch (their gradients add up) and rows that go untouched
        # for many steps (their moments must wait, not decay).
        high = 20 if step < 20 else 50
        ids = torch.randint(0, high, (32, 3), generator=g)
        seen[ids.reshape(-1)] = True
        target = torch.randn(32, 3, 4, generator=g)
        for emb, opt in ((sp, sp_opt), (de, de_opt)):
            opt.zero_grad(set_to_none=True)
            ((emb(ids) - target) ** 2).sum().backward()
            opt.step()
        torch.testing.assert_close(de.weight, sp.weight, rtol=1e-5, atol=1e-6, msg=lambda m, s=step: f"step {s}: {m}")
    state_s, state_d = sp_opt.state[sp.weight], de_opt.state[de.weight]
    assert state_d["step"] == state_s["step"] == 40
    torch.testing.assert_close(state_d["exp_avg"], state_s["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state_d["exp_avg_sq"], state_s["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    # Rows never looked up are exactly where they started, with zero moments.
    assert 0 < int((~seen).sum()) < 60
    assert torch.equal(de.weight.detach()[~seen], w0[~seen])
    assert not state_d["exp_avg"][~seen].any() and not state_d["exp_avg_sq"][~seen].any()


def test_a_dense_adam_would_move_untouched_rows_lazy_adam_does_not():
    """The property that matters: plain Adam keeps moving rows on stale momentum."""
    table = torch.nn.Parameter(torch.zeros(3, 2))
    plain = torch.nn.Parameter(torch.zeros(3, 2))
    lazy, adam = LazyAdam([table], lr=0.1), torch.optim.Adam([plain], lr=0.1)
    for grad in (torch.tensor([[1.0, 1.0], [0, 0], [0, 0]]), torch.zeros(3, 2)):
        table.grad, plain.grad = grad.clone(), grad.clone()
        lazy.step()
        adam.step()
    assert not torch.equal(plain.detach()[0], torch.full((2,), -0.1))  # Adam moved row 0 again
    torch.testing.assert_close(table.detach()[0], torch.full((2,), -0.1))  # LazyAdam did not
    assert not table.detach()[1:].any()


def test_lazy_adam_rejects_sparse_gradients_and_bad_settings():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = LazyAdam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="dense gradients"):
        opt.step()
    with pytest.raises(ValueError, match="invalid lr"):
        LazyAdam(emb.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="eps=0.0"):  # untouched rows would divide 0 by 0
        LazyAdam(emb.parameters(), eps=0.0)


def test_lazy_adam_state_round_trips_through_state_dict():
    _, _, (de, opt) = _pair()
    ids = torch.tensor([[1, 2, 3]])
    for _ in range(3):
        opt.zero_grad()
        de(ids).sum().backward()
        opt.step()
    copy = torch.nn.Embedding(60, 4)
    copy.weight.data.copy_(de.weight.detach())
    opt2 = LazyAdam(copy.parameters(), lr=0.01)
    opt2.load_state_dict(copy_module.deepcopy(opt.state_dict()))  # state_dict() aliases the moments
    for emb, o in ((de, opt), (copy, opt2)):
        o.zero_grad()
        emb(ids).sum().backward()
        o.step()
    assert torch.equal(de.weight, copy.weight)
