"""Loss-weighting strategies: each one's formula, its gradients, and its edge cases."""

import math

import pytest
import torch
from torch import nn

from mtrec.batch import Batch
from mtrec.models import create_model
from mtrec.schema import InputLayout, Task
from mtrec.training.losses import multitask_loss
from mtrec.training.step import RepresentationTap
from mtrec.typed import parameter_spec
from mtrec.weighting import DWA, WEIGHTINGS, GradNorm, PCGrad, create_weighting


class Toy(nn.Module):
    """Sparse embedding -> shared two-layer MLP -> one linear head per task."""

    def __init__(self, num_tasks: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 3, sparse=True)
        self.shared = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8))
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(num_tasks))

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> list[torch.Tensor]:
        h = self.shared(torch.cat([self.emb(ids), dense], dim=1))
        return [head(h).squeeze(-1) for head in self.heads]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.shared.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return list(self.shared[2].parameters())


def _data(n: int = 32, num_tasks: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (n,), generator=g)
    dense = torch.randn(n, 2, generator=g)
    targets = torch.randn(num_tasks, n, generator=g)
    return ids, dense, targets


def _toy_losses(model: Toy, data, scales=(1.0, 1.0)) -> dict[str, torch.Tensor]:
    ids, dense, targets = data
    outs = model(ids, dense)
    pairs = enumerate(zip(outs, targets, scales, strict=True))
    return {f"t{i}": (out - s * y).square().mean() for i, (out, y, s) in pairs}


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = None if g is None else (g.to_dense() if g.is_sparse else g).clone()
    return out


def _plain_grads(model: nn.Module, losses: dict[str, torch.Tensor], weights: dict[str, float]):
    model.zero_grad(set_to_none=True)
    sum(weights[k] * v for k, v in losses.items()).backward()
    return _grads(model)


def _call(weighting, model: Toy, losses, extra=None) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    return weighting.backward(
        losses, shared=model.shared_parameters(), last_shared=model.last_shared_parameters(), extra=extra
    )


def _assert_grads_close(a, b, names=None, atol=1e-6):
    for name in names or a:
        assert a[name] is not None and b[name] is not None, name
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


# ---- rlw -----------------------------------------------------------------------------


def test_rlw_weights_are_softmax_of_a_normal_draw_scaled_to_T_and_unbiased():
    weighting = create_weighting("rlw", ("a", "b", "c"), (1.0, 1.0, 1.0), seed=3)
    draws = torch.tensor([weighting.draw() for _ in range(20000)], dtype=torch.float64)
    assert bool((draws > 0).all())
    torch.testing.assert_close(draws.sum(dim=1), torch.full((20000,), 3.0, dtype=torch.float64))
    # E[T * softmax(z)_t] = 1 for every t: in expectation the objective is fixed weighting's.
    torch.testing.assert_close(draws.mean(dim=0), torch.ones(3, dtype=torch.float64), atol=0.02, rtol=0)
    assert float(draws.std(dim=0).min()) > 0.3  # and it does vary from step to step


def test_rlw_gradient_is_the_weighted_sum_with_the_reported_weights():
    torch.manual_seed(0)
    model, data = Toy(), _data()
    weighting = create_weighting("rlw", ("t0", "t1"), (0.5, 2.0), seed=1)
    assert weighting.weights() == {"t0": 0.5, "t1": 2.0}  # before the first step
    for _ in range(3):
        losses = _toy_losses(model, data)
        total = _call(weighting, model, losses)
        got, w = _grads(model), weighting.weights()
        assert w != {"t0": 0.5, "t1": 2.0} and sum(
            v / b for v, b in zip(w.values(), (0.5, 2.0), strict=True)
        ) == pytest.approx(2.0)
        _assert_grads_close(got, _plain_grads(model, _toy_losses(model, data), w))
        assert total.item() == pytest.approx(w["t0"] * losses["t0"].item() + w["t1"] * losses["t1"].item(), rel=1e-6)
        assert model.emb.weight.grad.is_sparse
    assert weighting.extra_parameters() == []


