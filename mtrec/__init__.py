"""mtrec: multi-task recommender ranking on Parquet click logs.

Example:
    >>> import mtrec
    >>> sorted(mtrec.list_models())  # doctest: +NORMALIZE_WHITESPACE
    ['aitm', 'cgc', 'cross_stitch', 'independent', 'mmoe', 'omoe', 'ple', 'shared_bottom',
     'shared_embedding', 'stem_net']
"""

__version__ = "0.1.0"

from mtrec.checkpoint import LoadedModel, load_model_dir  # noqa: E402
from mtrec.config import Config, load_config  # noqa: E402
from mtrec.errors import ConfigError, DataError, ModelError, MtrecError, SchemaError  # noqa: E402
from mtrec.models import MultiTaskModel, create_model, list_models, register_model  # noqa: E402
from mtrec.schema import DenseFeature, InputLayout, Schema, SequenceFeature, SparseFeature, Task  # noqa: E402
from mtrec.score import Ranker, load_model, score_parquet  # noqa: E402
from mtrec.train import TrainResult, train  # noqa: E402

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
