"""Hostile config input: YAML aliases, deep nesting, huge texts and out-of-range values.

Each case was reported against the loader: a 1 KB "billion laughs" document took 53 s and
2.5 GB before it was refused, deep nesting and deep ``where:`` expressions ended in
RecursionError tracebacks, and ``--set`` values such as ``train.lr=.nan`` or
``model.num_experts=100000`` passed validation and failed later (or never). Every one must
be a one-line :class:`~mtrec.errors.ConfigError` naming the key, raised at once.
"""

from __future__ import annotations

import dataclasses
import signal
import tracemalloc
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtrec import config as config_module
from mtrec.config import Config, DataConfig, TrainConfig, config_from_dict, config_to_dict, load_config
from mtrec.errors import ConfigError
from mtrec.models import list_models
from mtrec.models.registry import model_parameters
from mtrec.schema import DenseFeature, Esmm, SequenceFeature, SparseFeature, Task
from mtrec.typed import parameter_spec
from mtrec.weighting import WEIGHTINGS
from tests.integration.helpers import assert_one_line_error, mtrec

REPO = Path(__file__).resolve().parents[2]


def minimal() -> dict[str, Any]:
    """A small valid config (a fresh copy each call)."""
    return {
        "data": {"train": "train.parquet"},
        "features": {
            "sparse": [{"name": "user_id"}, {"name": "item_id"}],
            "dense": [{"name": "price"}],
            "sequence": [{"name": "hist", "max_len": 5, "vocab_from": "item_id"}],
        },
        "tasks": [
            {"name": "ctr", "label": "click"},
            {"name": "cvr", "label": "conversion", "where": "click == 1"},
        ],
        "model": {"name": "mmoe", "num_experts": 3},
        "train": {"epochs": 2},
    }


