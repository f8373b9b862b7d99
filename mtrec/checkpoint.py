"""The model directory: one folder holds everything needed to predict again.

```
DIR/
  config.yaml          the resolved config (every default filled in)
  meta.json            mtrec/torch versions, architecture, input layout, best epoch
  model.safetensors    weights (no pickle)
  preprocess/          fitted vocabularies (Parquet) and statistics (JSON)
  metrics.json         validation metrics per epoch and of the best epoch
  log.jsonl            training log, one JSON object per line
```

Files are written to a temporary name and renamed; a training run builds the folder
under ``DIR.incomplete`` and renames it to ``DIR`` only when it is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mtrec.config import Config, config_from_dict, config_to_dict
from mtrec.data.preprocess import Preprocessor
from mtrec.errors import ConfigError, ModelError
from mtrec.files import FILE_MODE, atomic_write_text, fresh_staging
from mtrec.models import create_model
from mtrec.models.esmm import EsmmModel
from mtrec.schema import InputLayout

__all__ = [
    "LoadedModel",
    "build_model",
    "load_model_dir",
    "prepare_output",
    "save_model_files",
    "save_resume_state",
    "load_resume_state",
    "has_resume_state",
    "save_weights",
]

WEIGHTS = "model.safetensors"


def save_weights(model: nn.Module, path: Path) -> None:
    """Saves the state dict as safetensors, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.chmod(tmp, FILE_MODE)  # save_file recreates the file with mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_model(config: Config, layout: InputLayout) -> nn.Module:
    """The architecture a config names, for a fitted input layout (wrapped by ESMM if asked)."""
    schema = config.schema
    model = create_model(
        config.model.name,
        layout,
        schema.task_names,
        embedding_dim=config.model.embedding_dim,
        output_dims=tuple(t.output_dim for t in schema.tasks),
        **config.model.params,
    )
    if schema.esmm is not None:
        model = EsmmModel(model, ctr=schema.esmm.ctr, cvr=schema.esmm.cvr, name=schema.esmm.name)
    return model


def prepare_output(output: Path, *, overwrite: bool) -> Path:
    """Checks ``output`` may be written and returns a fresh staging folder beside it."""
    return fresh_staging(output, overwrite=overwrite, owned=is_model_dir, what="an mtrec model directory")


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` looks like a model directory written by mtrec."""
    return (path / "meta.json").is_file() and (path / "config.yaml").is_file()


def save_model_files(staging: Path, config: Config, preprocessor: Preprocessor, meta: dict[str, Any]) -> None:
    """Writes the config, preprocessing state and meta data of a model folder."""
    atomic_write_text(staging / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
    preprocessor.save(staging / "preprocess")
    atomic_write_text(staging / "meta.json", json.dumps(meta, indent=2))


@dataclass
class LoadedModel:
    """A model directory read back: config, preprocessing, network (eval mode) and meta."""

    config: Config
    preprocessor: Preprocessor
    model: nn.Module
    meta: dict[str, Any]


def load_model_dir(directory: str | Path, *, map_location: str = "cpu") -> LoadedModel:
    """Reads a model directory; never unpickles anything."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"{directory}: no such model directory")
    for name in ("config.yaml", "meta.json", WEIGHTS, "preprocess"):
        if not (directory / name).exists():
            raise ModelError(f"{directory}: not a complete model directory ({name} is missing)")
    try:
        config = config_from_dict(yaml.safe_load((directory / "config.yaml").read_text()))
    except (ConfigError, yaml.YAMLError) as exc:
        raise ModelError(f"{directory / 'config.yaml'}: invalid saved config ({exc})") from None
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except ValueError as exc:
        raise ModelError(f"{directory / 'meta.json'}: invalid JSON ({exc})") from None
    pre = Preprocessor.load(config.schema, directory / "preprocess")
    layout = pre.layout()
    if dataclasses.asdict(layout) != _lists_to_tuples(meta.get("layout", {})):
        raise ModelError(f"{directory}: preprocessing state does not match the layout in meta.json")
    model = build_model(config, layout)
    try:
        state = load_file(str(directory / WEIGHTS), device=map_location)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{directory / WEIGHTS}: corrupt or truncated weights ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelError(f"{directory / WEIGHTS}: weights do not fit the saved config ({first})") from None
    model.eval()
    return LoadedModel(config, pre, model, meta)


def _lists_to_tuples(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _lists_to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_lists_to_tuples(v) for v in x)
    return x


# ----------------------------------------------------------------------------- resume state
RESUME = "resume"


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


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unpack(k, tensors): _unpack(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unpack(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
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
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
    try:
        doc = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / doc["tensors"]), device=map_location)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ModelError(f"{folder}: the resume state cannot be read ({str(exc).splitlines()[0]})") from None
    return _unpack(doc["state"], tensors)
