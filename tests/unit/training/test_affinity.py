"""The task-affinity report: its matrices against hand computations, and that measuring changes nothing."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtrec.batch import Batch
from mtrec.models import create_model, list_models
from mtrec.schema import Task
from mtrec.tables import format_affinity
from mtrec.training.affinity import TaskAffinity, affinity_summary, shared_set
from mtrec.training.losses import task_losses
from tests.unit.models.test_models import LAYOUT

torch.set_num_threads(1)

NAMES = ("ctr", "cvr", "sat")
TASKS = tuple(Task(n, label=n) for n in NAMES)


def _batch(n: int = 32, seed: int = 0, tasks: int = 3) -> Batch:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, s, (n,), generator=g) for s in (50, 30, 7)], dim=1)
    seqs = (torch.randint(0, 30, (n, 5), generator=g), torch.randint(0, 20, (n, 3), generator=g))
    lengths = torch.stack([torch.randint(0, 6, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)], dim=1)
    labels = torch.randint(0, 2, (n, tasks), generator=g).float()
    return Batch(sparse, torch.randn(n, 4, generator=g), seqs, lengths, labels, torch.ones(n, tasks, dtype=torch.bool))


def _model(name: str = "shared_bottom", tasks: tuple[str, ...] = NAMES, **params):
    torch.manual_seed(0)
    defaults = {
        "shared_bottom": {"bottom_hidden": (8,)},
        "shared_embedding": {"hidden": (8,)},
        "independent": {"hidden": (8,)},
    }
    model = create_model(
        name, LAYOUT, tasks, embedding_dim=4, tower_hidden=(4,), **{**defaults.get(name, {}), **params}
    )
    return model.train()


def _hand_grads(model, batch, tasks, params):
    parts = task_losses(model(batch), batch.labels, batch.label_mask, tasks, batch.sample_weight)
    grads = []
    for t in tasks:
        g = torch.autograd.grad(parts[t.name], params, retain_graph=True, allow_unused=True)
        dense = [torch.zeros_like(p) if x is None else x.to_dense() for p, x in zip(params, g, strict=True)]
        grads.append(torch.cat([x.reshape(-1) for x in dense]))
    return grads


def test_gradient_cosine_is_the_cosine_of_the_flattened_shared_gradients():
    model, batch = _model(), _batch()
    cos, _ = TaskAffinity(model, TASKS, every=1, lr=1e-3).matrices(batch)
    grads = _hand_grads(model, batch, TASKS, list(model.shared_parameters()))
    hand = np.array([[float(F.cosine_similarity(a, b, dim=0)) for b in grads] for a in grads])
    assert np.allclose(cos, hand, atol=1e-5)
    assert np.allclose(cos, cos.T) and np.allclose(np.diag(cos), 1.0)
    assert (np.abs(cos - np.eye(3)) > 1e-3).any()  # not a trivial identity


def _hand_lookahead(model, batch, tasks, lr, shared_of):
    """Z[i, j] = 1 - L_j(theta_s - lr g_i) / L_j(theta_s), all in float64 on a copy of the model."""
    m64 = copy.deepcopy(model).double()
    for m in m64.modules():
        if hasattr(m, "sparse"):
            m.sparse = False
    b = dataclasses.replace(batch, dense=batch.dense.double(), labels=batch.labels.double())
    params = shared_of(m64)
    parts = task_losses(m64(b), b.labels, b.label_mask, tasks)
    base = [float(parts[t.name].detach()) for t in tasks]
    grads = [torch.autograd.grad(parts[t.name], params, retain_graph=True) for t in tasks]
    z = np.zeros((len(tasks), len(tasks)))
    for i in range(len(tasks)):
        stepped = copy.deepcopy(m64)
        with torch.no_grad():
            for p, g in zip(shared_of(stepped), grads[i], strict=True):
                p -= lr * g
            after = task_losses(stepped(b), b.labels, b.label_mask, tasks)
        z[i] = [1 - float(after[t.name]) / base[j] for j, t in enumerate(tasks)]
    return z


def test_lookahead_affinity_is_one_sgd_step_on_a_task_seen_by_the_others():
    tasks = TASKS[:2]
    model, batch = _model(tasks=NAMES[:2]), _batch(tasks=2)
    _, look = TaskAffinity(model, tasks, every=1, lr=0.05).matrices(batch)
    hand = _hand_lookahead(model, batch, tasks, 0.05, lambda m: list(m.shared_parameters()))
    assert np.allclose(look, hand, rtol=1e-7, atol=1e-12)
    assert (np.diag(look) > 0).all()  # a step on a task's own gradient lowers its loss
    assert look[0, 1] != pytest.approx(look[1, 0])  # not symmetric


def test_shared_embedding_is_measured_on_its_shared_input_layer():
    model, batch = _model("shared_embedding"), _batch()
    assert list(model.shared_parameters()) == []
    affinity = TaskAffinity(model, TASKS, every=1, lr=1e-3, embedding_lr=0.05)
    assert affinity.shared.kind == "input" and affinity.shared.tables
    cos, look = affinity.matrices(batch)
    table = [model.features.embedding.weight]
    grads = _hand_grads(model, batch, TASKS, table)
    hand = np.array([[float(F.cosine_similarity(a, b, dim=0)) for b in grads] for a in grads])
    assert np.allclose(cos, hand, atol=1e-5)
    hand_look = _hand_lookahead(model, batch, TASKS, 0.05, lambda m: [m.features.embedding.weight])
    assert np.allclose(look, hand_look, rtol=1e-7, atol=1e-12)


def test_independent_shares_nothing_and_measures_nothing():
    model = _model("independent")
    affinity = TaskAffinity(model, TASKS, every=1, lr=1e-3)
    assert shared_set(model).kind == "none" and not affinity.due(1)
    cos, look = affinity.matrices(_batch())
    assert np.isnan(cos).all() and np.isnan(look).all()
    doc = affinity_summary([], affinity)
    assert doc["shared"] == "none" and doc["measurements"] == 0
    assert "shares no parameters" in format_affinity(doc)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("name", "embedding"), [(n, "shared") for n in sorted(list_models())] + [("mmoe", "per_task"), ("ple", "stem")]
)
def test_measuring_leaves_every_model_bit_identical(name, embedding):
    params = {"dropout": 0.3} if name in ("shared_bottom", "mmoe", "ple", "shared_embedding") else {}
    if name == "mmoe":
        params["expert_norm"] = True  # batch-norm statistics are buffers a training forward updates
    model = _model(name, embedding=embedding, embedding_dropout=0.2, **params)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before, rng = _snapshot(model), torch.get_rng_state()
    affinity = TaskAffinity(model, TASKS, every=1, lr=0.1, embedding_lr=0.1)
    cos, look = affinity.matrices(_batch())
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before), name
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    if affinity.shared.kind != "none":
        assert np.isfinite(cos).all() and np.isfinite(look).all(), name


def test_a_task_without_rows_is_undefined_and_left_out_of_the_averages():
    model = _model()
    affinity = TaskAffinity(model, TASKS, every=2, lr=1e-3)
    full, empty = _batch(seed=1), _batch(seed=2)
    empty.label_mask[:, 1] = False  # no cvr row
    cos, look = affinity.matrices(empty)
    assert np.isnan(cos[1]).all() and np.isnan(cos[:, 1]).all() and np.isnan(look[1]).all()
    keep = [0, 2]
    assert np.isfinite(cos[np.ix_(keep, keep)]).all() and np.isfinite(look[np.ix_(keep, keep)]).all()
    first, _ = affinity.matrices(full)
    affinity.measure(full)
    affinity.measure(empty)
    record = affinity.epoch_record()
    assert record["measurements"] == 2
    assert record["counts"]["gradient_cosine"][0] == [2, 1, 2] and record["counts"]["gradient_cosine"][1][1] == 1
    assert record["gradient_cosine"][0][1] == pytest.approx(first[0, 1])  # the one defined value
    assert record["gradient_cosine"][0][2] == pytest.approx((first[0, 2] + cos[0, 2]) / 2)
    assert affinity.epoch_record()["measurements"] == 0  # a new epoch starts empty
    # The run's average weighs each epoch's means by their counts.
    history = [{"epoch": 1, "affinity": record}, {"epoch": 2, "affinity": {**record, "measurements": 0}}]
    doc = affinity_summary(history, affinity)
    assert doc["gradient_cosine"][0][1] == pytest.approx(first[0, 1]) and len(doc["per_epoch"]) == 2
    assert "gradient cosine" in format_affinity(doc) and "lookahead affinity" in format_affinity(doc)
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc  # plain JSON: null, never NaN


def test_training_with_affinity_gives_the_same_weights_and_writes_affinity_json(tmp_path: Path):
    from safetensors.torch import load_file

    from mtrec.config import config_from_dict
    from mtrec.data.synthetic import write_click_log
    from mtrec.quickstart import synthetic_features, synthetic_tasks
    from mtrec.training import train

    data = tmp_path / "clicks.parquet"
    write_click_log(data, 3000, seed=5)
    raw = {
        "data": {"train": str(data)},
        "features": synthetic_features(),
        "tasks": synthetic_tasks(),
        "model": {"name": "mmoe", "embedding_dim": 4, "expert_hidden": [8], "tower_hidden": [4], "dropout": 0.2},
        "train": {"epochs": 2, "batch_size": 256, "seed": 3, "threads": 1, "device": "cpu", "patience": 5},
    }
    plain = train(config_from_dict(raw), output=tmp_path / "off", progress=False)
    raw["train"]["affinity_every"] = 4
    log = io.StringIO()
    measured = train(config_from_dict(raw), output=tmp_path / "on", stream=log)
    off, on = load_file(str(plain.output / "model.safetensors")), load_file(str(measured.output / "model.safetensors"))
    assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)
    assert [h["train_loss"] for h in plain.history] == [h["train_loss"] for h in measured.history]
    assert not (plain.output / "affinity.json").exists()
    doc = json.loads((measured.output / "affinity.json").read_text())
    rows = json.loads((measured.output / "meta.json").read_text())["train_rows"]
    updates = 2 * -(-rows // 256)  # two epochs
    assert doc["every"] == 4 and doc["measurements"] == updates // 4 > 0
    assert doc["tasks"] == [t["name"] for t in synthetic_tasks()] and doc["shared"] == "dense"
    for key in ("gradient_cosine", "lookahead_affinity"):
        assert len(doc[key]) == 3 and all(len(row) == 3 for row in doc[key])
    assert [e["epoch"] for e in doc["per_epoch"]] == [1, 2]
    assert "task affinity over" in log.getvalue() and "gradient cosine" in log.getvalue()
    epochs = [json.loads(line) for line in (measured.output / "log.jsonl").read_text().splitlines()]
    assert all("affinity" in r for r in epochs if r["event"] == "epoch")


def test_a_resumed_run_measures_what_the_uninterrupted_run_measured(tmp_path: Path):
    from mtrec.config import config_from_dict
    from mtrec.data.synthetic import write_click_log
    from mtrec.quickstart import synthetic_features, synthetic_tasks
    from mtrec.training import train

    data = tmp_path / "clicks.parquet"
    write_click_log(data, 3000, seed=2)
    config = config_from_dict(
        {
            "data": {"train": str(data)},
            "features": synthetic_features(),
            "tasks": synthetic_tasks(),
            "model": {"name": "mmoe", "embedding_dim": 4, "expert_hidden": [8], "tower_hidden": [4], "dropout": 0.2},
            "train": {"epochs": 3, "batch_size": 256, "seed": 4, "threads": 1, "device": "cpu", "patience": 5},
        },
        overrides=["train.affinity_every=5"],
    )
    train(config, output=tmp_path / "whole", progress=False)

    def interrupt(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, output=tmp_path / "cut", progress=False, on_epoch=interrupt)
    train(config, output=tmp_path / "cut", progress=False, resume=True)
    whole, cut = (json.loads((tmp_path / d / "affinity.json").read_text()) for d in ("whole", "cut"))
    for doc in (whole, cut):
        doc.pop("seconds_per_measurement")
        for epoch in doc["per_epoch"]:
            epoch.pop("seconds")
    assert cut == whole and whole["measurements"] > 0
