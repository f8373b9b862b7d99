"""The task-affinity report through the real CLI: train writes and prints it, evaluate's report
draws it, compare shows it, and a bad interval is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.helpers import assert_one_line_error, mtrec

SMALL = [
    "train.epochs=2",
    "train.batch_size=512",
    "train.threads=1",
    "train.device=cpu",
    "model.embedding_dim=4",
    "model.tower_hidden=[8]",
    "train.affinity_every=3",
]


@pytest.mark.parametrize("value", ["0", "-5"])
def test_affinity_every_below_1_is_refused_in_one_line(value):
    proc = mtrec("train", "--config", "configs/synthetic/mmoe.yaml", "--set", f"train.affinity_every={value}")
    assert_one_line_error(proc, "train.affinity_every", "expected >= 1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("affinity")
    clicks = work / "clicks.parquet"
    proc = mtrec("datasets", "synthetic", "--rows", "8000", "--seed", "3", "--output", str(clicks))
    assert proc.returncode == 0, proc.stderr
    out = {"clicks": clicks, "work": work}
    for arch, hidden in (("mmoe", "model.expert_hidden=[16]"), ("independent", "model.hidden=[16]")):
        sets = [f"--set={s}" for s in [f"data.train={clicks}", *SMALL, hidden]]
        proc = mtrec("train", "--config", f"configs/synthetic/{arch}.yaml", *sets, "--output", str(work / arch))
        assert proc.returncode == 0, proc.stderr
        out[arch] = work / arch
        (work / f"{arch}.stderr").write_text(proc.stderr)
    return out


def test_train_writes_and_prints_the_affinity(runs):
    doc = json.loads((runs["mmoe"] / "affinity.json").read_text())
    assert doc["every"] == 3 and doc["shared"] == "dense" and doc["measurements"] > 0
    assert doc["tasks"] == ["ctr", "cvr", "satisfaction"]
    for key in ("gradient_cosine", "lookahead_affinity"):
        assert len(doc[key]) == 3 and all(len(row) == 3 for row in doc[key])
    assert [doc["gradient_cosine"][i][i] for i in range(3)] == pytest.approx([1.0, 1.0, 1.0])
    assert [e["epoch"] for e in doc["per_epoch"]] == [1, 2]
    err = (runs["work"] / "mmoe.stderr").read_text()
    assert "task affinity over" in err and "gradient cosine" in err and "lookahead affinity" in err
    log = [json.loads(line) for line in (runs["mmoe"] / "log.jsonl").read_text().splitlines()]
    assert all(len(r["affinity"]["gradient_cosine"]) == 3 for r in log if r["event"] == "epoch")
    # independent shares nothing: said once, null matrices
    none = json.loads((runs["independent"] / "affinity.json").read_text())
    assert none["shared"] == "none" and none["measurements"] == 0
    assert all(v is None for row in none["gradient_cosine"] for v in row)
    assert "shares no parameters" in (runs["work"] / "independent.stderr").read_text()


def test_report_draws_the_affinity_next_to_the_label_correlations(runs):
    report = runs["work"] / "report"
    proc = mtrec("evaluate", "--model", str(runs["mmoe"]), "--data", str(runs["clicks"]), "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    page = (report / "report.html").read_text()
    section = page.split("<section id='relations'>", 1)[1].split("</section>", 1)[0]
    assert "data:image/png;base64," in section and "Task affinity over" in section
    other = runs["work"] / "report_independent"
    proc = mtrec("evaluate", "--model", str(runs["independent"]), "--data", str(runs["clicks"]), "--report", str(other))
    assert proc.returncode == 0, proc.stderr
    assert "shares no parameters" in (other / "report.html").read_text()


def test_compare_shows_each_models_affinity(runs):
    out = runs["work"] / "compare.json"
    args = [str(runs["mmoe"]), str(runs["independent"]), "--data", str(runs["clicks"])]
    proc = mtrec("compare", *args, "--affinity", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "mmoe (mmoe): task affinity over" in proc.stdout and "shares no parameters" in proc.stdout
    models = json.loads(out.read_text())["models"]
    assert models[str(runs["mmoe"])]["affinity"]["tasks"] == ["ctr", "cvr", "satisfaction"]
    plain = mtrec("compare", *args)
    assert plain.returncode == 0 and "gradient cosine" not in plain.stdout
