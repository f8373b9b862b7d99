"""What each added architecture promises: who depends on whom, routing, the AITM calibrator."""

import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from mtrec.models import create_model, list_models
from mtrec.nn.aitm import AdaptiveInformationTransfer, AITMLayer, expectation_calibration
from mtrec.nn.cross_stitch import CrossStitch, CrossStitchNetwork
from mtrec.nn.experts import PLE, Gate
from tests.unit.models.test_models import LAYOUT, TASKS, _batch

NEW = ("shared_embedding", "independent", "omoe", "cgc", "cross_stitch", "aitm")


def _grad(out: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(out.sum(), params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _model(name: str, **params):
    torch.manual_seed(0)
    return create_model(name, LAYOUT, TASKS, embedding_dim=4, **params)


def test_every_new_model_is_listed_with_a_description():
    models = list_models()
    for name in NEW:
        assert name in models
        assert models[name].strip()


@pytest.mark.parametrize("name", ["shared_embedding", "independent", "omoe", "cgc", "cross_stitch"])
def test_multiclass_output_dims(name):
    model = _model(name, output_dims=(1, 5, 1))
    logits = model(_batch(8))
    assert logits["ctr"].shape == (8,)
    assert logits["cvr"].shape == (8, 5)
    assert logits["sat"].shape == (8,)


@pytest.mark.parametrize("name", NEW)
def test_last_shared_layer_gets_gradient_from_every_task(name):
    model = _model(name)
    params = [getattr(p, "param", p) for p in model.last_shared_parameters()]  # a ParameterSlice's tensor
    if name in ("shared_embedding", "independent"):
        assert params == []
        assert model.shared_parameters() == []
        return
    assert params
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p in params)
    logits = model(_batch())
    for t in TASKS:
        assert any(g.abs().sum() > 0 for g in _grad(logits[t], params)), f"{name}: {t} misses the last shared layer"


@pytest.mark.parametrize("name", ["shared_embedding", "independent", "omoe", "cross_stitch", "aitm"])
def test_single_task_configs_build_and_share_nothing(name):
    torch.manual_seed(0)
    model = create_model(name, LAYOUT, ("ctr",), embedding_dim=4)
    assert model(_batch(4))["ctr"].shape == (4,)
    assert model.last_shared_parameters() == []


# --- shared_embedding / independent ----------------------------------------------------


@pytest.mark.parametrize("name", ["shared_embedding", "independent"])
def test_per_task_networks_are_independent(name):
    model = _model(name)
    weights = list(model.backbone.networks.weights) + list(model.backbone.networks.biases)
    logits = model(_batch())
    for t, name in enumerate(TASKS):
        grads = _grad(logits[name], weights)
        for s in range(len(TASKS)):
            norm = sum(g[s].abs().sum() for g in grads)
            assert (norm > 0) == (s == t), f"task {t} vs network {s}"
        # other tasks' towers are not reached either
        for s, tower in enumerate(model.towers):
            norm = sum(g.abs().sum() for g in _grad(logits[name], list(tower.parameters())))
            assert (norm > 0) == (s == t)


def test_independent_tables_get_gradient_only_from_their_own_task():
    model = _model("independent")
    model.use_sparse_embedding_grads(False)
    table = model.embedding_tables()[0]
    rows = sum(LAYOUT.table_sizes)
    assert table.shape[0] == len(TASKS) * rows  # one fused table, one set of tables per task
    logits = model(_batch())
    for t, name in enumerate(TASKS):
        (grad,) = torch.autograd.grad(logits[name].sum(), [table], retain_graph=True)
        for s in range(len(TASKS)):
            assert (grad[s * rows : (s + 1) * rows].abs().sum() > 0) == (s == t), f"task {t} vs tables {s}"


def test_independent_equals_separate_single_task_models():
    """Task t of the independent model predicts exactly what a one-task model with its weights does."""
    model = _model("independent")
    batch = _batch()
    logits = model(batch)
    rows = sum(LAYOUT.table_sizes)
    for t, name in enumerate(TASKS):
        alone = create_model("independent", LAYOUT, (name,), embedding_dim=4)
        state = {
            "features.embedding.weight": model.embedding_tables()[0].detach()[t * rows : (t + 1) * rows],
            **{
                f"backbone.networks.weights.{i}": w.detach()[t : t + 1]
                for i, w in enumerate(model.backbone.networks.weights)
            },
            **{
                f"backbone.networks.biases.{i}": b.detach()[t : t + 1]
                for i, b in enumerate(model.backbone.networks.biases)
            },
            **{f"towers.0.{k}": v for k, v in model.towers[t].state_dict().items()},
        }
        alone.load_state_dict(state)
        torch.testing.assert_close(alone(batch)[name], logits[name], rtol=1e-6, atol=1e-6)


def test_the_former_single_task_name_still_builds_the_shared_embedding_model():
    assert type(_model("single_task")) is type(_model("shared_embedding"))
    assert "single_task" not in list_models()


# --- omoe ------------------------------------------------------------------------------


def test_omoe_one_gate_and_identical_task_representations():
    model = _model("omoe")
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    assert len(gates) == 1 and gates[0].num_gates == 1
    x = model.features(_batch())
    reps, g = model.backbone(x, return_gates=True)
    assert reps.shape == (16, 3, model.backbone.out_dim)
    for t in range(1, 3):
        assert torch.equal(reps[:, t], reps[:, 0])
        assert torch.equal(g[:, t], g[:, 0])
    torch.testing.assert_close(g.sum(-1), torch.ones(16, 3))
    # the representation is the gate-weighted sum of the experts
    expected = (g[:, :1].transpose(1, 2) * model.backbone.experts(x)).sum(1)
    torch.testing.assert_close(reps[:, 0], expected)


# --- cgc -------------------------------------------------------------------------------


def test_cgc_equals_one_level_ple():
    cgc, ple = _model("cgc"), _model("ple", num_levels=1)
    assert isinstance(cgc.backbone, PLE) and len(cgc.backbone.levels) == 1
    assert cgc.backbone.levels[0].shared_gate is None
    batch = _batch()
    a, b = cgc(batch), ple(batch)
    for t in TASKS:
        torch.testing.assert_close(a[t], b[t], rtol=0, atol=0)


def test_cgc_task_experts_reach_only_their_task():
    model = _model("cgc", num_shared_experts=2, num_task_experts=2)
    S, K = 2, 2
    w = model.backbone.levels[0].experts.weights[0]
    logits = model(_batch())
    for t, name in enumerate(TASKS):
        (g,) = _grad(logits[name], [w])
        per_expert = g.abs().sum(dim=(1, 2))
        assert (per_expert[:S] > 0).all()  # shared experts reach every task
        for s in range(len(TASKS)):
            own = per_expert[S + s * K : S + (s + 1) * K]
            assert ((own > 0) if s == t else (own == 0)).all()


# --- cross_stitch ----------------------------------------------------------------------


def test_cross_stitch_init_rows_are_convex():
    unit = CrossStitch(3, self_weight=0.8)
    expected = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    torch.testing.assert_close(unit.alpha.data, expected)
    with pytest.raises(ValueError):
        CrossStitch(1)
    with pytest.raises(ValueError):
        CrossStitch(2, self_weight=1.5)


def test_cross_stitch_network_matches_columns_mixed_per_layer():
    torch.manual_seed(0)
    net = CrossStitchNetwork(5, num_tasks=2, hidden=(7, 3))
    with torch.no_grad():
        for unit in net.stitches:
            unit.alpha.copy_(torch.randn(2, 2))
    x = torch.randn(4, 5)
    h = [x, x]
    for i in range(2):
        h = [torch.relu(h[t] @ net.weights[i][t] + net.biases[i][t]) for t in range(2)]
        a = net.stitches[i].alpha
        h = [a[t, 0] * h[0] + a[t, 1] * h[1] for t in range(2)]
    torch.testing.assert_close(net(x), torch.stack(h, dim=1))


def _cross_gradients(model) -> torch.Tensor:
    """``(T, T)``: how much task ``t``'s output moves column ``s``'s weights."""
    cols = model.backbone
    params = list(cols.weights) + list(cols.biases)
    logits = model(_batch())
    out = torch.zeros(3, 3)
    for t, name in enumerate(TASKS):
        grads = _grad(logits[name], params)
        out[t] = torch.stack([g.abs().flatten(1).sum(1) for g in grads]).sum(0)
    return out


def test_cross_stitch_identity_decouples_and_off_diagonal_couples():
    model = _model("cross_stitch")
    assert model.last_shared_parameters() == [model.backbone.weights[-1], model.backbone.biases[-1]]
    # default init: every task reaches every column
    assert (_cross_gradients(model) > 0).all()
    with torch.no_grad():
        for unit in model.backbone.stitches:
            unit.alpha.copy_(torch.eye(3))
    assert torch.equal(_cross_gradients(model) > 0, torch.eye(3, dtype=torch.bool))


# --- aitm ------------------------------------------------------------------------------


def test_aitm_calibration_is_zero_unless_a_later_step_is_more_likely():
    model = _model("aitm")
    batch = _batch(2)
    down = {"ctr": torch.tensor([2.0, 0.0]), "cvr": torch.tensor([1.0, 0.0]), "sat": torch.tensor([-3.0, -1.0])}
    assert model.auxiliary_loss(down, batch).item() == 0.0
    # row 0: only cvr > ctr; row 1: both steps go up (the paper sums the steps, then averages rows)
    up = {"ctr": torch.tensor([0.0, -1.0]), "cvr": torch.tensor([1.0, 0.0]), "sat": torch.tensor([0.5, 1.0])}
    s1, s_1 = torch.sigmoid(torch.tensor(1.0)).item(), torch.sigmoid(torch.tensor(-1.0)).item()
    expected = 0.6 * ((s1 - 0.5) + (0.5 - s_1) + (s1 - 0.5)) / 2
    loss = model.auxiliary_loss(up, batch)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() > 0
    # gradient descent on it pushes the later step down and the earlier one up
    z = {k: v.clone().requires_grad_() for k, v in up.items()}
    model.auxiliary_loss(z, batch).backward()
    assert z["ctr"].grad[0] < 0 < z["cvr"].grad[0]
    assert z["sat"].grad[0] == 0
    assert _model("aitm", calibration_weight=0.0).auxiliary_loss(up, batch) is None


def test_aitm_expectation_calibration_function():
    assert expectation_calibration(torch.tensor([[3.0, 1.0, 0.0]])).item() == 0.0
    y = torch.sigmoid(torch.tensor([0.0, 1.0]))
    assert expectation_calibration(torch.tensor([[0.0, 1.0]])).item() == pytest.approx((y[1] - y[0]).item())


def test_aitm_chain_dependencies():
    model = _model("aitm")
    layer = model.backbone
    logits = model(_batch())

    params = list(layer.parameters())
    grads = {t: dict(zip(map(id, params), _grad(logits[t], params), strict=True)) for t in TASKS}

    def reach(task: str, module) -> float:
        return float(sum(grads[task][id(p)].abs().sum() for p in module.parameters()))

    # task 0 reads only its own tower, never a later task's tower, transfer or attention
    assert reach("ctr", layer.towers[0]) > 0
    assert reach("ctr", layer.towers[1]) == 0 and reach("ctr", layer.towers[2]) == 0
    assert reach("ctr", layer.transfers) == 0 and reach("ctr", layer.attentions) == 0
    # task 1 depends on task 0 through the transferred information p_0
    assert reach("cvr", layer.towers[0]) > 0 and reach("cvr", layer.transfers[0]) > 0
    assert reach("cvr", layer.towers[1]) > 0 and reach("cvr", layer.attentions[0]) > 0
    assert reach("cvr", layer.towers[2]) == 0 and reach("cvr", layer.transfers[1]) == 0
    # the last task reaches the whole chain
    assert all(reach("sat", m) > 0 for m in (*layer.towers, *layer.transfers, *layer.attentions))


def test_ait_matches_the_paper_equations():
    torch.manual_seed(0)
    ait = AdaptiveInformationTransfer(6)
    p, q = torch.randn(4, 6), torch.randn(4, 6)
    z, w = ait(p, q, return_weights=True)
    W, b = ait.proj.weight, ait.proj.bias
    h1, h2, h3 = ((lambda u, i=i: u @ W[6 * i : 6 * (i + 1)].T + b[6 * i : 6 * (i + 1)]) for i in range(3))
    scores = torch.stack([(h2(u) * h3(u)).sum(-1) / math.sqrt(6) for u in (p, q)], dim=1)
    weights = scores.softmax(dim=1)
    torch.testing.assert_close(w, weights)
    torch.testing.assert_close(z, weights[:, :1] * h1(p) + weights[:, 1:] * h1(q))
    torch.testing.assert_close(w.sum(-1), torch.ones(4))


def test_aitm_layer_chain_matches_manual_unrolling():
    torch.manual_seed(0)
    layer = AITMLayer(5, num_tasks=3, tower_hidden=(8, 4), info_hidden=3)
    x = torch.randn(6, 5)
    out, weights = layer(x, return_weights=True)
    assert out.shape == (6, 3, 4) and weights.shape == (6, 2, 2)
    z0 = layer.towers[0](x)
    z1 = layer.attentions[0](layer.transfers[0](z0), layer.towers[1](x))
    z2 = layer.attentions[1](layer.transfers[1](z1), layer.towers[2](x))
    torch.testing.assert_close(out, torch.stack([z0, z1, z2], dim=1))


def test_aitm_rejects_multiclass_outputs():
    with pytest.raises(ValueError, match="binary"):
        create_model("aitm", LAYOUT, TASKS, embedding_dim=4, output_dims=(1, 3, 1))
    model = create_model("aitm", LAYOUT, TASKS, embedding_dim=4, output_dims=(1, 1, 1))
    assert all(v.shape == (5,) for v in model(_batch(5)).values())


def test_independent_with_esmm_is_one_config_error():
    from mtrec.config import config_from_dict
    from mtrec.errors import ConfigError

    raw = {
        "data": {"train": "x.parquet"},
        "features": {"sparse": [{"name": "u"}]},
        "tasks": [{"name": "ctr", "label": "click"}, {"name": "cvr", "label": "buy", "where": "click == 1"}],
        "esmm": {"ctr": "ctr", "cvr": "cvr"},
        "model": {"name": "independent"},
    }
    with pytest.raises(ConfigError, match="independent baseline shares nothing"):
        config_from_dict(raw)


@pytest.mark.parametrize("name", ["mmoe", "cgc", "ple"])
@pytest.mark.parametrize("embedding", ["shared", "per_task"])
def test_gate_penalties_are_the_models_auxiliary_loss_in_training_only(name, embedding):
    gated = {"gate": "dselect_k", "gate_k": 2, "gate_entropy": 0.1, "expert_balance": 1.0, "expert_norm": True}
    model = _model(name, embedding=embedding, **gated)
    batch = _batch(16)
    logits = model(batch)
    aux = model.auxiliary_loss(logits, batch)
    assert aux is not None and aux.dim() == 0 and aux.item() > 0
    assert model.auxiliary_loss(logits, batch) is None  # taken once: the next step starts from nothing
    logits = model(batch)
    (model.auxiliary_loss(logits, batch) + sum(v.sum() for v in logits.values())).backward()
    gates = [p for n, p in model.named_parameters() if "dselect" in n or n.endswith("gates.weight")]
    assert gates and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)
    model(batch)  # a training pass whose penalty nobody takes ...
    model.eval()
    with torch.no_grad():
        logits = model(batch)
    assert model.auxiliary_loss(logits, batch) is None  # ... is not evaluation's
    plain = _model(name, embedding=embedding)
    assert plain.auxiliary_loss(plain(batch), batch) is None  # no penalty asked for, none computed


