"""Multi-task architectures, built by name through the registry.

Importing this package registers every architecture.
"""

from mtrec.models import (  # noqa: F401 - registration side effect
    adatt,
    aitm,
    cgc,
    cross_stitch,
    dbmtl,
    independent,
    mmoe,
    omoe,
    pepnet,
    ple,
    shared_bottom,
    shared_embedding,
    stem_net,
)
from mtrec.models.base import EmbeddingSpec, FeatureInput, MultiTaskModel, TaskAwareInput
from mtrec.models.registry import create_model, list_models, register_model

__all__ = [
    "EmbeddingSpec",
    "FeatureInput",
    "MultiTaskModel",
    "TaskAwareInput",
    "create_model",
    "list_models",
    "register_model",
]
