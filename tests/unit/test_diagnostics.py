"""Gate utilisation and collapse diagnostics."""

import numpy as np
import torch

from mtrec.data.batches import TensorColumns
from mtrec.data.preprocess import EncodedColumns
from mtrec.diagnostics import format_gates, gate_diagnostics
from mtrec.models import create_model
from mtrec.schema import InputLayout

LAYOUT = InputLayout((20, 7), (0, 1), (), (), (), 3)


def _columns(n: int = 300) -> TensorColumns:
    rng = np.random.default_rng(0)
    enc = EncodedColumns(
        np.stack([rng.integers(0, 20, n), rng.integers(0, 7, n)], 1).astype(np.int64),
        rng.normal(size=(n, 3)).astype(np.float32),
        [],
        np.zeros((n, 0), np.int64),
        np.zeros((n, 2), np.float32),
        np.ones((n, 2), bool),
    )
    return TensorColumns.from_encoded(enc)


def test_mmoe_gate_weights_sum_to_one_and_entropy_is_bounded():
    torch.manual_seed(0)
    model = create_model("mmoe", LAYOUT, ("ctr", "cvr"), embedding_dim=4, num_experts=3, expert_hidden=(8,))
    report = gate_diagnostics(model, _columns(), batch_size=128)
    assert report is not None and report["rows"] == 300
    for task in ("ctr", "cvr"):
        weights = report["tasks"][task]["mean_weight"]
        assert len(weights) == 3
        assert abs(sum(weights.values()) - 1.0) < 1e-5
        assert 0.0 <= report["tasks"][task]["entropy"] <= report["tasks"][task]["max_entropy"] + 1e-6
    assert report["warnings"] == []  # freshly initialised gates are spread out
    assert "gate utilisation" in format_gates(report)


def test_dominant_gate_and_collapsed_experts_are_flagged():
    torch.manual_seed(0)
    model = create_model("mmoe", LAYOUT, ("ctr", "cvr"), embedding_dim=4, num_experts=3, expert_hidden=(8,))
    backbone = model.backbone
    with torch.no_grad():
        bias = backbone.gates.linear.bias.view(2, 3)
        bias[0] = torch.tensor([20.0, 0.0, 0.0])  # ctr: all weight on expert 0
        for w, b in zip(backbone.experts.weights, backbone.experts.biases, strict=True):
            w.copy_(w[:1].expand_as(w))  # every expert identical
            b.copy_(b[:1].expand_as(b))
    report = gate_diagnostics(model, _columns())
    assert report["tasks"]["ctr"]["mean_weight"]["expert 0"] > 0.99
    assert any("task ctr" in w for w in report["warnings"])
    assert not any("task cvr" in w for w in report["warnings"])
    assert report["expert_similarity"] > 0.999
    assert any("collapse" in w for w in report["warnings"])


def test_ple_reports_each_task_over_its_own_and_shared_experts():
    torch.manual_seed(0)
    model = create_model("ple", LAYOUT, ("ctr", "cvr"), embedding_dim=4, expert_hidden=(8,), num_levels=2)
    report = gate_diagnostics(model, _columns())
    assert set(report["tasks"]["ctr"]["mean_weight"]) == {"ctr 0", "shared 0", "shared 1"}
    assert set(report["tasks"]["cvr"]["mean_weight"]) == {"cvr 0", "shared 0", "shared 1"}


def test_models_without_gates_have_no_report():
    model = create_model("shared_bottom", LAYOUT, ("ctr", "cvr"), embedding_dim=4)
    assert gate_diagnostics(model, _columns()) is None


def test_stem_gates_are_the_forward_gates_and_per_task_has_no_report():
    torch.manual_seed(0)
    kw = {"embedding_dim": 4, "num_experts": 3, "expert_hidden": (8,)}
    stem = create_model("mmoe", LAYOUT, ("ctr", "cvr"), embedding="stem", **kw).eval()
    columns = _columns()
    report = gate_diagnostics(stem, columns, batch_size=1000)
    assert report is not None
    # every task's input has the same values under stem, so the gates on input 0 are each task's own
    batch = next(iter(columns.iter_batches(1000)))
    x = stem.features(batch)
    for t, task in enumerate(("ctr", "cvr")):
        gates = stem.backbone.gates(x[t])[:, t].mean(0)
        assert np.allclose(list(report["tasks"][task]["mean_weight"].values()), gates.tolist(), atol=1e-5)
    per_task = create_model("mmoe", LAYOUT, ("ctr", "cvr"), embedding="per_task", **kw)
    assert gate_diagnostics(per_task, columns) is None