def refusal(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """The one-line ConfigError message of ``fn(*args, **kwargs)``; any other outcome fails
    the test with a one-line report (the thousand frames of a RecursionError help no one
    and can break pytest's traceback rendering)."""
    try:
        fn(*args, **kwargs)
    except ConfigError as exc:
        return one_line(exc)
    except Exception as exc:  # noqa: BLE001 - reported as the failure, not hidden
        pytest.fail(f"{type(exc).__name__} instead of a ConfigError: {str(exc)[:200]}", pytrace=False)
    pytest.fail("accepted instead of refused with a ConfigError", pytrace=False)


def error_of(raw: Any, overrides: tuple[str, ...] = ()) -> str:
    return refusal(config_from_dict, raw, overrides=overrides)


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def parse_yaml_text(text: str, source: str) -> Any:
    """The public bounded parser (looked up at call time: the old code has none)."""
    return config_module.parse_yaml_text(text, source)  # type: ignore[attr-defined]


@contextmanager
def bounded(seconds: float = 5.0, peak_bytes: int = 20 * 2**20) -> Iterator[None]:
    """Fails the block if it runs longer than ``seconds`` or allocates more than ``peak_bytes``
    at a time: a refused document must not be expanded first."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s (the document is being expanded)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
        assert peak < peak_bytes, f"peak allocation {peak / 2**20:.0f} MiB"
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def billion_laughs(levels: int = 7) -> str:
    """~1 KB of YAML whose aliases expand to 9**levels strings."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def config_text(extra: str = "") -> str:
    return yaml.safe_dump(minimal(), sort_keys=False) + extra


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- anchors and aliases


ALIAS_DOCS = {
    "anchor_only": config_text("output: &out runs/x\n"),
    "scalar_alias": config_text("output: &out runs/x\ntags: *out\n"),
    "merge_key": config_text("base: &base {epochs: 2}\nother: {<<: *base}\n"),
    "anchored_task": yaml.safe_dump({k: v for k, v in minimal().items() if k != "tasks"})
    + "tasks:\n  - &t {name: ctr, label: click}\n  - *t\n",
    "billion_laughs": config_text(billion_laughs()),
}


@pytest.mark.parametrize("text", list(ALIAS_DOCS.values()), ids=list(ALIAS_DOCS))
def test_anchors_and_aliases_in_a_config_file_are_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with bounded():
        msg = refusal(load_config, path)
    assert msg.startswith(f"{path}: line ")
    assert "anchors and aliases are not allowed" in msg


def test_billion_laughs_is_refused_by_the_public_parser_fast() -> None:
    text = billion_laughs()
    assert len(text) < 1024
    with bounded(seconds=2.0, peak_bytes=2 * 2**20):
        msg = refusal(parse_yaml_text, text, "model/config.yaml")
    assert msg.startswith("model/config.yaml: line 1 ")
    assert "alias" in msg and "&a0" in msg


def test_billion_laughs_from_another_yaml_loader_is_refused_without_expanding_it() -> None:
    # A model directory's config.yaml read with yaml.safe_load (shared, unexpanded lists):
    # config_from_dict stops copying the shared lists long before their 4.8 million strings
    # (the slack in time is for tracemalloc, which slows every allocation).
    raw = yaml.safe_load(config_text(billion_laughs()))
    with bounded(seconds=15.0, peak_bytes=64 * 2**20):
        msg = refusal(config_from_dict, raw)
    assert msg == "config: more than 1048576 values (shared lists expanding? YAML aliases are not allowed)"


def test_a_list_shared_by_two_keys_in_python_is_fine() -> None:
    raw = minimal()
    widths = [32, 16]
    raw["model"].update(expert_hidden=widths, tower_hidden=widths)
    params = config_from_dict(raw).model.params
    assert params["expert_hidden"] == params["tower_hidden"] == (32, 16)


@pytest.mark.parametrize("item", ["train.lr=*a", "train.lr=&a 0.1", "model.expert_hidden=[&w 8, *w]"])
def test_anchors_and_aliases_in_a_set_value_are_refused(item: str) -> None:
    msg = error_of(minimal(), overrides=(item,))
    assert msg.startswith(f"--set {item.partition('=')[0]}: ")
    assert "anchors and aliases are not allowed" in msg


# --------------------------------------------------------------------------- nesting and size


DEEP_DOCS = {
    "flow_lists": "data: " + "[" * 5000 + "]" * 5000 + "\n",
    "flow_mappings": "data: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
    "block_lists": "data:\n" + "".join(" " * (i + 1) + "-\n" for i in range(1000)),
    "block_mappings": "".join(" " * i + "k:\n" for i in range(1000)),
    "compact_lists": "- " * 5000 + "x\n",
}


@pytest.mark.parametrize("text", list(DEEP_DOCS.values()), ids=list(DEEP_DOCS))
def test_deep_nesting_in_a_config_file_is_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with bounded():
        msg = refusal(load_config, path)
    assert msg.startswith(f"{path}: line ")
    assert "nested deeper than 32 levels" in msg


def test_nesting_up_to_the_bound_is_parsed() -> None:
    text = "a: " + "[" * 31 + "]" * 31
    value = parse_yaml_text(text, "cfg.yaml")["a"]
    for _ in range(30):
        value = value[0]
    assert value == []


@pytest.mark.parametrize(
    "item",
    [
        "model.expert_hidden=" + "[" * 5000 + "]" * 5000,
        "model.expert_hidden=" + "[" * 5000,  # unterminated too: not read as a string
        "train.loss_weighting=" + "{a: " * 3000 + "1" + "}" * 3000,
    ],
    ids=["lists", "unterminated", "mappings"],
)
def test_deep_nesting_in_a_set_value_is_refused(item: str) -> None:
    with bounded():
        msg = error_of(minimal(), overrides=(item,))
    assert msg.startswith(f"--set {item.partition('=')[0]}: ")
    assert "nested deeper than 32 levels" in msg


def test_deep_set_key_is_refused() -> None:
    msg = error_of(minimal(), overrides=("train" + ".x" * 5000 + "=1",))
    assert msg.startswith("--set train.x.x")
    assert "at most 32 parts" in msg


def test_deeply_nested_python_dict_is_a_config_error() -> None:
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    raw = minimal()
    raw["model"]["expert_hidden"] = deep
    assert "nested deeper than 32 levels" in error_of(raw)


def test_oversized_config_file_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = write(tmp_path, config_text("#" * 80 + "\n") + ("#" * 1023 + "\n") * 1024)
    assert refusal(load_config, path) == f"{path}: config file larger than 1 MiB"


def test_oversized_text_is_refused_by_the_public_parser() -> None:
    assert (
        refusal(parse_yaml_text, "a: 1\n" + "#" * 2**20, "model/config.yaml")
        == "model/config.yaml: text larger than 1 MiB"
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("data: {? [1]: 2}\n", "invalid YAML (a key must be a scalar, got list)"),
        ("data:\n  ? {a: 1}\n  : 2\n", "invalid YAML (a key must be a scalar, got dict)"),
        ("train: {epochs: 2020-02-30}\n", "invalid YAML (cannot read this value (day is out of range for month))"),
        ("train: {epochs: " + "1" * 5000 + "}\n", "integers of more than 100 digits are not allowed"),
        ("train: {seed: 0x" + "f" * 5000 + "}\n", "integers of more than 100 digits are not allowed"),
    ],
    ids=["sequence_key", "mapping_key", "feb_30", "huge_int", "huge_hex"],
)
def test_yaml_values_that_break_python_are_yaml_errors(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    msg = refusal(load_config, path)
    assert msg.startswith(f"{path}: line ")
    assert fragment in msg


def test_set_value_that_is_not_yaml_is_still_its_text() -> None:
    cfg = config_from_dict(minimal(), overrides=["data.train=a: b: c", "output=[runs"])
    assert cfg.data.train == "a: b: c"
    assert cfg.output == "[runs"


# --------------------------------------------------------------------------- where: expressions


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        ("not " * 3000 + "click == 1", "at most 1000 characters, got 12010"),
        ("not " * 100_000 + "click == 1", "at most 1000 characters"),
        ("not " * 40 + "click == 1", "nested at most 32 levels deep, got 42"),
        ("click == " + "-" * 900 + "1", "nested at most 32 levels deep"),
        (" or ".join(["click == 1"] * 200), "at most 1000 characters"),
    ],
    ids=["not_x3000", "not_x100000", "not_x40", "minus_x900", "or_x200"],
)
def test_long_or_deep_where_is_refused(where: str, fragment: str) -> None:
    raw = minimal()
    raw["tasks"][1]["where"] = where
    with bounded():
        msg = error_of(raw)
    assert msg.startswith("tasks.cvr.where: ")
    assert fragment in msg


