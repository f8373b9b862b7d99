"""train.loss_normalization (sample_space | impressions) and ESMM's esmm.cvr_loss_weight."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from mtrec.config import config_from_dict
from mtrec.errors import ConfigError
from mtrec.quickstart import synthetic_features, synthetic_tasks
from mtrec.schema import Esmm, Schema, SparseFeature, Task
from mtrec.training.distributed import SINGLE_PROCESS, global_mean_scale
from mtrec.training.losses import multitask_loss, task_losses
from mtrec.training.step import loss_denominators as _loss_denominators
from mtrec.training.trainer import _masked_loss

TASKS = (Task("ctr", label="click"), Task("cvr", label="conv", where="click == 1"))


def _bce(z: float, y: float) -> float:
    p = 1 / (1 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _batch():
    """Four impressions, two clicked (rows 0 and 2): CVR's space is half the batch."""
    logits = {"ctr": torch.tensor([0.5, -1.0, 2.0, 0.0]), "cvr": torch.tensor([1.0, 50.0, -0.5, -80.0])}
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, False]])
    return logits, labels, mask


def test_both_normalizations_give_the_hand_computed_values():
    logits, labels, mask = _batch()
    ctr_rows = [_bce(0.5, 1), _bce(-1.0, 0), _bce(2.0, 1), _bce(0.0, 0)]
    cvr_rows = [_bce(1.0, 1), _bce(-0.5, 0)]  # the clicked rows only
    space = task_losses(logits, labels, mask, TASKS)
    impressions = task_losses(logits, labels, mask, TASKS, normalization="impressions")
    assert space["ctr"].item() == pytest.approx(sum(ctr_rows) / 4, rel=1e-6)
    assert space["cvr"].item() == pytest.approx(sum(cvr_rows) / 2, rel=1e-6)
    assert impressions["ctr"].item() == pytest.approx(sum(ctr_rows) / 4, rel=1e-6)  # CTR covers the batch
    assert impressions["cvr"].item() == pytest.approx(sum(cvr_rows) / 4, rel=1e-6)
    # The default is today's: the mean over the sample space.
    assert torch.equal(task_losses(logits, labels, mask, TASKS, normalization="sample_space")["cvr"], space["cvr"])


def test_impressions_equal_sample_space_times_the_share_of_the_batch_in_the_space():
    g = torch.Generator().manual_seed(0)
    n = 64
    logits = {"ctr": torch.randn(n, generator=g), "cvr": torch.randn(n, generator=g)}
    click = (torch.rand(n, generator=g) < 0.2).float()
    labels = torch.stack([click, click * (torch.rand(n, generator=g) < 0.5).float()], dim=1)
    mask = torch.stack([torch.ones(n, dtype=torch.bool), click.bool()], dim=1)
    space = task_losses(logits, labels, mask, TASKS)
    impressions = task_losses(logits, labels, mask, TASKS, normalization="impressions")
    for j, task in enumerate(TASKS):
        share = mask[:, j].sum().item() / n
        torch.testing.assert_close(impressions[task.name], space[task.name] * share, rtol=1e-6, atol=0.0)
    assert 0 < mask[:, 1].sum() < n


@pytest.mark.parametrize("normalization", ["sample_space", "impressions"])
def test_masked_rows_contribute_nothing(normalization):
    logits, labels, mask = _batch()
    base = task_losses(logits, labels, mask, TASKS, normalization=normalization)
    # Any logit or label outside CVR's space (rows 1 and 3), even inf or nan, changes nothing.
    wild_logits = {"ctr": logits["ctr"], "cvr": logits["cvr"].clone()}
    wild_logits["cvr"][1], wild_logits["cvr"][3] = float("inf"), float("nan")
    wild_labels = labels.clone()
    wild_labels[1, 1], wild_labels[3, 1] = 1.0, float("nan")
    wild = task_losses(wild_logits, wild_labels, mask, TASKS, normalization=normalization)
    assert torch.equal(wild["cvr"], base["cvr"]) and torch.equal(wild["ctr"], base["ctr"])
    # ... and no gradient reaches them.
    z = logits["cvr"].clone().requires_grad_()
    task_losses({"ctr": logits["ctr"], "cvr": z}, labels, mask, TASKS, normalization=normalization)["cvr"].backward()
    assert z.grad[1] == 0 and z.grad[3] == 0 and z.grad[0] != 0


def test_a_task_without_rows_in_the_batch_gives_zero_under_both():
    logits, labels, mask = _batch()
    mask[:, 1] = False
    for normalization in ("sample_space", "impressions"):
        assert task_losses(logits, labels, mask, TASKS, normalization=normalization)["cvr"].item() == 0.0


