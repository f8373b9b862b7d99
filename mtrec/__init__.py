"""mtrec: multi-task recommender ranking on Parquet click logs.

Example:
    >>> import mtrec
    >>> sorted(mtrec.list_models())  # doctest: +NORMALIZE_WHITESPACE
    ['adatt', 'aitm', 'cgc', 'cross_stitch', 'dbmtl', 'independent', 'mmoe', 'omoe', 'pepnet',
     'ple', 'shared_bottom', 'shared_embedding', 'stem_net']
"""

import importlib
from typing import TYPE_CHECKING, Any

from mtrec._version import __version__
from mtrec.errors import ConfigError, DataError, ModelError, MtrecError, SchemaError

if TYPE_CHECKING:
    from mtrec.config import Config, load_config
    from mtrec.inference import Ranker, load_model, score_parquet
    from mtrec.model_dir import LoadedModel, load_model_dir
    from mtrec.models import MultiTaskModel, create_model, list_models, register_model
    from mtrec.schema import DenseFeature, InputLayout, Schema, SequenceFeature, SparseFeature, Task
    from mtrec.training import TrainResult, train

# The rest is imported on first use (PEP 562), so that ``import mtrec`` and ``mtrec --help``
# do not import torch; ``from mtrec import train`` imports what it needs.
_LAZY = {
    **dict.fromkeys(("Config", "load_config"), "mtrec.config"),
    **dict.fromkeys(("Ranker", "load_model", "score_parquet"), "mtrec.inference"),
    **dict.fromkeys(("LoadedModel", "load_model_dir"), "mtrec.model_dir"),
    **dict.fromkeys(("MultiTaskModel", "create_model", "list_models", "register_model"), "mtrec.models"),
    **dict.fromkeys(
        ("DenseFeature", "InputLayout", "Schema", "SequenceFeature", "SparseFeature", "Task"), "mtrec.schema"
    ),
    **dict.fromkeys(("TrainResult", "train"), "mtrec.training"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mtrec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "DenseFeature",
    "InputLayout",
    "LoadedModel",
    "ModelError",
    "MtrecError",
    "MultiTaskModel",
    "Ranker",
    "Schema",
    "SchemaError",
    "SequenceFeature",
    "SparseFeature",
    "Task",
    "TrainResult",
    "__version__",
    "create_model",
    "list_models",
    "load_config",
    "load_model",
    "load_model_dir",
    "register_model",
    "score_parquet",
    "train",
]
