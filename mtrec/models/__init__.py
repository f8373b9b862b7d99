"""Multi-task architectures, built by name through the registry.

Importing this package registers every architecture.
"""

from mtrec.models import mmoe, ple, shared_bottom  # noqa: F401 - registration side effect
from mtrec.models.base import FeatureInput, MultiTaskModel
from mtrec.models.registry import create_model, list_models, register_model

__all__ = ["FeatureInput", "MultiTaskModel", "create_model", "list_models", "register_model"]