def test_rlw_draws_follow_the_seed_and_resume_where_they_stopped():
    names, base = ("a", "b"), (1.0, 1.0)
    one, same, other = (create_weighting("rlw", names, base, seed=s) for s in (7, 7, 8))
    first = [one.draw() for _ in range(5)]
    assert first == [same.draw() for _ in range(5)]
    assert first != [other.draw() for _ in range(5)]
    state = one.state_dict()
    ahead = [one.draw() for _ in range(5)]
    resumed = create_weighting("rlw", names, base, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.draw() for _ in range(5)] == ahead


# ---- famo ----------------------------------------------------------------------------


def _famo_step(weighting, values: tuple[float, ...]) -> torch.Tensor:
    """One FAMO step on losses ``values * p`` (p = 1, a parameter); returns p's gradient."""
    p = torch.ones((), requires_grad=True)
    losses = {name: v * p for name, v in zip(weighting.task_names, values, strict=True)}
    weighting.backward(losses, shared=[], last_shared=[])
    return p.grad


def test_famo_first_step_weights_the_losses_by_their_inverse_and_sums_to_T():
    torch.manual_seed(0)
    model, data = Toy(), _data()
    weighting = create_weighting("famo", ("t0", "t1"), (1.0, 1.0))
    losses = _toy_losses(model, data, scales=(1.0, 3.0))
    total = _call(weighting, model, losses)
    got, w = _grads(model), weighting.weights()
    inv = {k: 1.0 / v.item() for k, v in losses.items()}
    expected = {k: 2.0 * inv[k] / sum(inv.values()) for k in inv}  # equal logits: W_t = T c z_t / L_t
    assert w == pytest.approx(expected, rel=1e-5)
    assert sum(w.values()) == pytest.approx(2.0)
    _assert_grads_close(got, _plain_grads(model, _toy_losses(model, data, scales=(1.0, 3.0)), w))
    assert total.item() == pytest.approx(sum(w[k] * losses[k].item() for k in w), rel=1e-5)
    assert weighting.extra_parameters() == []  # the logits have their own update, not the model's optimiser


def test_famo_gains_weight_for_the_task_whose_loss_falls_slower():
    weighting = create_weighting("famo", ("a", "b"), (1.0, 1.0), lr=0.025, decay=0.0)
    _famo_step(weighting, (1.0, 1.0))
    torch.testing.assert_close(
        weighting.logits.detach(), torch.zeros(2, dtype=torch.float64)
    )  # nothing to compare with yet
    _famo_step(weighting, (0.5, 1.0))  # a halved, b did not move
    z = torch.softmax(weighting.logits.detach(), 0)
    assert z[1] > z[0]
    # Adam's first step is lr in the direction of -grad: -lr for the fast task, +lr for the slow one
    torch.testing.assert_close(
        weighting.logits.detach(), torch.tensor([-0.025, 0.025], dtype=torch.float64), atol=1e-6, rtol=0
    )
    # and its weight carries into the gradient: W_b / W_a = (z_b / L_b) / (z_a / L_a)
    w = weighting.weights()
    assert w["b"] / w["a"] == pytest.approx(float(z[1] / z[0]) * 0.5, rel=1e-5)


def test_famo_leaves_the_logits_alone_when_every_loss_falls_at_the_same_rate():
    # decay 0: Adam normalises the decay's pull on near-zero logits into steps of about lr
    weighting = create_weighting("famo", ("a", "b", "c"), (1.0, 1.0, 1.0), decay=0.0)
    for scale in (1.0, 0.5, 0.25, 0.125):  # (exact in float32: the rates are equal to the last bit)
        _famo_step(weighting, (2.0 * scale, 0.375 * scale, 5.0 * scale))
    torch.testing.assert_close(weighting.logits.detach(), torch.zeros(3, dtype=torch.float64), atol=1e-7, rtol=0)