@pytest.mark.parametrize("name", sorted(list_models()))
def test_every_model_takes_cross_layers_on_its_input(name):
    plain, crossed = _model(name), _model(name, cross_layers=2, cross_rank=3)
    batch = _batch(8)
    assert {k: v.shape for k, v in crossed(batch).items()} == {k: v.shape for k, v in plain(batch).items()}
    extra = sum(p.numel() for p in crossed.parameters()) - sum(p.numel() for p in plain.parameters())
    crosses = [m for m in crossed.features.modules() if type(m).__name__ == "CrossNetwork"]
    assert crosses and extra == sum(p.numel() for m in crosses for p in m.parameters())


def test_independent_cross_layers_are_per_task():
    """The baseline stays independent: task t's loss reaches only its own cross weights."""
    model = _model("independent", cross_layers=1)
    (cross,) = [m for m in model.features.modules() if type(m).__name__ == "CrossNetwork"]
    assert cross.copies == len(TASKS)
    model(_batch(8))["cvr"].sum().backward()
    grad = cross.weights[0].grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0


DIN_LAYOUT = dataclasses.replace(LAYOUT, sequence_pooling=("target_attention", "sum"), sequence_targets=(1, -1))


@pytest.mark.parametrize("name", sorted(list_models()))
def test_every_model_takes_a_target_attention_sequence(name):
    """DIN pooling of list 0 (it shares sparse column 1's table) under every architecture."""
    torch.manual_seed(0)
    model = create_model(name, DIN_LAYOUT, TASKS, embedding_dim=4)
    batch = _batch(8)
    logits = model(batch)
    assert all(v.shape[0] == 8 for v in logits.values())
    units = [m for m in model.features.modules() if type(m).__name__ == "TargetAttention"]
    assert units
    sum(v.float().sum() for v in logits.values()).backward()
    assert all(p.grad is not None for m in units for p in m.parameters())
    # the candidate matters: another item in column 1 changes the pooled history
    other = dataclasses.replace(batch, sparse=batch.sparse.clone())
    other.sparse[:, 1] = (other.sparse[:, 1] + 1) % DIN_LAYOUT.table_sizes[1]
    with torch.no_grad():
        model.eval()
        a, b = model(batch), model(other)
    assert any(not torch.allclose(a[t], b[t]) for t in TASKS)