def test_sample_weights_under_impressions_divide_the_weighted_sum_by_the_batch_rows():
    logits, labels, mask = _batch()
    weights = torch.tensor([[1.0, 2.0], [1.0, 5.0], [1.0, 0.5], [1.0, 9.0]])
    got = task_losses(logits, labels, mask, TASKS, weights, normalization="impressions")["cvr"].item()
    assert got == pytest.approx((2.0 * _bce(1.0, 1) + 0.5 * _bce(-0.5, 0)) / 4, rel=1e-6)
    space = task_losses(logits, labels, mask, TASKS, weights)["cvr"].item()
    assert space == pytest.approx((2.0 * _bce(1.0, 1) + 0.5 * _bce(-0.5, 0)) / 2.5, rel=1e-6)


def test_multitask_loss_and_the_validation_loss_follow_the_normalization():
    logits, labels, mask = _batch()
    total, parts = multitask_loss(logits, labels, mask, TASKS, normalization="impressions")
    assert total.item() == pytest.approx(parts["ctr"].item() + parts["cvr"].item(), rel=1e-6)
    valid = _masked_loss(
        {k: v.numpy() for k, v in logits.items()}, labels.numpy(), mask.numpy(), TASKS, None, "impressions"
    )
    assert valid == pytest.approx(total.item(), rel=1e-6)
    with pytest.raises(ValueError, match="normalization"):
        task_losses(logits, labels, mask, TASKS, normalization="rows")


def test_the_ddp_denominators_are_the_batch_rows_under_impressions():
    from mtrec.batch import Batch

    _, labels, mask = _batch()
    batch = Batch(torch.zeros(4, 1, dtype=torch.int64), torch.zeros(4, 0), (), torch.zeros(4, 0), labels, mask)
    assert _loss_denominators(batch, "impressions").tolist() == [4.0, 4.0]
    assert _loss_denominators(batch, "sample_space").tolist() == [4.0, 2.0]
    assert global_mean_scale(torch.tensor([4.0, 4.0]), SINGLE_PROCESS).tolist() == [1.0, 1.0]


def _impressions_step_equals_single_process(ctx) -> None:
    """Two ranks with 8 and 5 rows (a last, uneven batch): the scaled per-rank impressions
    losses give the gradient of one process's impressions loss on all 13 rows."""
    from mtrec.models import create_model
    from mtrec.training.distributed import sync_sparse_grads, wrap_model
    from tests.unit.training.test_distributed import LAYOUT, TASK_NAMES, TASKS, WORLD, _concat
    from tests.unit.training.test_distributed import _batch as rank_batch

    torch.manual_seed(100)
    model = create_model("mmoe", LAYOUT, TASK_NAMES, embedding_dim=4)
    model.use_sparse_embedding_grads(True)
    ddp = wrap_model(model, ctx, torch.device("cpu"))
    torch.manual_seed(100)
    ref = create_model("mmoe", LAYOUT, TASK_NAMES, embedding_dim=4)
    ref.use_sparse_embedding_grads(True)
    shards = [rank_batch(seed=7 + r, rank=r, n=(8, 5)[r]) for r in range(WORLD)]
    batch = shards[ctx.rank]
    parts = task_losses(ddp(batch), batch.labels, batch.label_mask, TASKS, normalization="impressions")
    scale = global_mean_scale(_loss_denominators(batch, "impressions"), ctx)
    sum(task.weight * scale[j] * parts[task.name] for j, task in enumerate(TASKS)).backward()
    sync_sparse_grads(model.embedding_parameters(), ctx)
    whole = _concat(*shards)
    multitask_loss(ref(whole), whole.labels, whole.label_mask, TASKS, normalization="impressions")[0].backward()
    emb, ref_emb = model.features.embedding.weight.grad, ref.features.embedding.weight.grad
    torch.testing.assert_close(emb.to_dense(), ref_emb.coalesce().to_dense(), rtol=1e-5, atol=1e-7)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        if not p.grad.is_sparse:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow  # 2 fresh processes importing torch: 4-11 s
def test_impressions_under_ddp_equal_one_process_on_the_global_batch():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    from tests.unit.training.test_distributed import _spawn

    _spawn(_impressions_step_equals_single_process)


def _config(**train):
    return config_from_dict(
        {
            "data": {"train": "x.parquet"},
            "features": synthetic_features(),
            "tasks": synthetic_tasks(),
            "train": train,
        }
    )


