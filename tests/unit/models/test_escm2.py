"""ESCM2's counterfactual risk: unbiased over the entire space, and what trains what."""

import pytest
import torch

from mtrec.models import create_model
from mtrec.models.esmm import EsmmModel, dr_risk, ips_risk
from tests.unit.models.test_models import LAYOUT, TASKS, _batch


def _world(n: int = 200_000, seed: int = 0):
    """Click probabilities, and a CVR loss that is larger where clicks are rarer."""
    g = torch.Generator().manual_seed(seed)
    p = 0.05 + 0.85 * torch.rand(n, generator=g, dtype=torch.float64)
    error = (1.0 - p) * 2.0 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64)
    clicked = torch.rand(n, generator=g, dtype=torch.float64) < p
    return p, error, clicked


def test_ips_is_unbiased_for_the_entire_space_where_the_clicked_mean_is_not():
    p, error, clicked = _world()
    truth = error.mean()
    assert abs(ips_risk(error, clicked, p) - truth) < 0.01 * truth
    naive = error[clicked].mean()  # the clicked rows alone: the sample-selection bias ESCM2 removes
    assert naive < 0.8 * truth


def test_dr_is_unbiased_if_either_the_propensity_or_the_imputation_is_right():
    p, error, clicked = _world()
    truth = error.mean()
    risk, _ = dr_risk(error, error, clicked, torch.full_like(p, 0.5))  # wrong propensity, exact imputation
    torch.testing.assert_close(risk, truth)
    risk, _ = dr_risk(error, torch.zeros_like(error) + 0.3, clicked, p)  # right propensity, poor imputation
    assert abs(risk - truth) < 0.01 * truth


def test_dr_risk_trains_the_cvr_side_and_the_imputation_loss_the_imputation_side():
    p, error, clicked = (t[:64] for t in _world(64))
    error = error.clone().requires_grad_(True)
    imputed = torch.full_like(error, 0.5, requires_grad=True)
    risk, imputation = dr_risk(error, imputed, clicked, p)
    g_err, g_imp = torch.autograd.grad(risk, [error, imputed], allow_unused=True)
    assert g_imp is None and g_err.abs().sum() > 0
    g_err, g_imp = torch.autograd.grad(imputation, [error, imputed], allow_unused=True)
    assert g_err is None and g_imp.abs().sum() > 0


@pytest.mark.parametrize("kind", ["ips", "dr"])
def test_the_wrapper_adds_the_weighted_risk_in_training_only(kind):
    torch.manual_seed(0)
    inner = create_model("mmoe", LAYOUT, TASKS, embedding_dim=4)
    model = EsmmModel(
        inner, ctr="ctr", cvr="cvr", counterfactual=kind, counterfactual_weight=0.5, propensity_clip=0.1, columns=(0, 1)
    )
    batch = _batch(32)
    logits = model(batch)
    clicked = batch.label_mask[:, 1]
    target = torch.where(clicked, batch.labels[:, 1], 0.0)
    error = torch.nn.functional.binary_cross_entropy_with_logits(logits["cvr"], target, reduction="none")
    p = torch.sigmoid(logits["ctr"].detach()).clamp_min(0.1)
    imputed = model._imputed
    aux = model.auxiliary_loss(logits, batch)
    if kind == "ips":
        expected = 0.5 * ips_risk(error, clicked, p)
    else:
        risk, imputation = dr_risk(error, imputed, clicked, p)
        expected = 0.5 * (risk + imputation)
        assert {id(q) for q in model.imputation.parameters()} <= {id(q) for q in model.dense_parameters()}
    torch.testing.assert_close(aux, expected)
    aux.backward()
    cvr_tower = list(inner.towers[1].parameters())
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in cvr_tower)
    assert all(q.grad is None for q in inner.towers[0].parameters())  # the propensity is a weight, not a target
    model.eval()
    with torch.no_grad():
        logits = model(batch)
    assert model.auxiliary_loss(logits, batch) is None


def test_esmm_without_counterfactual_adds_nothing():
    inner = create_model("mmoe", LAYOUT, TASKS, embedding_dim=4)
    model = EsmmModel(inner, ctr="ctr", cvr="cvr")
    assert model.imputation is None
    batch = _batch(8)
    assert model.auxiliary_loss(model(batch), batch) is None
