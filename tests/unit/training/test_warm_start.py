"""Warm start: parameters matched by name, towers and task blocks by task, embedding rows by raw ID;
freezing and the learning-rate groups of what was loaded."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
import torch

from mtrec.config import Config, TrainConfig
from mtrec.data.preprocess import Preprocessor
from mtrec.errors import ConfigError
from mtrec.models import create_model
from mtrec.models.parts import freeze_groups
from mtrec.schema import Schema, SparseFeature, Task
from mtrec.training.optim import make_optimizers
from mtrec.training.warm_start import freeze, loaded_parameters, transfer_weights


def _schema(tasks: tuple[str, ...]) -> Schema:
    return Schema(
        sparse=(SparseFeature("user"), SparseFeature("slot", hash_buckets=5)),
        tasks=tuple(Task(t, label=f"y_{t}") for t in tasks),
    )


def _pre(tasks: tuple[str, ...], users: list[int]) -> Preprocessor:
    table = pa.table({"user": users, "slot": list(range(len(users)))})
    return Preprocessor.fit(_schema(tasks), table)


def _model(name: str, pre: Preprocessor, tasks: tuple[str, ...], seed: int, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, pre.layout(), tasks, embedding_dim=4, **kw)


OLD_USERS = [10, 20, 30, 30, 20, 30]  # vocabulary by frequency: 30, 20, 10
NEW_USERS = [40, 10, 10, 10, 30, 40, 40, 40]  # 40, 10, 30: another order and a new ID


def test_embedding_rows_follow_the_raw_id_and_new_ids_stay_fresh():
    old_pre, new_pre = _pre(("a", "b"), OLD_USERS), _pre(("a", "b"), NEW_USERS)
    old = _model("mmoe", old_pre, ("a", "b"), seed=1, num_experts=2, expert_hidden=(8,))
    new = _model("mmoe", new_pre, ("a", "b"), seed=2, num_experts=2, expert_hidden=(8,))
    before = new.state_dict()["features.embedding.weight"].clone()
    report = transfer_weights(old, old_pre, new, new_pre, "old")
    old_w, new_w = old.state_dict()["features.embedding.weight"], new.state_dict()["features.embedding.weight"]
    old_vocab, new_vocab = old_pre.vocabs["user"].to_pylist(), new_pre.vocabs["user"].to_pylist()
    assert old_vocab == [30, 20, 10] and new_vocab == [40, 10, 30]
    for user in (10, 30):
        torch.testing.assert_close(new_w[new_vocab.index(user) + 1], old_w[old_vocab.index(user) + 1], rtol=0, atol=0)
    torch.testing.assert_close(new_w[1], before[1], rtol=0, atol=0)  # 40 is new: its fresh row stays
    torch.testing.assert_close(new_w[0], old_w[0], rtol=0, atol=0)  # the unseen row
    # The hashed table (after the user table's 4 rows) is copied bucket for bucket.
    torch.testing.assert_close(new_w[4:], old_w[4:], rtol=0, atol=0)
    entry = next(e for e in report.entries if e["name"] == "features.embedding.weight")
    assert entry["status"] == "remapped" and entry["detail"].startswith("7 of 8 IDs")


def test_towers_and_gate_blocks_follow_the_task_name_not_its_position():
    pre = _pre(("a", "b"), OLD_USERS)
    old = _model("mmoe", pre, ("a", "b"), seed=1, num_experts=3, expert_hidden=(8,))
    new_pre = _pre(("b", "c", "a"), OLD_USERS)
    new = _model("mmoe", new_pre, ("b", "c", "a"), seed=2, num_experts=3, expert_hidden=(8,))
    fresh_gate = new.state_dict()["backbone.gates.linear.weight"].clone()
    report = transfer_weights(old, pre, new, new_pre, "old")
    o, n = old.state_dict(), new.state_dict()
    gate_o, gate_n = o["backbone.gates.linear.weight"], n["backbone.gates.linear.weight"]  # (T * 3, D)
    assert torch.equal(gate_n[0:3], gate_o[3:6])  # b: second in the old model, first here
    assert torch.equal(gate_n[6:9], gate_o[0:3])  # a
    assert torch.equal(gate_n[3:6], fresh_gate[3:6])  # c is new
    assert torch.equal(n["towers.2.out.weight"], o["towers.0.out.weight"])  # a's tower
    assert torch.equal(n["towers.0.out.weight"], o["towers.1.out.weight"])  # b's tower
    assert torch.equal(n["backbone.experts.weights.0"], o["backbone.experts.weights.0"])  # shared: whole
    status = {e.get("matched_as", e["name"]): e["status"] for e in report.entries}
    assert status["towers[c].out.weight"] == "new" and status["backbone.experts.weights.0"] == "loaded"
    assert status["backbone.gates.linear.weight"] == "remapped"
    assert report.partial["backbone.gates.linear.weight"] == "the blocks of c are new"
    # Dropping a task: its tower is reported, nothing else is lost.
    back = _model("mmoe", pre, ("a",), seed=3, num_experts=3, expert_hidden=(8,))
    report = transfer_weights(new, new_pre, back, pre, "new")
    dropped = {e.get("matched_as") for e in report.entries if e["status"] == "dropped"}
    assert dropped == {
        f"towers[{t}].{p}" for t in "bc" for p in ("mlp.0.weight", "mlp.0.bias", "out.weight", "out.bias")
    }
    assert torch.equal(back.state_dict()["towers.0.out.weight"], o["towers.0.out.weight"])


def test_ple_keeps_shared_experts_and_each_tasks_own():
    pre = _pre(("a", "b"), OLD_USERS)
    kw = {"num_shared_experts": 2, "num_task_experts": 1, "expert_hidden": (8,)}
    old = _model("ple", pre, ("a", "b"), seed=1, num_levels=1, **kw)
    new_pre = _pre(("b", "a", "c"), OLD_USERS)
    new = _model("ple", new_pre, ("b", "a", "c"), seed=2, num_levels=1, **kw)
    fresh = new.state_dict()["backbone.levels.0.experts.weights.0"].clone()
    transfer_weights(old, pre, new, new_pre, "old")
    w_o, w_n = (
        old.state_dict()["backbone.levels.0.experts.weights.0"],
        new.state_dict()["backbone.levels.0.experts.weights.0"],
    )
    # [shared 0, shared 1 | task 0 | task 1 (| task 2)]
    assert torch.equal(w_n[:2], w_o[:2])
    assert torch.equal(w_n[2], w_o[3]) and torch.equal(w_n[3], w_o[2])  # b, a swapped places
    assert torch.equal(w_n[4], fresh[4])  # c's own expert is new


def test_per_task_tables_are_copied_copy_by_task():
    pre = _pre(("a", "b"), OLD_USERS)
    old = _model("independent", pre, ("a", "b"), seed=1, hidden=(8,))
    new = _model("independent", pre, ("b", "a"), seed=2, hidden=(8,))
    transfer_weights(old, pre, new, pre, "old")
    rows = sum(pre.layout().table_sizes)
    w_o, w_n = old.state_dict()["features.embedding.weight"], new.state_dict()["features.embedding.weight"]
    assert torch.equal(w_n[:rows], w_o[rows:]) and torch.equal(w_n[rows:], w_o[:rows])


def test_a_chain_that_changed_order_starts_fresh():
    pre = _pre(("a", "b"), OLD_USERS)
    old = _model("aitm", pre, ("a", "b"), seed=1)
    new = _model("aitm", pre, ("b", "a"), seed=2)
    report = transfer_weights(old, pre, new, pre, "old")
    chain = [e for e in report.entries if e["name"].startswith("backbone.")]
    assert chain and all(e["status"] == "new" and "task order" in e["detail"] for e in chain)
    same = _model("aitm", pre, ("a", "b"), seed=3)
    report = transfer_weights(old, pre, same, pre, "old")
    assert all(e["status"] == "loaded" for e in report.entries)


def test_freeze_names_and_what_they_refuse():
    pre = _pre(("a", "b"), OLD_USERS)
    old = _model("mmoe", pre, ("a", "b"), seed=1, num_experts=2, expert_hidden=(8,))
    new = _model("mmoe", pre, ("a", "b", "c"), seed=2, num_experts=2, expert_hidden=(8,))
    report = transfer_weights(old, pre, new, pre, "old")
    groups = freeze_groups(new)
    assert set(groups) >= {"embedding", "backbone", "experts", "gates", "towers", "towers.a", "towers.c"}
    with pytest.raises(ConfigError, match="'cross' matches nothing in this model"):
        freeze(new, ("cross",), report)
    with pytest.raises(ConfigError, match="blocks of c are new"):
        freeze(new, ("gates",), report)
    with pytest.raises(ConfigError, match="task c is new"):
        freeze(new, ("towers",), report)
    frozen = freeze(new, ("embedding", "experts", "towers.a"), report)
    names = {n for n, p in new.named_parameters() if not p.requires_grad}
    assert names == {"features.embedding.weight", *groups["experts"], *groups["towers.a"]}
    assert len(frozen) == len(names)


def test_loaded_parameters_learn_at_the_scaled_rate_and_frozen_ones_are_left_out():
    pre = _pre(("a", "b"), OLD_USERS)
    old = _model("mmoe", pre, ("a",), seed=1, num_experts=2, expert_hidden=(8,))
    new = _model("mmoe", pre, ("a", "b"), seed=2, num_experts=2, expert_hidden=(8,))
    report = transfer_weights(old, pre, new, pre, "old")
    freeze(new, ("experts",), report)
    config = Config(train=dataclasses.replace(TrainConfig(), lr=0.01, embedding_lr=0.1, init_lr_scale=0.1))
    dense, table = make_optimizers(new, config, loaded_parameters(new, report))
    ids = {id(p): n for n, p in new.named_parameters()}
    scaled, full = ({ids[id(p)] for p in g["params"]} for g in dense.param_groups)
    assert [g["lr"] for g in dense.param_groups] == pytest.approx([0.001, 0.01])
    assert "towers.0.out.weight" in scaled and "backbone.experts.weights.0" not in scaled  # (frozen)
    # Task b's tower is new, and so is b's block of the gates: they learn at the full rate.
    assert full == {n for n in ids.values() if n.startswith("towers.1.")} | {
        "backbone.gates.linear.weight",
        "backbone.gates.linear.bias",
    }
    assert not any(n.startswith("backbone.experts") for n in scaled | full)  # frozen: in no group
    assert [g["lr"] for g in table.param_groups] == pytest.approx([0.01, 0.1])
    assert [len(g["params"]) for g in table.param_groups] == [1, 0]


def test_frozen_experts_keep_their_batch_norm_statistics_bit_for_bit(tmp_path):
    """HoME's expert norms hold running statistics (buffers, not parameters): freezing the
    experts keeps them as loaded too, while a trainable expert group's move."""
    from safetensors.torch import load_file

    from mtrec.config import config_from_dict
    from mtrec.data.synthetic import write_click_log
    from mtrec.quickstart import synthetic_features, synthetic_tasks
    from mtrec.training import train

    data = tmp_path / "clicks.parquet"
    write_click_log(data, 4000, seed=1)

    def config(**train_keys):
        return config_from_dict(
            {
                "data": {"train": str(data)},
                "features": synthetic_features(),
                "tasks": synthetic_tasks(),
                "model": {
                    "name": "mmoe",
                    "embedding_dim": 4,
                    "expert_hidden": [8],
                    "tower_hidden": [4],
                    "expert_norm": True,
                },
                "train": {"epochs": 1, "batch_size": 512, "threads": 1, **train_keys},
            }
        )

    train(config(), output=tmp_path / "source", progress=False)
    source = load_file(tmp_path / "source" / "model.safetensors")
    for frozen, same in ((["experts"], True), (["embedding"], False)):
        out = tmp_path / f"warm-{frozen[0]}"
        train(config(init_from=str(tmp_path / "source"), freeze=frozen), output=out, progress=False)
        after = load_file(out / "model.safetensors")
        experts = [k for k in source if k.startswith("backbone.experts.")]
        assert any("running_mean" in k for k in experts)
        assert all(torch.equal(after[k], source[k]) for k in experts) == same
        stats = [k for k in experts if "running" in k]
        assert all(torch.equal(after[k], source[k]) for k in stats) == same


