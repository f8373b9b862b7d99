"""What model.embedding (shared | per_task | stem) and embedding_dropout promise.

per_task: task t's loss reaches only its own table set. stem: every task reads every set
(the forward value depends on all of them) but task t's loss reaches the shared set and
set t only. embedding_dropout: whole feature vectors, training only, mean-preserving.
"""

import pytest
import torch

from mtrec.config import ConfigError, config_from_dict, config_to_dict
from mtrec.models import create_model
from mtrec.models.base import EmbeddingSpec, FeatureInput, TaskAwareInput
from tests.unit.models.test_models import LAYOUT, TASKS, _batch

BACKBONES = ("mmoe", "cgc", "ple", "shared_bottom", "omoe", "cross_stitch", "aitm")
T = len(TASKS)


def _model(name: str, embedding: str, **extra):
    torch.manual_seed(0)
    return create_model(name, LAYOUT, TASKS, embedding_dim=4, embedding=embedding, **extra).eval()


def _dense(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if grad is None:
        return torch.zeros_like(like)
    return grad.to_dense() if grad.is_sparse else grad


def _table_grads(model, logits, task: str) -> list[torch.Tensor]:
    tables = model.embedding_tables()
    grads = torch.autograd.grad(logits[task].sum(), tables, retain_graph=True, allow_unused=True)
    return [_dense(g, t) for g, t in zip(grads, tables, strict=True)]


def _set_norms(grad: torch.Tensor) -> list[float]:
    rows = grad.shape[0] // T
    return [float(grad[s * rows : (s + 1) * rows].abs().sum()) for s in range(T)]


@pytest.mark.parametrize("name", BACKBONES)
def test_per_task_loss_reaches_only_its_own_table_set(name):
    model = _model(name, "per_task")
    (table,) = model.embedding_tables()
    assert table.shape[0] == T * sum(LAYOUT.table_sizes)
    logits = model(_batch())
    for t, task in enumerate(TASKS):
        (grad,) = _table_grads(model, logits, task)
        norms = _set_norms(grad)
        assert [n > 0 for n in norms] == [s == t for s in range(T)], f"{name} {task}: {norms}"


@pytest.mark.parametrize("name", BACKBONES)
def test_stem_all_forward_task_specific_backward(name):
    model = _model(name, "stem")
    shared, task_sets = model.embedding_tables()
    assert shared.shape[0] == sum(LAYOUT.table_sizes)
    assert task_sets.shape[0] == T * sum(LAYOUT.table_sizes)
    batch = _batch()
    logits = model(batch)
    for t, task in enumerate(TASKS):
        g_shared, g_sets = _table_grads(model, logits, task)
        assert g_shared.abs().sum() > 0, f"{name} {task}: the shared set got no gradient"
        norms = _set_norms(g_sets)
        assert [n > 0 for n in norms] == [s == t for s in range(T)], f"{name} {task}: {norms}"
    # All forward: changing another task's set changes task 0's prediction (it reads it).
    rows = task_sets.shape[0] // T
    with torch.no_grad():
        before = model(batch)[TASKS[0]].clone()
        task_sets[2 * rows : 3 * rows] += 0.5
        after = model(batch)[TASKS[0]]
    assert not torch.allclose(before, after)


def test_stem_gives_every_task_the_same_input_values():
    torch.manual_seed(0)
    inp = TaskAwareInput(LAYOUT, EmbeddingSpec(dim=4, mode="stem", task_dim=3), T)
    x = inp(_batch())
    assert x.shape == (T, 16, inp.out_dim)
    # shared (3 sparse + 2 lists) * 4 + 4 dense, then T sets of 5 * 3 (no dense).
    assert inp.out_dim == 5 * 4 + 4 + T * 5 * 3
    for t in range(1, T):
        assert torch.equal(x[t], x[0])


def test_per_task_with_one_task_and_widths():
    torch.manual_seed(0)
    model = create_model("mmoe", LAYOUT, ("ctr",), embedding_dim=4, embedding="stem", task_embedding_dim=2)
    shared, sets = model.embedding_tables()
    assert shared.shape[1] == 4 and sets.shape[1] == 2
    assert model(_batch(3))["ctr"].shape == (3,)


def test_per_task_matches_running_the_backbone_on_each_task_input():
    model = _model("mmoe", "per_task")
    batch = _batch()
    logits = model(batch)
    x = model.features(batch)  # (T, B, d)
    for t, task in enumerate(TASKS):
        reps = model.backbone(x[t])[:, t]
        torch.testing.assert_close(logits[task], model.towers[t](reps))


@pytest.mark.parametrize("name", ["independent", "shared_embedding", "single_task"])
@pytest.mark.parametrize("mode", ["per_task", "stem"])
def test_models_with_a_fixed_embedding_refuse_other_modes(name, mode):
    with pytest.raises(ValueError, match="use embedding: shared"):
        create_model(name, LAYOUT, TASKS, embedding_dim=4, embedding=mode)


def _raw(**model):
    from mtrec.quickstart import synthetic_features, synthetic_tasks

    return {
        "data": {"train": "x.parquet"},
        "features": synthetic_features(),
        "tasks": synthetic_tasks(),
        "model": {"name": "mmoe", **model},
    }


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"name": "independent", "embedding": "stem"}, "model.embedding: embedding 'stem' needs a model"),
        ({"embedding": "stemm"}, "model.embedding: expected one of shared, per_task, stem, got 'stemm'"),
        ({"task_embedding_dim": 8}, "model.task_embedding_dim: needs embedding per_task or stem"),
        ({"embedding": "stem", "task_embedding_dim": 0}, "model.task_embedding_dim: expected >= 1"),
        ({"embedding_dropout": 1.0}, "model.embedding_dropout"),
        ({"embedding_dropout": "high"}, "model.embedding_dropout"),
    ],
)
def test_config_refuses_bad_embedding_keys(model, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(_raw(**model))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_embedding_keys_round_trip_and_defaults_stay_unwritten():
    cfg = config_from_dict(_raw(embedding="stem", task_embedding_dim=8, embedding_dropout=0.1))
    assert (cfg.model.embedding, cfg.model.task_embedding_dim, cfg.model.embedding_dropout) == ("stem", 8, 0.1)
    out = config_to_dict(cfg)
    assert config_from_dict(out).model == cfg.model
    plain = config_to_dict(config_from_dict(_raw()))
    assert not {"embedding", "task_embedding_dim", "embedding_dropout"} & set(plain["model"])


# --- per-feature embedding dropout ---------------------------------------------------------


def test_embedding_dropout_drops_whole_feature_vectors_in_training_only():
    torch.manual_seed(0)
    p = 0.3
    plain = FeatureInput(LAYOUT, 8)
    dropped = FeatureInput(LAYOUT, 8, dropout=p)
    dropped.load_state_dict(plain.state_dict())
    batch = _batch(4000)
    dropped.eval()
    assert torch.equal(dropped(batch), plain(batch))  # evaluation: identity
    dropped.train()
    with torch.no_grad():
        ref, out = plain(batch), dropped(batch)
    K = 5  # 3 sparse features + 2 pooled lists, 8 wide each, then 4 dense
    vec_ref, vec_out = ref[:, : K * 8].view(-1, K, 8), out[:, : K * 8].view(-1, K, 8)
    zero = (vec_out == 0).all(-1)
    nonzero_ref = (vec_ref != 0).all(-1)
    # a feature is dropped whole (all 8 values) or kept whole, scaled by 1 / (1 - p)
    kept = ~zero & nonzero_ref
    torch.testing.assert_close(vec_out[kept], vec_ref[kept] / (1 - p))
    assert ((vec_out != 0) == (vec_out != 0).all(-1, keepdim=True)).all()
    rate = float(zero[nonzero_ref].float().mean())
    assert abs(rate - p) < 0.02, rate
    # dense features are never dropped
    assert torch.equal(out[:, K * 8 :], ref[:, K * 8 :])
    # each row draws its own mask
    assert len({tuple(r.tolist()) for r in zero[:50]}) > 5


def test_embedding_dropout_reaches_the_model_and_turns_off_in_eval():
    torch.manual_seed(0)
    model = create_model("mmoe", LAYOUT, TASKS, embedding_dim=4, embedding_dropout=0.5)
    batch = _batch()
    model.train()
    a, b = model(batch)["ctr"], model(batch)["ctr"]
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(batch)["ctr"], model(batch)["ctr"])