def test_famo_skips_an_absent_task_and_resumes_its_logits_and_adam_state():
    names = ("a", "b")
    weighting = create_weighting("famo", names, (1.0, 1.0))
    _famo_step(weighting, (1.0, 1.0))
    grad = _famo_step(weighting, (0.7, 0.0))  # b has no row this batch
    assert weighting.weights()["b"] == 0.0
    assert weighting.weights()["a"] == pytest.approx(1.0)  # one task present: its weight is 1
    assert grad.item() == pytest.approx(0.7)
    # with b absent only a has a rate: nothing to balance it against, so no logit moves
    assert torch.equal(weighting.logits.detach(), torch.zeros(2, dtype=torch.float64))
    for values in ((0.6, 0.9), (0.55, 0.85)):
        _famo_step(weighting, values)
    state = weighting.state_dict()
    resumed = create_weighting("famo", names, (1.0, 1.0))
    resumed.load_state_dict(state)
    for values in ((0.5, 0.8), (0.3, 0.79), (0.2, 0.78)):
        _famo_step(weighting, values)
        _famo_step(resumed, values)
        assert torch.equal(weighting.logits, resumed.logits)
    assert weighting.weights() == resumed.weights()


def test_famo_refuses_a_bad_step_size():
    with pytest.raises(ValueError, match="famo needs lr > 0 and decay >= 0"):
        create_weighting("famo", ("a",), (1.0,), lr=0.0)


# ---- fixed ---------------------------------------------------------------------------


def test_fixed_gradients_equal_weighted_sum_by_hand():
    torch.manual_seed(0)
    model, data = Toy(), _data()
    w = {"t0": 0.7, "t1": 2.5}
    expected = _plain_grads(model, _toy_losses(model, data), w)
    weighting = create_weighting("fixed", ("t0", "t1"), (0.7, 2.5))
    losses = _toy_losses(model, data)
    total = _call(weighting, model, losses)
    _assert_grads_close(_grads(model), expected)
    assert not total.requires_grad
    assert total.item() == pytest.approx(0.7 * losses["t0"].item() + 2.5 * losses["t1"].item(), rel=1e-6)
    assert model.emb.weight.grad.is_sparse
    assert weighting.weights() == {"t0": 0.7, "t1": 2.5}
    assert weighting.extra_parameters() == []


def test_extra_term_is_added_with_weight_one():
    torch.manual_seed(0)
    model, data = Toy(), _data()
    losses = _toy_losses(model, data)
    model.zero_grad(set_to_none=True)
    (0.5 * losses["t0"] + losses["t1"] + 3.0 * model.heads[0].bias.sum()).backward(retain_graph=True)
    expected = _grads(model)
    total = _call(create_weighting("fixed", ("t0", "t1"), (0.5, 1.0)), model, losses, 3.0 * model.heads[0].bias.sum())
    _assert_grads_close(_grads(model), expected)
    assert total.item() == pytest.approx(
        0.5 * losses["t0"].item() + losses["t1"].item() + 3.0 * model.heads[0].bias.item(), rel=1e-6
    )


# ---- uncertainty ---------------------------------------------------------------------


def test_uncertainty_log_variance_gradient_matches_formula():
    torch.manual_seed(0)
    model, data = Toy(), _data()
    weighting = create_weighting("uncertainty", ("t0", "t1"), (1.0, 2.0))
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.3, -0.4]))
    losses = _toy_losses(model, data)
    L = torch.stack([losses["t0"], losses["t1"]]).detach()
    s = torch.tensor([0.3, -0.4])
    w = torch.tensor([1.0, 2.0])
    eff = w * torch.exp(-s)
    expected_model = _plain_grads(model, _toy_losses(model, data), {"t0": eff[0].item(), "t1": eff[1].item()})
    total = _call(weighting, model, losses)
    # d/ds_t [exp(-s_t) w_t L_t + s_t / 2] = 1/2 - w_t exp(-s_t) L_t
    torch.testing.assert_close(weighting.log_vars.grad, 0.5 - eff * L)
    _assert_grads_close(_grads(model), expected_model)
    assert total.item() == pytest.approx((eff * L + s / 2).sum().item(), rel=1e-6)
    assert weighting.weights() == pytest.approx({"t0": eff[0].item(), "t1": eff[1].item()})
    assert weighting.extra_parameters() == [weighting.log_vars]


