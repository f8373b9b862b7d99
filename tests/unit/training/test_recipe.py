"""The training recipe: embedding weight decay on touched rows, learning-rate warm-up and decay."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mtrec.config import config_from_dict
from mtrec.data.synthetic import write_click_log
from mtrec.errors import ConfigError
from mtrec.model_dir import has_resume_state, load_resume_state
from mtrec.quickstart import synthetic_features, synthetic_tasks
from mtrec.training import make_optimizers, train
from mtrec.training.optim import LazyAdam, SparseAdamW, lr_factor, make_lr_schedulers
from mtrec.training.profiling import HostSyncCounter

# --------------------------------------------------------------------------- embedding weight decay


def _lookups(steps: int = 30, rows: int = 60, seed: int = 1):
    """Batches of ids over rows 0..19 only (rows 20.. are never looked up) and their targets."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 20, (16, 3), generator=g), torch.randn(16, 3, 4, generator=g)) for _ in range(steps)]


def _train_table(kind: str, weight_decay: float, batches, rows: int = 60, lr: float = 0.05) -> torch.Tensor:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(rows, 4, sparse=kind == "sparse")
    torch.nn.init.normal_(emb.weight, std=1.0)
    cls = SparseAdamW if kind == "sparse" else LazyAdam
    opt = cls(emb.parameters(), lr=lr, weight_decay=weight_decay)
    for ids, target in batches:
        opt.zero_grad(set_to_none=True)
        ((emb(ids) - target) ** 2).mean().backward()
        opt.step()
    return emb.weight.detach()


def _initial(rows: int = 60) -> torch.Tensor:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(rows, 4)
    torch.nn.init.normal_(emb.weight, std=1.0)
    return emb.weight.detach()


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_weight_decay_shrinks_touched_rows_and_leaves_untouched_rows_bit_identical(kind):
    batches = _lookups()
    w0 = _initial()
    plain, decayed = _train_table(kind, 0.0, batches), _train_table(kind, 2.0, batches)
    # Rows 20.. were never looked up: exactly their initial values, decay or not.
    assert torch.equal(decayed[20:], w0[20:]) and torch.equal(plain[20:], w0[20:])
    # The touched rows are pulled towards 0 compared with the same run without decay.
    assert decayed[:20].norm(dim=1).mean() < 0.9 * plain[:20].norm(dim=1).mean()


def test_one_step_of_decay_is_lr_times_wd_times_the_row_before_the_adam_update():
    table = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, 4.0], [0.5, 0.5]]))
    ref = torch.nn.Parameter(table.detach().clone())
    grad = torch.tensor([[0.3, -0.1], [0.0, 0.0], [1.0, 2.0]])
    lr, wd = 0.1, 0.5
    opt, ref_opt = LazyAdam([table], lr=lr, weight_decay=wd), LazyAdam([ref], lr=lr)
    table.grad, ref.grad = grad.clone(), grad.clone()
    opt.step()
    ref_opt.step()
    before = torch.tensor([[1.0, -2.0], [3.0, 4.0], [0.5, 0.5]])
    touched = torch.tensor([True, False, True])
    # p_new = p * (1 - lr * wd) - adam_step, adam_step the same as without decay.
    expected = before[touched] * (1 - lr * wd) - (before[touched] - ref.detach()[touched])
    torch.testing.assert_close(table.detach()[touched], expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(table.detach()[1], before[1])


def test_sparse_and_dense_paths_apply_the_same_decayed_update():
    batches = _lookups(steps=40)
    torch.testing.assert_close(
        _train_table("dense", 0.5, batches), _train_table("sparse", 0.5, batches), rtol=1e-5, atol=1e-6
    )


def test_zero_weight_decay_is_todays_update_bit_for_bit():
    batches = _lookups(steps=10)
    torch.manual_seed(0)
    emb = torch.nn.Embedding(60, 4, sparse=True)
    torch.nn.init.normal_(emb.weight, std=1.0)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=0.05)
    for ids, target in batches:
        opt.zero_grad(set_to_none=True)
        ((emb(ids) - target) ** 2).mean().backward()
        opt.step()
    assert torch.equal(_train_table("sparse", 0.0, batches), emb.weight.detach())


def test_a_lazy_adam_state_saved_without_weight_decay_still_loads():
    """States saved before the key existed (no decay then) keep working, also across paths."""
    table = torch.nn.Parameter(torch.ones(3, 2))
    old = LazyAdam([table], lr=0.1)
    table.grad = torch.ones(3, 2)
    old.step()
    state = old.state_dict()
    del state["param_groups"][0]["weight_decay"]
    new = LazyAdam([table], lr=0.1, weight_decay=1.0)
    new.load_state_dict(state)
    new.step()  # no KeyError; the saved group (no decay) wins, as for every other hyper-parameter
    sparse = SparseAdamW([table], lr=0.1, weight_decay=0.0)
    sparse.load_state_dict(state)
    assert sparse.param_groups[0]["lr"] == 0.1