# --- stem_net: STEM-Net's own experts and all-forward task-specific-backward gates ---------


@pytest.mark.parametrize("shared", [0, 2])
def test_stem_net_task_loss_trains_only_its_own_tables_and_experts(shared):
    model = _model("stem_net", "shared", num_shared_experts=shared, num_task_experts=2)
    layer = model.backbone
    assert len(model.embedding_tables()) == (2 if shared else 1)  # per-task sets are the last table
    logits = model(_batch())
    for t, name in enumerate(TASKS):
        task_table = _table_grads(model, logits, name)[-1]
        assert [n > 0 for n in _set_norms(task_table)] == [s == t for s in range(T)]
        w = layer.task_experts.weights[0]
        (g,) = torch.autograd.grad(logits[name].sum(), [w], retain_graph=True)
        per_expert = g.abs().sum(dim=(1, 2))
        assert [bool(x > 0) for x in per_expert] == [e // 2 == t for e in range(2 * T)]
        if shared:
            shared_table = _table_grads(model, logits, name)[0]
            assert shared_table.abs().sum() > 0
            (sg,) = torch.autograd.grad(logits[name].sum(), [layer.shared_experts.weights[0]], retain_graph=True)
            assert (sg.abs().sum(dim=(1, 2)) > 0).all()


def test_stem_net_every_task_reads_every_expert_forward():
    model = _model("stem_net", "shared", num_shared_experts=1, num_task_experts=1)
    batch = _batch()
    before = model(batch)
    with torch.no_grad():  # change only task 2's expert: every task's output moves
        model.backbone.task_experts.weights[-1][2].mul_(3.0)
    after = model(batch)
    for name in TASKS:
        assert not torch.allclose(before[name], after[name])


def test_stem_net_refuses_other_embedding_modes_and_no_task_expert():
    with pytest.raises(ValueError, match="stem_net"):
        create_model("stem_net", LAYOUT, TASKS, embedding="stem")
    with pytest.raises(ValueError, match="num_task_experts >= 1"):
        create_model("stem_net", LAYOUT, TASKS, num_task_experts=0)
