"""The model directory: one folder holds everything needed to predict again.

```
DIR/
  config.yaml          the resolved config (every default filled in)
  meta.json            mtrec/torch versions, architecture, input layout, best epoch
  model.safetensors    weights (no pickle)
  preprocess/          fitted vocabularies (Parquet) and statistics (JSON)
  metrics.json         validation metrics per epoch and of the best epoch
  log.jsonl            training log, one JSON object per line
  affinity.json        with train.affinity_every: the task-affinity matrices
```

Files are written to a temporary name and renamed; a training run builds the folder
under ``DIR.incomplete`` and renames it to ``DIR`` only when it is complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mtrec.calibration import Calibrator
from mtrec.config import Config, config_from_dict, config_to_dict, parse_yaml_text
from mtrec.data.preprocess import Preprocessor
from mtrec.errors import ConfigError, ModelError, MtrecError
from mtrec.files import (
    allow_staging_names,
    atomic_write_text,
    claim_output,
    commit_dir,
    new_staging,
    output_path,
    recover,
    staging_dir,
    write_file,
)
from mtrec.models import create_model
from mtrec.models.esmm import EsmmModel
from mtrec.schema import InputLayout

__all__ = [
    "LoadedModel",
    "build_model",
    "load_affinity",
    "load_model_dir",
    "claim_model_dir",
    "commit_model_dir",
    "save_calibration",
    "save_model_files",
    "save_resume_state",
    "load_resume_state",
    "has_resume_state",
    "save_weights",
]

# Every name in a model directory (the names of its manifest are these and preprocess/*).
CONFIG = "config.yaml"
META = "meta.json"
WEIGHTS = "model.safetensors"
PREPROCESS = "preprocess"
METRICS = "metrics.json"
LOG = "log.jsonl"
DIAGNOSTICS = "diagnostics.json"
CALIBRATION = "calibration.json"  # with train.calibration: per-task calibrators (mtrec.calibration)
INIT_FROM = "init_from.json"  # with train.init_from: what the warm start loaded (mtrec.training.warm_start)
AFFINITY = "affinity.json"  # with train.affinity_every: task-affinity matrices (mtrec.training.affinity)
EVALUATIONS = "evaluations"  # evaluate's JSON files, added to a finished directory
RESUME = "resume"  # in the unfinished folder only: dropped when the run is committed


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors, atomically; its I/O errors (a full disk) become the OSError they are."""

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp))
        except SafetensorError as exc:
            code = re.search(r"os error (\d+)", str(exc))
            if code is None:
                raise OSError(str(exc)) from None
            raise OSError(int(code[1]), os.strerror(int(code[1]))) from None

    write_file(path, write)


def save_weights(model: nn.Module, path: Path) -> None:
    """Saves the state dict as safetensors, atomically."""
    _save_tensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)


def build_model(config: Config, layout: InputLayout) -> nn.Module:
    """The architecture a config names, for a fitted input layout (wrapped by ESMM if asked)."""
    schema = config.schema
    model = create_model(
        config.model.name,
        layout,
        schema.task_names,
        **config.model.embedding_keys(),
        **config.features.interaction_keys(),
        output_dims=tuple(t.output_dim for t in schema.tasks),
        **config.model.params,
    )
    e = schema.esmm
    if e is not None:
        names = schema.task_names
        model = EsmmModel(
            model,
            ctr=e.ctr,
            cvr=e.cvr,
            name=e.name,
            counterfactual=e.counterfactual,
            counterfactual_weight=e.counterfactual_weight,
            propensity_clip=e.propensity_clip,
            columns=(names.index(e.ctr), names.index(e.cvr)),
        )
    return model


MODEL_KIND = "model"
allow_staging_names(
    MODEL_KIND, (CONFIG, META, WEIGHTS, PREPROCESS, METRICS, LOG, DIAGNOSTICS, CALIBRATION, INIT_FROM, AFFINITY, RESUME)
)


