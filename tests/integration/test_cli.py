"""The real `mtrec` CLI in subprocesses: generate -> train -> evaluate, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.integration.helpers import ROOT, assert_one_line_error, mtrec

SMALL_MODEL = [
    "train.epochs=2",
    "train.batch_size=1024",
    "model.expert_hidden=[64, 32]",
    "model.tower_hidden=[16]",
    "train.log_every=10",
]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def clicks(work: Path) -> Path:
    path = work / "clicks.parquet"
    proc = mtrec("datasets", "synthetic", "--rows", "60000", "--seed", "3", "--output", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "best achievable AUC" in proc.stdout
    return path


@pytest.fixture(scope="module")
def trained(work: Path, clicks: Path) -> Path:
    out = work / "model"
    sets = [f"--set={s}" for s in [f"data.train={clicks}", *SMALL_MODEL]]
    proc = mtrec("train", "--config", "configs/synthetic/mmoe.yaml", *sets, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/2" in proc.stderr and "rows/s" in proc.stderr and "eta" in proc.stderr
    return out


def test_train_writes_one_complete_model_directory(trained: Path):
    names = {p.name for p in trained.iterdir()}
    assert {"config.yaml", "meta.json", "model.safetensors", "preprocess", "metrics.json", "log.jsonl"} <= names
    assert not trained.with_name("model.incomplete").exists()
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert config["model"]["num_experts"] == 4  # resolved defaults are saved
    assert config["model"]["expert_hidden"] == [64, 32]
    meta = json.loads((trained / "meta.json").read_text())
    assert meta["model"] == "mmoe" and meta["best_epoch"] in (1, 2)
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(0.0 < r["valid"]["ctr"]["auc"] < 1.0 for r in epochs)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["best_epoch"] == meta["best_epoch"]
    # CVR is evaluated on clicked rows only
    assert metrics["best"]["cvr"]["count"] < 0.1 * metrics["best"]["ctr"]["count"]


def test_evaluate_prints_table_writes_json_and_beats_chance(trained: Path, work: Path):
    test_file = work / "test.parquet"
    proc = mtrec(
        "datasets", "synthetic", "--rows", "40000", "--seed", "3", "--sample-seed", "11", "--output", str(test_file)
    )
    assert proc.returncode == 0, proc.stderr
    out_json = work / "eval.json"
    proc = mtrec("evaluate", "--model", str(trained), "--data", str(test_file), "--output", str(out_json))
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0].split()
    assert header[:5] == ["task", "rows", "positives", "auc", "logloss"]
    result = json.loads(out_json.read_text())
    tasks = result["tasks"]
    assert result["rows"] == 40000
    assert tasks["ctr"]["count"] == 40000
    assert tasks["cvr"]["count"] == pq.read_table(test_file, columns=["click"]).column("click").to_numpy().sum()
    assert tasks["ctr"]["auc"] > 0.56
    assert tasks["cvr"]["auc"] > 0.6
    assert tasks["satisfaction"]["auc"] > 0.56
    for t in tasks.values():
        assert 0.0 < t["logloss"] < 1.0


def test_evaluate_default_output_goes_into_model_dir(trained: Path, clicks: Path):
    proc = mtrec("evaluate", "--model", str(trained), "--data", str(clicks))
    assert proc.returncode == 0, proc.stderr
    written = trained / "evaluations" / "clicks.json"
    assert written.exists()
    assert json.loads(written.read_text())["rows"] == 60000


def test_evaluate_into_a_pipe_that_closes_early_keeps_its_json(trained: Path, clicks: Path, work: Path):
    out = work / "piped.json"
    cmd = [sys.executable, "-m", "mtrec", "evaluate", "--model", str(trained), "--data", str(clicks)]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line, like `| head -0`
    try:
        proc = subprocess.run(
            [*cmd, "--output", str(out)], stdout=write_end, stderr=subprocess.PIPE, cwd=ROOT, timeout=600
        )
    finally:
        os.close(write_end)
    err = proc.stderr.decode()
    assert "Traceback" not in err and proc.returncode == 141, err
    assert json.loads(out.read_text())["rows"] == 60000


def test_existing_output_is_not_overwritten(trained: Path, clicks: Path):
    before = (trained / "model.safetensors").read_bytes()
    sets = [f"--set={s}" for s in [f"data.train={clicks}", *SMALL_MODEL]]
    proc = mtrec("train", "--config", "configs/synthetic/mmoe.yaml", *sets, "--output", str(trained))
    assert_one_line_error(proc, str(trained), "--overwrite")
    assert (trained / "model.safetensors").read_bytes() == before


def test_missing_column_names_file_and_column(work: Path, clicks: Path):
    table = pq.read_table(clicks).drop_columns(["item_price", "city"])
    bad = work / "missing.parquet"
    pq.write_table(table, bad)
    proc = mtrec(
        "train", "--config", "configs/synthetic/mmoe.yaml", f"--set=data.train={bad}", "--output", str(work / "m1")
    )
    assert_one_line_error(proc, str(bad), "'city'", "'item_price'")
    assert not (work / "m1").exists()
    assert not (work / "m1.incomplete").exists()


def test_not_parquet_file(work: Path):
    bad = work / "oops.parquet"
    bad.write_text("user_id,click\n1,0\n")
    proc = mtrec(
        "train", "--config", "configs/synthetic/mmoe.yaml", f"--set=data.train={bad}", "--output", str(work / "m2")
    )
    assert_one_line_error(proc, str(bad), "not a readable Parquet file")


def test_bad_binary_label(work: Path, clicks: Path):
    table = pq.read_table(clicks)
    click = table.column("click").to_numpy().copy()
    click[5] = 2
    bad = work / "label.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("click"), "click", pa.array(click)), bad)
    proc = mtrec(
        "train", "--config", "configs/synthetic/mmoe.yaml", f"--set=data.train={bad}", "--output", str(work / "m3")
    )
    assert_one_line_error(proc, str(bad), "'click'", "{0, 1}")


def test_string_where_number_expected(work: Path, clicks: Path):
    table = pq.read_table(clicks)
    price = pa.array([str(v) for v in table.column("item_price").to_pylist()])
    bad = work / "strprice.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("item_price"), "item_price", price), bad)
    proc = mtrec(
        "train", "--config", "configs/synthetic/mmoe.yaml", f"--set=data.train={bad}", "--output", str(work / "m4")
    )
    assert_one_line_error(proc, str(bad), "'item_price'", "expected a number")


def test_nan_in_clean_dense_feature(work: Path, clicks: Path):
    table = pq.read_table(clicks)
    cfg = yaml.safe_load((ROOT / "configs/synthetic/mmoe.yaml").read_text())
    for f in cfg["features"]["dense"]:
        if f["name"] == "user_age":  # has ~2% nulls in the synthetic log
            f["clean"] = True
    cfg["data"]["train"] = str(clicks)
    path = work / "clean.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = mtrec("train", "--config", str(path), "--output", str(work / "m5"))
    assert_one_line_error(proc, str(clicks), "'user_age'", "declared clean")
    assert table.column("user_age").null_count > 0


def test_config_errors_name_the_key(work: Path):
    cfg = yaml.safe_load((ROOT / "configs/synthetic/mmoe.yaml").read_text())
    cfg["train"]["epoch"] = 3
    path = work / "typo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert_one_line_error(mtrec("train", "--config", str(path)), str(path), "train.epoch", "unknown key")
    proc = mtrec("train", "--config", "configs/synthetic/mmoe.yaml", "--set", "train.epochs=three")
    assert_one_line_error(proc, "train.epochs", "expected int")
    proc = mtrec("train", "--config", "configs/synthetic/mmoe.yaml", "--set", "model.num_expert=3")
    assert_one_line_error(proc, "model.num_expert", "unknown parameter")
    proc = mtrec("train", "--config", str(work / "nope.yaml"))
    assert_one_line_error(proc, "nope.yaml")


def test_bad_model_dir(work: Path, trained: Path, clicks: Path):
    assert_one_line_error(mtrec("evaluate", "--model", str(work / "none"), "--data", str(clicks)), "no such model")
    broken = work / "broken"
    broken.mkdir()
    for name in ("config.yaml", "meta.json"):
        (broken / name).write_bytes((trained / name).read_bytes())
    import shutil

    shutil.copytree(trained / "preprocess", broken / "preprocess")
    (broken / "model.safetensors").write_bytes((trained / "model.safetensors").read_bytes()[:100])
    proc = mtrec("evaluate", "--model", str(broken), "--data", str(clicks))
    assert_one_line_error(proc, "model.safetensors", "corrupt or truncated")


def test_evaluate_rejects_bad_batch_size_and_folder_output(trained: Path, clicks: Path, work: Path):
    proc = mtrec("evaluate", "--model", str(trained), "--data", str(clicks), "--batch-size", "-5")
    assert_one_line_error(proc, "--batch-size")
    proc = mtrec("evaluate", "--model", str(trained), "--data", str(clicks), "--output", str(work))
    assert_one_line_error(proc, "is a folder")


def test_export_cli_writes_model_and_state(trained: Path, work: Path):
    out = work / "serve" / "m.pt"
    proc = mtrec("export", "--model", str(trained), "--format", "torchscript", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and (work / "serve" / "m.pt.preprocess" / "signature.json").exists()
    again = mtrec("export", "--model", str(trained), "--format", "torchscript", "--output", str(out))
    assert_one_line_error(again, "--overwrite")


def test_debug_shows_traceback(work: Path):
    proc = mtrec("--debug", "train", "--config", str(work / "nope.yaml"))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


@pytest.mark.parametrize(
    "cmd", [[], ["quickstart"], ["datasets", "synthetic"], ["train"], ["evaluate"], ["compare"], ["score"], ["export"]]
)
def test_help_has_examples(cmd):
    proc = mtrec(*cmd, "--help")
    assert proc.returncode == 0
    assert "example" in proc.stdout.lower()


def test_models_lists_registry():
    proc = mtrec("models")
    assert proc.returncode == 0
    listed = {line.split()[0] for line in proc.stdout.splitlines()}
    expected = {"independent", "shared_embedding", "shared_bottom", "omoe", "mmoe", "cgc", "ple", "aitm"}
    expected.update({"cross_stitch", "stem_net", "dbmtl", "adatt", "pepnet"})
    assert listed == expected
    assert all(len(line.split()) > 3 for line in proc.stdout.splitlines())  # each with a description


def test_esmm_with_pcgrad_trains_and_evaluates_ctcvr_and_gates(work: Path, clicks: Path):
    out = work / "esmm"
    sets = [f"data.train={clicks}", *SMALL_MODEL, "train.epochs=1", "train.loss_weighting={name: pcgrad}"]
    proc = mtrec(
        "train", "--config", "configs/synthetic/esmm_ple.yaml", *[f"--set={s}" for s in sets], "--output", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert "label correlation" in proc.stderr and "gate utilisation" in proc.stderr
    assert (out / "diagnostics.json").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epoch = next(r for r in log if r["event"] == "epoch")
    assert set(epoch["valid"]) == {"ctr", "cvr", "satisfaction", "ctcvr"}
    assert epoch["valid"]["ctcvr"]["count"] == epoch["valid"]["ctr"]["count"]
    proc = mtrec("evaluate", "--model", str(out), "--data", str(clicks), "--output", str(work / "esmm.json"))
    assert proc.returncode == 0, proc.stderr
    assert "ctcvr" in proc.stdout and "gate utilisation" in proc.stdout
    result = json.loads((work / "esmm.json").read_text())
    assert result["tasks"]["ctcvr"]["auc"] > 0.55
    assert set(result["gates"]["tasks"]) == {"ctr", "cvr", "satisfaction"}


def test_representation_gradient_weighting_trains_ple_and_logs_its_weights(work: Path, clicks: Path):
    """Nash-MTL on PLE's shared experts through the real trainer: trains, logs the combination's
    effective weights (Nash-MTL's are not the fixed 1s), and the model scores."""
    out = work / "nash"
    sets = [f"data.train={clicks}", *SMALL_MODEL, "train.epochs=1", "train.loss_weighting={name: nash_mtl}"]
    proc = mtrec("train", "--config", "configs/synthetic/ple.yaml", *[f"--set={s}" for s in sets], "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epoch = next(r for r in log if r["event"] == "epoch")
    weights = epoch["task_weights"]
    assert set(weights) == {"ctr", "cvr", "satisfaction"}
    assert all(w > 0 for w in weights.values()) and any(abs(w - 1.0) > 1e-3 for w in weights.values())
    assert all(0.5 < epoch["valid"][t]["auc"] < 1.0 for t in weights)
    proc = mtrec(
        "train",
        "--config",
        "configs/synthetic/ple.yaml",
        "--set",
        "train.loss_weighting={name: mgda}",
        "--set",
        "train.compile=true",
    )
    assert_one_line_error(proc, "train.compile: loss_weighting mgda")


def test_modelling_config_errors(work: Path):
    proc = mtrec("train", "--config", "configs/synthetic/mmoe.yaml", "--set", "train.loss_weighting={name: magic}")
    assert_one_line_error(proc, "train.loss_weighting.name")
    proc = mtrec("train", "--config", "configs/synthetic/mmoe.yaml", "--set", "tasks.cvr.where=click ==")
    assert_one_line_error(proc, "tasks.cvr.where", "cannot parse")
    proc = mtrec("train", "--config", "configs/synthetic/esmm_ple.yaml", "--set", "esmm.ctr=clicks")
    assert_one_line_error(proc, "esmm.ctr")
    sets = ["--set=model.gate=dselect_k", "--set=model.gate_k=5"]
    proc = mtrec("train", "--config", "configs/synthetic/mmoe.yaml", *sets)
    assert_one_line_error(proc, "model.gate_k: expected at most 4 (num_experts), got 5")
    sets = ["--set=train.loss_weighting={name: famo}", "--set=train.precision=fp16"]
    proc = mtrec("train", "--config", "configs/synthetic/mmoe.yaml", *sets)
    assert_one_line_error(proc, "train.precision: fp16 scales the losses", "not famo")
    proc = mtrec("train", "--config", "configs/synthetic/pepnet.yaml", "--set", "model.prior_features=[user_id, town]")
    assert_one_line_error(proc, "model.prior_features: 'town' is not a sparse feature", "'author_id'")


def test_quickstart_end_to_end(tmp_path: Path):
    proc = mtrec("quickstart", "--rows", "20000", "--epochs", "1", "--workdir", str(tmp_path / "qs"))
    assert proc.returncode == 0, proc.stderr
    assert "validation metrics" in proc.stdout
    assert (tmp_path / "qs" / "model" / "model.safetensors").exists()
    assert (tmp_path / "qs" / "clicks.parquet.truth.json").exists()
    again = mtrec("quickstart", "--rows", "20000", "--epochs", "1", "--workdir", str(tmp_path / "qs"))
    assert_one_line_error(again, "--overwrite")


def test_evaluate_group_by_and_html_report(trained: Path, clicks: Path, work: Path):
    report = work / "report"
    out = work / "grouped.json"
    proc = mtrec(
        "evaluate",
        "--model",
        str(trained),
        "--data",
        str(clicks),
        "--group-by",
        "user_id",
        "--output",
        str(out),
        "--report",
        str(report),
    )
    assert proc.returncode == 0, proc.stderr
    assert "gauc" in proc.stdout.splitlines()[0]
    result = json.loads(out.read_text())
    g = result["tasks"]["ctr"]["gauc"]
    assert 0.5 < g["gauc"] < 1.0 and g["groups_used"] + g["groups_skipped_one_class"] == g["groups"]
    page = (report / "report.html").read_text()
    for section in ("metrics", "roc", "calibration", "training", "gates"):
        assert f"<section id='{section}'>" in page
    assert page.count("data:image/png;base64,") >= 4  # ROC, calibration, training, gates


def test_evaluate_missing_group_column_and_empty_data(trained: Path, clicks: Path, work: Path):
    proc = mtrec("evaluate", "--model", str(trained), "--data", str(clicks), "--group-by", "session_id")
    assert_one_line_error(proc, "'session_id'")
    proc = mtrec("evaluate", "--model", str(trained), "--data", str(clicks), "--group-by", "hist_item_ids")
    assert_one_line_error(proc, "'hist_item_ids'", "expected ints, strings or booleans")
    nulls = work / "null_users.parquet"
    table = pq.read_table(clicks)
    users = table.column("user_id").to_pylist()
    users[3] = None
    pq.write_table(table.set_column(table.schema.get_field_index("user_id"), "user_id", pa.array(users)), nulls)
    proc = mtrec("evaluate", "--model", str(trained), "--data", str(nulls), "--group-by", "user_id")
    assert_one_line_error(proc, "'user_id'", "nulls")
    proc = mtrec("evaluate", "--model", str(trained), "--data", str(clicks), "--report", str(clicks / "sub"))
    assert_one_line_error(proc, "is a file")
    empty = work / "empty.parquet"
    pq.write_table(pq.read_table(clicks).slice(0, 0), empty)
    proc = mtrec("evaluate", "--model", str(trained), "--data", str(empty), "--output", str(work / "e.json"))
    assert_one_line_error(proc, "no rows")


def test_compare_flags_tasks_below_the_baseline(trained: Path, clicks: Path, work: Path):
    other = work / "single"
    sets = [f"data.train={clicks}", "train.epochs=1", "model.hidden=[32]", "model.tower_hidden=[8]"]
    proc = mtrec(
        "train", "--config", "configs/synthetic/independent.yaml", *[f"--set={s}" for s in sets], "--output", str(other)
    )
    assert proc.returncode == 0, proc.stderr
    out = work / "compare.json"
    proc = mtrec("compare", str(trained), str(other), "--data", str(clicks), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    comparison = json.loads(out.read_text())
    assert comparison["baseline"] == str(other)  # the single-task model is the default baseline
    rows = comparison["models"][str(trained)]["tasks"]
    base = comparison["models"][str(other)]["tasks"]
    for task, entry in rows.items():
        assert abs(entry["lift"] - (entry["value"] - base[task]["value"])) < 1e-12
        assert abs(entry["delta"] - entry["lift"]) < 1e-9  # the DeLong delta is the AUC difference
        assert entry["ci_low"] < entry["delta"] < entry["ci_high"] and 0.0 <= entry["p_value"] <= 1.0
        expected = "negative" if entry["ci_high"] < 0 else "positive" if entry["ci_low"] > 0 else "none"
        assert entry["transfer"] == expected and "worse" not in entry
        if entry["transfer"] == "negative":
            assert "negative transfer" in proc.stdout


def _tiny_log(n: int, seed: int, *, conversions: bool = True) -> pa.Table:
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    click = (rng.random(n) < 1 / (1 + np.exp(-(2 * x - 0.5)))).astype(np.int64)
    conversion = np.where(click == 1, (rng.random(n) < 0.3 + 0.3 * np.tanh(x)).astype(np.int64), 0)
    return pa.table(
        {
            "u": rng.integers(0, 60, n),
            "cat": rng.choice(["a", "b", "c"], n),
            "x": x,
            "click": click,
            "conversion": conversion if conversions else np.zeros(n, np.int64),
        }
    )


TINY_TASKS = [{"name": "ctr", "label": "click"}, {"name": "cvr", "label": "conversion", "where": "click == 1"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny models (in-process training) on one small log: two comparable, two that are not."""
    import mtrec
    from mtrec.config import config_from_dict

    work = tmp_path_factory.mktemp("compare")
    pq.write_table(_tiny_log(3000, 0), work / "train.parquet")
    pq.write_table(_tiny_log(2000, 1), work / "test.parquet")
    pq.write_table(_tiny_log(2000, 1, conversions=False), work / "no_conversions.parquet")
    out = {"test": work / "test.parquet", "no_conversions": work / "no_conversions.parquet"}
    models = {
        "independent": ("independent", TINY_TASKS),
        "shared_bottom": ("shared_bottom", TINY_TASKS),
        "ctr_only": ("shared_bottom", TINY_TASKS[:1]),
        "unclicked": ("shared_bottom", [TINY_TASKS[0], {**TINY_TASKS[1], "where": "click == 0"}]),
    }
    for name, (arch, tasks) in models.items():
        hidden = {"hidden": [8]} if arch == "independent" else {"bottom_hidden": [16]}
        config = config_from_dict(
            {
                "data": {"train": str(work / "train.parquet"), "valid_fraction": 0.2},
                "features": {"sparse": [{"name": "u"}, {"name": "cat"}], "dense": [{"name": "x"}]},
                "tasks": tasks,
                "model": {"name": arch, "embedding_dim": 4, "tower_hidden": [8], **hidden},
                "train": {"epochs": 3, "batch_size": 256, "device": "cpu", "seed": 0},
            }
        )
        out[name] = mtrec.train(config, output=work / name, progress=False).output
    return out


def test_compare_reports_paired_tests_per_task(tiny: dict[str, Path], tmp_path: Path):
    out = tmp_path / "c.json"
    args = [str(tiny["shared_bottom"]), str(tiny["independent"]), "--data", str(tiny["test"]), "--group-by", "u"]
    proc = mtrec("compare", *args, "--bootstrap", "300", "--seed", "5", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    comparison = json.loads(out.read_text())
    assert comparison["baseline"] == str(tiny["independent"])  # the independent model, though listed second
    assert comparison["test"]["resamples"] == 300 and comparison["test"]["seed"] == 5
    header = proc.stdout.splitlines()[0]
    assert all(col in header for col in ("lift", "delta", "95% CI", "p"))
    for entry in comparison["models"][str(tiny["shared_bottom"])]["tasks"].values():
        assert {"metric", "value", "lift", "lift_percent", "delta", "ci_low", "ci_high", "p_value"} <= set(entry)
        assert entry["ci_low"] < entry["delta"] < entry["ci_high"] and "worse" not in entry
        for t in (entry, entry["gauc_test"]):
            significant = t["ci_low"] > 0 or t["ci_high"] < 0
            assert (t["transfer"] != "none") == significant and 0.0 < t["p_value"] <= 1.0
        assert (entry["p_value"] < 0.05) == (entry["transfer"] != "none")  # DeLong: CI excludes 0 iff p < 0.05
        assert entry["gauc_test"]["ci_low"] <= entry["gauc_test"]["delta"] <= entry["gauc_test"]["ci_high"]
    words = ("negative transfer", "positive transfer", "no significant difference")
    assert sum(proc.stdout.count(w) for w in words) >= 4  # AUC and GAUC of both tasks, plus the footer
    again = mtrec("compare", *args, "--bootstrap", "300", "--seed", "5")
    assert again.stdout == proc.stdout.replace(f"comparison written to {out}\n", "")  # seeded


def test_compare_a_one_class_task_has_no_test_but_a_reason(tiny: dict[str, Path], tmp_path: Path):
    out = tmp_path / "c.json"
    models = [str(tiny["independent"]), str(tiny["shared_bottom"])]
    proc = mtrec("compare", *models, "--data", str(tiny["no_conversions"]), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    cvr = json.loads(out.read_text())["models"][str(tiny["shared_bottom"])]["tasks"]["cvr"]
    assert cvr["p_value"] is None and cvr["ci_low"] is None and cvr["transfer"] == "none"
    assert cvr["why"] == "only one class on this task's rows"
    assert "no test (only one class on this task's rows)" in proc.stdout


def test_compare_refuses_other_tasks_or_sample_spaces_in_one_line(tiny: dict[str, Path]):
    base, data = str(tiny["independent"]), str(tiny["test"])
    proc = mtrec("compare", base, str(tiny["ctr_only"]), "--data", data)
    assert_one_line_error(proc, "no task 'cvr'", "same tasks")
    proc = mtrec("compare", base, str(tiny["unclicked"]), "--data", data)
    assert_one_line_error(proc, "task 'cvr'", "sample space", "click == 0", "click == 1")
    proc = mtrec("compare", base, str(tiny["shared_bottom"]), "--data", data, "--bootstrap", "0")
    assert_one_line_error(proc, "--bootstrap")
