"""``mtrec tune`` as a user runs it: a real CLI process, tiny data, a fixed sampler seed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from helpers import assert_one_line_error, mtrec  # noqa: I001 - the integration tests' own helpers

pytest.importorskip("optuna")

BASE = [
    "--set=train.epochs=2",
    "--set=model.expert_hidden=[16]",
    "--set=model.tower_hidden=[8]",
    "--set=train.threads=1",
    "--set=train.batch_size=512",
]
SPACE = {
    "space": {
        "train.lr": {"type": "log", "low": 1.0e-4, "high": 1.0e-2},
        "model.num_experts": {"type": "int", "low": 2, "high": 4},
        "train.loss_weighting": {"type": "categorical", "choices": [{"name": "fixed"}, {"name": "rlw"}]},
    },
    "objective": {"weights": {"ctr.auc": 1.0, "satisfaction.auc": 0.5}},
}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune")
    proc = mtrec("datasets", "synthetic", "--rows", "8000", "--seed", "2", "--output", str(root / "clicks.parquet"))
    assert proc.returncode == 0, proc.stderr
    return root


def _tune(work: Path, space: dict, trials: int, out: str = "study", *extra: str):
    path = work / f"{out}-space.yaml"
    path.write_text(yaml.safe_dump(space))
    return mtrec(
        "tune", "--config", "configs/synthetic/mmoe.yaml", "--space", str(path), "--trials", str(trials),
        "--output", str(work / out), f"--set=data.train={work / 'clicks.parquet'}", *BASE, *extra,
    )  # fmt: skip


def test_tune_writes_trials_best_config_and_continues_a_study(work: Path):
    proc = _tune(work, SPACE, 3)
    assert proc.returncode == 0, proc.stderr
    out = work / "study"
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["trials"]) == 3 and summary["new_trials"] == 3
    values = [t["value"] for t in summary["trials"] if t["state"] == "complete"]
    assert summary["best"]["value"] == max(values)
    # Each trial is a model directory whose validation metrics give its value.
    for t in summary["trials"]:
        if t["state"] != "complete":
            continue
        metrics = json.loads((out / f"trial-{t['trial']:04d}" / "metrics.json").read_text())
        kept = metrics["best"]  # the epoch the directory keeps (best by train.monitor)
        assert t["value"] == pytest.approx(kept["ctr"]["auc"] + 0.5 * kept["satisfaction"]["auc"])
    # best.yaml is the best trial's whole config: its drawn values, accepted by mtrec train.
    best = yaml.safe_load((out / "best.yaml").read_text())
    params = summary["best"]["params"]
    assert best["train"]["lr"] == pytest.approx(params["train.lr"])
    assert best["model"]["num_experts"] == params["model.num_experts"]
    assert best["train"]["loss_weighting"]["name"] == params["train.loss_weighting"]["name"]
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["trial"] for r in rows] == ["0", "1", "2"] and (out / "importance.png").stat().st_size > 0
    # The same command again continues the study: new trials, new draws.
    proc = _tune(work, SPACE, 1)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["trials"]) == 4 and summary["new_trials"] == 1
    drawn = [json.dumps({k: t[k] for k in SPACE["space"]}, sort_keys=True) for t in summary["trials"]]
    assert len(set(drawn)) == 4
    proc = mtrec("train", "--config", str(out / "best.yaml"), "--set=train.epochs=1", "--output", str(work / "best"))
    assert proc.returncode == 0, proc.stderr
    # Another space (or objective) over the same study is refused, not mixed in.
    other = {**SPACE, "objective": {"weights": {"ctr.auc": 1.0}}}
    assert_one_line_error(_tune(work, other, 1), "study.db: holds a study of another config, space or objective")


@pytest.mark.parametrize(
    ("space", "needle"),
    [
        ({"space": {"model.nope": {"type": "int", "low": 1, "high": 3}}}, "space.model.nope"),
        ({"space": {"train.lr": {"type": "log", "low": "a", "high": 1.0}}}, "log needs numbers low and high"),
        ({"space": {"train.lr": {"type": "log", "low": 0.0, "high": 1.0}}}, "log needs low > 0"),
        ({"space": {"train.lr": {"type": "uniform", "low": 1.0, "high": 0.5}}}, "low must be below high"),
        ({"space": {"model.num_experts": {"type": "int", "low": 1.5, "high": 4}}}, "int needs integer low and high"),
        ({"space": {"train.lr": {"type": "normal"}}}, "expected {type: log | uniform | int | categorical"),
        ({"space": {"train.epochs": {"type": "int", "low": -3, "high": 2}}}, "train.epochs"),
        ({"space": {}}, "non-empty 'space'"),
        ({"space": {"train.lr": {"type": "log", "low": 0.1, "high": 1.0, "step": 2}}}, "step is for int ranges"),
        ({"space": {"model.num_experts": {"type": "int", "low": 1, "high": 4, "step": 0}}}, "step is for int"),
        ({**SPACE, "objective": {"weights": {"ctr.rmse": 1.0}}}, "objective.weights.ctr.rmse: expected one of"),
    ],
)
def test_a_bad_space_is_one_line_and_writes_nothing(work: Path, space: dict, needle: str):
    proc = _tune(work, space, 2, "bad")
    assert_one_line_error(proc, needle)
    assert not (work / "bad").exists()