def _depends(logit: torch.Tensor, params: list[torch.Tensor]) -> bool:
    return any(g.abs().sum() > 0 for g in _grad(logit, params))


@pytest.mark.parametrize(("order", "bottom"), [((), "mlp"), (("cvr", "sat", "ctr"), "mmoe")])
def test_dbmtl_towers_read_the_earlier_tasks_in_the_declared_order(order, bottom):
    model = _model("dbmtl", task_order=order, bottom=bottom)
    sequence = list(order) or list(TASKS)
    logits = model(_batch())
    relations = model.backbone.relations
    for k, task in enumerate(sequence):
        for j, other in enumerate(sequence):
            tower = list(relations.towers[TASKS.index(other)].parameters())
            # a task's logit reads its own tower and the towers of the tasks before it, never after
            assert _depends(logits[task], tower) == (j <= k), (task, other)
    assert hasattr(model.backbone, "gate_report") == (bottom == "mmoe")  # diagnostics see MMoE's gates


def test_dbmtl_task_order_must_name_every_task_once():
    from mtrec.models.dbmtl import task_positions

    assert task_positions(("b", "a"), ("a", "b")) == (1, 0)
    with pytest.raises(ValueError, match=r"task_order names unknown task\(s\) \['click'\]"):
        task_positions(("click", "a"), ("a", "b"))
    with pytest.raises(ValueError, match="must list every task once"):
        task_positions(("a",), ("a", "b"))