def test_uncertainty_log_variance_follows_the_loss_scale():
    torch.manual_seed(0)
    model, data = Toy(), _data(64)
    weighting = create_weighting("uncertainty", ("t0", "t1"), (1.0, 1.0))
    opt = torch.optim.Adam([*model.shared.parameters(), *model.heads.parameters(), *weighting.extra_parameters()], 0.05)
    for _ in range(150):
        opt.zero_grad(set_to_none=True)
        _call(weighting, model, _toy_losses(model, data, scales=(10.0, 1.0)))
        opt.step()
    s_big, s_small = weighting.log_vars.tolist()
    assert s_big > s_small + 1.5  # the 100x-loss task is trusted less
    w = weighting.weights()
    assert w["t0"] < w["t1"] / 3


# ---- gradnorm ------------------------------------------------------------------------


def test_gradnorm_model_gradient_is_plain_weighted_sum_and_never_on_embeddings(monkeypatch):
    torch.manual_seed(0)
    model, data = Toy(), _data()
    weighting = create_weighting("gradnorm", ("t0", "t1"), (1.0, 3.0))
    before = weighting.weights()
    assert before == pytest.approx({"t0": 0.5, "t1": 1.5})  # normalised to sum T = 2
    expected = _plain_grads(model, _toy_losses(model, data, (4.0, 1.0)), before)

    asked = []
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        asked.extend(inputs if isinstance(inputs, (list, tuple)) else [inputs])
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    _call(weighting, model, _toy_losses(model, data, (4.0, 1.0)))
    assert any(p is model.shared[2].weight for p in asked)
    assert all(p is not model.emb.weight for p in asked)
    assert all(not any(p is q for q in model.shared[0].parameters()) for p in asked)
    _assert_grads_close(_grads(model), expected)
    assert model.emb.weight.grad.is_sparse
    assert weighting.weights() != pytest.approx(before)  # w took a step


def test_gradnorm_weights_positive_sum_to_T_and_downweight_the_large_task():
    torch.manual_seed(0)
    model, data = Toy(3), _data(num_tasks=3)
    weighting = create_weighting("gradnorm", ("t0", "t1", "t2"), (1.0, 1.0, 1.0), alpha=1.5, lr=0.025)
    opt = torch.optim.SGD([*model.shared.parameters(), *model.heads.parameters()], lr=0.01)
    history = []
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        _call(weighting, model, _toy_losses(model, data, scales=(10.0, 1.0, 1.0)))
        opt.step()
        w = weighting.weights()
        history.append(w)
        assert all(v > 0 for v in w.values())
        assert sum(w.values()) == pytest.approx(3.0, abs=1e-5)
    assert history[-1]["t0"] < history[0]["t0"] < 1.0
    assert history[-1]["t0"] < 0.6
    assert history[-1]["t1"] > 1.0 and history[-1]["t2"] > 1.0


def test_gradnorm_L_grad_step_direction_at_a_known_point():
    # L_t(0) is recorded at the first call; on the same batch r_t = 1 and target = mean(G),
    # so Adam's first step (size lr) lowers the weight of the task with the larger G_t.
    torch.manual_seed(0)
    model, data = Toy(), _data()
    weighting = GradNorm(("t0", "t1"), (1.0, 1.0), lr=0.01)
    _call(weighting, model, _toy_losses(model, data, (5.0, 1.0)))
    w = weighting.weights()
    # Adam's first step moves each w by exactly lr; renormalisation keeps the sum at 2.
    assert w["t0"] == pytest.approx(0.99, abs=1e-6)
    assert w["t1"] == pytest.approx(1.01, abs=1e-6)
    torch.testing.assert_close(
        weighting.initial_losses, torch.stack(list(_toy_losses(model, data, (5.0, 1.0)).values()))
    )


