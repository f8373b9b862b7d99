"""The training step never makes the host wait for the device (checked on the CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mtrec.config import config_from_dict
from mtrec.data.synthetic import write_click_log
from mtrec.errors import MtrecError
from mtrec.quickstart import synthetic_features, synthetic_tasks
from mtrec.training import DENSE_EMBEDDING_MAX_VALUES, resolve_embedding_optimizer, train
from mtrec.training.profiling import BOOLEAN_INDEXING, STEP_RANGE, HostSyncCounter


@pytest.fixture(scope="module")
def clicks(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("syncs") / "clicks.parquet"
    write_click_log(path, 6000, seed=2)
    return path


GATED = {"gate": "dselect_k", "gate_entropy": 0.01, "expert_balance": 0.1, "expert_norm": True}


def _config(data: Path, model: str = "mmoe", *, esmm: bool = False, model_keys: dict | None = None, **train_keys):
    raw = {
        "data": {"train": str(data), "mode": "memory"},
        "features": synthetic_features(),
        "tasks": synthetic_tasks(),
        "model": {"name": model, "embedding_dim": 8, **(model_keys or {})},
        "train": {"epochs": 1, "batch_size": 1024, "seed": 0, "threads": 1, **train_keys},
    }
    if esmm:
        raw["esmm"] = {"ctr": "ctr", "cvr": "cvr", "name": "ctcvr"}
    return config_from_dict(raw)


def _syncs(cfg, out: Path) -> tuple[HostSyncCounter, dict]:
    with HostSyncCounter() as counter:
        train(cfg, output=out, progress=False)
    return counter, json.loads((out / "meta.json").read_text())


def test_the_counter_sees_host_reads_and_sync_operators_only_inside_steps():
    x = torch.tensor([1.0, -2.0, 3.0])
    with HostSyncCounter() as counter:
        for _ in range(2):
            with torch.profiler.record_function(STEP_RANGE):
                loss = x.abs().sum()
                _ = float(loss)
                _ = x[x > 0]  # boolean indexing: nonzero in the kernel
                _ = torch.where(x > 0, x, 0.0)  # the same selection without a sync
                _ = x * torch.tensor([1.0, 2.0, 3.0])  # Python numbers copied to the device
                with torch.profiler.record_function("inner"):  # a nested range stays inside the step
                    _ = loss.item()
        _ = float(loss)  # outside any step
    assert counter.steps == 2
    assert counter.per_step() == {
        "Tensor.__float__": 1.0,
        "Tensor.item": 1.0,
        "aten::lift_fresh": 1.0,
        BOOLEAN_INDEXING: 1.0,
    }


@pytest.mark.parametrize(
    ("model", "esmm", "keys"),
    [
        ("mmoe", False, {}),
        ("ple", False, {"grad_clip": 1.0}),
        ("mmoe", True, {"loss_weighting": {"name": "dwa"}}),
        ("shared_bottom", False, {"loss_weighting": {"name": "uncertainty"}}),
        ("ple", False, {"model_keys": GATED}),
    ],
    ids=["mmoe", "ple-grad_clip", "esmm-dwa", "shared_bottom-uncertainty", "ple-gated"],
)
def test_a_training_step_with_dense_embedding_gradients_has_no_host_sync(clicks, tmp_path, model, esmm, keys):
    counter, meta = _syncs(_config(clicks, model, esmm=esmm, embedding_optimizer="dense", **keys), tmp_path / "m")
    assert meta["embedding_optimizer"] == "dense"
    assert counter.steps == 6  # 5400 training rows in batches of 1024
    assert counter.per_step() == {}


def test_rlw_reads_only_its_draw_from_a_host_generator(clicks, tmp_path):
    counter, _ = _syncs(_config(clicks, embedding_optimizer="dense", loss_weighting={"name": "rlw"}), tmp_path / "m")
    assert counter.per_step() == {"Tensor.tolist": 1.0}  # the CPU generator's draw: no GPU wait


def test_famo_reads_only_its_adams_step_count_a_host_tensor(clicks, tmp_path):
    cfg = _config(clicks, embedding_optimizer="dense", loss_weighting={"name": "famo"})
    counter, _ = _syncs(cfg, tmp_path / "m")
    # torch's Adam reads its step count, a CPU tensor (no GPU wait), from the second step on
    # (the first step has no earlier loss to compare with and leaves the logits alone), and
    # makes that count once, at its first step (a CPU tensor again: no copy to a GPU)
    assert counter.per_step() == {"Tensor.item": 5 / 6, "aten::lift_fresh": 1 / 6}


def test_sparse_embedding_gradients_cost_one_coalesce_per_step(clicks, tmp_path):
    counter, meta = _syncs(_config(clicks, embedding_optimizer="sparse"), tmp_path / "m")
    assert meta["embedding_optimizer"] == "sparse"
    assert counter.per_step() == {"aten::_coalesce": 1.0}


def test_sparse_and_dense_embedding_gradients_train_the_same_model(clicks, tmp_path):
    a = train(_config(clicks, embedding_optimizer="sparse", epochs=2), output=tmp_path / "s", progress=False)
    b = train(_config(clicks, embedding_optimizer="dense", epochs=2), output=tmp_path / "d", progress=False)
    for task in ("ctr", "cvr", "satisfaction"):
        assert abs(a.best_metrics[task]["auc"] - b.best_metrics[task]["auc"]) < 1e-3
    for ha, hb in zip(a.history, b.history, strict=True):
        assert math.isclose(ha["train_loss"], hb["train_loss"], rel_tol=1e-4)


def test_auto_picks_dense_gradients_only_for_one_process_and_moderate_tables_on_cuda(clicks, tmp_path):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_embedding_optimizer("auto", cuda, DENSE_EMBEDDING_MAX_VALUES) == "dense"
    assert resolve_embedding_optimizer("auto", cuda, DENSE_EMBEDDING_MAX_VALUES + 1) == "sparse"
    assert resolve_embedding_optimizer("auto", cpu, 10) == "sparse"
    assert resolve_embedding_optimizer("dense", cpu, 10**9) == "dense"
    # Under DDP a dense table would be all-reduced whole every step: the touched rows only.
    assert resolve_embedding_optimizer("auto", cuda, 10, world_size=2) == "sparse"
    _, meta = _syncs(_config(clicks), tmp_path / "m")
    assert meta["embedding_optimizer"] == "sparse"  # this machine has no GPU


def test_a_diverging_run_stops_with_one_line(clicks, tmp_path):
    cfg = _config(clicks, lr=1e30, embedding_lr=1e30, log_every=2)
    with pytest.raises(MtrecError, match=r"training diverged in epoch 1 by step \d+ \(loss (nan|inf)\)") as err:
        train(cfg, output=tmp_path / "m", progress=False)
    assert "lower train.lr" in str(err.value) and len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "m").exists()
