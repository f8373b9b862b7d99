"""Task-aware embeddings through the real CLI: the recommended configs train, reload, score
and export like any model; a model with no per-task path refuses them in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tests.integration.helpers import ROOT, assert_one_line_error
from tests.integration.helpers import mtrec as cli

TINY = ["train.epochs=1", "train.batch_size=1024", "model.expert_hidden=[32, 16]", "model.tower_hidden=[8]"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("task_embedding_cli")


@pytest.fixture(scope="module")
def clicks(work: Path) -> Path:
    path = work / "clicks.parquet"
    proc = cli("datasets", "synthetic", "--rows", "12000", "--seed", "5", "--output", str(path))
    assert proc.returncode == 0, proc.stderr
    return path


@pytest.fixture(scope="module")
def recommended(work: Path, clicks: Path) -> Path:
    out = work / "recommended"
    config = ROOT / "configs" / "synthetic" / "recommended.yaml"
    sets = [f"--set={s}" for s in [f"data.train={clicks}", *TINY]]
    proc = cli("train", "--config", str(config), *sets, "--output", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_recommended_configs_keep_feature_names_out_of_model_and_train():
    for folder in ("synthetic", "census_income", "census_income/group2"):
        raw = yaml.safe_load((ROOT / "configs" / folder / "recommended.yaml").read_text())
        names = {f["name"] for kind in raw["features"].values() for f in kind}
        names |= {t["label"] for t in raw["tasks"]} | {t["name"] for t in raw["tasks"]}
        values = [v for section in ("model", "train") for v in _strings(raw[section])]
        named = [v for v in values if v in names or v.split(".")[0] in names]  # e.g. monitor: ctr.auc
        assert not named, f"{folder}: model/train name {named}"
        assert "mean_auc" in values  # what they monitor instead


def test_recommended_model_reloads_scores_and_exports_the_same(recommended: Path, clicks: Path, work: Path):
    import mtrec

    saved = yaml.safe_load((recommended / "config.yaml").read_text())
    assert saved["model"]["name"] == "stem_net"  # the synthetic recommendation (a table set per task)
    table = pq.read_table(clicks)
    expected = mtrec.load_model(recommended).predict(table)
    again = mtrec.load_model(recommended).predict(table)
    scores = work / "scores.parquet"
    proc = cli("score", "--model", str(recommended), "--input", str(clicks), "--output", str(scores), "--quiet")
    assert proc.returncode == 0, proc.stderr
    got = pq.read_table(scores)
    for task in ("ctr", "cvr", "satisfaction"):
        np.testing.assert_array_equal(again[task], expected[task])
        np.testing.assert_allclose(got.column(task).to_numpy(), expected[task], rtol=0, atol=1e-6)
    out = work / "serve" / "m.pt"
    proc = cli("export", "--model", str(recommended), "--format", "torchscript", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()


@pytest.mark.parametrize("model", ["independent", "shared_embedding"])
def test_task_embedding_on_a_model_without_per_task_input_is_one_line(model: str, clicks: Path, work: Path):
    config = f"configs/synthetic/{model}.yaml"
    proc = cli(
        "train", "--config", config, f"--set=data.train={clicks}", "--set=model.embedding=stem",
        "--output", str(work / f"refused-{model}"),
    )  # fmt: skip
    line = assert_one_line_error(proc, "model.embedding", "'stem'", f"'{model}'", "use embedding: shared")
    assert "config" in line or config in line
    assert not (work / f"refused-{model}").exists()