def test_gradnorm_without_last_shared_layer_is_fixed():
    torch.manual_seed(0)
    model, data = Toy(), _data()
    expected = _plain_grads(model, _toy_losses(model, data), {"t0": 1.0, "t1": 3.0})
    weighting = create_weighting("gradnorm", ("t0", "t1"), (1.0, 3.0))
    model.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="no last shared layer"):
        weighting.backward(_toy_losses(model, data), shared=model.shared_parameters(), last_shared=[])
    _assert_grads_close(_grads(model), expected)


# ---- dwa -----------------------------------------------------------------------------


def test_dwa_weights_follow_the_formula():
    torch.manual_seed(0)
    names = ("a", "b", "c")
    weighting = create_weighting("dwa", names, (1.0, 1.0, 1.0), temperature=2.0)
    assert weighting.weights() == {"a": 1.0, "b": 1.0, "c": 1.0}
    weighting.epoch_end({"a": 1.0, "b": 2.0, "c": 0.5})
    assert weighting.weights() == {"a": 1.0, "b": 1.0, "c": 1.0}  # still epoch 2
    weighting.epoch_end({"a": 0.5, "b": 2.0, "c": 0.6})
    r = [0.5 / 1.0, 2.0 / 2.0, 0.6 / 0.5]
    e = [math.exp(x / 2.0) for x in r]
    expected = [3 * v / sum(e) for v in e]
    got = weighting.weights()
    assert [got[n] for n in names] == pytest.approx(expected, rel=1e-12)
    assert sum(got.values()) == pytest.approx(3.0)
    assert got["a"] < got["b"] < got["c"]  # the task whose loss fell fastest gets the least
    # Only the last two epochs count.
    weighting.epoch_end({"a": 0.5, "b": 1.0, "c": 0.6})
    r = [1.0, 0.5, 1.0]
    e = [math.exp(x / 2.0) for x in r]
    assert [weighting.weights()[n] for n in names] == pytest.approx([3 * v / sum(e) for v in e], rel=1e-12)


def test_dwa_multiplies_base_weights_into_the_gradient():
    torch.manual_seed(0)
    model, data = Toy(), _data()
    weighting = DWA(("t0", "t1"), (2.0, 0.5), temperature=1.0)
    weighting.epoch_end({"t0": 1.0, "t1": 1.0})
    weighting.epoch_end({"t0": 2.0, "t1": 1.0})
    e0, e1 = math.exp(2.0), math.exp(1.0)
    lam = (2 * e0 / (e0 + e1), 2 * e1 / (e0 + e1))
    w = {"t0": 2.0 * lam[0], "t1": 0.5 * lam[1]}
    assert weighting.weights() == pytest.approx(w)
    expected = _plain_grads(model, _toy_losses(model, data), w)
    _call(weighting, model, _toy_losses(model, data))
    _assert_grads_close(_grads(model), expected)


def test_dwa_zero_epoch_loss_counts_as_ratio_one():
    weighting = DWA(("a", "b"), (1.0, 1.0))
    weighting.epoch_end({"a": 0.0, "b": 1.0})
    weighting.epoch_end({"a": 0.3, "b": 1.0})
    assert weighting.weights() == pytest.approx({"a": 1.0, "b": 1.0})


# ---- pcgrad --------------------------------------------------------------------------


class Linear2(nn.Module):
    """Losses linear in a shared vector, so each task's shared gradient is a chosen constant."""

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.c = c  # (T, P)
        self.theta = nn.Parameter(torch.randn(c.shape[1]))
        self.tower = nn.Parameter(torch.randn(c.shape[0]))
        self.emb = nn.Embedding(10, 2, sparse=True)

    def losses(self) -> dict[str, torch.Tensor]:
        e = self.emb(torch.tensor([1, 4, 4])).sum()
        return {
            f"t{i}": self.c[i] @ self.theta + (i + 1) * self.tower[i] ** 2 + (i + 1) * e for i in range(self.c.shape[0])
        }


