"""CUDA paths: resident training data, prefetched batches, bf16 training. Skipped without a GPU."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrec.config import config_from_dict
from mtrec.data.batches import TensorColumns, prefetch_to_device
from mtrec.data.preprocess import EncodedColumns
from mtrec.data.synthetic import write_click_log
from mtrec.quickstart import synthetic_features, synthetic_tasks
from mtrec.training import train
from mtrec.training.profiling import STEP_RANGE, HostSyncCounter

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _columns(rows: int) -> TensorColumns:
    rng = np.random.default_rng(0)
    enc = EncodedColumns(
        rng.integers(0, 100, (rows, 3)),
        rng.random((rows, 2), dtype=np.float32),
        [],
        np.zeros((rows, 0), np.int64),
        rng.random((rows, 2), dtype=np.float32),
        np.ones((rows, 2), bool),
    )
    return TensorColumns.from_encoded(enc)


def test_prefetched_batches_equal_the_host_batches():
    cols = _columns(10_000)
    device = torch.device("cuda")
    host = list(cols.iter_batches(1000))
    moved = list(prefetch_to_device(cols.iter_batches(1000), device, depth=3))
    assert len(moved) == len(host)
    for a, b in zip(host, moved, strict=True):
        assert b.sparse.device.type == "cuda"
        assert torch.equal(a.sparse, b.sparse.cpu()) and torch.equal(a.dense, b.dense.cpu())


def test_prefetch_raises_errors_of_the_source_in_the_consumer():
    def broken():
        yield from _columns(100).iter_batches(50)
        raise ValueError("row group 3 cannot be decoded")

    with pytest.raises(ValueError, match="row group 3"):
        list(prefetch_to_device(broken(), torch.device("cuda")))


@pytest.mark.parametrize("share", [0.5, 0.0])
def test_training_on_the_gpu_matches_the_cpu_run(tmp_path: Path, share: float):
    data = tmp_path / "clicks.parquet"
    write_click_log(data, 30_000, seed=1)

    def config(device: str):
        return config_from_dict(
            {
                "data": {"train": str(data), "mode": "memory"},
                "features": synthetic_features(),
                "tasks": synthetic_tasks(),
                "model": {"name": "mmoe", "embedding_dim": 8, "expert_hidden": [64], "tower_hidden": [16]},
                "train": {"epochs": 2, "batch_size": 1024, "device": device, "gpu_data_share": share, "seed": 2},
            }
        )

    log = io.StringIO()
    gpu = train(config("cuda"), output=tmp_path / "gpu", stream=log)
    cpu = train(config("cpu"), output=tmp_path / "cpu", progress=False)
    assert ("resident on the GPU" in log.getvalue()) == (share > 0)
    meta = json.loads((tmp_path / "gpu" / "meta.json").read_text())
    assert meta["precision"] == "bf16 autocast"
    assert meta["embedding_optimizer"] == "dense"  # a small table on CUDA: LazyAdam, no host sync
    for task in ("ctr", "cvr", "satisfaction"):
        assert gpu.best_metrics[task]["count"] == cpu.best_metrics[task]["count"]
    assert abs(gpu.best_metrics["ctr"]["auc"] - cpu.best_metrics["ctr"]["auc"]) < 0.03


def test_training_steps_on_the_gpu_never_wait_for_the_device(tmp_path: Path):
    """CUDA's own sync detector, over the trainer's steps (the first one may set things up)."""
    data = tmp_path / "clicks.parquet"
    write_click_log(data, 20_000, seed=1)
    cfg = config_from_dict(
        {
            "data": {"train": str(data), "mode": "memory"},
            "features": synthetic_features(),
            "tasks": synthetic_tasks(),
            "model": {"name": "mmoe", "embedding_dim": 8},
            "train": {"epochs": 1, "batch_size": 1024, "device": "cuda", "gpu_data_share": 0.5, "seed": 2},
        }
    )
    hits: list[tuple[int, str]] = []  # (step, message) of syncs inside training steps
    outside: list[str] = []
    with HostSyncCounter() as counter, warnings.catch_warnings():
        warnings.simplefilter("always")

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return
            if counter._in_step():
                hits.append((counter.steps, str(message)))
            else:
                outside.append(str(message))

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            # The detector and the hook work: a sync inside a (marked) step is caught.
            with torch.profiler.record_function(STEP_RANGE):
                torch.ones(1, device="cuda").item()
            assert len(hits) == 1, hits
            hits.clear()
            train(cfg, output=tmp_path / "m", progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert counter.steps > 10
    assert outside, "validation copies predictions to the host: the detector must have seen it"
    # The first training step may set things up (e.g. optimiser state); none after it.
    assert [h for h in hits if h[0] > 2] == []