@contextmanager
def claim_model_dir(
    output: str | Path, *, overwrite: bool, resume: bool = False, inputs: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Holds ``output`` for a training run and yields its staging folder ``output.incomplete``.

    A new run starts from an empty staging folder (an unfinished one is kept for
    ``--resume`` unless ``overwrite``); a resumed run continues in its own. The old
    model directory is replaced only once the new one is sealed (:func:`commit_model_dir`),
    and only if it is provably an mtrec model directory.
    """
    with claim_output(
        output, kind=MODEL_KIND, overwrite=overwrite or resume, inputs=inputs, what="an mtrec model directory"
    ) as out:
        staging = staging_dir(out)
        if not resume:
            if has_resume_state(staging) and not overwrite:
                raise MtrecError(
                    f"{staging}: holds an interrupted run; continue it with "
                    f"`mtrec train --resume {out}` or pass --overwrite to start over"
                )
            new_staging(out, MODEL_KIND, name=staging, overwrite=True)
        yield staging


def commit_model_dir(staging: Path, output: Path) -> None:
    """Seals a finished staging folder and swaps it in (the resume state is not part of the model)."""
    commit_dir(staging, output_path(output), MODEL_KIND, discard=(RESUME,))


def save_model_files(staging: Path, config: Config, preprocessor: Preprocessor, meta: dict[str, Any]) -> None:
    """Writes the config, preprocessing state and meta data of a model folder."""
    atomic_write_text(staging / CONFIG, yaml.safe_dump(config_to_dict(config), sort_keys=False))
    preprocessor.save(staging / PREPROCESS)
    atomic_write_text(staging / META, json.dumps(meta, indent=2))


@dataclass
class LoadedModel:
    """A model directory read back: config, preprocessing, network (eval mode), meta and the
    per-task calibration (empty without ``train.calibration``)."""

    config: Config
    preprocessor: Preprocessor
    model: nn.Module
    meta: dict[str, Any]
    calibration: dict[str, Calibrator] = dataclasses.field(default_factory=dict)


def load_model_dir(directory: str | Path, *, map_location: str = "cpu") -> LoadedModel:
    """Reads a model directory; never unpickles anything.

    A training run killed while it swapped this directory in is finished (or rolled
    back) first, so a reader never finds it missing after a crash.
    """
    directory = Path(directory)
    try:
        recover(directory)
    except (MtrecError, OSError):
        pass  # best effort: a read-only location, or a pending swap over a foreign folder (left as it is)
    if not directory.is_dir():
        raise ModelError(f"{directory}: no such model directory")
    for name in (CONFIG, META, WEIGHTS, PREPROCESS):
        path = directory / name
        if not path.exists():
            raise ModelError(f"{directory}: not a complete model directory ({name} is missing)")
        if name == PREPROCESS and not path.is_dir():
            raise ModelError(f"{path}: expected a folder of preprocessing state, found a file")
        if name != PREPROCESS and not path.is_file():
            raise ModelError(f"{path}: expected a file, found {'a folder' if path.is_dir() else 'no regular file'}")
    config_path = directory / CONFIG
    text = _read_text(config_path)
    try:
        raw = parse_yaml_text(text, str(config_path))  # bounded and alias-free, like a config file
    except ConfigError as exc:
        raise ModelError(f"invalid saved config: {_first_line(exc)}") from None
    try:
        config = config_from_dict(raw, training=False)  # inference: no training objects
    except (ConfigError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelError(f"{config_path}: invalid saved config ({_first_line(exc)})") from None
    meta_path = directory / META
    try:
        meta = json.loads(_read_text(meta_path))
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{meta_path}: invalid JSON ({_first_line(exc)})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{meta_path}: expected a JSON object, got {_json_type(meta)}")
    if not isinstance(meta.get("layout"), dict):
        raise ModelError(f"{meta_path}: expected a 'layout' object, got {_json_type(meta.get('layout'))}")
    pre = Preprocessor.load(config.schema, directory / PREPROCESS)
    layout = pre.layout()
    # Layouts saved before target attention existed have no sequence_targets (none then), and
    # those saved before sparse_names existed no names (the schema's, which gave the layout).
    older = {"sequence_targets": (), "sparse_names": layout.sparse_names}
    if dataclasses.asdict(layout) != {**older, **_lists_to_tuples(meta["layout"])}:
        raise ModelError(f"{directory}: preprocessing state does not match the layout in meta.json")
    model = _build_saved_model(config, layout, config_path)
    try:
        state = load_file(str(directory / WEIGHTS), device=map_location)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{directory / WEIGHTS}: corrupt or truncated weights ({_first_line(exc)})") from None
    check_state_tensors(model.state_dict(), state, directory / WEIGHTS)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{directory / WEIGHTS}: weights do not fit the saved config ({_first_line(exc)})") from None
    model.eval()
    return LoadedModel(config, pre, model, meta, _load_calibration(directory, config))


def save_calibration(path: Path, method: str, calibrators: dict[str, Calibrator]) -> None:
    """Writes the per-task calibrators as plain JSON (atomically)."""
    body = {
        "method": method,
        "fitted_on": "validation split",
        "tasks": {n: c.to_json() for n, c in calibrators.items()},
    }
    atomic_write_text(path, json.dumps(body, indent=2))


def _load_calibration(directory: Path, config: Config) -> dict[str, Calibrator]:
    """The saved calibrators (none without the file), every field checked."""
    path = directory / CALIBRATION
    method = config.train.calibration
    if not path.exists():
        if method != "none":
            raise ModelError(f"{path}: missing (the model was trained with train.calibration: {method})")
        return {}
    try:
        raw = json.loads(_read_text(path))
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: invalid JSON ({_first_line(exc)})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), dict):
        raise ModelError(f"{path}: expected an object with a 'tasks' object")
    if raw.get("method") != method:
        raise ModelError(f"{path}: method {raw.get('method')!r} is not the config's train.calibration {method!r}")
    binary = {t.name for t in config.schema.output_tasks if t.kind.ranks}
    out = {}
    for name, entry in raw["tasks"].items():
        if name not in binary:
            raise ModelError(
                f"{path}: tasks.{name}: not a binary task of this model (expected some of {sorted(binary)})"
            )
        out[name] = Calibrator.from_json(entry, f"{path}: tasks.{name}")
    return out


def load_affinity(directory: str | Path) -> dict[str, Any] | None:
    """The task-affinity report of a model directory (``None`` without ``affinity.json``):
    ``tasks`` (names) and the square ``gradient_cosine`` and ``lookahead_affinity`` matrices
    (numbers or ``null``) checked, one :class:`ModelError` naming the file otherwise."""
    path = Path(directory) / AFFINITY
    if not path.exists():
        return None
    try:
        raw = json.loads(_read_text(path))
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: invalid JSON ({_first_line(exc)})") from None
    tasks = raw.get("tasks") if isinstance(raw, dict) else None
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ModelError(f"{path}: expected an object with 'tasks', a non-empty list of task names")
    n = len(tasks)
    for key in ("gradient_cosine", "lookahead_affinity"):
        m = raw.get(key)
        square = isinstance(m, list) and len(m) == n and all(isinstance(r, list) and len(r) == n for r in m)
        numbers = square and all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
            for r in m
            for v in r
        )
        if not numbers:
            raise ModelError(f"{path}: {key}: expected a {n} x {n} matrix of finite numbers or null")
    if raw.get("shared") not in ("dense", "input", "none"):
        raise ModelError(f"{path}: shared: expected dense, input or none, got {raw.get('shared')!r}")
    for key, least in (("every", 1), ("measurements", 0)):
        v = raw.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise ModelError(f"{path}: {key}: expected an integer >= {least}, got {v!r}")
    return cast(dict[str, Any], raw)


# Bounds what a loader reads as text (config.yaml, meta.json, resume/state.json): files that
# mtrec writes are far smaller, anything larger is not one of them.
_MAX_TEXT_BYTES = 64 * 2**20


def _read_text(path: Path, limit: int = _MAX_TEXT_BYTES) -> str:
    """A small UTF-8 text file, or :class:`ModelError` naming the file and what was expected."""
    if not path.is_file():
        raise ModelError(f"{path}: expected a file, found {'a folder' if path.is_dir() else 'no regular file'}")
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ModelError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise ModelError(f"{path}: larger than {limit // 2**20} MiB, expected a small text file written by mtrec")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"{path}: expected UTF-8 text (invalid byte at offset {exc.start})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _json_type(x: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(x), "a number" if isinstance(x, (int, float)) else type(x).__name__)


def _build_saved_model(config: Config, layout: InputLayout, source: Path) -> nn.Module:
    """:func:`build_model` for a saved config: values that validate but do not build are a ModelError."""
    try:
        return build_model(config, layout)
    except (ValueError, TypeError, RuntimeError, ArithmeticError, IndexError, KeyError) as exc:
        raise ModelError(f"{source}: the saved config does not build a model ({_first_line(exc)})") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_state_tensors(expected: dict[str, Any], found: dict[str, Any], source: Path) -> None:
    """Refuses tensors that are missing, unexpected or of another dtype or shape than the model's."""
    for key in expected:
        if key not in found:
            raise ModelError(f"{source}: tensor {key!r} is missing (the model of the saved config has it)")
    for key in found:
        if key not in expected:
            raise ModelError(f"{source}: tensor {key!r} is not part of the model of the saved config")
    for key, want in expected.items():
        got = found[key]
        if not isinstance(want, torch.Tensor):
            continue  # extra (non-tensor) module state: load_state_dict checks it
        if not isinstance(got, torch.Tensor):
            raise ModelError(f"{source}: {key!r} is {type(got).__name__}, expected a {_dtype_name(want.dtype)} tensor")
        if got.dtype != want.dtype:
            have, expect = _dtype_name(got.dtype), _dtype_name(want.dtype)
            raise ModelError(f"{source}: tensor {key!r} is {have}, expected {expect}")
        if got.shape != want.shape:
            raise ModelError(f"{source}: tensor {key!r} has shape {list(got.shape)}, expected {list(want.shape)}")


def _lists_to_tuples(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _lists_to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_lists_to_tuples(v) for v in x)
    return x


# ----------------------------------------------------------------------------- resume state


def _pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able skeleton of ``obj`` with every tensor moved into ``tensors`` (no pickle)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_pack(k, tensors), _pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__": [_pack(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save a {type(obj).__name__} in the resume state")