def _pcgrad_run(c: torch.Tensor, weights: tuple[float, ...], seed: int = 0):
    torch.manual_seed(1)
    model = Linear2(c)
    names = tuple(f"t{i}" for i in range(c.shape[0]))
    plain = _plain_grads(model, model.losses(), dict(zip(names, weights, strict=True)))
    model.zero_grad(set_to_none=True)
    weighting = create_weighting("pcgrad", names, weights, seed=seed)
    weighting.backward(model.losses(), shared=[model.theta], last_shared=[])
    return model, plain, _grads(model)


def test_pcgrad_no_conflict_is_plain_sum():
    c = torch.tensor([[1.0, 2.0, 0.0], [0.5, 1.0, -1.0]])
    assert c[0] @ c[1] > 0
    _, plain, got = _pcgrad_run(c, (1.0, 2.0))
    assert torch.equal(got["theta"], plain["theta"])
    _assert_grads_close(got, plain)


def test_pcgrad_conflict_projects_onto_normal_planes():
    c = torch.tensor([[1.0, 0.0, 1.0], [-2.0, 1.0, 0.5]])
    w = (1.5, 0.5)
    g1, g2 = w[0] * c[0], w[1] * c[1]
    assert g1 @ g2 < 0
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    assert p1 @ g2 >= -1e-6 and p2 @ g1 >= -1e-6
    model, plain, got = _pcgrad_run(c, w)
    torch.testing.assert_close(got["theta"], p1 + p2)
    assert not torch.allclose(got["theta"], plain["theta"])
    # Everything outside `shared` keeps the plain gradient, the sparse embedding included.
    _assert_grads_close(got, plain, names=["tower", "emb.weight"])
    assert model.emb.weight.grad.is_sparse


def _reference_pcgrad(grads: torch.Tensor, seed: int) -> torch.Tensor:
    """Algorithm 1 of the paper on explicit vectors, drawing the same random order."""
    g = torch.Generator().manual_seed(seed)
    T = grads.shape[0]
    out = torch.zeros_like(grads[0])
    for t in range(T):
        v = grads[t].clone()
        for s in torch.randperm(T, generator=g).tolist():
            if s == t or grads[s] @ grads[s] == 0:
                continue
            if v @ grads[s] < 0:
                v = v - (v @ grads[s]) / (grads[s] @ grads[s]) * grads[s]
        out += v
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pcgrad_three_tasks_matches_reference_algorithm(seed):
    g = torch.Generator().manual_seed(10 + seed)
    c = torch.randn(4, 6, generator=g, dtype=torch.float64)
    c[1] = -c[0] + 0.3 * c[1]  # make sure something conflicts
    w = (1.0, 0.5, 2.0, 1.0)
    weighted = torch.tensor(w, dtype=torch.float64)[:, None] * c
    _, plain, got = _pcgrad_run(c.float(), w, seed=seed)
    expected = _reference_pcgrad(weighted, seed).float()
    torch.testing.assert_close(got["theta"], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got["theta"], plain["theta"])


def test_pcgrad_extra_term_is_not_projected():
    c = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    torch.manual_seed(1)
    model = Linear2(c)
    extra = torch.tensor([3.0, -7.0]) @ model.theta
    model.zero_grad(set_to_none=True)
    PCGrad(("t0", "t1"), (1.0, 1.0)).backward(model.losses(), shared=[model.theta], last_shared=[], extra=extra)
    g1, g2 = c[0], c[1]
    p = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g2 @ g1) / (g1 @ g1) * g1)
    torch.testing.assert_close(model.theta.grad, p + torch.tensor([3.0, -7.0]))


