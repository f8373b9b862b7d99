"""``train.tensorboard``: the training log as TensorBoard scalars, read back from the event files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mtrec.config import config_from_dict
from mtrec.data.synthetic import write_click_log
from mtrec.errors import ConfigError
from mtrec.quickstart import synthetic_features, synthetic_tasks
from mtrec.training import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


@pytest.fixture(scope="module")
def clicks(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tb") / "clicks.parquet"
    write_click_log(path, 5000, seed=2)
    return path


def _config(data: Path, tensorboard: Path, **train_keys):
    keys = {"epochs": 2, "batch_size": 512, "seed": 1, "threads": 1, "log_every": 3, "tensorboard": str(tensorboard)}
    return config_from_dict(
        {
            "data": {"train": str(data), "mode": "memory"},
            "features": synthetic_features(),
            "tasks": synthetic_tasks(),
            "model": {"name": "mmoe", "embedding_dim": 8, "expert_hidden": [16], "tower_hidden": [8]},
            "train": {**keys, **train_keys},
        }
    )


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_losses_metrics_weights_and_gate_entropy_are_written_per_step_and_epoch(clicks, tmp_path):
    board = tmp_path / "board"
    out = tmp_path / "m"
    train(_config(clicks, board, loss_weighting={"name": "rlw"}), output=out, progress=False)
    scalars = _scalars(board)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if r["event"] == "epoch"]
    steps = [r for r in log if r["event"] == "step"]
    # Epoch scalars equal the log's, at the last step of each epoch.
    auc = scalars["valid/ctr/auc"]
    assert [v for _, v in auc] == pytest.approx([e["valid"]["ctr"]["auc"] for e in epochs], rel=1e-6)
    assert scalars["valid/loss"][-1][1] == pytest.approx(epochs[-1]["valid_loss"], rel=1e-6)
    assert {"train/loss/ctr", "train/loss/cvr", "train/loss/satisfaction", "valid/cvr/auc"} <= set(scalars)
    per_epoch = auc[1][0] - auc[0][0]
    assert per_epoch > 0 and auc[0][0] == per_epoch  # the global step: updates since the start
    # Step scalars every log_every steps, with the loss weighting's weights (RLW: new each step).
    step_losses = [v for s, v in scalars["train/loss"] if s % per_epoch]
    assert step_losses == pytest.approx([r["loss"] for r in steps if r["step"] % per_epoch], rel=1e-6)
    rlw = [v for _, v in scalars["weights/ctr"]]
    assert len(rlw) == len(steps) + len(epochs) and len(set(rlw)) > 1
    # MMoE's gates: the entropy share of each task's gate, in (0, 1].
    shares = scalars["gates/ctr/entropy_share"]
    assert len(shares) == len(epochs) and all(0 < v <= 1 + 1e-6 for _, v in shares)
    assert "gates/expert_similarity" in scalars


def test_a_directory_that_cannot_be_written_fails_before_training(clicks, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = tmp_path / "m"
    with pytest.raises(ConfigError, match=r"^train.tensorboard: .*file.* cannot be written"):
        train(_config(clicks, blocker / "board"), output=out, progress=False)
    assert not out.exists()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="cannot be written"):
            train(_config(clicks, locked), output=out, progress=False)
        assert not out.exists()


def test_the_key_defaults_to_off_and_is_saved_with_the_config(clicks, tmp_path):
    from mtrec.config import config_to_dict

    raw = config_to_dict(_config(clicks, tmp_path / "b"))
    assert raw["train"]["tensorboard"] == str(tmp_path / "b")
    raw["train"].pop("tensorboard")
    assert config_from_dict(raw).train.tensorboard is None