def test_the_config_key_defaults_to_sample_space_and_is_checked():
    assert _config().train.loss_normalization == "sample_space"
    assert _config(loss_normalization="impressions").train.loss_normalization == "impressions"
    with pytest.raises(ConfigError, match="train.loss_normalization: expected 'sample_space' or 'impressions'"):
        _config(loss_normalization="rows")


# --------------------------------------------------------------------------- ESMM's direct CVR loss


def _esmm(cvr_loss_weight: float = 0.0) -> tuple[Task, ...]:
    esmm = Esmm(ctr="ctr", cvr="cvr") if cvr_loss_weight == 0 else Esmm("ctr", "cvr", cvr_loss_weight=cvr_loss_weight)
    return Schema(sparse=(SparseFeature("u"),), tasks=TASKS, esmm=esmm).output_tasks


def _esmm_batch():
    logits, labels, mask = _batch()
    # ctcvr: the product logit, label click * conv, on every row.
    from mtrec.models.esmm import product_logit

    logits = {**logits, "ctcvr": product_logit(logits["ctr"], logits["cvr"])}
    labels = torch.cat([labels, (labels[:, 0] * labels[:, 1])[:, None]], dim=1)
    mask = torch.cat([mask, torch.ones(4, 1, dtype=torch.bool)], dim=1)
    return logits, labels, mask


def test_cvr_loss_weight_zero_is_todays_esmm_loss_exactly():
    logits, labels, mask = _esmm_batch()
    tasks = _esmm(0.0)
    assert [t.weight for t in tasks] == [1.0, 0.0, 1.0]
    total, parts = multitask_loss(logits, labels, mask, tasks)
    # Today's ESMM objective: CTR + CTCVR, on every impression.
    assert torch.equal(total, torch.zeros(()) + parts["ctr"] + 0.0 * parts["cvr"] + parts["ctcvr"])
    assert total.item() == pytest.approx(parts["ctr"].item() + parts["ctcvr"].item(), rel=1e-7)


@pytest.mark.parametrize("normalization", ["sample_space", "impressions"])
@pytest.mark.parametrize("w", [0.25, 1.0, 3.0])
def test_cvr_loss_weight_adds_exactly_w_times_the_cvr_bce_on_the_clicked_rows(w, normalization):
    logits, labels, mask = _esmm_batch()
    base, _ = multitask_loss(logits, labels, mask, _esmm(0.0), normalization=normalization)
    total, _ = multitask_loss(logits, labels, mask, _esmm(w), normalization=normalization)
    clicked = mask[:, 1]
    bce = F.binary_cross_entropy_with_logits(logits["cvr"][clicked], labels[clicked, 1], reduction="sum")
    denominator = clicked.sum() if normalization == "sample_space" else len(clicked)
    torch.testing.assert_close(total - base, w * bce / denominator, rtol=1e-6, atol=1e-7)
    # The unclicked rows' huge CVR logits (50, -80) stay out of it.
    assert (total - base).item() < 2.0 * w


def test_cvr_loss_weight_is_configurable_and_checked():
    raw = {
        "data": {"train": "x.parquet"},
        "features": synthetic_features(),
        "tasks": synthetic_tasks(),
        "esmm": {"ctr": "ctr", "cvr": "cvr", "cvr_loss_weight": 0.5},
    }
    cfg = config_from_dict(raw)
    assert cfg.esmm.cvr_loss_weight == 0.5
    weights = {t.name: t.weight for t in cfg.schema.output_tasks}
    assert weights["cvr"] == 0.5 and weights["ctcvr"] == 1.0
    assert config_from_dict({**raw, "esmm": {"ctr": "ctr", "cvr": "cvr"}}).esmm.cvr_loss_weight == 0.0
    with pytest.raises(ConfigError, match="esmm.cvr_loss_weight: expected >= 0"):
        config_from_dict({**raw, "esmm": {"ctr": "ctr", "cvr": "cvr", "cvr_loss_weight": -1.0}})
    with pytest.raises(ConfigError, match="esmm.cvr_loss_weight: expected a finite number"):
        config_from_dict({**raw, "esmm": {"ctr": "ctr", "cvr": "cvr", "cvr_loss_weight": float("nan")}})
    # Without the click condition the CVR label on every impression is the CTCVR target: refused.
    tasks = [t if t["name"] != "cvr" else {k: v for k, v in t.items() if k != "where"} for t in synthetic_tasks()]
    with pytest.raises(ConfigError, match="esmm.cvr_loss_weight: the direct CVR loss is on the clicked rows"):
        config_from_dict({**raw, "tasks": tasks})