def test_per_task_cross_layers_and_two_axis_gates_follow_the_tasks():
    """Per-task parts a model holds outside its towers: the cross layers of each task's table set
    go block by block by task; AdaTT's gates (task by task's experts) start fresh when the tasks
    or their order change, and load whole when they do not."""
    pre = _pre(("a", "b"), OLD_USERS)
    old = _model("independent", pre, ("a", "b"), seed=1, hidden=(8,), cross_layers=1)
    new = _model("independent", pre, ("b", "a"), seed=2, hidden=(8,), cross_layers=1)
    report = transfer_weights(old, pre, new, pre, "old")
    w_o, w_n = old.state_dict()["features.cross.weights.0"], new.state_dict()["features.cross.weights.0"]
    assert torch.equal(w_n[0], w_o[1]) and torch.equal(w_n[1], w_o[0])
    assert report.status("features.cross.weights.0") == "remapped"
    kw = {"num_task_experts": 1, "expert_hidden": (8,), "num_levels": 1}
    old = _model("adatt", pre, ("a", "b"), seed=1, **kw)
    swapped = _model("adatt", pre, ("b", "a"), seed=2, **kw)
    report = transfer_weights(old, pre, swapped, pre, "old")
    assert report.status("backbone.levels.0.gate_weight") == "new"
    same = _model("adatt", pre, ("a", "b"), seed=3, **kw)
    report = transfer_weights(old, pre, same, pre, "old")
    assert report.status("backbone.levels.0.gate_weight") == "loaded"


