"""GradNorm's W, ``last_shared_parameters()``: every task's gradient must reach all of it.

GradNorm compares the tasks' gradient norms on W; a block of W that one task reaches alone
(a CGC/PLE task-specific expert, a row of a cross-stitch matrix) inflates that task's norm
and the balancing then measures the wrong thing.
"""

import pytest
import torch
import torch.nn.functional as F

from mtrec.models import create_model, list_models
from mtrec.models.esmm import EsmmModel
from tests.unit.models.test_models import LAYOUT, TASKS, _batch

# Models that share no dense layer between tasks (GradNorm falls back to fixed weights).
NOTHING_SHARED = {"shared_embedding", "independent"}
# Must share a layer: the models of the issue, plus the other multi-task architectures.
MUST_SHARE = ("cgc", "ple", "cross_stitch", "mmoe", "shared_bottom", "omoe", "aitm")


def _model(name: str, **params):
    torch.manual_seed(0)
    return create_model(name, LAYOUT, TASKS, embedding_dim=4, **params)


def _task_losses(model, n: int = 128) -> dict[str, torch.Tensor]:
    batch = _batch(n)
    logits = model(batch)
    return {t: F.binary_cross_entropy_with_logits(logits[t], batch.labels[:, i]) for i, t in enumerate(TASKS)}


def _entries(model) -> list[tuple[torch.nn.Parameter, slice]]:
    """``(parameter, rows)`` of every entry of W, whole parameters as ``rows = slice(None)``
    (read by attribute so that the test also runs, and fails, on plain parameter lists)."""
    return [(getattr(e, "param", e), getattr(e, "rows", slice(None))) for e in model.last_shared_parameters()]


def _row_norms(loss: torch.Tensor, param: torch.nn.Parameter, rows: slice) -> torch.Tensor:
    """Gradient norm of ``loss`` on each row block (first-dimension slice) of ``param[rows]``:
    one expert / column of a batched ``(E, in, H)`` tensor, one row of a matrix."""
    (g,) = torch.autograd.grad(loss, [param], retain_graph=True, allow_unused=True)
    g = torch.zeros_like(param) if g is None else g
    g = g[rows]
    return g.reshape(g.shape[0], -1).norm(dim=1) if g.dim() > 1 else g.abs()


def test_the_models_of_the_issue_are_registered():
    assert set(MUST_SHARE) <= set(list_models())


@pytest.mark.parametrize("name", sorted(list_models()))
def test_every_task_gradient_reaches_every_row_block_of_w(name):
    model = _model(name)
    entries = _entries(model)
    if name in NOTHING_SHARED:
        assert entries == []
        return
    assert entries, f"{name}: no last shared layer"
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p, _ in entries), f"{name}: W outside shared_parameters()"
    losses = _task_losses(model)
    total = sum(losses.values())
    for p, rows in entries:
        reached = _row_norms(total, p, rows) > 0
        if p.dim() == 3:  # batched experts / columns: every block is in use
            assert reached.all(), f"{name}: a block of W {tuple(p.shape)} gets no gradient at all"
        assert reached.any()
        for t, loss in losses.items():
            norms = _row_norms(loss, p, rows)
            missed = (reached & (norms == 0)).nonzero().flatten().tolist()
            assert not missed, f"{name}: task {t} misses row block(s) {missed} of W {tuple(p.shape)}"


@pytest.mark.parametrize("name", ["cgc", "ple"])
def test_cgc_and_ple_w_is_the_shared_experts_of_the_last_level(name):
    model = _model(name, num_shared_experts=2, num_task_experts=1)
    last = model.backbone.levels[-1]
    entries = _entries(model)
    assert [id(p) for p, _ in entries] == [id(last.experts.weights[-1]), id(last.experts.biases[-1])]
    for p, rows in entries:
        assert torch.arange(p.shape[0])[rows].tolist() == [0, 1]  # experts [shared 0, shared 1 | task ...]


def test_cgc_without_shared_experts_shares_nothing():
    assert _model("cgc", num_shared_experts=0, num_task_experts=1).last_shared_parameters() == []


def test_cross_stitch_w_is_the_input_of_the_last_stitch_not_its_alpha():
    model = _model("cross_stitch")
    net = model.backbone
    assert [id(p) for p, _ in _entries(model)] == [id(net.weights[-1]), id(net.biases[-1])]
    # every task reaches every column's last layer (the off-diagonal alpha couples them)
    losses = _task_losses(model)
    for t, loss in losses.items():
        assert (_row_norms(loss, net.weights[-1], slice(None)) > 0).all(), t
    # whereas task t reaches row t of the last alpha only
    for i, loss in enumerate(losses.values()):
        assert torch.equal(_row_norms(loss, net.stitches[-1].alpha, slice(None)) > 0, torch.arange(3) == i)


def test_esmm_wrapper_names_the_inner_models_w():
    inner = _model("cgc")
    assert EsmmModel(inner, ctr="ctr", cvr="cvr").last_shared_parameters() == inner.last_shared_parameters()


def test_gradnorm_measures_the_norm_on_the_shared_experts_only():
    from mtrec.weighting import GradNorm

    model = _model("cgc", num_shared_experts=2, num_task_experts=1)
    last = model.backbone.levels[-1]
    losses = _task_losses(model)
    expected, whole = [], []
    for loss in losses.values():
        grads = torch.autograd.grad(loss, [last.experts.weights[-1], last.experts.biases[-1]], retain_graph=True)
        expected.append(torch.sqrt(sum(g[:2].square().sum() for g in grads)))
        whole.append(torch.sqrt(sum(g.square().sum() for g in grads)))
    weighting = GradNorm(TASKS, (1.0, 1.0, 1.0))
    seen = []
    update = weighting._update_weights
    weighting._update_weights = lambda values, norms: (seen.append(norms.detach().clone()), update(values, norms))
    weighting.backward(losses, shared=model.shared_parameters(), last_shared=model.last_shared_parameters())
    (norms,) = seen
    torch.testing.assert_close(norms, torch.stack(expected))
    assert not torch.allclose(norms, torch.stack(whole))  # the task experts are left out
    assert last.experts.weights[-1].grad is not None
    w = weighting.task_weights.detach()
    assert torch.isfinite(w).all() and w.sum().item() == pytest.approx(3.0)
