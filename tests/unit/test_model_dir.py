"""Model directory safety: what --overwrite may replace, atomic writes, validation of settings."""

import numpy as np
import pyarrow as pa
import pytest

from mtrec.config import config_from_dict
from mtrec.data.preprocess import Preprocessor
from mtrec.errors import ConfigError, DataError, MtrecError
from mtrec.files import atomic_write_text
from mtrec.model_dir import claim_model_dir, commit_model_dir
from mtrec.schema import DenseFeature, Schema, Task

BASE = {
    "data": {"train": "x.parquet"},
    "features": {"sparse": [{"name": "u"}]},
    "tasks": [{"name": "ctr", "label": "click"}, {"name": "dwell", "label": "d", "type": "regression"}],
}


def test_overwrite_never_replaces_a_folder_that_is_not_a_model(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("important")
    with pytest.raises(MtrecError, match="not an mtrec model directory"):
        with claim_model_dir(precious, overwrite=True):
            pass
    assert (precious / "thesis.txt").read_text() == "important"
    assert not (tmp_path / "precious.incomplete").exists()


def test_overwrite_replaces_a_model_only_when_the_new_one_is_complete(tmp_path):
    out = tmp_path / "model"
    with claim_model_dir(out, overwrite=False) as staging:
        for name in ("meta.json", "config.yaml"):
            (staging / name).write_text("old")
        commit_model_dir(staging, out)
    with claim_model_dir(out, overwrite=True) as staging:
        assert (out / "meta.json").read_text() == "old"  # untouched while training
        (staging / "meta.json").write_text("new")
        (staging / "config.yaml").write_text("new")
        commit_model_dir(staging, out)
    assert (out / "meta.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging, old copy or lock left


def test_output_parents_are_created_but_not_through_a_file(tmp_path):
    with claim_model_dir(tmp_path / "runs" / "new" / "model", overwrite=False) as staging:
        assert staging.is_dir() and staging.name == "model.incomplete"
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(MtrecError, match="is a file"):
        with claim_model_dir(tmp_path / "data.parquet" / "model", overwrite=False):
            pass


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(MtrecError, match="--overwrite"):
        with claim_model_dir(tmp_path / "m", overwrite=False):
            pass


def test_atomic_write_refuses_folders_and_leaves_no_temp_files(tmp_path):
    with pytest.raises(MtrecError, match="is a folder"):
        atomic_write_text(tmp_path, "x")
    atomic_write_text(tmp_path / "a.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.grad_clip=-1", "train.grad_clip"),
        ("train.log_every=0", "train.log_every"),
        ("train.threads=0", "train.threads"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.embedding_lr=0", "train.embedding_lr"),
        ("train.monitor=ctr.loss", "train.monitor"),
        ("train.monitor=ctr.rmse", "train.monitor"),
        ("train.monitor=dwell.auc", "train.monitor"),
        ("tasks.ctr.name=a.b", "task name"),
        ("tasks.ctr.weight=-1", "tasks.ctr.weight"),
        ("features.sparse.u.max_vocab=0", "max_vocab"),
    ],
)
def test_invalid_settings_are_config_errors(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        config_from_dict(BASE, overrides=[override])


def test_valid_monitors_per_task_type():
    for monitor in ("ctr.auc", "ctr.logloss", "dwell.rmse", "dwell.mae", "loss", "mean_auc"):
        assert config_from_dict(BASE, overrides=[f"train.monitor={monitor}"]).train.monitor == monitor


def test_dense_value_beyond_float32_is_a_data_error():
    schema = Schema(dense=(DenseFeature("price", transform="standardize"),), tasks=(Task("ctr", label="click"),))
    ok = pa.table({"price": np.arange(10, dtype=np.float64), "click": [0, 1] * 5})
    pre = Preprocessor.fit(schema, ok)
    bad = pa.table({"price": [1.0, 1e300], "click": [0, 1]})
    with pytest.raises(DataError, match="'price'.*too large for float32"):
        pre.transform(bad, source="big.parquet")


def test_where_rows_with_null_columns_are_outside_the_sample_space():
    from mtrec.expr import parse_where

    click = np.array([1.0, 0.0, np.nan, 1.0])
    s = np.array(["a", None, "b", "a"], dtype=object)
    assert parse_where("click != 1").evaluate({"click": click}).tolist() == [False, True, False, False]
    assert parse_where("not click == 1").evaluate({"click": click}).tolist() == [False, True, False, False]
    assert parse_where("s != 'a'").evaluate({"s": s}).tolist() == [False, False, True, False]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.loss_weighting={name: dwa, temperature: -1}", "temperature"),
        ("train.loss_weighting={name: gradnorm, lr: 0}", "lr"),
        ("model.name=aitm", "AITM"),
    ],
)
def test_weighting_values_and_aitm_sample_spaces_are_checked_up_front(override, needle):
    raw = {
        "data": {"train": "x.parquet"},
        "features": {"sparse": [{"name": "u"}]},
        "tasks": [{"name": "ctr", "label": "click"}, {"name": "cvr", "label": "conv", "where": "click == 1"}],
    }
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(raw, overrides=[override])


def test_saved_weights_are_readable_files(tmp_path):
    import os
    import stat

    import torch

    from mtrec.model_dir import save_weights

    save_weights(torch.nn.Linear(2, 2), tmp_path / "w.safetensors")
    mode = stat.S_IMODE(os.stat(tmp_path / "w.safetensors").st_mode)
    assert mode & 0o044  # group/other may read, like every other output file