def test_home_norms_of_task_experts_move_with_their_experts():
    pre = _pre(("a", "b"), OLD_USERS)
    kw = {"num_shared_experts": 1, "num_task_experts": 1, "expert_hidden": (4,), "expert_norm": True}
    old = _model("cgc", pre, ("a", "b"), seed=1, **kw)
    with torch.no_grad():  # distinct running statistics per expert
        old.state_dict()["backbone.levels.0.experts.norms.0.running_mean"].copy_(torch.arange(12.0))
    new_pre = _pre(("b", "a", "c"), OLD_USERS)
    new = _model("cgc", new_pre, ("b", "a", "c"), seed=2, **kw)
    report = transfer_weights(old, pre, new, new_pre, "old")
    mean = new.state_dict()["backbone.levels.0.experts.norms.0.running_mean"]  # [shared | b | a | c], 4 each
    assert mean[:4].tolist() == [0, 1, 2, 3]  # shared
    assert mean[4:8].tolist() == [8, 9, 10, 11] and mean[8:12].tolist() == [4, 5, 6, 7]  # b and a swapped
    assert mean[12:].tolist() == [0, 0, 0, 0]  # c's fresh statistics
    assert "the blocks of c are new" in report.partial["backbone.levels.0.experts.norms.0.running_mean"]


def test_freeze_refuses_tables_that_start_fresh_and_finds_dselect_gates():
    pre = _pre(("a", "b"), OLD_USERS)
    old = _model("independent", pre, ("a", "b"), seed=1, hidden=(8,))
    new = _model("independent", pre, ("a", "b", "c"), seed=2, hidden=(8,))
    report = transfer_weights(old, pre, new, pre, "old")
    with pytest.raises(ConfigError, match="the table sets of c are new"):
        freeze(new, ("embedding",), report)
    assert id(new.state_dict(keep_vars=True)["features.embedding.weight"]) not in loaded_parameters(new, report)
    cgc = _model("cgc", pre, ("a", "b"), seed=1, num_shared_experts=1, num_task_experts=1, gate="dselect_k")
    gates = freeze_groups(cgc)["gates"]
    assert gates and all(".dselect." in n for n in gates)
