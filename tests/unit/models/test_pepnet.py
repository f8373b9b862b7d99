"""The pepnet model (Chang et al., KDD 2023): which sparse columns feed which gates, the stop-gradient
on the embedding, per-task gates, the refusals, and a trained model directory read back."""

import dataclasses
import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch

import mtrec
from mtrec.config import config_from_dict
from mtrec.data.synthetic import write_click_log
from mtrec.inference.export import _reference_logits
from mtrec.models import create_model
from mtrec.models.pepnet import feature_columns
from mtrec.quickstart import synthetic_features, synthetic_tasks
from tests.unit.models.test_models import LAYOUT, TASKS, _batch

NAMED = dataclasses.replace(LAYOUT, sparse_names=("user", "item", "cat"))


def _model(layout=NAMED, **params):
    torch.manual_seed(0)
    return create_model("pepnet", layout, TASKS, embedding_dim=4, **params)


def _gate_inputs(model, batch):
    """The (domain, prior) vectors the backbone got, and E and O_ep (retaining their gradients)."""
    seen = {}

    def backbone_hook(module, args):
        seen["domain"], seen["prior"] = args[1], args[2]

    def epnet_hook(module, args, out):
        seen["e"], seen["o_ep"] = args[0], out
        args[0].retain_grad()
        out.retain_grad()

    handles = [
        model.backbone.register_forward_pre_hook(backbone_hook),
        model.backbone.epnet.register_forward_hook(epnet_hook),
    ]
    logits = model(batch)
    for h in handles:
        h.remove()
    return logits, seen


def test_named_features_resolve_to_their_sparse_columns_and_rows():
    model = _model(prior_features=("item", "user"), domain_features=("cat",))
    assert model.prior_columns.tolist() == [1, 0] and model.domain_columns.tolist() == [2]
    batch = _batch(8)
    _, seen = _gate_inputs(model, batch)
    table = model.features.embedding
    rows = batch.sparse + table.column_offsets[:3]  # the rows E reads for the three sparse columns
    torch.testing.assert_close(seen["prior"], torch.cat([table.weight[rows[:, 1]], table.weight[rows[:, 0]]], 1))
    torch.testing.assert_close(seen["domain"], table.weight[rows[:, 2]])
    # defaults: every sparse column is a prior, and the domain features are the priors
    plain = _model(LAYOUT)
    assert plain.prior_columns.tolist() == [0, 1, 2] and plain.domain_columns.tolist() == [0, 1, 2]
    assert _model(prior_features=("cat",)).domain_columns.tolist() == [2]


def test_each_tasks_tower_output_follows_a_prior_id():
    model = _model(prior_features=("item",), domain_features=("cat",)).eval()
    batch = _batch(8)
    other = dataclasses.replace(batch, sparse=batch.sparse.clone())
    other.sparse[0, 1] = (other.sparse[0, 1] + 1) % LAYOUT.table_sizes[1]
    with torch.no_grad():
        a, b = model.representations(batch), model.representations(other)
    for t in range(len(TASKS)):
        assert not torch.allclose(a[0, t], b[0, t]), t
        torch.testing.assert_close(a[1:, t], b[1:, t])


def test_a_tasks_loss_trains_only_its_own_ppnet_gates():
    model = _model(prior_features=("item", "user"))
    ppnet = model.backbone.ppnet
    model(_batch())["ctr"].sum().backward()
    for gate in ppnet.gates:
        for p in (*gate.weights, *gate.biases):
            assert p.grad[0].abs().sum() > 0 and p.grad[1:].abs().sum() == 0
    assert all(p.grad[1:].abs().sum() == 0 for p in (*ppnet.weights, *ppnet.biases))
    assert all(p.grad.abs().sum() > 0 for p in model.backbone.epnet.parameters())  # EPNet is shared
    assert model.shared_parameters() == list(model.backbone.epnet.parameters())


def test_the_embedding_gets_no_gradient_through_the_gates_inputs():
    """dL/dE is EPNet's scale times dL/dO_ep: nothing flows back into E through a gate's input."""
    model = _model(prior_features=("item",), domain_features=("cat",))
    logits, seen = _gate_inputs(model, _batch())
    sum(v.sum() for v in logits.values()).backward()
    e, o_ep = seen["e"], seen["o_ep"]
    delta = model.backbone.epnet.gate(torch.cat([seen["domain"], e], dim=1)).squeeze(1).detach()
    torch.testing.assert_close(e.grad, delta * o_ep.grad)


def test_bad_feature_names_and_embedding_modes_are_refused():
    with pytest.raises(ValueError, match=r"prior_features: 'city' is not a sparse feature .*\['user', 'item', 'cat'\]"):
        _model(prior_features=("city",))
    with pytest.raises(ValueError, match="domain_features: 'user' is listed twice"):
        _model(domain_features=("user", "user"))
    with pytest.raises(ValueError, match="carries no sparse feature names"):
        _model(LAYOUT, prior_features=("user",))
    with pytest.raises(ValueError, match="use embedding: shared"):
        create_model("pepnet", NAMED, TASKS, embedding="per_task")
    assert feature_columns(("b",), ("a", "b")) == (1,)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("pepnet")
    data = work / "clicks.parquet"
    write_click_log(data, 3000, seed=2)
    cfg = config_from_dict(
        {
            "data": {"train": str(data)},
            "features": synthetic_features(num_sparse=8, num_dense=4),
            "tasks": synthetic_tasks(),
            "model": {
                "name": "pepnet",
                "embedding_dim": 4,
                "prior_features": ["item_id", "user_id"],
                "domain_features": ["device"],
                "tower_hidden": [8],
                "gate_hidden": 8,
            },
            "train": {"epochs": 1, "batch_size": 512},
        }
    )
    mtrec.train(cfg, output=work / "model", progress=False)
    return work / "model", pq.read_table(data).slice(0, 500)


def test_a_trained_model_dir_reads_back_and_scores_the_same(trained, tmp_path):
    directory, table = trained
    loaded = mtrec.load_model_dir(directory)
    names = [f.name for f in loaded.config.schema.sparse]
    assert loaded.model.prior_columns.tolist() == [names.index("item_id"), names.index("user_id")]
    assert loaded.model.domain_columns.tolist() == [names.index("device")]
    assert json.loads((directory / "meta.json").read_text())["layout"]["sparse_names"] == names
    first = _reference_logits(directory, table)
    torch.manual_seed(123)
    again = _reference_logits(directory, table)
    # a directory written before the layout named its sparse columns loads as it did
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["layout"]["sparse_names"]
    (old / "meta.json").write_text(json.dumps(meta))
    older = _reference_logits(old, table)
    for task in first:
        assert (first[task] == again[task]).all() and (first[task] == older[task]).all()