_MARKERS = ("__tensor__", "__dict__", "__list__", "__tuple__")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_pack`; ``ValueError`` saying what is malformed for anything it never writes."""
    if isinstance(obj, dict):
        if len(obj) != 1 or next(iter(obj)) not in _MARKERS:
            raise ValueError(f"expected an object with one key of {', '.join(_MARKERS)}, got keys {sorted(obj)[:4]}")
        ((marker, value),) = obj.items()
        if marker == "__tensor__":
            if not isinstance(value, str) or value not in tensors:
                raise ValueError(f"tensor {value!r} is not in the tensor file")
            return tensors[value]
        if not isinstance(value, list):
            raise ValueError(f"{marker!r} must be an array, got {_json_type(value)}")
        if marker == "__dict__":
            out = {}
            for pair in value:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise ValueError(f"'__dict__' must hold [key, value] pairs, got {_json_type(pair)}")
                key = _unpack(pair[0], tensors)
                if not isinstance(key, (str, int, float, bool, type(None))):
                    raise ValueError(f"a mapping key must be a string or number, got {type(key).__name__}")
                out[key] = _unpack(pair[1], tensors)
            return out
        items = [_unpack(v, tensors) for v in value]
        return items if marker == "__list__" else tuple(items)
    if isinstance(obj, list):
        raise ValueError("a bare array (lists are saved as {'__list__': [...]})")
    return obj


def save_resume_state(staging: Path, state: dict[str, Any]) -> None:
    """Writes the state to continue training from (``staging/resume/``), replacing the last one.

    Tensors go to ``state.safetensors`` and everything else to ``state.json``, each written
    to a temporary name and renamed, the JSON last: a crash while saving leaves the
    previous complete state (the JSON names the tensor file it belongs to).
    """
    folder = staging / RESUME
    folder.mkdir(exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _pack(state, tensors)
    name = f"state-{state.get('epoch', 0)}.safetensors"
    _save_tensors(tensors, folder / name)
    atomic_write_text(folder / "state.json", json.dumps({"tensors": name, "state": skeleton}))
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def has_resume_state(staging: Path) -> bool:
    """Whether ``staging`` holds a state saved by :func:`save_resume_state`."""
    return (staging / RESUME / "state.json").is_file()


def load_resume_state(staging: Path, *, map_location: str = "cpu") -> dict[str, Any]:
    """The state saved by :func:`save_resume_state` (safetensors + JSON, never pickle)."""
    folder = staging / RESUME
    path = folder / "state.json"
    try:
        doc = json.loads(_read_text(path))
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: invalid JSON ({_first_line(exc)})") from None
    if not isinstance(doc, dict) or set(doc) != {"tensors", "state"}:
        got = f"keys {sorted(doc)}" if isinstance(doc, dict) else _json_type(doc)
        raise ModelError(f"{path}: expected an object with the keys 'tensors' and 'state', got {got}")
    name = doc["tensors"]
    # A plain file name beside state.json: no folders, no "..", no hidden (temporary) files.
    plain = isinstance(name, str) and name.endswith(".safetensors") and not name.startswith(".")
    if not plain or any(c in name for c in "/\\\0"):
        raise ModelError(f"{path}: 'tensors' must name a .safetensors file in {folder}, got {name!r}")
    if not (folder / name).is_file():
        raise ModelError(f"{path}: 'tensors' names {name!r}, but {folder / name} is not there")
    try:
        tensors = load_file(str(folder / name), device=map_location)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{folder / name}: corrupt or truncated resume tensors ({_first_line(exc)})") from None
    try:
        state = _unpack(doc["state"], tensors)
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: malformed resume state ({_first_line(exc)})") from None
    problem = _resume_state_problem(state)
    if problem is not None:
        raise ModelError(f"{path}: {problem}")
    return state


def _is_int(x: Any, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_rng(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.uint8


def _is_str_dict(x: Any, values: type | tuple[type, ...] = object) -> bool:
    return isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, values) for k, v in x.items())


def _is_optimizer_state(x: Any) -> bool:
    return isinstance(x, dict) and isinstance(x.get("state"), dict) and isinstance(x.get("param_groups"), list)


# What the trainer saves after each epoch: key -> (check, what is expected, required).
_RESUME_KEYS: dict[str, tuple[Any, str, bool]] = {
    "epoch": (lambda x: _is_int(x, 1), "an epoch number >= 1", True),
    "model": (lambda x: _is_str_dict(x, torch.Tensor), "a mapping of names to tensors", True),
    "optimizers": (
        lambda x: isinstance(x, list) and len(x) > 0 and all(_is_optimizer_state(o) for o in x),
        "a list of optimizer states",
        True,
    ),
    "schedulers": (
        lambda x: isinstance(x, list) and all(_is_str_dict(s) for s in x),
        "a list of learning-rate scheduler states",
        False,
    ),
    "weighting": (_is_str_dict, "a mapping of names to loss weighting state", True),
    "generator": (_is_rng, "a uint8 tensor (random generator state)", True),
    "scaler": (lambda x: x is None or _is_str_dict(x), "null or a grad scaler state", False),
    "torch_rng": (_is_rng, "a uint8 tensor (random generator state)", True),
    "cuda_rng": (lambda x: x is None or _is_rng(x), "null or a uint8 tensor (CUDA generator states)", True),
    "world_size": (lambda x: _is_int(x, 1), "a process count >= 1", False),
    "data_mode": (lambda x: x in ("memory", "stream"), "'memory' or 'stream'", False),
    "embedding_optimizer": (lambda x: isinstance(x, str), "a string", False),
    "best_value": (
        lambda x: x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)),
        "null or a number",
        True,
    ),
    "best_epoch": (_is_int, "an epoch number >= 0", True),
    "best_metrics": (lambda x: _is_str_dict(x, dict), "a mapping of task names to metrics", True),
    "bad_epochs": (_is_int, "a count >= 0", True),
    "history": (
        lambda x: isinstance(x, list) and all(_is_str_dict(h) and _is_str_dict(h.get("valid"), dict) for h in x),
        "a list of epoch records",
        True,
    ),
}


def _resume_state_problem(state: Any) -> str | None:
    """What is wrong with an unpacked resume state (``None`` if it has the trainer's structure)."""
    if not isinstance(state, dict):
        return f"'state' must be a mapping, got {type(state).__name__}"
    unknown = sorted(str(k) for k in state if k not in _RESUME_KEYS)
    if unknown:
        return f"unknown key {unknown[0]!r} in the resume state (expected {', '.join(_RESUME_KEYS)})"
    for key, (check, expected, required) in _RESUME_KEYS.items():
        if key not in state:
            if required:
                return f"the resume state has no {key!r} (expected {expected})"
        elif not check(state[key]):
            return f"{key!r} in the resume state must be {expected}, got {_describe(state[key])}"
    if state["best_epoch"] > state["epoch"] or len(state["history"]) != state["epoch"]:
        return (
            f"the resume state is inconsistent (epoch {state['epoch']}, best epoch {state['best_epoch']}, "
            f"{len(state['history'])} epoch records)"
        )
    return None


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {_dtype_name(x.dtype)} tensor"
    if isinstance(x, (bool, int, float, str)) or x is None:
        return repr(x)[:40]
    return f"a {type(x).__name__}"
