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
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mtrec.config import Config, config_from_dict, config_to_dict
from mtrec.data.preprocess import Preprocessor
from mtrec.errors import ConfigError, ModelError, MtrecError
from mtrec.files import FILE_MODE, atomic_write_text, staging_dir
from mtrec.models import create_model
from mtrec.models.esmm import EsmmModel
from mtrec.schema import InputLayout

__all__ = [
    "LoadedModel",
    "build_model",
    "load_model_dir",
    "prepare_output",
    "save_model_files",
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
    output = output.resolve()
    if output.exists() and not overwrite:
        raise MtrecError(f"{output}: already exists (pass --overwrite to replace it)")
    if output.exists() and not output.is_dir():
        raise MtrecError(f"{output}: exists and is not a folder")
    if output.exists() and any(output.iterdir()) and not is_model_dir(output):
        # --overwrite replaces models, never an arbitrary folder (data, home, ...).
        raise MtrecError(f"{output}: is not an mtrec model directory; refusing to replace it")
    for parent in output.parents:
        if parent.exists() and not parent.is_dir():
            raise MtrecError(f"{parent}: is a file, so {output} cannot be a folder")
    staging = staging_dir(output)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


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