def test_adatt_fuses_every_tasks_experts_plus_its_own():
    from mtrec.nn.experts import AdaTTLayer

    torch.manual_seed(0)
    layer = AdaTTLayer(6, num_tasks=3, num_specific=2, expert_hidden=(5,))
    with torch.no_grad():
        layer.own_weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 6)
    experts = layer.experts(x)  # (B, 6, H): task t's experts are 2t, 2t + 1
    gates = torch.softmax((torch.einsum("bi,tie->bte", x, layer.gate_weight) + layer.gate_bias.transpose(0, 1)), -1)
    expected = torch.einsum("bte,beh->bth", gates, experts)
    for t in range(3):
        own = layer.own_weight[t, 0] * experts[:, 2 * t] + layer.own_weight[t, 1] * experts[:, 2 * t + 1]
        expected[:, t] += own
    torch.testing.assert_close(layer(x), expected)
    out = layer(x)
    # task 0's loss reaches every task's experts (through its gate) but only its own residual
    weight = layer.experts.weights[0]
    grad = torch.autograd.grad(out[:, 0].sum(), [weight, layer.own_weight])
    assert all(grad[0][e].abs().sum() > 0 for e in range(6))
    assert grad[1][0].abs().sum() > 0 and grad[1][1:].abs().sum() == 0


