"""Faults mid-run keep the last good epoch, and --resume continues it to the uninterrupted result."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtrec.config import config_from_dict
from mtrec.data.synthetic import write_click_log
from mtrec.errors import MtrecError
from mtrec.model_dir import _pack, _unpack, has_resume_state
from mtrec.quickstart import synthetic_features, synthetic_tasks
from mtrec.training import train
from tests.integration.helpers import mtrec

# DSelect-k gates with both penalties and HoME's batch-normalised experts (running statistics).
GATED = {"gate": "dselect_k", "gate_entropy": 0.01, "expert_balance": 0.1, "expert_norm": True}


def _config(data: Path, mode: str, weighting: str = "fixed", embedding: str = "auto"):
    gated = GATED if weighting == "famo" else {}
    return config_from_dict(
        {
            "data": {"train": str(data), "mode": mode, "shuffle_buffer": 4096},
            "features": synthetic_features(),
            "tasks": synthetic_tasks(),
            "model": {
                "name": "mmoe",
                "embedding_dim": 8,
                "expert_hidden": [32],
                "tower_hidden": [8],
                "dropout": 0.1,
                **gated,
            },
            "train": {
                "epochs": 3,
                "batch_size": 512,
                "seed": 3,
                "threads": 1,
                "patience": 5,
                "loss_weighting": {"name": weighting},
                "embedding_optimizer": embedding,
            },
        }
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("resume") / "data"
    folder.mkdir()
    for i in range(3):
        write_click_log(folder / f"part-{i}.parquet", 6000, seed=1, sample_seed=i, row_group_size=2000)
    return sorted(folder.glob("*.parquet"))


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize(
    ("mode", "weighting", "embedding"),
    [
        ("stream", "fixed", "auto"),
        ("memory", "dwa", "auto"),
        ("memory", "fixed", "dense"),
        ("memory", "rlw", "auto"),
        ("memory", "famo", "auto"),  # FAMO's logits and their Adam state, on a gated model (GATED)
    ],
)
def test_resumed_run_equals_the_uninterrupted_run(files, tmp_path, mode, weighting, embedding):
    data = files[0].parent
    whole = train(_config(data, mode, weighting, embedding), output=tmp_path / "whole", progress=False)

    def interrupt(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt  # the process is stopped after epoch 1 was saved

    with pytest.raises(KeyboardInterrupt):
        train(_config(data, mode, weighting, embedding), output=tmp_path / "cut", progress=False, on_epoch=interrupt)
    staging = tmp_path / "cut.incomplete"
    assert has_resume_state(staging) and not (tmp_path / "cut").exists()
    with pytest.raises(MtrecError, match="holds an interrupted run; continue it with `mtrec train --resume"):
        train(_config(data, mode, weighting), output=tmp_path / "cut", progress=False)
    assert has_resume_state(staging)  # starting again by mistake destroys nothing

    other = "memory" if mode == "stream" else "stream"
    with pytest.raises(MtrecError, match=f"resume it the same way \\(now 1, {other}\\)"):
        train(_config(data, other, weighting, embedding), output=tmp_path / "cut", progress=False, resume=True)

    # As if the process died between saving the state and the best weights of epoch 1.
    (staging / "model.safetensors").unlink()
    resumed = train(_config(data, mode, weighting, embedding), output=tmp_path / "cut", progress=False, resume=True)
    assert not staging.exists()
    assert not (tmp_path / "cut" / "resume").exists()  # optimiser moments are not part of the model
    assert resumed.best_epoch == whole.best_epoch
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in whole.history]
    assert resumed.best_metrics == whole.best_metrics
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log if r["event"] != "step"] == ["start", "epoch", "resume", "epoch", "epoch", "end"]


@pytest.mark.parametrize(("first", "then"), [("dense", "sparse"), ("sparse", "dense")])
def test_a_run_continues_with_the_other_embedding_update(files, tmp_path, first, then):
    """E.g. a dense-gradient run (the GPU default) resumed with sparse Adam (the CPU
    default): both keep the same optimiser state and apply the same update."""
    data = files[0].parent
    whole = train(_config(data, "memory", embedding=first), output=tmp_path / "whole", progress=False)

    def interrupt(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(data, "memory", embedding=first), output=tmp_path / "cut", progress=False, on_epoch=interrupt)
    resumed = train(_config(data, "memory", embedding=then), output=tmp_path / "cut", progress=False, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for a, b in zip(resumed.history, whole.history, strict=True):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-4)
    for task in ("ctr", "cvr", "satisfaction"):
        assert abs(resumed.best_metrics[task]["auc"] - whole.best_metrics[task]["auc"]) < 1e-3
    meta = json.loads((tmp_path / "cut" / "meta.json").read_text())
    assert meta["embedding_optimizer"] == then  # what the process that finished the run used


def test_a_file_that_disappears_mid_run_keeps_the_last_good_epoch(files, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(files[0].parent, data)
    victim = sorted(data.glob("*.parquet"))[1]
    moved = tmp_path / "moved.parquet"

    def vanish(record):
        if record["epoch"] == 1:
            victim.rename(moved)

    with pytest.raises(MtrecError) as err:
        train(_config(data, "stream"), output=tmp_path / "m", progress=False, on_epoch=vanish)
    message = str(err.value)
    assert victim.name in message and "mtrec train --resume" in message
    assert len(message.splitlines()) == 1
    staging = tmp_path / "m.incomplete"
    assert has_resume_state(staging) and (staging / "model.safetensors").is_file()

    moved.rename(victim)
    result = train(_config(data, "stream"), output=tmp_path / "m", progress=False, resume=True)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert (tmp_path / "m" / "metrics.json").is_file()


def test_cli_resume_continues_and_refuses_what_it_cannot(files, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(files[0].parent, data)

    proc = mtrec("train", "--resume", str(tmp_path / "none"))
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr
    # A run that stopped after epoch 1: made with the Python API, continued by the CLI.
    cfg = _config(data, "stream")

    def stop(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, output=tmp_path / "m", progress=False, on_epoch=stop)
    proc = mtrec("train", "--resume", str(tmp_path / "m"), "--set", "train.epochs=9")
    assert proc.returncode == 2 and "drop --config, --set, --output and --init-from" in proc.stderr
    proc = mtrec("train", "--resume", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr
    assert "resuming after epoch 1" in proc.stderr and "epoch 3/3" in proc.stderr
    assert json.loads((tmp_path / "m" / "meta.json").read_text())["best_epoch"] in (1, 2, 3)


def test_state_packing_round_trips_without_pickle():
    state = {
        "epoch": 2,
        3: [torch.arange(4), (1.5, None, "x")],
        "nested": {"t": torch.ones(2, 2, dtype=torch.bfloat16), "flag": True},
    }
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _pack(state, tensors)
    json.dumps(skeleton)  # everything but the tensors is plain JSON
    back = _unpack(skeleton, tensors)
    assert back["epoch"] == 2 and back[3][1] == (1.5, None, "x")
    assert torch.equal(back[3][0], torch.arange(4)) and back["nested"]["t"].dtype == torch.bfloat16
    with pytest.raises(TypeError, match="cannot save a set"):
        _pack({"s": {1, 2}}, {})


def test_an_interrupted_warm_start_resumes_to_the_uninterrupted_result(files, tmp_path):
    """init_from.json is written with the run's first files: the unfinished folder stays one that
    mtrec owns, so it resumes (and the result equals the run that was not interrupted)."""
    source = tmp_path / "source"
    train(
        dataclasses.replace(
            _config(files[0], "memory"), train=dataclasses.replace(_config(files[0], "memory").train, epochs=1)
        ),
        output=source,
        progress=False,
    )
    cfg = _config(files[0], "memory")
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train, init_from=str(source), freeze=("embedding",), init_lr_scale=0.5, init_from_preprocessing="reuse"
        ),
    )
    whole = train(cfg, output=tmp_path / "whole", progress=False)

    def stop(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, output=tmp_path / "cut", progress=False, on_epoch=stop)
    assert (tmp_path / "cut.incomplete" / "init_from.json").is_file()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, output=tmp_path / "again", progress=False, on_epoch=stop)
    train(cfg, output=tmp_path / "again", progress=False, overwrite=True)  # starting over replaces it
    source.rename(tmp_path / "moved")  # resuming needs init_from.json, not the source
    resumed = train(cfg, output=tmp_path / "cut", progress=False, resume=True)
    assert resumed.history[-1]["valid"] == whole.history[-1]["valid"]
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(
        a["features.embedding.weight"], load_file(tmp_path / "moved" / "model.safetensors")["features.embedding.weight"]
    )