def test_long_where_from_a_set_value_is_refused() -> None:
    msg = error_of(minimal(), overrides=("tasks.cvr.where=" + "not " * 3000 + "click",))
    assert msg.startswith("tasks.cvr.where: expected an expression of at most 1000 characters")


def test_where_within_the_bounds_is_accepted() -> None:
    raw = minimal()
    raw["tasks"][1]["where"] = "not " * 20 + "(click == 1 or price > 2)"
    assert config_from_dict(raw).tasks[1].where == raw["tasks"][1]["where"]


# --------------------------------------------------------------------------- --set values


BAD_SETS = [
    (
        "esmm={ctr: ctr, cvr: cvr, counterfactual: tobit}",
        "esmm.counterfactual: expected 'none' or 'ips' or 'dr', got 'tobit'",
    ),
    (
        "esmm={ctr: ctr, cvr: cvr, counterfactual: ips, propensity_clip: 0}",
        "esmm.propensity_clip: expected a number in (0, 1], got 0.0",
    ),
    ("esmm={ctr: ctr, cvr: cvr, counterfactual: dr, counterfactual_weight: -1}", "esmm.counterfactual_weight"),
    (
        "esmm={ctr: cvr, cvr: ctr, counterfactual: ips}",
        "esmm.ctr: the click task 'cvr' must cover every impression",
    ),
    (
        "features.sequence.hist.pooling=target_attention",
        "features.sequence.hist.target: pooling target_attention needs the candidate's sparse feature",
    ),
    ("features.sequence.hist.target=item_id", "features.sequence.hist.target: only for pooling: target_attention"),
    (
        "features.sequence.hist={name: hist, pooling: target_attention, target: user_id, vocab_from: item_id}",
        "features.sequence.hist.target: the list must share 'user_id''s embedding table to attend with it "
        "(set vocab_from: user_id; it is 'item_id')",
    ),
    (
        "features.sequence.hist={name: hist, pooling: target_attention, target: price}",
        "features.sequence.hist.target: 'price' is not a sparse feature",
    ),
    ("features.interaction={name: dcn_v2, layers: 0}", "features.interaction.layers: expected >= 1, got 0"),
    ("features.interaction={name: dcn_v2, rank: 0}", "features.interaction.rank: expected >= 1"),
    ("features.interaction={name: dcn}", "features.interaction.name: expected 'dcn_v2', got 'dcn'"),
    ("features.interaction={name: dcn_v2, layer: 2}", "features.interaction.layer: unknown key"),
    ("train.lr=.nan", "train.lr: expected a finite positive number, got nan"),
    ("train.lr=.inf", "train.lr: expected a finite positive number, got inf"),
    ("train.lr=-.inf", "train.lr: expected a finite positive number, got -inf"),
    ("train.lr=1" + "0" * 400, "--set train.lr: integers of more than 100 digits are not allowed"),
    ("train.lr=1" + "0" * 400 + ".0", "train.lr: expected a finite positive number, got inf"),
    ("train.embedding_lr=.nan", "train.embedding_lr: expected a finite positive number or null, got nan"),
    ("train.weight_decay=.nan", "train.weight_decay: expected a finite number >= 0, got nan"),
    ("train.grad_clip=.inf", "train.grad_clip: expected a finite positive number or null, got inf"),
    ("train.gpu_data_share=.nan", "train.gpu_data_share: expected a finite number in [0, 1], got nan"),
    ("train.dist_timeout_s=.inf", "train.dist_timeout_s: expected a finite positive number, got inf"),
    ("train.dist_timeout_s=.nan", "train.dist_timeout_s: expected a finite positive number, got nan"),
    ("train.dist_timeout_s=1e300", "train.dist_timeout_s: expected at most 31536000"),
    ("train.seed=-1", "train.seed: expected >= 0, got -1"),
    ("train.seed=4294967296", "train.seed: expected at most 4294967295"),
    ("train.seed=18446744073709551617", "train.seed: expected at most 4294967295"),
    ("train.epochs=" + "9" * 30, "train.epochs: expected at most 1000000"),
    ("train.batch_size=" + "9" * 30, "train.batch_size: expected at most 2147483647"),
    ("train.threads=0", "train.threads: expected >= 1 or null, got 0"),
    ("data.valid_fraction=.nan", "data.valid_fraction: expected a finite number in (0, 1), got nan"),
    ("data.memory_budget_mb=.inf", "data.memory_budget_mb: expected a finite positive number, got inf"),
    ("data.num_workers=100000", "data.num_workers: expected at most 1024"),
    ("features.dense.price.fill=.nan", "features.dense.price.fill: expected a finite number or null, got nan"),
    ("features.sparse.user_id.hash_buckets=" + "9" * 20, "features.sparse.user_id.hash_buckets: expected at most"),
    ("features.sequence.hist.max_len=100000000", "features.sequence.hist.max_len: expected at most 65536"),
    ("tasks.ctr.weight=.nan", "tasks.ctr.weight: expected a finite number >= 0, got nan"),
    ("tasks.ctr.huber_delta=.inf", "tasks.ctr.huber_delta: expected a finite positive number, got inf"),
    ("tasks.ctr.name=[x]", "tasks.0.name: expected str, got ['x']"),
    ("model.name=[a]", "model.name: expected a string, got ['a']"),
    ("model.embedding_dim=1e9", "model.embedding_dim: expected int"),
    ("model.embedding_dim=1000000000", "model.embedding_dim: expected at most 4096, got 1000000000"),
    ("model.num_experts=100000", "model.num_experts: expected at most 64, got 100000"),
    ("model.num_experts=0", "model.num_experts: expected >= 1, got 0"),
    ("model.dropout=2.0", "model.dropout: expected a number in [0, 1), got 2.0"),
    ("model.dropout=.nan", "model.dropout: expected a finite number in [0, 1), got nan"),
    ("model.tower_hidden=[0]", "model.tower_hidden.0: expected >= 1, got 0"),
    ("model.tower_hidden=[64, -1]", "model.tower_hidden.1: expected >= 1, got -1"),
    ("model.expert_hidden=[1000000]", "model.expert_hidden.0: expected at most 65536"),
    ("model.expert_hidden=[]", "model.expert_hidden: expected a non-empty list of widths, got []"),
    ("train.loss_weighting={name: [a]}", "train.loss_weighting.name: expected one of"),
    ("train.loss_weighting={name: {a: 1}}", "train.loss_weighting.name: expected one of"),
    ("train.loss_weighting={name: gradnorm, alpha: .nan}", "train.loss_weighting.alpha: expected a finite number >= 0"),
    ("train.loss_weighting={name: gradnorm, lr: .inf}", "train.loss_weighting.lr: expected a finite positive number"),
    ("train.loss_weighting={name: dwa, temperature: .nan}", "train.loss_weighting.temperature: expected a finite"),
    ("train.loss_weighting={name: pcgrad, seed: -1}", "train.loss_weighting.seed: expected >= 0, got -1"),
    ("train.loss_weighting={name: pcgrad, seed: 18446744073709551617}", "train.loss_weighting.seed: expected at most"),
    ("esmm={ctr: ctr, cvr: cvr, weight: .nan}", "esmm.weight: expected a finite number >= 0, got nan"),
]


