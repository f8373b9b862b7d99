"""Census-income through the real CLI: prepare -> train (shipped config) -> evaluate on test."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.helpers import ROOT
from tests.integration.helpers import mtrec as run_mtrec

SOURCE = ROOT.parent / "shared" / "data" / "census-income-kdd"
pytestmark = pytest.mark.skipif(not (SOURCE / "census-income.test.gz").is_file(), reason=f"{SOURCE} not present")
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


def mtrec(*args: str) -> subprocess.CompletedProcess:
    return run_mtrec(*args, env=ENV)


def test_prepare_train_and_evaluate_the_mmoe_config(tmp_path: Path):
    data = tmp_path / "census"
    proc = mtrec("datasets", "census-income", "--source", str(SOURCE), "--output", str(data))
    assert proc.returncode == 0, proc.stderr
    assert "train 59,858, valid 19,952, test 19,952 rows" in proc.stdout
    assert "income: 6.20% positive" in proc.stdout

    model = tmp_path / "mmoe"
    sets = [f"data.train={data / 'train.parquet'}", f"data.valid={data / 'valid.parquet'}", "train.epochs=3"]
    proc = mtrec(
        "train", "--config", "configs/census_income/mmoe.yaml", *[f"--set={s}" for s in sets], "--output", str(model)
    )
    assert proc.returncode == 0, proc.stderr

    out = tmp_path / "test.json"
    proc = mtrec("evaluate", "--model", str(model), "--data", str(data / "test.parquet"), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    tasks = json.loads(out.read_text())["tasks"]
    assert tasks["income"]["count"] == tasks["never_married"]["count"] == 19_952
    # Three epochs are well short of the tuned run (0.945 / 0.994), but far above chance.
    assert tasks["income"]["auc"] > 0.92
    assert tasks["never_married"]["auc"] > 0.985


def test_bad_source_is_one_line_and_writes_nothing(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = mtrec("datasets", "census-income", "--source", str(empty), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtrec: error:") and "census-income.test.gz" in lines[0]
    assert not (tmp_path / "out").exists()
