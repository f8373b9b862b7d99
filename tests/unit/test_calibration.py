"""Per-task calibration: the fits, their JSON, the refusals, and the trainer, scorer and
evaluation that use them."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mtrec.calibration import Calibrator, check_calibration_data, fit_calibrator
from mtrec.config import config_from_dict
from mtrec.data.synthetic import write_click_log
from mtrec.errors import DataError, ModelError
from mtrec.quickstart import synthetic_features, synthetic_tasks
from mtrec.training import train


def _draw(n: int = 200_000, a: float = 0.5, b: float = -1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(a * z + b)))).astype(np.float32)
    return z, y


def test_platt_recovers_the_slope_and_intercept_of_a_miscalibrated_score():
    z, y = _draw()
    cal = fit_calibrator("platt", z, y)
    assert cal.a == pytest.approx(0.5, abs=0.02) and cal.b == pytest.approx(-1.0, abs=0.02)
    p = 1.0 / (1.0 + np.exp(-z))
    np.testing.assert_allclose(cal.apply(p), 1.0 / (1.0 + np.exp(-(cal.a * z + cal.b))), rtol=1e-5)


def test_isotonic_is_monotone_and_matches_the_label_mean_where_it_was_fitted():
    z, y = _draw()
    w = np.random.default_rng(1).uniform(0.5, 2.0, z.size)
    cal = fit_calibrator("isotonic", z, y, w)
    p = 1.0 / (1.0 + np.exp(-z))
    out = cal.apply(p).astype(np.float64)
    assert np.average(out, weights=w) == pytest.approx(np.average(y, weights=w), rel=1e-5)
    order = np.argsort(p)
    assert (np.diff(out[order]) >= -1e-7).all()
    assert cal.apply(np.array([0.0, 1.0])).tolist() == pytest.approx([cal.y[0], cal.y[-1]])  # clipped at the ends
    raw_ratio = p.mean() / y.mean()
    assert abs(raw_ratio - 1) > 0.2  # the score was far off; the calibrated one is not
    assert abs(out.mean() / y.mean() - 1) < 0.01


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_a_calibrator_round_trips_through_json(method):
    z, y = _draw(20_000)
    cal = fit_calibrator(method, z, y)
    back = Calibrator.from_json(json.loads(json.dumps(cal.to_json())), "x")
    p = np.linspace(0.0, 1.0, 101)
    np.testing.assert_array_equal(back.apply(p), cal.apply(p))
    assert back.rows == 20_000


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"method": "magic"}, "method platt or isotonic"),
        ({"method": "platt", "a": float("nan"), "b": 0.0}, "finite numbers a and b"),
        ({"method": "platt", "a": True, "b": 0.0}, "finite numbers a and b"),
        ({"method": "isotonic", "x": [0.2, 0.1], "y": [0.1, 0.2]}, "non-decreasing"),
        ({"method": "isotonic", "x": [0.1, 0.2], "y": [0.1, 1.5]}, "within \\[0, 1\\]"),
        ({"method": "isotonic", "x": [0.1], "y": [0.1, 0.2]}, "one length"),
        ({"method": "isotonic", "x": ["a"], "y": [0.1]}, "must be numbers"),
        ({"method": "platt", "a": 1.0, "b": 0.0, "rows": -1}, "rows: expected an integer"),
    ],
)
def test_a_bad_calibration_file_is_refused_naming_where(raw, message):
    with pytest.raises(ModelError, match=f"^m/calibration.json: tasks.ctr.*{message}"):
        Calibrator.from_json(raw, "m/calibration.json: tasks.ctr")


def test_an_empty_or_one_class_sample_space_is_refused():
    with pytest.raises(DataError, match="task 'cvr' has no row in its sample space in the validation split"):
        check_calibration_data("cvr", np.zeros(0), "the validation split")
    with pytest.raises(DataError, match="task 'cvr' has only negative labels in its 5 rows.*both classes"):
        fit_calibrator("isotonic", np.zeros(5), np.zeros(5), task="cvr")
    with pytest.raises(DataError, match="only positive labels"):
        fit_calibrator("platt", np.zeros(3), np.ones(3), task="cvr")


# ---- in training, scoring and evaluation --------------------------------------------------


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("calibration")
    write_click_log(root / "train.parquet", 60_000, seed=5)
    write_click_log(root / "test.parquet", 60_000, seed=5, sample_seed=9)  # the same world, other rows
    return root / "train.parquet", root / "test.parquet"


def _config(data: Path, calibration: str, valid: Path | None = None):
    return config_from_dict(
        {
            "data": {
                "train": str(data),
                "mode": "memory",
                "valid_fraction": 0.3,
                **({"valid": str(valid)} if valid else {}),
            },
            "features": synthetic_features(),
            "tasks": synthetic_tasks(),
            "model": {"name": "mmoe", "embedding_dim": 8, "expert_hidden": [32], "tower_hidden": [16]},
            "train": {"epochs": 1, "batch_size": 512, "seed": 0, "threads": 1, "calibration": calibration},
        }
    )


def _se_of_ratio(pred_mean: float, y: np.ndarray) -> float:
    """Standard error of mean(pred) / mean(y) from the label noise of ``y`` alone."""
    p = y.mean()
    return pred_mean / p * math.sqrt((1 - p) / (y.size * p))


def test_isotonic_calibration_is_fitted_saved_and_applied_on_held_out_rows(logs, tmp_path):
    from mtrec.evaluation.evaluate import evaluate_model_dir
    from mtrec.inference import load_model, score_parquet

    train_file, test_file = logs
    out = tmp_path / "m"
    train(_config(train_file, "isotonic"), output=out, progress=False)
    saved = json.loads((out / "calibration.json").read_text())
    assert saved["method"] == "isotonic" and set(saved["tasks"]) == {"ctr", "cvr", "satisfaction"}

    result = evaluate_model_dir(out, str(test_file))
    table = pq.read_table(test_file)
    clicked = table.column("click").to_numpy() == 1
    labels = {
        "ctr": table.column("click").to_numpy(),
        "cvr": table.column("conversion").to_numpy()[clicked],
        "satisfaction": table.column("satisfied").to_numpy()[clicked],
    }
    for task, y in labels.items():
        cal = result["calibrated"][task]
        # Held out: within three standard errors of 1 (label noise of the test rows and of the
        # validation rows the calibration was fitted on), where the raw model was not.
        se = _se_of_ratio(cal["mean_pred"], y.astype(np.float64)) * math.sqrt(1 + y.size / (0.3 * 60_000))
        assert abs(cal["calibration"] - 1) < 3 * se + 0.01, (task, cal["calibration"], se)
        assert cal["auc"] == pytest.approx(result["tasks"][task]["auc"], abs=0.01)  # ranking kept up to ties

    ranker = load_model(out)
    raw = ranker.predict(table, calibrated=False)
    calibrated = ranker.predict(table)
    assert not np.allclose(raw["cvr"], calibrated["cvr"])
    # Calibrated from the logits, while the reference can only go through the float32 probability,
    # a few float32 steps from the exact one (torch's float32 sigmoid); where the isotonic map is
    # steep those steps move its output by more than any fixed tolerance. The map is monotone, so
    # the calibrated value lies between the map at the probability moved 4 steps either way.
    cal = ranker.calibration["cvr"]
    p = raw["cvr"].astype(np.float64)
    step = 4 * float(np.finfo(np.float32).eps)
    low, high = cal.apply(p * (1 - step)), cal.apply(p * (1 + step))
    assert np.all(calibrated["cvr"] >= low - 1e-7) and np.all(calibrated["cvr"] <= high + 1e-7)
    np.testing.assert_allclose(calibrated["cvr"], cal.apply(raw["cvr"]), rtol=1e-3, atol=1e-7)
    scored = tmp_path / "scores.parquet"
    score_parquet(out, test_file, scored, progress=False)
    np.testing.assert_allclose(pq.read_table(scored).column("cvr").to_numpy(), calibrated["cvr"], rtol=1e-6)
    unscored = tmp_path / "raw.parquet"
    score_parquet(out, test_file, unscored, progress=False, calibrated=False)
    np.testing.assert_allclose(pq.read_table(unscored).column("cvr").to_numpy(), raw["cvr"], rtol=1e-6)


def test_a_one_class_validation_space_is_refused_before_training(logs, tmp_path):
    train_file, _ = logs
    valid = tmp_path / "valid.parquet"
    table = pq.read_table(train_file).slice(0, 5000)
    table = table.set_column(
        table.schema.get_field_index("conversion"), "conversion", pc.multiply(table.column("conversion"), 0)
    )
    pq.write_table(table, valid)
    out = tmp_path / "m"
    with pytest.raises(DataError, match="train.calibration: task 'cvr' has only negative labels"):
        train(_config(train_file, "platt", valid=valid), output=out, progress=False)
    assert not out.exists() and not (tmp_path / "m.incomplete").exists()


def test_a_tampered_calibration_file_is_refused_on_load(logs, tmp_path):
    from mtrec.model_dir import load_model_dir

    train_file, _ = logs
    out = tmp_path / "m"
    train(_config(train_file, "platt"), output=out, progress=False)
    path = out / "calibration.json"
    body = json.loads(path.read_text())
    body["tasks"]["dwell"] = body["tasks"]["ctr"]
    path.write_text(json.dumps(body))
    with pytest.raises(ModelError, match="calibration.json: tasks.dwell: not a binary task"):
        load_model_dir(out)
    path.write_text("[1, 2")
    with pytest.raises(ModelError, match="calibration.json: invalid JSON"):
        load_model_dir(out)
    body["tasks"].pop("dwell")
    path.write_text(json.dumps({**body, "method": "isotonic"}))
    with pytest.raises(ModelError, match="method 'isotonic' is not the config's train.calibration 'platt'"):
        load_model_dir(out)
    path.unlink()
    with pytest.raises(ModelError, match="calibration.json: missing .*train.calibration: platt"):
        load_model_dir(out)


def test_platt_is_fitted_on_the_best_epochs_validation_logits_and_the_stages_are_timed(logs, tmp_path):
    """The calibration reuses the logits the best epoch was validated with: the same fit as on
    the saved model's own predictions of the validation rows (which are not predicted again);
    meta.json carries the seconds of each stage."""
    from mtrec.data.batches import TensorColumns
    from mtrec.model_dir import load_model_dir
    from mtrec.predict import predict_logits

    train_file, test_file = logs
    cfg = _config(train_file, "platt", valid=test_file)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3, patience=3))
    out = tmp_path / "m"
    result = train(cfg, output=out, progress=False)
    assert result.best_epoch < 3 or all(h["improved"] for h in result.history)
    saved = json.loads((out / "calibration.json").read_text())["tasks"]
    loaded = load_model_dir(out)
    encoded = loaded.preprocessor.transform(pq.read_table(test_file))
    logits = predict_logits(loaded.model, TensorColumns.from_encoded(encoded), loaded.model.task_names)
    space = encoded.label_mask[:, 1]  # cvr: the clicked rows
    again = fit_calibrator("platt", logits["cvr"][space], encoded.labels[space, 1], None, task="cvr").to_json()
    assert saved["cvr"]["rows"] == again["rows"]
    assert saved["cvr"]["a"] == pytest.approx(again["a"], rel=1e-6) and saved["cvr"]["b"] == pytest.approx(
        again["b"], rel=1e-6
    )
    meta = json.loads((out / "meta.json").read_text())
    stages = ("read_encode_s", "setup_s", "train_s", "validate_s", "checkpoint_s", "post_loop_s")
    assert all(meta["timings"][k] >= 0 for k in stages)
    assert meta["timings"]["train_s"] == pytest.approx(sum(h["train_seconds"] for h in result.history))
    assert result.timings["commit_s"] >= 0