@pytest.mark.parametrize(("item", "prefix"), BAD_SETS, ids=[item[:48] for item, _ in BAD_SETS])
def test_bad_set_value_is_refused_with_its_key(item: str, prefix: str) -> None:
    msg = error_of(minimal(), overrides=(item,))
    assert msg.startswith(prefix), msg


@pytest.mark.parametrize(
    ("model", "prefix"),
    [
        ({"name": "cgc", "num_shared_experts": 0, "num_task_experts": 0}, "model.num_task_experts: expected >= 1"),
        ({"name": "ple", "num_levels": 0}, "model.num_levels: expected >= 1, got 0"),
        (
            {"name": "dbmtl", "task_order": ["cvr", "click"]},
            "model.task_order: task_order names unknown task(s) ['click'] (expected the tasks ['ctr', 'cvr'])",
        ),
        ({"name": "dbmtl", "task_order": ["cvr"]}, "model.task_order: task_order must list every task once"),
        ({"name": "dbmtl", "bottom": "ple"}, "model.bottom: expected 'mlp' or 'mmoe', got 'ple'"),
        ({"name": "dbmtl", "relation_hidden": []}, "model.relation_hidden: expected a non-empty list"),
        (
            {"name": "pepnet", "prior_features": ["user_id", "city"]},
            "model.prior_features: 'city' is not a sparse feature (expected names from ['user_id', 'item_id'])",
        ),
        ({"name": "pepnet", "domain_features": ["hist"]}, "model.domain_features: 'hist' is not a sparse feature"),
        (
            {"name": "pepnet", "prior_features": ["item_id", "item_id"]},
            "model.prior_features: 'item_id' is listed twice",
        ),
        ({"name": "pepnet", "prior_features": "user_id"}, "model.prior_features: expected a list of str"),
        ({"name": "pepnet", "gate_scale": 0}, "model.gate_scale: expected a positive number, got 0.0"),
        ({"name": "pepnet", "gate_hidden": 0}, "model.gate_hidden: expected >= 1, got 0"),
        ({"name": "pepnet", "embedding": "per_task"}, "model.embedding: embedding 'per_task' needs a model"),
        ({"name": "mmoe", "gate": "dselect_k", "gate_k": 5}, "model.gate_k: expected at most 4 (num_experts), got 5"),
        (
            {"name": "ple", "gate": "dselect_k", "gate_k": 4},
            "model.gate_k: expected at most 3 (num_shared_experts + num_task_experts, the experts a task gate mixes)",
        ),
        ({"name": "cgc", "gate": "topk"}, "model.gate: expected 'softmax' or 'dselect_k', got 'topk'"),
        (
            {"name": "mmoe", "gate_entropy": 0.1},
            "model.gate_entropy: DSelect-k's selector penalty needs gate: dselect_k",
        ),
        (
            {"name": "mmoe", "gate": "dselect_k", "gate_gamma": 0},
            "model.gate_gamma: expected a positive number, got 0.0",
        ),
        ({"name": "ple", "expert_balance": -1}, "model.expert_balance: expected >= 0, got -1.0"),
        ({"name": "mmoe", "expert_norm": "yes"}, "model.expert_norm: expected"),
        ({"name": "ple", "num_levels": 1000}, "model.num_levels: expected at most 64"),
        ({"name": "single_task", "hidden": []}, "model.hidden: expected a non-empty list"),
        ({"name": "cross_stitch", "hidden": []}, "model.hidden: expected a non-empty list"),
        ({"name": "cross_stitch", "stitch_self_weight": 1.5}, "model.stitch_self_weight: expected a number in [0, 1]"),
        ({"name": "aitm", "tower_hidden": []}, "model.tower_hidden: expected a non-empty list"),
        ({"name": "aitm", "info_hidden": 0}, "model.info_hidden: expected >= 1, got 0"),
        ({"name": "aitm", "calibration_weight": float("inf")}, "model.calibration_weight: expected a finite number"),
        ({"name": "shared_bottom", "bottom_hidden": [128, 0]}, "model.bottom_hidden.1: expected >= 1, got 0"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={w}" for k, w in v.items()),
)
def test_bad_model_params_are_refused(model: dict[str, Any], prefix: str) -> None:
    raw = minimal()
    raw["model"] = model
    if model["name"] == "aitm":
        del raw["tasks"][1]["where"]
    assert error_of(raw).startswith(prefix)


def _float_fields() -> list[tuple[str, dict[str, Any]]]:
    """Every float key of the typed sections, as (dotted key, a config that sets it to nan)."""
    sections: list[tuple[type, str, Any]] = [
        (DataConfig, "data", None),
        (TrainConfig, "train", None),
        (DenseFeature, "features.dense.price", ("features", "dense", 0)),
        (SparseFeature, "features.sparse.user_id", ("features", "sparse", 0)),
        (SequenceFeature, "features.sequence.hist", ("features", "sequence", 0)),
        (Task, "tasks.ctr", ("tasks", 0)),
        (Esmm, "esmm", None),
    ]
    cases = []
    for cls, prefix, path in sections:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if float not in (hints[f.name], *typing.get_args(hints[f.name])):
                continue
            raw = minimal()
            if cls is Esmm:
                raw["esmm"] = {"ctr": "ctr", "cvr": "cvr", f.name: float("nan")}
            elif path is None:
                raw.setdefault(prefix, {})[f.name] = float("nan")
            else:
                node: Any = raw
                for part in path:
                    node = node[part]
                node[f.name] = float("nan")
            cases.append((f"{prefix}.{f.name}", raw))
    return cases


FLOAT_FIELDS = _float_fields()


@pytest.mark.parametrize(("key", "raw"), FLOAT_FIELDS, ids=[key for key, _ in FLOAT_FIELDS])
def test_every_float_key_must_be_finite(key: str, raw: dict[str, Any]) -> None:
    msg = error_of(raw)
    assert msg.startswith(f"{key}: expected a finite "), msg
    assert msg.endswith("got nan")


def _float_params() -> list[tuple[str, str, str]]:
    """Every float parameter of every model and loss weighting: (owner kind, owner, name)."""
    cases = [
        ("model", name, param)
        for name in sorted(list_models())
        for param, (tp, _) in model_parameters(name).items()
        if tp is float
    ]
    for name, cls in WEIGHTINGS.items():
        spec = parameter_spec(cls.__init__, skip=("task_names", "base_weights"))
        cases += [("weighting", name, param) for param, (tp, _) in spec.items() if tp is float]
    return cases


FLOAT_PARAMS = _float_params()


@pytest.mark.parametrize(("kind", "owner", "param"), FLOAT_PARAMS, ids=[f"{o}.{p}" for _, o, p in FLOAT_PARAMS])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_every_float_parameter_must_be_finite(kind: str, owner: str, param: str, value: float) -> None:
    raw = minimal()
    if kind == "model":
        raw["model"] = {"name": owner, param: value}
        if owner == "aitm":
            del raw["tasks"][1]["where"]
        key = f"model.{param}"
    else:
        raw["train"]["loss_weighting"] = {"name": owner, param: value}
        key = f"train.loss_weighting.{param}"
    msg = error_of(raw)
    assert msg.startswith(f"{key}: expected a finite "), msg


@pytest.mark.parametrize(
    ("key", "value", "prefix"),
    [
        ("lr", 10**400, "train.lr: expected a finite number, got 1000"),
        (
            "seed",
            16**5000,
            "train.seed: expected at most 4294967295 (numpy's seed limit), got a value too large to print",
        ),
    ],
    ids=["float_overflow", "unprintable_int"],
)
def test_huge_python_ints_are_config_errors(key: str, value: int, prefix: str) -> None:
    raw = minimal()
    raw["train"][key] = value
    assert error_of(raw).startswith(prefix)


def test_error_message_of_a_huge_value_stays_short() -> None:
    msg = error_of(minimal(), overrides=("model.name=[" + ", ".join(["a"] * 100_000) + "]",))
    assert msg.startswith("model.name: expected a string, got ['a', 'a'")
    assert msg.endswith("...")


@pytest.mark.parametrize(
    "item",
    [
        "train.seed=4294967295",
        "train.seed=0",
        "model.embedding_dim=4096",
        "model.num_experts=64",
        "model.dropout=0.0",
        "model.tower_hidden=[]",
        "model.expert_hidden=[65536]",
        "train.gpu_data_share=0",
        "train.dist_timeout_s=86400",
    ],
)
def test_values_at_the_bounds_are_accepted(item: str) -> None:
    config_from_dict(minimal(), overrides=(item,))


def test_ple_with_no_shared_expert_is_accepted() -> None:
    raw = minimal()
    raw["model"] = {"name": "ple", "num_shared_experts": 0, "num_task_experts": 1, "num_levels": 2}
    assert config_from_dict(raw).model.params["num_shared_experts"] == 0


# --------------------------------------------------------------------------- saved model configs


def saved_config_text(**model: Any) -> str:
    """A model directory's ``config.yaml`` (as the checkpoint writes it) with model keys changed."""
    out = config_to_dict(config_from_dict(minimal()))
    out["model"].update(model)
    return yaml.safe_dump(out, sort_keys=False)


SAVED = [
    ({"dropout": 2.0}, "model.dropout: expected a number in [0, 1), got 2.0"),
    ({"num_experts": 0}, "model.num_experts: expected >= 1, got 0"),
    ({"tower_hidden": [-1]}, "model.tower_hidden.0: expected >= 1, got -1"),
    ({"tower_hidden": [0]}, "model.tower_hidden.0: expected >= 1, got 0"),
    ({"expert_hidden": []}, "model.expert_hidden: expected a non-empty list of widths"),
    ({"embedding_dim": 10**9}, "model.embedding_dim: expected at most 4096"),
]


SAVED_IDS = ["-".join(f"{k}={v}" for k, v in m.items()) for m, _ in SAVED]


@pytest.mark.parametrize(("model", "prefix"), SAVED, ids=SAVED_IDS)
def test_saved_config_that_cannot_be_built_is_refused(model: dict[str, Any], prefix: str) -> None:
    text = saved_config_text(**model)
    # as checkpoint.py reads it today, and through the bounded parser it is moving to
    assert error_of(yaml.safe_load(text)).startswith(prefix)
    assert error_of(parse_yaml_text(text, "m/config.yaml")).startswith(prefix)


def test_saved_config_round_trips_through_the_public_parser() -> None:
    cfg = config_from_dict(minimal())
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    assert isinstance(cfg, Config)
    assert config_from_dict(parse_yaml_text(text, "m/config.yaml")) == cfg


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("case", ["aliases", "deep_set"])
def test_cli_refuses_hostile_config_in_one_line(tmp_path: Path, case: str) -> None:
    if case == "aliases":
        # a small alias document: the old loader expands and accepts it (then fails elsewhere)
        text = yaml.safe_dump(minimal(), sort_keys=False).replace("train.parquet", "&p train.parquet")
        path = write(tmp_path, text + "output: *p\n", "bad.yaml")
        proc = mtrec("train", "--config", str(path))
        assert_one_line_error(proc, str(path), "anchors and aliases are not allowed")
    else:
        path = write(tmp_path, config_text(), "ok.yaml")
        proc = mtrec("train", "--config", str(path), "--set", "model.expert_hidden=" + "[" * 5000 + "]" * 5000)
        assert_one_line_error(proc, "--set model.expert_hidden", "nested deeper than 32 levels")


def test_escm2_needs_the_click_condition_on_the_cvr_task() -> None:
    raw = minimal()
    del raw["tasks"][1]["where"]
    raw["esmm"] = {"ctr": "ctr", "cvr": "cvr", "counterfactual": "ips"}
    assert error_of(raw).startswith(
        "esmm.counterfactual: ESCM2's counterfactual risk weighs the clicked rows' CVR loss by 1 / pCTR, "
        "but task 'cvr' has no where:"
    )
    raw["esmm"] = {"ctr": "ctr", "cvr": "cvr"}  # plain ESMM takes a CVR task without where
    config_from_dict(raw)