def test_pcgrad_rejects_embeddings_as_shared_parameters():
    model = Linear2(torch.tensor([[1.0], [-1.0]]))
    with pytest.raises(ValueError, match="embedding tables are never shared"):
        PCGrad(("t0", "t1"), (1.0, 1.0)).backward(model.losses(), shared=[model.emb.weight], last_shared=[])


# ---- all strategies on a real model ---------------------------------------------------

LAYOUT = InputLayout(
    table_sizes=(50, 30, 7, 20),
    sparse_tables=(0, 1, 2),
    sequence_tables=(1, 3),
    sequence_max_len=(5, 3),
    sequence_pooling=("mean", "sum"),
    num_dense=4,
)
TASKS = tuple(Task(n, label=n) for n in ("ctr", "cvr", "sat"))


def _mmoe_batch(n: int = 16, cvr_rows: bool = True) -> Batch:
    g = torch.Generator().manual_seed(0)
    sparse = torch.stack([torch.randint(0, s, (n,), generator=g) for s in (50, 30, 7)], dim=1)
    seqs = (torch.randint(0, 30, (n, 5), generator=g), torch.randint(0, 20, (n, 3), generator=g))
    lengths = torch.stack([torch.randint(0, 6, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)], dim=1)
    labels = torch.randint(0, 2, (n, 3), generator=g).float()
    mask = torch.ones(n, 3, dtype=torch.bool)
    if not cvr_rows:
        mask[:, 1] = False
    return Batch(sparse, torch.randn(n, 4, generator=g), seqs, lengths, labels, mask)


def _attached_losses(logits, batch) -> dict[str, torch.Tensor]:
    # multitask_loss returns detached parts; one task at a time gives attached ones.
    return {
        t.name: multitask_loss({t.name: logits[t.name]}, batch.labels[:, [j]], batch.label_mask[:, [j]], (t,))[0]
        for j, t in enumerate(TASKS)
    }


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
@pytest.mark.parametrize("absent", ["graph", "constant"])
def test_every_strategy_on_mmoe_with_an_absent_task(name, absent):
    torch.manual_seed(0)
    model = create_model("mmoe", LAYOUT, tuple(t.name for t in TASKS), embedding_dim=4, expert_hidden=(8, 8))
    weighting = create_weighting(name, tuple(t.name for t in TASKS), (1.0, 1.0, 0.5))
    tap = RepresentationTap(*model.representation_layer()) if weighting.needs_representation else None
    for step in range(3):
        batch = _mmoe_batch(cvr_rows=False)
        logits = model(batch)
        losses = _attached_losses(logits, batch)
        assert losses["cvr"].item() == 0.0
        if absent == "constant":
            losses["cvr"] = torch.zeros(())  # no graph dependence at all
        model.zero_grad(set_to_none=True)
        rep = {"representation": tap.take()} if tap is not None else {}
        total = weighting.backward(
            losses, shared=model.shared_parameters(), last_shared=model.last_shared_parameters(), **rep
        )
        assert torch.isfinite(total)
        for pname, p in model.named_parameters():
            if p.grad is None:
                # A constant loss has no graph: only the absent task's own tower is unreached.
                assert absent == "constant" and pname.startswith("towers.1."), pname
                continue
            g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
            assert torch.isfinite(g).all(), f"{name}: {pname}"
        assert model.features.embedding.weight.grad.is_sparse
        assert all(math.isfinite(v) and v >= 0 for v in weighting.weights().values())
        for p in weighting.extra_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()
        weighting.epoch_end({"ctr": 0.5 + step, "cvr": 0.0, "sat": 0.7})
    if name == "uncertainty":
        assert weighting.log_vars.grad[1] == 0  # an absent task's log-variance does not move
    if name == "gradnorm":
        assert weighting.initial_losses[1] == 0  # L_cvr(0) waits for a batch with CVR rows
        assert sum(weighting.weights().values()) == pytest.approx(3.0, abs=1e-5)


