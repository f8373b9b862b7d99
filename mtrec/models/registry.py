"""Model registry: ``register_model`` / ``create_model`` / ``list_models``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from mtrec.models.base import EmbeddingSpec
from mtrec.schema import InputLayout
from mtrec.typed import parameter_spec

__all__ = ["check_embedding_mode", "create_model", "list_models", "model_parameters", "register_model"]

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], str]] = {}
# Former names that saved model directories may still carry: built, never listed.
_ALIASES: dict[str, str] = {}
# Models whose embedding is part of what they are (independent: per task; shared_embedding: one
# set): they take no other embedding mode, and say why.
_FIXED_EMBEDDING: dict[str, str] = {}
_FIXED = ("layout", "task_names", "embedding", "output_dims")


def register_model(
    name: str, description: str, *, aliases: tuple[str, ...] = (), fixed_embedding: str | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Registers a builder ``fn(layout, task_names, *, embedding, output_dims, ...) -> nn.Module``.

    ``embedding`` is an :class:`~mtrec.models.base.EmbeddingSpec` (the ``model:`` keys
    ``embedding_dim``, ``embedding``, ``task_embedding_dim``, ``embedding_dropout``);
    ``output_dims`` gives each task's number of outputs (``None``: one each); the other
    keyword parameters, with their annotations and defaults, become the architecture's
    config keys under ``model:``. ``fixed_embedding``, the reason, marks a model that takes
    only ``embedding: shared`` (its own embedding is what defines it).
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = (fn, description)
        _ALIASES.update(dict.fromkeys(aliases, name))
        if fixed_embedding is not None:
            _FIXED_EMBEDDING[name] = fixed_embedding
        return fn

    return wrap


def check_embedding_mode(name: str, mode: str) -> None:
    """Raises ``ValueError`` if model ``name`` cannot take embedding ``mode``."""
    name = _ALIASES.get(name, name)
    if mode != "shared" and name in _FIXED_EMBEDDING:
        raise ValueError(
            f"embedding {mode!r} needs a model with a backbone path per task to feed; "
            f"{name!r} has none to give it ({_FIXED_EMBEDDING[name]}); use embedding: shared"
        )


def list_models() -> dict[str, str]:
    """Registered model names with a one-line description."""
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}


def _builder(name: str) -> Callable[..., nn.Module]:
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r} (expected one of {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name][0]


def model_parameters(name: str) -> dict[str, tuple[Any, Any]]:
    """The architecture's keyword parameters: ``{name: (annotation, default)}``."""
    return parameter_spec(_builder(name), skip=_FIXED)


def create_model(
    name: str,
    layout: InputLayout,
    task_names: tuple[str, ...],
    *,
    embedding_dim: int = 16,
    embedding: str = "shared",
    task_embedding_dim: int | None = None,
    embedding_dropout: float = 0.0,
    output_dims: tuple[int, ...] | None = None,
    **params: Any,
) -> nn.Module:
    """Builds a registered model (the embedding keys: see :class:`~mtrec.models.base.EmbeddingSpec`).

        Example:
            >>> from mtrec.schema import InputLayout
    from mtrec.typed import parameter_spec
            >>> layout = InputLayout((10,), (0,), (), (), (), 2)
            >>> model = create_model("mmoe", layout, ("ctr", "cvr"), embedding_dim=4, num_experts=2)
            >>> sorted(model.task_names)
            ['ctr', 'cvr']
    """
    builder = _builder(name)
    check_embedding_mode(name, embedding)
    spec = EmbeddingSpec(dim=embedding_dim, mode=embedding, task_dim=task_embedding_dim, dropout=embedding_dropout)
    return builder(layout, task_names, embedding=spec, output_dims=output_dims, **params)
