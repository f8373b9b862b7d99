"""Unit tests for the strict config loader (mtrec.config)."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtrec.config import Config, config_from_dict, config_to_dict, load_config
from mtrec.errors import ConfigError
from mtrec.models import list_models
from mtrec.models.registry import _builder
from mtrec.quickstart import synthetic_features, synthetic_tasks
from mtrec.schema import DenseFeature, SequenceFeature, SparseFeature, Task

REPO = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((REPO / "configs").glob("**/*.yaml"))


def minimal() -> dict[str, Any]:
    """A small valid config as a plain dict (a fresh copy each call)."""
    return {
        "data": {"train": "train.parquet"},
        "features": {
            "sparse": [{"name": "user_id", "min_freq": 2}, {"name": "item_id"}],
            "dense": [{"name": "price", "transform": "log1p"}],
            "sequence": [{"name": "hist", "max_len": 5, "vocab_from": "item_id"}],
        },
        "tasks": [
            {"name": "ctr", "label": "click"},
            {"name": "cvr", "label": "conversion", "where": "click == 1"},
        ],
        "model": {"name": "mmoe", "num_experts": 3},
        "train": {"epochs": 2},
    }


def with_change(path: str, value: Any) -> dict[str, Any]:
    """``minimal()`` with the value at a dotted path (list items by index) replaced."""
    raw = minimal()
    node: Any = raw
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return raw


def error_of(raw: Any, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, overrides=overrides)
    return str(info.value)


# --------------------------------------------------------------------------- basics


def test_minimal_config_is_parsed_into_typed_dataclasses() -> None:
    cfg = config_from_dict(minimal())
    assert isinstance(cfg, Config)
    assert cfg.data.train == "train.parquet"
    assert cfg.data.valid is None
    assert cfg.data.valid_fraction == 0.1
    assert cfg.features.sparse == (SparseFeature("user_id", min_freq=2), SparseFeature("item_id"))
    assert cfg.features.dense == (DenseFeature("price", transform="log1p"),)
    assert cfg.features.sequence == (SequenceFeature("hist", max_len=5, vocab_from="item_id"),)
    assert cfg.tasks == (Task("ctr", label="click"), Task("cvr", label="conversion", where="click == 1"))
    assert cfg.train.epochs == 2
    assert cfg.train.batch_size == 2048  # default kept
    assert cfg.model.name == "mmoe"
    assert cfg.model.embedding_dim == 16
    assert cfg.schema.task_names == ("ctr", "cvr")


def test_int_is_accepted_and_converted_where_a_float_is_expected() -> None:
    cfg = config_from_dict(with_change("train.lr", 1))
    assert cfg.train.lr == 1.0
    assert isinstance(cfg.train.lr, float)


def test_input_dict_is_not_mutated() -> None:
    raw = minimal()
    before = copy.deepcopy(raw)
    config_from_dict(raw, overrides=["train.epochs=9", "tasks.cvr.weight=3"])
    assert raw == before


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({**minimal(), "trian": {"epochs": 1}}, "trian"),
        (with_change("train.epoch", 3), "train.epoch"),
        (with_change("data.validation", "v.parquet"), "data.validation"),
        (with_change("features.embeddings", []), "features.embeddings"),
        (with_change("features.sparse.1", {"name": "item_id", "min_frq": 2}), "features.sparse.item_id.min_frq"),
        (with_change("features.dense.0", {"name": "price", "scale": 2.0}), "features.dense.price.scale"),
        (with_change("features.sequence.0", {"name": "hist", "maxlen": 3}), "features.sequence.hist.maxlen"),
        (with_change("tasks.1", {"name": "cvr", "label": "conversion", "wher": "click == 1"}), "tasks.cvr.wher"),
        (with_change("model.num_expert", 8), "model.num_expert"),
    ],
)
def test_unknown_key_is_rejected_with_its_full_path(raw: dict[str, Any], path: str) -> None:
    msg = error_of(raw)
    assert msg.startswith(f"{path}: unknown")


def test_unknown_model_parameter_lists_the_models_own_parameters() -> None:
    msg = error_of(with_change("model.num_expert", 8))
    assert "'mmoe'" in msg
    assert "num_experts" in msg


def test_model_parameter_of_another_model_is_rejected() -> None:
    # num_levels belongs to PLE, not MMoE.
    msg = error_of(with_change("model.num_levels", 2))
    assert msg.startswith("model.num_levels: unknown parameter")
    cfg = config_from_dict(with_change("model", {"name": "ple", "num_levels": 3}))
    assert cfg.model.params["num_levels"] == 3


def test_unknown_model_name_is_a_config_error() -> None:
    msg = error_of(with_change("model.name", "transformer"))
    assert msg.startswith("model.name:")
    assert "transformer" in msg
    assert "mmoe" in msg


def test_missing_required_key_is_named() -> None:
    msg = error_of(with_change("tasks.0", {"name": "ctr"}))
    assert msg.startswith("tasks.ctr.label: required key is missing")


# --------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    ("raw", "path", "expected"),
    [
        (with_change("train.epochs", "5"), "train.epochs", "expected int"),
        (with_change("train.epochs", True), "train.epochs", "expected int"),
        (with_change("train.epochs", 2.5), "train.epochs", "expected int"),
        (with_change("train.epochs", [3]), "train.epochs", "expected int"),
        (with_change("train.lr", False), "train.lr", "expected float"),
        (with_change("features.dense.0", {"name": "price", "clean": 1}), "features.dense.price.clean", "expected bool"),
        (
            with_change("features.dense.0", {"name": "price", "clean": "yes"}),
            "features.dense.price.clean",
            "expected bool",
        ),
        (with_change("train.grad_clip", "1.0"), "train.grad_clip", "expected float or null"),
        (with_change("data.train", ["a.parquet"]), "data.train", "expected str or null"),
        (with_change("features.sparse", {"name": "user_id"}), "features.sparse", "expected a list"),
        (with_change("features.sparse.0", "user_id"), "features.sparse.0", "expected a mapping"),
        (
            with_change("features.sparse.0", {"name": "user_id", "min_freq": "2"}),
            "features.sparse.user_id.min_freq",
            "expected int",
        ),
        (
            with_change("features.dense.0", {"name": "price", "transform": "log"}),
            "features.dense.price.transform",
            "expected 'none' or 'standardize' or 'log1p' or 'log1p_standardize'",
        ),
        (
            with_change("tasks.0", {"name": "ctr", "label": "click", "type": "ordinal"}),
            "tasks.ctr.type",
            "expected 'binary' or 'regression' or 'multiclass'",
        ),
        (
            with_change("tasks.0", {"name": "ctr", "label": "click", "weight": "high"}),
            "tasks.ctr.weight",
            "expected float",
        ),
        (with_change("tasks", {"name": "ctr", "label": "click"}), "tasks", "expected a list"),
        (with_change("train", [1, 2]), "train", "expected a mapping"),
        (with_change("model.num_experts", "4"), "model.num_experts", "expected int"),
        (with_change("model.num_experts", True), "model.num_experts", "expected int"),
        (with_change("model.expert_hidden", 64), "model.expert_hidden", "expected a list of int"),
        (with_change("model.expert_hidden", [64, "32"]), "model.expert_hidden.1", "expected int"),
        (with_change("model.embedding_dim", 8.0), "model.embedding_dim", "expected int"),
        (with_change("model.name", 3), "model.name", "expected a string"),
        (with_change("model", [1]), "model", "expected a mapping"),
    ],
)
def test_wrong_type_names_key_and_expected_type(raw: dict[str, Any], path: str, expected: str) -> None:
    msg = error_of(raw)
    assert msg.startswith(f"{path}: {expected}")


def test_top_level_must_be_a_mapping() -> None:
    assert "expected a mapping at the top level" in error_of([minimal()])


@pytest.mark.parametrize(
    ("raw", "prefix"),
    [
        (with_change("train.epochs", 0), "train.epochs: expected a positive number"),
        (with_change("train.batch_size", -1), "train.batch_size: expected a positive number"),
        (with_change("train.lr", 0), "train.lr: expected a positive number"),
        (with_change("train.patience", -1), "train.patience: expected >= 0"),
        (with_change("data.valid_fraction", 1.0), "data.valid_fraction: expected a number in (0, 1)"),
        (with_change("data.valid_fraction", 0), "data.valid_fraction: expected a number in (0, 1)"),
        (with_change("train.device", "gpu"), "train.device: expected auto, cpu, cuda or cuda:N"),
        (with_change("train.monitor", "ctx.auc"), "train.monitor:"),
        (with_change("train.monitor", "ctr.accuracy"), "train.monitor:"),
        (with_change("model.embedding_dim", 0), "model.embedding_dim: expected >= 1"),
        (with_change("features.sparse.0", {"name": "user_id", "min_freq": 0}), "features.sparse.user_id.min_freq"),
        (
            with_change("features.sequence.0", {"name": "hist", "vocab_from": "nope"}),
            "features.sequence.hist.vocab_from",
        ),
        (with_change("tasks.1", {"name": "ctr", "label": "conversion"}), "tasks: task name 'ctr' is used twice"),
        (with_change("tasks.0", {"name": "ctr", "label": "price"}), "tasks.ctr.label: column 'price'"),
        (with_change("tasks", []), "tasks: at least one task is required"),
        (with_change("features.sparse.1", {"name": "user_id"}), "features.sparse: column 'user_id' is listed twice"),
    ],
)
def test_invalid_values_are_rejected_with_key(raw: dict[str, Any], prefix: str) -> None:
    assert error_of(raw).startswith(prefix)


@pytest.mark.parametrize("monitor", ["mean_auc", "loss", "ctr.auc", "cvr.logloss"])
def test_valid_monitor_values_are_accepted(monitor: str) -> None:
    assert config_from_dict(with_change("train.monitor", monitor)).train.monitor == monitor


def test_auto_monitor_is_mean_auc_with_a_binary_task_else_loss() -> None:
    assert config_from_dict(minimal()).train.monitor == "mean_auc"
    raw = minimal()
    raw["tasks"] = [{"name": "watch", "label": "dwell_time", "type": "regression"}]
    assert config_from_dict(raw).train.monitor == "loss"


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_valid_devices_are_accepted(device: str) -> None:
    assert config_from_dict(minimal(), overrides=[f"train.device={device}"]).train.device == device


# --------------------------------------------------------------------------- --set overrides


def test_override_scalar() -> None:
    cfg = config_from_dict(minimal(), overrides=["train.epochs=5"])
    assert cfg.train.epochs == 5
    assert isinstance(cfg.train.epochs, int)


def test_override_creates_missing_section_and_key() -> None:
    raw = minimal()
    del raw["train"]
    cfg = config_from_dict(raw, overrides=["train.batch_size=64", "output=runs/x"])
    assert cfg.train.batch_size == 64
    assert cfg.output == "runs/x"


def test_override_list_item_by_name() -> None:
    cfg = config_from_dict(minimal(), overrides=["tasks.cvr.weight=2"])
    assert [t.weight for t in cfg.tasks] == [1.0, 2.0]


def test_override_list_item_by_index_and_negative_index() -> None:
    cfg = config_from_dict(minimal(), overrides=["features.sparse.0.min_freq=3", "features.sparse.-1.min_freq=4"])
    assert [f.min_freq for f in cfg.features.sparse] == [3, 4]


def test_override_with_spaces_in_value() -> None:
    cfg = config_from_dict(minimal(), overrides=["tasks.cvr.where=click == 1 and price > 2"])
    assert cfg.tasks[1].where == "click == 1 and price > 2"


def test_override_yaml_list_value() -> None:
    cfg = config_from_dict(minimal(), overrides=["model.expert_hidden=[32, 16]"])
    assert cfg.model.params["expert_hidden"] == (32, 16)


def test_override_empty_value_is_null() -> None:
    cfg = config_from_dict(minimal(), overrides=["data.train="])
    assert cfg.data.train is None


def test_later_override_wins() -> None:
    cfg = config_from_dict(minimal(), overrides=["train.epochs=5", "train.epochs=7"])
    assert cfg.train.epochs == 7


def test_override_values_are_type_checked() -> None:
    msg = error_of(minimal(), overrides=("train.epochs=many",))
    assert msg.startswith("train.epochs: expected int")


def test_override_unknown_key_is_rejected() -> None:
    assert error_of(minimal(), overrides=("train.epoch=5",)).startswith("train.epoch: unknown key")
    assert error_of(minimal(), overrides=("model.num_expert=5",)).startswith("model.num_expert: unknown parameter")


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("features.sparse.7.min_freq=3", "features.sparse.7: index out of range (list has 2 items)"),
        ("features.sparse.-3.min_freq=3", "features.sparse.-3: index out of range"),
        ("tasks.ctx.weight=2", "tasks.ctx: no item named 'ctx'"),
        ("train.epochs", "expected KEY=VALUE"),
        ("=5", "expected KEY=VALUE"),
        ("train.epochs.x=1", "train.epochs is a value, not a section"),
    ],
)
def test_bad_override_is_a_config_error(item: str, fragment: str) -> None:
    msg = error_of(minimal(), overrides=(item,))
    assert msg.startswith("--set ")
    assert fragment in msg


def test_override_float_in_exponent_notation() -> None:
    cfg = config_from_dict(minimal(), overrides=["train.lr=1e-4"])
    assert cfg.train.lr == pytest.approx(1e-4)


def test_override_into_null_section() -> None:
    raw = minimal()
    raw["train"] = None
    assert config_from_dict(raw).train.epochs == 3  # a null section is fine on its own
    cfg = config_from_dict(raw, overrides=["train.epochs=5"])
    assert cfg.train.epochs == 5


# --------------------------------------------------------------------------- model params


def builder_defaults(name: str) -> dict[str, Any]:
    sig = inspect.signature(_builder(name))
    skip = {"layout", "task_names", "embedding", "output_dims"}  # set by the task types, not config
    return {k: p.default for k, p in sig.parameters.items() if k not in skip}


@pytest.mark.parametrize("name", sorted(list_models()))
def test_model_params_defaults_are_filled_in(name: str) -> None:
    raw = with_change("model", {"name": name})
    if name == "aitm":  # AITM chains tasks on one space: no where:
        raw["tasks"] = [{k: v for k, v in t.items() if k != "where"} for t in raw["tasks"]]
    cfg = config_from_dict(raw)
    assert cfg.model.name == name
    assert cfg.model.embedding_dim == 16
    assert dict(cfg.model.params) == builder_defaults(name)


def test_model_defaults_fill_only_missing_params() -> None:
    cfg = config_from_dict(with_change("model", {"name": "mmoe", "num_experts": 7, "expert_hidden": [8]}))
    assert cfg.model.params["num_experts"] == 7
    assert cfg.model.params["expert_hidden"] == (8,)
    assert cfg.model.params["tower_hidden"] == builder_defaults("mmoe")["tower_hidden"]


def test_missing_model_section_defaults_to_mmoe() -> None:
    raw = minimal()
    del raw["model"]
    cfg = config_from_dict(raw)
    assert cfg.model.name == "mmoe"
    assert dict(cfg.model.params) == builder_defaults("mmoe")


# --------------------------------------------------------------------------- round trip


def rich() -> dict[str, Any]:
    raw = minimal()
    raw["data"] = {"train": "t/*.parquet", "valid": "v.parquet", "valid_fraction": 0.25}
    raw["features"]["sparse"].append({"name": "city", "hash_buckets": 1000, "max_vocab": 50})
    raw["features"]["dense"].append({"name": "age", "transform": "none", "fill": -1.5, "clean": True})
    raw["tasks"].append({"name": "dwell", "label": "dwell_time", "type": "regression", "weight": 0.5})
    raw["model"] = {"name": "ple", "embedding_dim": 8, "num_levels": 1, "expert_hidden": [32]}
    raw["train"] = {"epochs": 4, "embedding_lr": 0.01, "grad_clip": 5, "threads": 2, "monitor": "cvr.auc"}
    raw["output"] = "runs/rich"
    return raw


@pytest.mark.parametrize("make", [minimal, rich], ids=["minimal", "rich"])
def test_config_to_dict_round_trips(make: Any) -> None:
    cfg = config_from_dict(make())
    out = config_to_dict(cfg)
    assert config_from_dict(out) == cfg
    # as written to and read back from a model directory's config.yaml
    text = yaml.safe_dump(out, sort_keys=False)
    assert config_from_dict(yaml.safe_load(text)) == cfg


def test_config_to_dict_is_plain() -> None:
    out = config_to_dict(config_from_dict(rich()))

    def check(x: Any) -> None:
        assert not isinstance(x, tuple)
        if isinstance(x, dict):
            for v in x.values():
                check(v)
        elif isinstance(x, list):
            for v in x:
                check(v)
        else:
            assert x is None or isinstance(x, (str, int, float, bool))

    check(out)
    assert out["model"]["name"] == "ple"
    assert out["model"]["embedding_dim"] == 8
    assert out["model"]["num_levels"] == 1
    assert out["model"]["expert_hidden"] == [32]
    assert "params" not in out["model"]


# --------------------------------------------------------------------------- files


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_config_reads_file_and_applies_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(minimal()))
    cfg = load_config(path, overrides=["train.epochs=4"])
    assert cfg == config_from_dict(minimal(), overrides=["train.epochs=4"])


def test_load_config_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(with_change("train.epoch", 1)))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: train.epoch: unknown key")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("data: {train: x.parquet}\ntasks:\n  - name: ctr\n   label: click\n", 4),
        ("a: 1\nb: [1, 2\nc: 3\n", 3),
        ("a: 1\n\tb: 2\n", 2),
    ],
)
def test_invalid_yaml_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(str(path))
    assert f"line {line} " in msg
    assert "invalid YAML" in msg


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(info.value)


def test_empty_file_reports_missing_tasks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tasks: at least one task"):
        load_config(write(tmp_path, "# nothing here\n"))


def test_top_level_list_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    text = "data: !!python/object/apply:os.system ['echo hacked']\n"
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, text))


def test_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    raw = minimal()
    del raw["train"]
    text = yaml.safe_dump(raw) + "train: {epochs: 3, epochs: 5}\n"
    with pytest.raises(ConfigError, match="epochs"):
        load_config(write(tmp_path, text))


# --------------------------------------------------------------------------- where: safety


@pytest.mark.parametrize(
    "where",
    [
        "click.__class__",
        "click.__class__ == 1",
        "__import__('os')",
        "__import__('os').system('echo hacked') == 0",
        "len(click) > 1",
        "click[0] == 1",
        "lambda: 1",
        "click == (lambda: 1)",
        "click == __import__",
        "click == other",
        "click in (1, 2)",
        "0 < click < 2",
        "click is 1",
        "click == None",
        "click == b'x'",
        "click == [1]",
        "click + 1 == 2",
        "click == 1 +",
        "click ==",
        "click = 1",
        "",
        "(click == 1",
        "f'{click}' == 'x'",
        "[c for c in click]",
    ],
)
def test_unsafe_or_unparsable_where_is_rejected(where: str) -> None:
    raw = minimal()
    raw["tasks"][1]["where"] = where
    msg = error_of(raw)
    assert msg.startswith("tasks.cvr.where: ")


@pytest.mark.parametrize(
    "where",
    ["click == 1", "1 == click", "click != 0 and price >= 2.5", "not (click == 0 or city == 'x')", "click"],
)
def test_safe_where_is_accepted(where: str) -> None:
    raw = minimal()
    raw["tasks"][1]["where"] = where
    assert config_from_dict(raw).tasks[1].where == where


def test_where_with_negative_constant_is_accepted() -> None:
    raw = minimal()
    raw["tasks"][1]["where"] = "price > -1"
    assert config_from_dict(raw).tasks[1].where == "price > -1"


# --------------------------------------------------------------------------- shipped configs


def test_there_are_shipped_configs() -> None:
    assert CONFIG_FILES, "no configs/**/*.yaml found"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[str(p.relative_to(REPO)) for p in CONFIG_FILES])
def test_shipped_config_loads_and_names_a_registered_model(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.name in list_models()
    assert set(cfg.model.params) == set(builder_defaults(cfg.model.name))
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_quickstart_defaults_agree_with_synthetic_mmoe_config() -> None:
    shipped = load_config(REPO / "configs" / "synthetic" / "mmoe.yaml")
    embedded = config_from_dict({"features": synthetic_features(), "tasks": synthetic_tasks()})
    assert embedded.features == shipped.features
    assert embedded.tasks == shipped.tasks
    assert embedded.schema == shipped.schema