def test_all_losses_constant_leaves_no_gradient():
    model = Toy()
    for name in WEIGHTINGS:
        model.zero_grad(set_to_none=True)
        total = create_weighting(name, ("t0", "t1"), (1.0, 1.0)).backward(
            {"t0": torch.zeros(()), "t1": torch.zeros(())},
            shared=model.shared_parameters(),
            last_shared=model.last_shared_parameters(),
        )
        assert total.item() == 0.0
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())


# ---- factory -------------------------------------------------------------------------


def test_create_weighting_rejects_unknown_names_and_parameters():
    with pytest.raises(
        ValueError,
        match="unknown loss weighting 'nope'.*aligned_mtl, cagrad, db_mtl, dwa, famo, fixed, gradnorm, mgda, nash_mtl",
    ):
        create_weighting("nope", ("a",), (1.0,))
    with pytest.raises(ValueError, match="unknown parameter.*alpah.*gradnorm.*accepted: alpha, lr"):
        create_weighting("gradnorm", ("a", "b"), (1.0, 1.0), alpah=2.0)
    with pytest.raises(ValueError, match="unknown parameter.*temperature.*'fixed'.*accepted: none"):
        create_weighting("fixed", ("a",), (1.0,), temperature=2.0)
    with pytest.raises(ValueError, match="2 base weights given for 1 tasks"):
        create_weighting("fixed", ("a",), (1.0, 2.0))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        create_weighting("dwa", ("a",), (1.0,), temperature=0.0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        create_weighting("gradnorm", ("a",), (1.0,), lr=-1.0)
    with pytest.raises(ValueError, match="losses are for tasks"):
        create_weighting("fixed", ("a", "b"), (1.0, 1.0)).backward({"a": torch.zeros(())}, shared=[], last_shared=[])


def test_weighting_parameters_are_annotated_config_keys():
    specs = {
        name: parameter_spec(cls.__init__, skip=("task_names", "base_weights")) for name, cls in WEIGHTINGS.items()
    }
    assert specs == {
        "fixed": {},
        "uncertainty": {},
        "gradnorm": {"alpha": (float, 1.5), "lr": (float, 0.025)},
        "dwa": {"temperature": (float, 2.0)},
        "rlw": {"seed": (int, 0)},
        "famo": {"lr": (float, 0.025), "decay": (float, 0.001)},
        "pcgrad": {"seed": (int, 0)},
        "mgda": {},
        "cagrad": {"c": (float, 0.4)},
        "nash_mtl": {},
        "aligned_mtl": {},
        "db_mtl": {"beta": (float, 0.9), "beta_sigma": (float, 0.5)},
    }


def test_zero_weight_task_stays_out_of_every_strategy():
    """ESMM gives its CVR task weight 0: no strategy may hand it a loss of its own."""
    from mtrec.weighting import create_weighting

    names = ("ctr", "cvr", "ctcvr")
    shared = torch.nn.Linear(4, 4)
    heads = torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in names)
    x = torch.randn(32, 4)
    for name in ("uncertainty", "gradnorm", "dwa", "rlw"):
        w = create_weighting(name, names, (1.0, 0.0, 1.0))
        opt = torch.optim.Adam([*shared.parameters(), *heads.parameters(), *w.extra_parameters()], lr=0.1)
        for epoch in range(4):
            for _ in range(20):
                h = shared(x)
                losses = {
                    n: head(h).square().mean() * (i + 1) for i, (n, head) in enumerate(zip(names, heads, strict=True))
                }
                opt.zero_grad()
                w.backward(losses, shared=list(shared.parameters()), last_shared=list(shared.parameters()))
                opt.step()
            w.epoch_end({n: float(i + 1) / (epoch + 1) ** (i + 1) for i, n in enumerate(names)})
        weights = w.weights()
        assert weights["cvr"] == 0.0, name
        assert heads[1].weight.grad is None or heads[1].weight.grad.abs().sum() == 0, name
        if name == "uncertainty":
            assert w.log_vars[1].item() == 0.0
        if name in ("gradnorm", "dwa"):
            assert abs(weights["ctr"] + weights["ctcvr"] - 2.0) < 1e-4, name
