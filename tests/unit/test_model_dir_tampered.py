"""A tampered model directory or resume state fails with one ModelError line, never a traceback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mtrec.config import Config, config_from_dict
from mtrec.data.synthetic import write_click_log
from mtrec.errors import ModelError, MtrecError
from mtrec.model_dir import has_resume_state, load_model_dir
from mtrec.training import train
from tests.integration.helpers import assert_one_line_error, mtrec

WEIGHTS = "model.safetensors"


def _config(data: Path, epochs: int) -> Config:
    return config_from_dict(
        {
            "data": {"train": str(data), "mode": "memory"},
            "features": {"sparse": [{"name": "user_id"}, {"name": "item_id"}], "dense": [{"name": "item_price"}]},
            "tasks": [{"name": "ctr", "label": "click"}, {"name": "cvr", "label": "conversion", "where": "click == 1"}],
            "model": {"name": "mmoe", "embedding_dim": 4, "expert_hidden": [8], "tower_hidden": [4], "num_experts": 2},
            "train": {"epochs": epochs, "batch_size": 512, "seed": 3, "threads": 1},
        }
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tampered")
    write_click_log(folder / "data.parquet", 2000, seed=1)
    return folder


@pytest.fixture(scope="module")
def model_dir(work: Path) -> Path:
    """A complete model directory (trained once, copied by every case)."""
    return train(_config(work / "data.parquet", 1), output=work / "model", progress=False).output


@pytest.fixture(scope="module")
def interrupted(work: Path) -> Path:
    """The output of a run stopped after epoch 1 (its ``.incomplete`` folder holds the resume state)."""

    def stop(record: dict[str, Any]) -> None:
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(work / "data.parquet", 2), output=work / "run", progress=False, on_epoch=stop)
    assert has_resume_state(work / "run.incomplete")
    return work / "run"


# ----------------------------------------------------------------------------- model directory
def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def _folder(name: str) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        (d / name).unlink()
        (d / name).mkdir()

    return tamper


def _model_param(key: str, value: Any) -> Callable[[Path], None]:
    """A saved config value that passes validation but cannot build the model."""

    def tamper(d: Path) -> None:
        raw = yaml.safe_load((d / "config.yaml").read_text())
        raw["model"][key] = value
        (d / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    return tamper


def _weights(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        tensors = load_file(str(d / WEIGHTS))
        edit(tensors)
        save_file(tensors, str(d / WEIGHTS))

    return tamper


def _to_int64(t: dict[str, torch.Tensor]) -> None:
    t["backbone.gates.linear.weight"] = t["backbone.gates.linear.weight"].to(torch.int64)


def _drop(t: dict[str, torch.Tensor]) -> None:
    del t["towers.1.out.bias"]


def _extra(t: dict[str, torch.Tensor]) -> None:
    t["towers.9.out.bias"] = torch.zeros(1)


def _reshape(t: dict[str, torch.Tensor]) -> None:
    t["towers.0.out.weight"] = torch.zeros(1, 5)


TAMPERED = {
    "config_not_utf8": (_write("config.yaml", b"model:\n  name: \xff\xfe\n"), "config.yaml: expected UTF-8"),
    "config_is_folder": (_folder("config.yaml"), "config.yaml: expected a file"),
    "meta_is_folder": (_folder("meta.json"), "meta.json: expected a file"),
    "meta_is_array": (_write("meta.json", b"[]"), "meta.json: expected a JSON object, got an array"),
    "meta_is_null": (_write("meta.json", b"null"), "meta.json: expected a JSON object, got null"),
    "meta_is_string": (_write("meta.json", b'"model"'), "meta.json: expected a JSON object, got a string"),
    "dropout_2": (_model_param("dropout", 2.0), "config.yaml"),
    "num_experts_0": (_model_param("num_experts", 0), "config.yaml"),
    "tower_hidden_negative": (_model_param("tower_hidden", [-1]), "config.yaml"),
    "weights_int64": (_to_int64, "model.safetensors: tensor 'backbone.gates.linear.weight' is int64, expected float32"),
    "weights_missing_key": (_drop, "model.safetensors: tensor 'towers.1.out.bias' is missing"),
    "weights_unexpected_key": (_extra, "model.safetensors: tensor 'towers.9.out.bias' is not part of the model"),
    "weights_wrong_shape": (_reshape, "model.safetensors: tensor 'towers.0.out.weight' has shape [1, 5], expected"),
}
for _name in ("weights_int64", "weights_missing_key", "weights_unexpected_key", "weights_wrong_shape"):
    TAMPERED[_name] = (_weights(TAMPERED[_name][0]), TAMPERED[_name][1])


def _tampered_copy(model_dir: Path, tmp_path: Path, case: str) -> Path:
    copy = tmp_path / case
    shutil.copytree(model_dir, copy)
    TAMPERED[case][0](copy)
    return copy


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_model_directory_is_a_model_error(model_dir, tmp_path, case):
    copy = _tampered_copy(model_dir, tmp_path, case)
    with pytest.raises(ModelError) as info:
        load_model_dir(copy)
    message = str(info.value)
    assert TAMPERED[case][1] in message and str(copy) in message and "\n" not in message


def test_the_untampered_directory_still_loads(model_dir):
    loaded = load_model_dir(model_dir)
    assert loaded.meta["layout"] and not loaded.model.training


@pytest.mark.parametrize(
    ("command", "case"),
    [("evaluate", "config_not_utf8"), ("evaluate", "weights_int64"), ("score", "meta_is_array")],
)
def test_cli_reports_a_tampered_model_in_one_line(model_dir, work, tmp_path, command, case):
    copy = _tampered_copy(model_dir, tmp_path, case)
    data = str(work / "data.parquet")
    if command == "evaluate":
        proc = mtrec("evaluate", "--model", str(copy), "--data", data, "--output", str(tmp_path / "e.json"))
    else:
        proc = mtrec("score", "--model", str(copy), "--input", data, "--output", str(tmp_path / "s.parquet"))
    assert_one_line_error(proc, str(copy), TAMPERED[case][1])
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "s.parquet").exists()


# ----------------------------------------------------------------------------- resume state
def _state_items(doc: dict[str, Any]) -> list[list[Any]]:
    return doc["state"]["__dict__"]


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        for item in _state_items(doc):
            if item[0] == key:
                item[1] = value

    return edit


def _without(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["state"]["__dict__"] = [item for item in _state_items(doc) if item[0] != key]

    return edit


RESUME_TAMPERED = {
    "unknown_key": (lambda d: _state_items(d).append(["surprise", 1]), "unknown key 'surprise'"),
    "epoch_is_string": (_set("epoch", "one"), "'epoch' in the resume state must be"),
    "history_is_number": (_set("history", 3), "'history' in the resume state must be"),
    "best_value_is_list": (_set("best_value", {"__list__": [1]}), "'best_value' in the resume state must be"),
    "missing_optimizers": (_without("optimizers"), "has no 'optimizers'"),
    "missing_epoch": (_without("epoch"), "has no 'epoch'"),
    "unknown_top_level_key": (lambda d: d.update(extra=1), "expected an object with the keys 'tensors' and 'state'"),
    "tensors_not_there": (lambda d: d.update(tensors="state-7.safetensors"), "state.json: 'tensors' names"),
    "tensors_outside": (lambda d: d.update(tensors="../model.safetensors"), "state.json: 'tensors' must name"),
    "tensor_not_in_file": (_set("generator", {"__tensor__": "t999"}), "tensor 't999' is not in the tensor file"),
}


def _tampered_run(interrupted: Path, tmp_path: Path, case: str) -> Path:
    out = tmp_path / "run"
    shutil.copytree(interrupted.parent / f"{interrupted.name}.incomplete", tmp_path / "run.incomplete")
    path = tmp_path / "run.incomplete" / "resume" / "state.json"
    doc = json.loads(path.read_text())
    RESUME_TAMPERED[case][0](doc)
    path.write_text(json.dumps(doc))
    return out


@pytest.mark.parametrize("case", sorted(RESUME_TAMPERED))
def test_a_tampered_resume_state_is_a_model_error(work, interrupted, tmp_path, case):
    out = _tampered_run(interrupted, tmp_path, case)
    with pytest.raises(ModelError) as info:
        train(_config(work / "data.parquet", 2), output=out, progress=False, resume=True)
    message = str(info.value)
    assert RESUME_TAMPERED[case][1] in message and "state.json" in message and "\n" not in message
    assert not out.exists()


def test_resume_tensors_that_do_not_fit_the_model_name_the_key(work, interrupted, tmp_path):
    out = _tampered_run(interrupted, tmp_path, "unknown_key")
    path = tmp_path / "run.incomplete" / "resume" / "state.json"
    doc = json.loads(path.read_text())
    _state_items(doc).pop()  # back to the saved structure
    model = dict(_state_items(doc))["model"]["__dict__"]
    model[:] = [item for item in model if item[0] != "towers.0.out.bias"]
    path.write_text(json.dumps(doc))
    # (A MtrecError: train adds how to continue to every error after the model is built.)
    with pytest.raises(MtrecError, match="resume: tensor 'towers.0.out.bias' is missing"):
        train(_config(work / "data.parquet", 2), output=out, progress=False, resume=True)


@pytest.mark.parametrize("case", ["unknown_key", "tensors_outside"])
def test_cli_resume_of_a_tampered_state_is_one_line(interrupted, tmp_path, case):
    out = _tampered_run(interrupted, tmp_path, case)
    proc = mtrec("train", "--resume", str(out), "--quiet")
    assert_one_line_error(proc, "state.json", RESUME_TAMPERED[case][1])
    assert not out.exists()