def test_invalid_weight_decay_is_refused():
    table = torch.nn.Parameter(torch.ones(3, 2))
    for cls in (LazyAdam, SparseAdamW):
        for bad in (-0.1, float("nan")):
            with pytest.raises(ValueError, match="weight_decay"):
                cls([table], lr=0.1, weight_decay=bad)


# --------------------------------------------------------------------------- learning-rate schedule


def test_lr_factor_follows_warmup_then_cosine_or_linear_decay():
    kw = {"warmup_steps": 4, "total_steps": 14, "min_lr_ratio": 0.2}
    # Warm-up: the k-th update (step k - 1) runs at k / 4 of the rate.
    assert [lr_factor(s, decay="cosine", **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, decay="cosine", **kw) == 1.0  # the decay starts from the full rate
    assert lr_factor(9, decay="cosine", **kw) == pytest.approx(0.2 + 0.8 * 0.5)  # half way: the cosine's middle
    assert lr_factor(9, decay="linear", **kw) == pytest.approx(0.6)
    assert lr_factor(6, decay="cosine", **kw) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_factor(6, decay="linear", **kw) == pytest.approx(0.2 + 0.8 * 0.8)
    for decay in ("cosine", "linear"):
        assert lr_factor(14, decay=decay, **kw) == pytest.approx(0.2)  # the end ...
        assert lr_factor(100, decay=decay, **kw) == pytest.approx(0.2)  # ... and after it
    assert [lr_factor(s, decay="none", **kw) for s in (0, 3, 4, 50)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_factor(0, decay="none", warmup_steps=0, total_steps=0, min_lr_ratio=0.0) == 1.0
    with pytest.raises(ValueError, match="decay"):
        lr_factor(0, decay="step", **kw)


def test_schedulers_set_every_optimizers_rate_per_step():
    dense, table = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(5, 2))
    extra = torch.nn.Parameter(torch.zeros(2))
    opts = [torch.optim.Adam([dense], lr=1e-3), LazyAdam([table], lr=1e-2)]
    opts[0].add_param_group({"params": [extra], "weight_decay": 0.0})
    kw = {"warmup_steps": 2, "decay": "linear", "total_steps": 6, "min_lr_ratio": 0.0}
    schedulers = make_lr_schedulers(opts, **kw)
    assert len(schedulers) == 2
    seen = []
    for step in range(8):
        seen.append([g["lr"] for o in opts for g in o.param_groups])
        expected = lr_factor(step, **kw)
        assert seen[-1] == pytest.approx([1e-3 * expected, 1e-3 * expected, 1e-2 * expected]), step
        for p in (dense, table, extra):
            p.grad = torch.ones_like(p)
        for o in opts:
            o.step()
        for s in schedulers:
            s.step()
    assert [row[2] for row in seen][:7] == pytest.approx([5e-3, 1e-2, 1e-2, 7.5e-3, 5e-3, 2.5e-3, 0.0])
    assert make_lr_schedulers(opts, warmup_steps=0, decay="none", total_steps=6, min_lr_ratio=0.0) == []


# --------------------------------------------------------------------------- config


def _raw(**train):
    return {
        "data": {"train": "x.parquet"},
        "features": synthetic_features(),
        "tasks": synthetic_tasks(),
        "model": {"name": "mmoe", "embedding_dim": 8},
        "train": train,
    }


def test_the_recipe_defaults_are_todays_behaviour():
    t = config_from_dict(_raw()).train
    assert (t.embedding_weight_decay, t.warmup_steps, t.lr_decay, t.min_lr_ratio) == (0.0, 0, "none", 0.0)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("embedding_weight_decay", -1.0, "train.embedding_weight_decay: expected >= 0"),
        ("embedding_weight_decay", float("inf"), "train.embedding_weight_decay: expected a finite number >= 0"),
        ("warmup_steps", -1, "train.warmup_steps: expected >= 0"),
        ("warmup_steps", 1.5, "train.warmup_steps: expected int"),
        ("lr_decay", "step", "train.lr_decay: expected 'none' or 'cosine' or 'linear'"),
        ("min_lr_ratio", 1.5, "train.min_lr_ratio: expected a number in [0, 1]"),
        ("min_lr_ratio", float("nan"), "train.min_lr_ratio: expected a finite number in [0, 1]"),
    ],
)
def test_the_recipe_keys_are_range_checked(key, value, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(_raw(**{key: value}))
    assert str(err.value).startswith(message)


def test_make_optimizers_passes_the_embedding_weight_decay_to_either_path():
    from mtrec.model_dir import build_model
    from mtrec.schema import InputLayout

    layout = InputLayout((30, 20), (0, 1), (), (), (), 0)
    raw = _raw(embedding_weight_decay=0.3)
    raw["features"] = {"sparse": [{"name": "user_id"}, {"name": "item_id"}]}
    cfg = config_from_dict(raw)
    model = build_model(cfg, layout)
    for sparse, cls in ((True, SparseAdamW), (False, LazyAdam)):
        model.use_sparse_embedding_grads(sparse)
        embedding_opt = make_optimizers(model, cfg)[-1]
        assert type(embedding_opt) is cls and embedding_opt.param_groups[0]["weight_decay"] == 0.3


# --------------------------------------------------------------------------- in the trainer


@pytest.fixture(scope="module")
def clicks(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "clicks.parquet"
    write_click_log(path, 6000, seed=4)
    return path


def _config(data: Path, embedding: str = "auto", **train_keys):
    keys = {"epochs": 3, "batch_size": 512, "seed": 3, "threads": 1, "patience": 5, "embedding_optimizer": embedding}
    raw = _raw(**{**keys, **train_keys})
    raw["data"] = {"train": str(data), "mode": "memory"}
    raw["model"] = {"name": "mmoe", "embedding_dim": 8, "expert_hidden": [32], "tower_hidden": [8], "dropout": 0.1}
    return config_from_dict(raw)


RECIPE = {"warmup_steps": 5, "lr_decay": "cosine", "min_lr_ratio": 0.1, "embedding_weight_decay": 0.5}


def test_the_trainer_steps_the_schedule_per_step_and_saves_it(clicks, tmp_path):
    cfg = _config(clicks, **RECIPE)
    seen = []

    def capture(record):
        state = load_resume_state(tmp_path / "m.incomplete")
        seen.append((record["epoch"], state["schedulers"], state["optimizers"]))

    train(cfg, output=tmp_path / "m", progress=False, on_epoch=capture)
    steps_per_epoch = math.ceil(5400 / 512)  # 10 % of 6000 rows held out for validation
    total = 3 * steps_per_epoch
    for epoch, schedulers, optimizers in seen:
        done = epoch * steps_per_epoch
        assert [s["last_epoch"] for s in schedulers] == [done, done]
        factor = lr_factor(done, warmup_steps=5, decay="cosine", total_steps=total, min_lr_ratio=0.1)
        dense_lr, embedding_lr = (o["param_groups"][0]["lr"] for o in optimizers)
        assert dense_lr == pytest.approx(1e-3 * factor) and embedding_lr == pytest.approx(1e-2 * factor)
    assert seen[-1][1][0]["last_epoch"] == total
    assert lr_factor(total, warmup_steps=5, decay="cosine", total_steps=total, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_without_a_schedule_the_resume_state_holds_no_scheduler(clicks, tmp_path):
    states = []
    train(
        _config(clicks, epochs=1),
        output=tmp_path / "m",
        progress=False,
        on_epoch=lambda r: states.append(load_resume_state(tmp_path / "m.incomplete")),
    )
    assert states[0]["schedulers"] == []
    assert states[0]["optimizers"][0]["param_groups"][0]["lr"] == 1e-3


@pytest.mark.parametrize("embedding", ["sparse", "dense"])
def test_a_resumed_run_with_the_recipe_equals_the_uninterrupted_run(clicks, tmp_path, embedding):
    cfg = _config(clicks, embedding, **RECIPE)
    whole = train(cfg, output=tmp_path / "whole", progress=False)

    def interrupt(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, output=tmp_path / "cut", progress=False, on_epoch=interrupt)
    assert has_resume_state(tmp_path / "cut.incomplete")
    resumed = train(cfg, output=tmp_path / "cut", progress=False, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in whole.history]
    assert resumed.best_metrics == whole.best_metrics
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log if r["event"] != "step"] == ["start", "epoch", "resume", "epoch", "epoch", "end"]


def test_a_state_without_the_schedule_does_not_resume_into_one(clicks, tmp_path):
    def interrupt(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(clicks), output=tmp_path / "cut", progress=False, on_epoch=interrupt)
    from mtrec.errors import ModelError

    with pytest.raises(ModelError, match="0 learning-rate scheduler state"):
        train(_config(clicks, lr_decay="linear"), output=tmp_path / "cut", progress=False, resume=True)


def test_the_schedule_and_the_decay_add_no_host_sync_to_a_step(clicks, tmp_path):
    cfg = _config(clicks, "dense", epochs=1, **RECIPE)
    with HostSyncCounter() as counter:
        train(cfg, output=tmp_path / "m", progress=False)
    assert counter.steps == math.ceil(5400 / 512)
    assert counter.per_step() == {}
