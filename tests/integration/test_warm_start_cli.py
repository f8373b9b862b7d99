"""The README's warm-start example as a new user runs it (smaller), and what `--init-from` refuses."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.integration.helpers import ROOT, assert_one_line_error, mtrec

SMALL = [
    "--set=train.epochs=1",
    "--set=train.threads=1",
    "--set=model.expert_hidden=[32]",
    "--set=model.tower_hidden=[8]",
    "--set=train.log_every=1000",
]


def _readme_commands() -> list[list[str]]:
    """The shell block of the README's warm-start section, one argv per command."""
    section = (ROOT / "README.md").read_text().split("### Warm start", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, list[str]]:
    """Runs the README's commands in a fresh folder: 20k/10k rows instead of 200k/100k, one small epoch."""
    work = tmp_path_factory.mktemp("warm")
    outputs = []
    for argv in _readme_commands():
        assert argv[0] == "mtrec"
        args = [a.replace("200000", "20000").replace("100000", "10000") for a in argv[1:]]
        args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]
        if args[0] == "train":
            args += SMALL
        proc = mtrec(*args, cwd=work)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        outputs.append(proc.stdout + proc.stderr)
    return work, outputs


def test_readme_example_adds_a_task_with_frozen_embeddings(example):
    work, outputs = example
    runs = work / "runs"
    report = json.loads((runs / "warm" / "init_from.json").read_text())
    status = {e.get("matched_as", e["name"]): e["status"] for e in report["parameters"]}
    assert status["features.embedding.weight"] == "loaded"  # reused preprocessing: the same rows
    assert status["towers[satisfaction].out.weight"] == "new"
    assert status["towers[cvr].out.weight"] == "loaded"
    assert status["backbone.gates.linear.weight"] == "remapped"  # ctr and cvr's gates, satisfaction's fresh
    meta = json.loads((runs / "warm" / "meta.json").read_text())
    assert meta["init_from"]["source"] == "runs/ctr_cvr" and meta["init_from"]["new"] == 4
    before, after = load_file(runs / "ctr_cvr" / "model.safetensors"), load_file(runs / "warm" / "model.safetensors")
    assert after["features.embedding.weight"].equal(before["features.embedding.weight"])  # frozen: bit for bit
    assert not after["backbone.experts.weights.0"].equal(before["backbone.experts.weights.0"])  # trained on
    train_log = outputs[3]
    assert "init_from runs/ctr_cvr: " in train_log and "frozen: embedding" in train_log
    compare = outputs[-1]
    for task in ("ctr", "cvr", "satisfaction"):
        assert task in compare
    assert "paired DeLong" in compare and "tested results:" in compare


def test_init_from_with_other_tasks_refitted_vocabulary_and_lower_rate(example, tmp_path):
    work, _ = example
    out = tmp_path / "refit"
    proc = mtrec(
        "train",
        "--config",
        str(ROOT / "configs/synthetic/warm_start/ctr_cvr.yaml"),
        "--init-from",
        str(work / "runs" / "warm"),
        "--set=train.init_lr_scale=0.1",
        "--set=train.freeze=[experts, towers.ctr]",
        f"--set=data.train={work / 'data/synthetic/test.parquet'}",  # other rows: a refitted vocabulary
        *SMALL,
        "--output",
        str(out),
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "init_from.json").read_text())
    entry = next(e for e in report["parameters"] if e["name"] == "features.embedding.weight")
    assert entry["status"] == "remapped" and "IDs kept by raw ID" in entry["detail"]
    dropped = {e["matched_as"] for e in report["parameters"] if e["status"] == "dropped"}
    assert dropped == {f"towers[satisfaction].{p}" for p in ("mlp.0.weight", "mlp.0.bias", "out.weight", "out.bias")}
    before, after = load_file(work / "runs" / "warm" / "model.safetensors"), load_file(out / "model.safetensors")
    for name in ("backbone.experts.weights.0", "backbone.experts.biases.0", "towers.0.out.weight"):
        assert after[name].equal(before[name]), name
    assert not after["towers.1.out.weight"].equal(before["towers.1.out.weight"])


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--init-from", "nowhere"], ["train.init_from: nowhere: no such model directory"]),
        (["--init-from", "data"], ["train.init_from: data", "not a complete model directory"]),
        (["--init-from", "runs/ctr_cvr", "--set=train.freeze=[cross]"], ["train.freeze: 'cross' matches nothing"]),
        (["--init-from", "runs/ctr_cvr", "--set=train.freeze=[gates]"], ["blocks of satisfaction are new"]),
        (
            ["--init-from", "runs/ctr_cvr", "--set=model.expert_hidden=[16]", "--set=train.freeze=[experts]"],
            ["train.freeze: experts includes backbone.experts.weights.0", "shape (4, 346, 32) saved, (4, 346, 16)"],
        ),
        (["--set=train.freeze=[embedding]"], ["train.freeze: applies to a warm start"]),
        (
            [
                "--init-from",
                "runs/ctr_cvr",
                "--set=train.init_from_preprocessing=reuse",
                "--set=features.dense.0.transform=standardize",
            ],
            ["train.init_from_preprocessing: reuse", "no dense feature 'item_price' as this config declares it"],
        ),
        (
            [
                "--init-from",
                "runs/ctr_cvr",
                "--set=train.freeze=[experts]",
                "--set=train.loss_weighting={name: gradnorm}",
            ],
            ["train.freeze: experts freezes the shared layer where loss_weighting gradnorm works"],
        ),
    ],
)
def test_bad_warm_starts_are_one_line_and_write_nothing(example, extra, needles):
    work, _ = example
    args = ["train", "--config", str(ROOT / "configs/synthetic/mmoe.yaml"), *SMALL, *extra, "--output", "runs/bad"]
    args.append("--quiet")  # (errors found once the model is built come after the progress lines)
    assert_one_line_error(mtrec(*args, cwd=work), *needles)
    assert not (work / "runs" / "bad").exists() and not (work / "runs" / "bad.incomplete").exists()
