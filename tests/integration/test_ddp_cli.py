"""`torchrun --nproc-per-node 2 -m mtrec train` on CPU (gloo) against one process, same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from mtrec.data.synthetic import write_click_log

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
    pytest.mark.slow,
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SETS = [
    "train.epochs=2",
    "train.batch_size=1024",
    "train.threads=1",
    "train.seed=4",
    "model.expert_hidden=[32]",
    "model.tower_hidden=[8]",
    "model.embedding_dim=8",
    "data.shuffle_buffer=8192",
]


def _train(data: Path, out: Path, *launcher: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    sets = [f"--set={s}" for s in [f"data.train={data}", "data.mode=stream", *SETS, *extra]]
    cmd = [*launcher, "-m", "mtrec", "train", "--config", "configs/synthetic/mmoe.yaml", *sets, "--output", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


@pytest.fixture(scope="module")
def clicks(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "clicks.parquet"
    write_click_log(path, 40_000, seed=2, row_group_size=4096)
    return path


def test_two_ranks_match_one_process_and_write_one_model_directory(clicks: Path, tmp_path: Path):
    single = _train(clicks, tmp_path / "single", sys.executable)
    assert single.returncode == 0, single.stderr
    ddp = _train(clicks, tmp_path / "ddp", *TORCHRUN)
    assert ddp.returncode == 0, ddp.stderr
    assert "training rows on 2 ranks" in ddp.stderr
    # Only rank 0 reports: each epoch line once.
    assert ddp.stderr.count("epoch 1/2:") == 1

    # Exactly one complete model directory, no leftovers.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "start" for r in log) == 1

    one = json.loads((tmp_path / "single" / "metrics.json").read_text())
    two = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    meta1 = json.loads((tmp_path / "single" / "meta.json").read_text())
    meta2 = json.loads((tmp_path / "ddp" / "meta.json").read_text())
    # Same preprocessing and the same validation rows, gathered from both ranks (exact, not averaged).
    assert meta2["layout"] == meta1["layout"] and meta2["valid_rows"] == meta1["valid_rows"]
    for task in ("ctr", "cvr", "satisfaction"):
        assert two["best"][task]["count"] == one["best"][task]["count"]
    # The ranks see the rows in another order, so the runs differ a little, not more.
    assert abs(two["best"]["ctr"]["auc"] - one["best"]["ctr"]["auc"]) < 0.03
    losses1 = [h["train_loss"] for h in one["history"]]
    losses2 = [h["train_loss"] for h in two["history"]]
    assert losses2 == pytest.approx(losses1, rel=0.05)
    assert two["best"]["ctr"]["auc"] > 0.55


def test_bad_input_on_every_rank_ends_the_job_with_one_line(clicks: Path, tmp_path: Path):
    proc = _train(clicks, tmp_path / "m", *TORCHRUN, extra=("features.dense.0.name=no_such_column",))
    # As the README says: torchrun reports the failed ranks itself (exit 1, its own summary),
    # after the one line that names the cause.
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("mtrec: error:")]
    assert errors and all("no_such_column" in lines[i] for i in errors)
    later = [i for i, line in enumerate(lines) if "Traceback" in line or "ChildFailedError" in line]
    assert all(i > errors[0] for i in later)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.incomplete").exists()


def test_a_global_batch_that_does_not_split_is_refused(clicks: Path, tmp_path: Path):
    proc = _train(clicks, tmp_path / "m", *TORCHRUN, extra=("train.batch_size=1023",))
    assert proc.returncode != 0
    assert "train.batch_size: 1023 is the global batch and must divide evenly among 2 ranks" in proc.stderr
