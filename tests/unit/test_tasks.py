"""Task types (binary, regression with Huber/log1p, multiclass), sample weights and ESMM."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mtrec.batch import Batch
from mtrec.config import config_from_dict
from mtrec.data.preprocess import Preprocessor
from mtrec.errors import ConfigError, DataError
from mtrec.models import create_model
from mtrec.models.esmm import EsmmModel, product_logit
from mtrec.schema import Esmm, InputLayout, Schema, SparseFeature, Task
from mtrec.tasks import compute_metrics
from mtrec.training.losses import multitask_loss


def test_product_logit_is_logit_of_product_and_stays_finite():
    a = torch.linspace(-8, 8, 33)
    b = torch.linspace(6, -6, 33)
    p = torch.sigmoid(a.double()) * torch.sigmoid(b.double())
    torch.testing.assert_close(product_logit(a, b).double(), torch.log(p / (1 - p)), atol=1e-4, rtol=1e-4)
    extreme = product_logit(torch.tensor([60.0, -60.0, 60.0]), torch.tensor([60.0, -60.0, -60.0]))
    assert torch.isfinite(extreme).all()
    assert extreme[0] > 10 and extreme[1] < -100 and extreme[2] < -50


def _esmm_schema() -> Schema:
    return Schema(
        sparse=(SparseFeature("u"),),
        tasks=(Task("ctr", label="click"), Task("cvr", label="conv", where="click == 1")),
        esmm=Esmm(ctr="ctr", cvr="cvr"),
    )


def test_esmm_adds_ctcvr_task_and_silences_the_cvr_loss():
    tasks = _esmm_schema().output_tasks
    assert [t.name for t in tasks] == ["ctr", "cvr", "ctcvr"]
    assert [t.weight for t in tasks] == [1.0, 0.0, 1.0]


def test_esmm_ctcvr_label_is_click_times_conversion_on_every_row():
    schema = _esmm_schema()
    table = pa.table({"u": [1, 2, 3, 4], "click": [1, 1, 0, 0], "conv": [1, 0, None, None]})
    enc = Preprocessor.fit(schema, table).transform(table)
    assert enc.labels[:, 2].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert enc.label_mask[:, 2].all()
    assert enc.label_mask[:, 1].tolist() == [True, True, False, False]


def test_esmm_cvr_tower_learns_only_through_the_product():
    layout = InputLayout((10,), (0,), (), (), (), 2)
    torch.manual_seed(0)
    inner = create_model("shared_bottom", layout, ("ctr", "cvr"), embedding_dim=4, bottom_hidden=(8,))
    model = EsmmModel(inner, ctr="ctr", cvr="cvr")
    n = 32
    batch = Batch(
        torch.randint(0, 10, (n, 1)),
        torch.randn(n, 2),
        (),
        torch.zeros(n, 0, dtype=torch.int64),
        torch.zeros(n, 3),
        torch.ones(n, 3, dtype=torch.bool),
    )
    logits = model(batch)
    assert set(logits) == {"ctr", "cvr", "ctcvr"}
    torch.testing.assert_close(
        torch.sigmoid(logits["ctcvr"]),
        torch.sigmoid(logits["ctr"]) * torch.sigmoid(logits["cvr"]),
        atol=1e-6,
        rtol=1e-5,
    )
    tasks = _esmm_schema().output_tasks
    total, _ = multitask_loss(logits, batch.labels, batch.label_mask, tasks)
    total.backward()
    cvr_tower = inner.towers[1].out.weight
    assert cvr_tower.grad is not None and cvr_tower.grad.abs().sum() > 0  # through ctcvr
    # Without the ctcvr term the CVR tower gets nothing (its own weight is 0).
    inner.zero_grad()
    logits = model(batch)
    only = tuple(t for t in tasks if t.name != "ctcvr")
    multitask_loss(logits, batch.labels, batch.label_mask, only)[0].backward()
    assert cvr_tower.grad is None or cvr_tower.grad.abs().sum() == 0


@pytest.mark.parametrize(
    "esmm, needle",
    [
        ({"ctr": "click", "cvr": "cvr"}, "esmm.ctr"),
        ({"ctr": "ctr", "cvr": "dwell"}, "must be binary"),
        ({"ctr": "cvr", "cvr": "ctr"}, "every impression"),
        ({"ctr": "ctr", "cvr": "cvr", "name": "ctr"}, "esmm.name"),
    ],
)
def test_bad_esmm_config(esmm, needle):
    raw = {
        "data": {"train": "x"},
        "features": {"sparse": [{"name": "u"}]},
        "tasks": [
            {"name": "ctr", "label": "click"},
            {"name": "cvr", "label": "conv", "where": "click == 1"},
            {"name": "dwell", "label": "d", "type": "regression"},
        ],
        "esmm": esmm,
    }
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(raw)


def _fit(tasks, **cols):
    schema = Schema(sparse=(SparseFeature("u"),), tasks=tasks)
    table = pa.table({"u": list(range(len(next(iter(cols.values()))))), **cols})
    pre = Preprocessor.fit(schema, table)
    return pre.transform(table, source="t.parquet")


def test_multiclass_labels_and_metrics():
    tasks = (Task("cls", label="y", type="multiclass", num_classes=3),)
    enc = _fit(tasks, y=[0, 2, 1, 2])
    assert enc.labels[:, 0].tolist() == [0, 2, 1, 2]
    with pytest.raises(DataError, match=r"'y' \(task cls\).*\[0, 3\)"):
        _fit(tasks, y=[0, 3, 1, 2])
    with pytest.raises(DataError, match="task cls"):
        _fit(tasks, y=[0.0, 1.5, 1.0, 2.0])
    z = np.array([[3.0, 0, 0], [0, 0, 3.0], [0, 3.0, 0], [3.0, 0, 0]], dtype=np.float32)
    m = compute_metrics({"cls": z}, enc.labels, enc.label_mask, tasks)["cls"]
    assert m["accuracy"] == pytest.approx(0.75)
    logits = torch.from_numpy(z)
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2, 1, 2])).item()
    assert m["logloss"] == pytest.approx(expected, rel=1e-6)
    loss, parts = multitask_loss({"cls": logits}, torch.from_numpy(enc.labels), torch.from_numpy(enc.label_mask), tasks)
    assert parts["cls"].item() == pytest.approx(expected, rel=1e-6)


def test_multiclass_needs_num_classes():
    with pytest.raises(ConfigError, match="num_classes"):
        config_from_dict(
            {
                "features": {"sparse": [{"name": "u"}]},
                "tasks": [{"name": "c", "label": "y", "type": "multiclass"}],
            }
        )


def test_regression_log1p_and_huber():
    tasks = (Task("dwell", label="d", type="regression", loss="huber", huber_delta=0.5, label_transform="log1p"),)
    enc = _fit(tasks, d=[0.0, 9.0, 99.0])
    np.testing.assert_allclose(enc.labels[:, 0], np.log1p([0.0, 9.0, 99.0]), rtol=1e-6)
    with pytest.raises(DataError, match=r">= 0"):
        _fit(tasks, d=[0.0, -2.0, 1.0])
    with pytest.raises(DataError, match="null/NaN/inf"):
        _fit(tasks, d=[0.0, None, 1.0])
    # metrics on the original scale
    z = np.log1p(np.array([1.0, 9.0, 99.0], dtype=np.float32))
    m = compute_metrics({"dwell": z}, enc.labels, enc.label_mask, tasks)["dwell"]
    assert m["mae"] == pytest.approx(1.0 / 3, rel=1e-4)
    pred = torch.tensor([0.0, 0.0, 0.0])
    _, parts = multitask_loss({"dwell": pred}, torch.from_numpy(enc.labels), torch.from_numpy(enc.label_mask), tasks)
    expected = torch.nn.functional.huber_loss(pred, torch.from_numpy(enc.labels[:, 0]), delta=0.5).item()
    assert parts["dwell"].item() == pytest.approx(expected, rel=1e-6)


def test_sample_weights_in_loss_and_metrics():
    tasks = (Task("ctr", label="y", sample_weight="w"),)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    w = rng.uniform(0, 3, 200)
    enc = _fit(tasks, y=y, w=w)
    assert enc.sample_weight is not None
    z = rng.normal(size=200).astype(np.float32)
    m = compute_metrics({"ctr": z}, enc.labels, enc.label_mask, tasks, enc.sample_weight)["ctr"]
    assert m["auc"] == pytest.approx(roc_auc_score(y, z, sample_weight=w), abs=1e-6)
    _, parts = multitask_loss(
        {"ctr": torch.from_numpy(z)},
        torch.from_numpy(enc.labels),
        torch.from_numpy(enc.label_mask),
        tasks,
        torch.from_numpy(enc.sample_weight),
    )
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(z).double(), torch.from_numpy(y).double(), reduction="none"
    )
    expected = (bce * torch.from_numpy(w)).sum() / w.sum()
    assert parts["ctr"].item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(DataError, match="sample_weight column 'w'"):
        _fit(tasks, y=[0, 1], w=[1.0, -1.0])
