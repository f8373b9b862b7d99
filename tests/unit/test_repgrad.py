"""The representation-gradient balancing methods: each solver's defining property, and how
:class:`~mtrec.weighting.RepresentationGradient` applies the combination to the model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from mtrec import repgrad
from mtrec.models import create_model
from mtrec.nn.experts import ExpertGroup
from mtrec.schema import InputLayout
from mtrec.training.step import RepresentationTap
from mtrec.weighting import Representation, create_weighting

REP_METHODS = ("mgda", "cagrad", "nash_mtl", "aligned_mtl", "db_mtl")


def _gradients(seed: int, n: int = 3, dim: int = 6, conflict: float = 1.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(n, dim))
    G[1] -= conflict * G[0]  # tasks 0 and 1 conflict
    return G


# ---- solvers ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [2, 3, 5])
def test_min_norm_point_satisfies_the_kkt_conditions_and_beats_a_grid(seed, n):
    G = _gradients(seed, n=n)
    alpha = repgrad.min_norm_coefficients(G @ G.T)
    assert alpha.min() >= 0 and alpha.sum() == pytest.approx(1.0)
    d = alpha @ G
    # Minimum norm in the hull <=> every g_t . d >= ||d||^2, with equality where alpha_t > 0.
    slack = G @ d - d @ d
    assert (slack >= -1e-9).all()
    assert np.abs(slack[alpha > 1e-9]).max() < 1e-9
    if n == 3:  # no point of a fine grid of the simplex has a smaller norm
        steps = np.linspace(0, 1, 101)
        grid = np.array([(a, b, 1 - a - b) for a, b in itertools.product(steps, steps) if a + b <= 1])
        assert d @ d <= (np.linalg.norm(grid @ G, axis=1) ** 2).min() + 1e-12


def test_min_norm_of_opposite_gradients_is_zero_and_of_equal_ones_is_the_gradient():
    g = np.array([1.0, -2.0, 0.5])
    for G, norm in ((np.stack([g, -g]), 0.0), (np.stack([g, g]), float(g @ g))):
        alpha = repgrad.min_norm_coefficients(G @ G.T)
        d = alpha @ G
        assert d @ d == pytest.approx(norm, abs=1e-12)


def test_min_norm_refuses_too_many_tasks():
    with pytest.raises(ValueError, match="at most 12 tasks"):
        repgrad.min_norm_coefficients(np.eye(13))
    with pytest.raises(ValueError, match="mgda takes at most 12 tasks"):
        create_weighting("mgda", tuple(f"t{i}" for i in range(13)), (1.0,) * 13)


@pytest.mark.parametrize("seed", range(4))
def test_cagrad_at_c_zero_is_the_sum_of_the_gradients(seed):
    G = _gradients(seed)
    assert np.array_equal(repgrad.cagrad_coefficients(G @ G.T, 0.0), np.ones(3))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_cagrad_direction_maximises_the_worst_task_within_its_ball(seed, c):
    G = _gradients(seed, dim=4)
    n = len(G)
    a = repgrad.cagrad_coefficients(G @ G.T, c)
    d = (a * (1 + c) / n) @ G  # undo the rescaling: CAGrad's d
    g0 = G.mean(axis=0)
    radius = c * np.linalg.norm(g0)
    assert np.linalg.norm(d - g0) <= radius * (1 + 1e-6)
    # No point of the ball (sampled densely, D = 4) improves the worst task more.
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(200_000, 4))
    v *= (radius * rng.uniform(size=(len(v), 1)) ** 0.25) / np.linalg.norm(v, axis=1, keepdims=True)
    sampled = ((g0 + v) @ G.T).min(axis=1).max()
    assert (G @ d).min() >= sampled - 1e-6
    assert (G @ d).min() > (G @ g0).min()  # and it does better than the average gradient


@pytest.mark.parametrize("seed", range(6))
def test_nash_solution_satisfies_the_bargaining_condition(seed):
    G = _gradients(seed, n=3, dim=8)
    alpha = repgrad.nash_coefficients(G @ G.T)
    d = alpha @ G
    assert (alpha > 0).all()
    np.testing.assert_allclose((G @ d) * alpha, 1.0, rtol=1e-8)  # g_t . d = 1 / alpha_t
    assert d @ d == pytest.approx(3.0)


def test_nash_is_invariant_to_a_task_loss_scale():
    G = _gradients(1, n=3, dim=8)
    scaled = G * np.array([[1.0], [10.0], [0.1]])
    a, b = repgrad.nash_coefficients(G @ G.T), repgrad.nash_coefficients(scaled @ scaled.T)
    np.testing.assert_allclose(b @ scaled, a @ G, atol=1e-8)
    np.testing.assert_allclose(b, a / np.array([1.0, 10.0, 0.1]), rtol=1e-7)


def test_nash_without_a_common_descent_direction_takes_no_step():
    g = np.array([1.0, 2.0])
    G = np.stack([g, -g])
    assert np.array_equal(repgrad.nash_coefficients(G @ G.T), np.zeros(2))


@pytest.mark.parametrize("seed", range(6))
def test_aligned_gradients_have_condition_number_one(seed):
    G = _gradients(seed, n=3, dim=8)
    A = G @ G.T
    a = repgrad.aligned_coefficients(A)
    lam, V = np.linalg.eigh(A)
    B = np.sqrt(lam.min()) * (V / np.sqrt(lam)) @ V.T
    aligned = B @ G
    np.testing.assert_allclose(aligned @ aligned.T, lam.min() * np.eye(3), atol=1e-9 * lam.max())
    np.testing.assert_allclose(a @ G, aligned.sum(axis=0), atol=1e-9)


def test_aligned_leaves_orthogonal_gradients_of_one_norm_alone():
    G = 2.0 * np.eye(3)[:, :]
    np.testing.assert_allclose(repgrad.aligned_coefficients(G @ G.T), np.ones(3))


def test_every_solver_gives_fixed_weights_to_agreeing_tasks():
    g = np.array([0.3, -1.0, 2.0])
    A = np.outer(np.ones(3), np.ones(3)) * (g @ g)  # three equal gradients
    for coef in (repgrad.min_norm_coefficients(A) * 3, repgrad.cagrad_coefficients(A, 0.4)):
        np.testing.assert_allclose(coef.sum(), 3.0)  # the step is sum_t g_t = 3 g


# ---- the weighting on a model ------------------------------------------------------------


class Shared(nn.Module):
    """z = shared(x) -> one head per task; z is the representation."""

    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(5, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(tasks))

    def losses(self, x: torch.Tensor, scales=(1.0, -1.5, 0.7)) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        z = self.shared(x)
        return {
            f"t{i}": (s * head(z)).mean() + head(z).square().mean()
            for i, (s, head) in enumerate(zip(scales, self.heads, strict=False))
        }, z


@pytest.mark.parametrize("name", REP_METHODS)
def test_the_layers_below_the_representation_get_the_combined_gradient(name):
    model = Shared()
    x = torch.randn(16, 5)
    weights = (1.0, 0.5, 2.0)
    names = ("t0", "t1", "t2")
    weighting = create_weighting(name, names, weights)
    losses, z = model.losses(x)
    weighting.backward(losses, shared=[], last_shared=[], representation=Representation((z,)))
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    # By hand: the per-task gradients on z, the method's coefficients on their Gram matrix.
    losses, z = model.losses(x)
    g = torch.stack(
        [torch.autograd.grad(w * losses[n], z, retain_graph=True)[0] for n, w in zip(names, weights, strict=True)]
    )
    flat = g.reshape(3, -1).double()
    values = np.array([w * losses[n].item() for n, w in zip(names, weights, strict=True)])
    fresh = create_weighting(name, names, weights)
    coef = fresh.coefficients((flat @ flat.T).numpy(), values, np.arange(3))
    model.zero_grad()
    combined = (torch.from_numpy(coef).float().view(3, 1, 1) * g).sum(0)
    z.backward(combined, retain_graph=True)
    for n, p in model.shared.named_parameters():
        torch.testing.assert_close(got[f"shared.{n}"], p.grad, rtol=1e-5, atol=1e-6)
    model.zero_grad()
    sum(w * losses[n] for n, w in zip(names, weights, strict=True)).backward()
    for n, p in model.heads.named_parameters():  # above z: the plain weighted sum
        torch.testing.assert_close(got[f"heads.{n}"], p.grad, rtol=1e-5, atol=1e-6)
    assert weighting.weights() == pytest.approx(dict(zip(names, (coef * np.array(weights)).tolist(), strict=True)))


@pytest.mark.parametrize("name", REP_METHODS)
def test_an_absent_or_zero_weight_task_stays_out(name):
    model = Shared()
    x = torch.randn(16, 5)
    weighting = create_weighting(name, ("t0", "t1", "t2"), (1.0, 0.0, 1.0))
    losses, z = model.losses(x)
    losses["t2"] = torch.zeros(())  # no row this batch
    weighting.backward(losses, shared=[], last_shared=[], representation=Representation((z,)))
    assert model.heads[1].weight.grad.abs().sum() == 0 and model.heads[2].weight.grad is None
    assert weighting.weights()["t1"] == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_db_mtl_balances_every_task_to_the_largest_log_gradient_and_ignores_loss_scales():
    x = torch.randn(16, 5)
    names = ("t0", "t1", "t2")

    def combined(scales: tuple[float, ...]) -> tuple[torch.Tensor, list[float]]:
        model = Shared()
        weighting = create_weighting("db_mtl", names, (1.0, 1.0, 1.0), beta=0.0)
        losses, z = model.losses(x, scales=(0.4, 0.9, 1.7))
        losses = {n: s * loss.exp() for (n, loss), s in zip(losses.items(), scales, strict=True)}  # > 0
        g = [torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses.values()]
        weighting.backward(losses, shared=[], last_shared=[], representation=Representation((z,)))
        a = [weighting.weights()[n] for n in names]
        return model.shared.weight.grad.clone(), [float((ai * gi).norm()) for ai, gi in zip(a, g, strict=True)]

    grad, norms = combined((1.0, 1.0, 1.0))
    assert max(norms) / min(norms) == pytest.approx(1.0, rel=1e-5)  # every task's step has one norm
    scaled, _ = combined((10.0, 0.01, 3.0))
    torch.testing.assert_close(scaled, grad, rtol=1e-4, atol=1e-7)  # the log cancels the scales


def test_db_mtl_averages_the_norms_and_resumes_them():
    model = Shared()
    x = torch.randn(16, 5)
    names = ("t0", "t1", "t2")
    w = create_weighting("db_mtl", names, (1.0, 1.0, 1.0), beta=0.9, beta_sigma=0.5)
    for _ in range(3):
        losses, z = model.losses(x)
        losses = {n: loss.exp() for n, loss in losses.items()}
        w.backward(losses, shared=[], last_shared=[], representation=Representation((z,)))
    assert w.steps.tolist() == [3, 3, 3] and (w.norms > 0).all()
    again = create_weighting("db_mtl", names, (1.0, 1.0, 1.0))
    again.load_state_dict(w.state_dict())
    assert torch.equal(again.norms, w.norms) and torch.equal(again.steps, w.steps)
    with pytest.raises(ValueError, match="beta"):
        create_weighting("db_mtl", names, (1.0, 1.0, 1.0), beta=1.0)


def test_without_a_representation_the_methods_warn_and_use_fixed_weights():
    model = Shared()
    losses, _ = model.losses(torch.randn(8, 5))
    w = create_weighting("mgda", ("t0", "t1", "t2"), (1.0, 1.0, 1.0))
    with pytest.warns(UserWarning, match="no shared representation"):
        w.backward(losses, shared=[], last_shared=[])
    assert w.weights() == {"t0": 1.0, "t1": 1.0, "t2": 1.0}


# ---- where the representation is --------------------------------------------------------

LAYOUT = InputLayout(
    sparse_tables=(0, 1),
    table_sizes=(40, 20),
    sequence_tables=(),
    sequence_max_len=(),
    sequence_pooling=(),
    num_dense=3,
)


def test_representation_layer_is_the_last_shared_layer_of_each_model():
    tasks = ("a", "b")
    mmoe = create_model("mmoe", LAYOUT, tasks, embedding_dim=4, expert_hidden=(8, 4))
    module, rows = mmoe.representation_layer()
    assert module is mmoe.backbone.experts and rows is None
    ple = create_model("ple", LAYOUT, tasks, embedding_dim=4, expert_hidden=(8, 4), num_shared_experts=2)
    module, rows = ple.representation_layer()
    assert module is ple.backbone.levels[-1].experts and isinstance(module, ExpertGroup) and rows == slice(0, 2)
    bottom = create_model("shared_bottom", LAYOUT, tasks, embedding_dim=4, bottom_hidden=(8, 4))
    module, rows = bottom.representation_layer()
    assert isinstance(module, nn.Linear) and module.out_features == 4
    shared_embedding = create_model("shared_embedding", LAYOUT, tasks, embedding_dim=4)
    assert shared_embedding.representation_layer() == (shared_embedding.features, None)  # one shared input
    # Nothing shared: separate table sets, or a last shared layer that is the whole backbone.
    assert create_model("independent", LAYOUT, tasks, embedding_dim=4).representation_layer() is None
    assert create_model("mmoe", LAYOUT, tasks, embedding="per_task").representation_layer() is None
    assert create_model("cross_stitch", LAYOUT, tasks, embedding_dim=4).representation_layer() is None


def test_the_trainer_refuses_a_representation_method_on_a_model_that_shares_none(tmp_path):
    from mtrec.config import config_from_dict
    from mtrec.data.synthetic import write_click_log
    from mtrec.errors import ConfigError
    from mtrec.quickstart import synthetic_features, synthetic_tasks
    from mtrec.training import train

    write_click_log(tmp_path / "c.parquet", 2000, seed=1)
    cfg = config_from_dict(
        {
            "data": {"train": str(tmp_path / "c.parquet"), "mode": "memory"},
            "features": synthetic_features(),
            "tasks": synthetic_tasks(),
            "model": {"name": "independent", "embedding_dim": 4},
            "train": {"epochs": 1, "threads": 1, "loss_weighting": {"name": "nash_mtl"}},
        }
    )
    with pytest.raises(ConfigError, match="nash_mtl combines the task gradients on a representation.*independent"):
        train(cfg, output=tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.incomplete").exists()


def _batch(n: int = 32):
    from mtrec.batch import Batch

    g = torch.Generator().manual_seed(0)
    sparse = torch.stack([torch.randint(0, s, (n,), generator=g) for s in (40, 20)], dim=1)
    labels = torch.randint(0, 2, (n, 2), generator=g).float()
    return Batch(
        sparse,
        torch.randn(n, 3, generator=g),
        (),
        torch.zeros(n, 0, dtype=torch.long),
        labels,
        torch.ones(n, 2, dtype=torch.bool),
    )


def test_on_ple_only_the_shared_experts_get_the_combination():
    torch.manual_seed(0)
    tasks = ("a", "b")
    ple = create_model(
        "ple", LAYOUT, tasks, embedding_dim=4, expert_hidden=(8, 4), num_shared_experts=1, num_task_experts=1
    )
    batch = _batch()
    bce = nn.functional.binary_cross_entropy_with_logits

    def grads(name: str | None) -> torch.Tensor:
        ple.zero_grad(set_to_none=True)
        tap = RepresentationTap(*ple.representation_layer())
        logits = ple(batch)
        losses = {t: bce(logits[t], batch.labels[:, i]) for i, t in enumerate(tasks)}
        if name is None:
            sum(losses.values()).backward()
        else:
            create_weighting(name, tasks, (1.0, 1.0)).backward(
                losses, shared=[], last_shared=[], representation=tap.take()
            )
        tap.remove()
        return ple.backbone.levels[-1].experts.weights[-1].grad.clone()

    plain, mgda = grads(None), grads("aligned_mtl")
    torch.testing.assert_close(mgda[1:], plain[1:])  # the task experts (rows 1, 2): untouched
    assert not torch.allclose(mgda[:1], plain[:1])  # the shared expert: combined


def test_the_tap_records_training_passes_only():
    model = create_model("mmoe", LAYOUT, ("a", "b"), embedding_dim=4, expert_hidden=(8, 4))
    tap = RepresentationTap(*model.representation_layer())
    batch = _batch()
    model.eval()
    model(batch)
    with torch.no_grad():
        model.train()
        model(batch)
    assert tap.take().tensors == ()
    model(batch)
    rep = tap.take()
    assert len(rep.tensors) == 1 and rep.tensors[0].shape == (32, 4, 4)  # (B, E, H)
    assert tap.take().tensors == ()


@pytest.mark.parametrize(("name", "kwargs"), [("shared_bottom", {"bottom_hidden": (8, 6)}), ("aitm", {})])
def test_the_tapped_representation_is_the_linear_output_before_its_activation(name, kwargs):
    # An in-place ReLU after the tapped Linear would overwrite what the tap holds (and move its
    # grad_fn onto the ReLU): the gradient methods would then work on another tensor.
    model = create_model(name, LAYOUT, ("a", "b"), embedding_dim=4, **kwargs)
    tap = RepresentationTap(*model.representation_layer())
    model(_batch())
    (rep,) = tap.take().tensors
    tap.remove()
    assert type(rep.grad_fn).__name__ == "AddmmBackward0"
    assert (rep < 0).any()  # pre-activation values, not clamped at 0


# ---- config -----------------------------------------------------------------------------


def test_config_refuses_a_representation_method_with_a_compiled_backbone_and_bad_values():
    from pathlib import Path

    from mtrec.config import load_config
    from mtrec.errors import ConfigError

    config = Path(__file__).resolve().parents[2] / "configs" / "synthetic" / "mmoe.yaml"
    with pytest.raises(ConfigError, match="train.compile: loss_weighting mgda records the shared representation"):
        load_config(config, ["train.compile=true", "train.loss_weighting={name: mgda}"])
    with pytest.raises(ConfigError, match=r"train.loss_weighting.c: expected >= 0, got -1"):
        load_config(config, ["train.loss_weighting={name: cagrad, c: -1}"])
    with pytest.raises(ConfigError, match=r"train.loss_weighting.beta: expected a number in \[0, 1\], got 2.0"):
        load_config(config, ["train.loss_weighting={name: db_mtl, beta: 2}"])
    with pytest.raises(ConfigError, match=r"train.loss_weighting: db_mtl needs 0 <= beta < 1"):
        load_config(config, ["train.loss_weighting={name: db_mtl, beta: 1}"])
    cfg = load_config(config, ["train.loss_weighting={name: cagrad, c: 0.2}"])
    assert cfg.train.loss_weighting == {"name": "cagrad", "c": 0.2}