def test_adatt_levels_chain_per_task_and_report_all_experts():
    model = _model("adatt", num_levels=2, num_task_experts=1)
    x = model.features(_batch(5))
    gates, experts, labels, covers = model.backbone.gate_report(x, TASKS)
    assert gates.shape == (5, 3, 3) and experts.shape[1] == 3 and covers == [[0, 1, 2]] * 3
    torch.testing.assert_close(gates.sum(-1), torch.ones(5, 3))
    first, second = model.backbone.levels
    h = first(x).transpose(0, 1)
    torch.testing.assert_close(model.backbone(x), second(h))  # level 2's task t reads level 1's f_t


def test_cross_stitch_trains_under_cpu_bf16_autocast_on_one_thread():
    """The mix's backward reduces over B * H values; torch's CPU bf16 GEMM dies of SIGFPE on one
    thread from 2^19 of them (the synthetic config's batch of 2048 x 256 units), so the unit
    mixes in fp32. Run in a child process: the bug kills its process rather than raising."""
    code = (
        "import torch\n"
        "from mtrec.nn.cross_stitch import CrossStitch\n"
        "torch.set_num_threads(1)\n"
        "unit = CrossStitch(3)\n"
        "h = torch.randn(3, 2048, 256, requires_grad=True)\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    out = unit(h.to(torch.bfloat16))\n"
        "assert out.dtype == torch.bfloat16, out.dtype\n"
        "out.float().sum().backward()\n"
        "expected = unit.alpha.detach().sum(0).view(3, 1, 1).expand(3, 2048, 256)\n"
        "torch.testing.assert_close(h.grad, expected, rtol=1e-2, atol=1e-2)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-500:])
