"""Real log formats through the real CLI: prepare -> train (shipped config) -> evaluate -> score.

Each sample is a few hundred real rows in a format nobody here designed (numeric column
names, label-encoded IDs, 63 dense fields, tab-separated without a header); the point is
that the schema loads, trains and scores them as they are, not accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tests.integration.helpers import ROOT, assert_one_line_error

SAMPLES = ROOT.parent / "shared" / "data" / "samples"
pytestmark = pytest.mark.skipif(
    not SAMPLES.is_dir(), reason=f"the real sample logs are not at {SAMPLES} (../shared/data/samples)"
)
# One thread per process: the samples are tiny and the test machines are shared.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

CASES = {
    "ali-ccp": {
        "preparer": "ali-ccp",
        "config": "configs/ali_ccp/mmoe.yaml",
        "keep": ["101", "205", "click"],
        "tasks": {"ctr": "click", "cvr": "purchase"},
        "rows": {"train": 100, "valid": 50, "test": 50},
    },
    "aliexpress": {
        "preparer": "aliexpress",
        "config": "configs/aliexpress/ple.yaml",
        "keep": ["search_id", "categorical_7"],
        "tasks": {"ctr": "click", "cvr": "conversion"},
        "rows": {"test": 20},
    },
    "tiny-mtl": {
        "preparer": "aliexpress",
        "config": "configs/aliexpress/esmm_ple.yaml",
        "keep": ["search_id", "categorical_7"],
        "tasks": {"ctr": "click", "cvr": "conversion", "ctcvr": None},
        "rows": {"test": 100},
    },
    "byterec": {
        "preparer": "byterec",
        "config": "configs/byterec/mmoe.yaml",
        "keep": ["uid", "item_id", "time"],
        "tasks": {"finish": "finish", "like": "like"},
        "rows": {"train": 140, "valid": 30, "test": 30},
    },
}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mtrec", *args]


def run_together(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Runs independent CLI calls at the same time (each spends seconds importing torch)."""
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
        for c in commands
    ]
    results = []
    for c, p in zip(commands, procs, strict=True):
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    return results


@pytest.mark.parametrize("name", CASES, ids=list(CASES))
def test_prepare_train_evaluate_score(tmp_path: Path, name: str):
    case = CASES[name]
    data = tmp_path / "data"
    (prepared,) = run_together(
        command("datasets", case["preparer"], "--source", str(SAMPLES / name), "--output", str(data))
    )
    assert prepared.returncode == 0, prepared.stderr
    labels = [label for label in case["tasks"].values() if label]
    for label in labels:
        assert f"{label}: " in prepared.stdout and "% positive" in prepared.stdout
    manifest = json.loads((data / "dataset.json").read_text())
    for split, rows in case["rows"].items():
        assert manifest["splits"][split]["rows"] == rows

    model = tmp_path / "model"
    sets = [f"data.train={data / 'train.parquet'}", f"data.valid={data / 'valid.parquet'}", "train.threads=1"]
    (trained,) = run_together(
        command("train", "--config", case["config"], *[f"--set={s}" for s in sets], "--output", str(model), "--quiet")
    )
    assert trained.returncode == 0, trained.stderr
    assert {"config.yaml", "meta.json", "model.safetensors", "preprocess", "metrics.json"} <= {
        p.name for p in model.iterdir()
    }
    assert not model.with_name("model.incomplete").exists()
    saved = yaml.safe_load((model / "config.yaml").read_text())
    assert saved["data"]["train"] == str(data / "train.parquet")
    shipped = yaml.safe_load((ROOT / case["config"]).read_text())
    # The real column names survive the round trip as strings ("101" stays a name).
    assert saved["features"]["sparse"][0]["name"] == shipped["features"]["sparse"][0]["name"]

    test = data / "test.parquet"
    metrics_json, scored = tmp_path / "metrics.json", tmp_path / "scored.parquet"
    evaluated, scoring = run_together(
        command("evaluate", "--model", str(model), "--data", str(test), "--output", str(metrics_json)),
        command(
            "score", "--model", str(model), "--input", str(test), "--output", str(scored), "--keep",
            ",".join(case["keep"]), "--quiet",
        ),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    assert scoring.returncode == 0, scoring.stderr

    source = pq.read_table(test)
    metrics = json.loads(metrics_json.read_text())
    assert metrics["rows"] == source.num_rows
    assert set(metrics["tasks"]) == set(case["tasks"])
    first_task, first_label = next(iter(case["tasks"].items()))
    assert metrics["tasks"][first_task]["count"] == source.num_rows
    assert metrics["tasks"][first_task]["positives"] == int(np.sum(source.column(first_label).to_numpy()))
    if "cvr" in case["tasks"]:
        # CVR is scored on clicked impressions only.
        assert metrics["tasks"]["cvr"]["count"] == int(np.sum(source.column("click").to_numpy()))

    out = pq.read_table(scored)
    assert out.num_rows == source.num_rows
    assert out.column_names[: len(case["keep"])] == case["keep"]
    for column in case["keep"]:
        # Same rows in the same order, same types (IDs still int64).
        assert out.column(column).equals(source.column(column)), column
    for task in case["tasks"]:
        p = out.column(task).to_numpy()
        assert p.dtype == np.float32
        assert np.all((p > 0.0) & (p < 1.0)), task


def test_bad_input_of_each_format_is_one_line_naming_the_file(tmp_path: Path):
    sources = {}
    for folder in ("ali-ccp", "aliexpress", "byterec"):
        sources[folder] = tmp_path / folder
        shutil.copytree(SAMPLES / folder, sources[folder], copy_function=shutil.copyfile)
    ali = sources["ali-ccp"] / "ali_ccp_val_sample.csv"
    lines = ali.read_text().split("\n")
    lines[4] = "2" + lines[4][1:]  # click = 2 on line 5
    ali.write_text("\n".join(lines))
    ae = sources["aliexpress"] / "aliexpress_test_sample.csv"
    lines = ae.read_text().split("\n")
    lines[2] = lines[2].replace(",", ",x", 1)  # search_id "30,x9" -> categorical_1 = "x9"
    ae.write_text("\n".join(lines))
    br = sources["byterec"] / "byterec_sample.txt"
    br.write_text(br.read_text().replace("\t", ","))

    results = run_together(
        *(
            command("datasets", preparer, "--source", str(sources[folder]), "--output", str(tmp_path / f"out-{folder}"))
            for preparer, folder in (("ali-ccp", "ali-ccp"), ("aliexpress", "aliexpress"), ("byterec", "byterec"))
        )
    )
    assert_one_line_error(results[0], str(ali), "line 5", "'click'", "0 or 1")
    assert_one_line_error(results[1], str(ae), "line 3", "'categorical_1'", "'x9'")
    assert_one_line_error(results[2], str(br), "tab-separated", "expected 12")
    assert not any(p.name.startswith("out-") for p in tmp_path.iterdir())
