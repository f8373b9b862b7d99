"""mtrec: multi-task recommender ranking on Parquet click logs.

Example:
    >>> import mtrec
    >>> sorted(mtrec.list_models())  # doctest: +NORMALIZE_WHITESPACE
    ['adatt', 'aitm', 'cgc', 'cross_stitch', 'dbmtl', 'independent', 'mmoe', 'omoe', 'pepnet',
     'ple', 'shared_bottom', 'shared_embedding', 'stem_net']
"""

from mtrec._version import __version__
from mtrec.config import Config, load_config
from mtrec.errors import ConfigError, DataError, ModelError, MtrecError, SchemaError
from mtrec.inference import Ranker, load_model, score_parquet
from mtrec.model_dir import LoadedModel, load_model_dir
from mtrec.models import MultiTaskModel, create_model, list_models, register_model
from mtrec.schema import DenseFeature, InputLayout, Schema, SequenceFeature, SparseFeature, Task
from mtrec.training import TrainResult, train

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
