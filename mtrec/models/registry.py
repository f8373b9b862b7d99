"""Model registry: ``register_model`` / ``create_model`` / ``list_models``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from mtrec.schema import InputLayout

__all__ = ["create_model", "list_models", "model_parameters", "register_model"]

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], str]] = {}
# Former names that saved model directories may still carry: built, never listed.
_ALIASES: dict[str, str] = {}
_FIXED = ("layout", "task_names", "embedding_dim", "output_dims")


def register_model(
    name: str, description: str, *, aliases: tuple[str, ...] = ()
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Registers a builder ``fn(layout, task_names, *, embedding_dim, output_dims, ...) -> nn.Module``.

    ``output_dims`` gives each task's number of outputs (``None``: one each); the other
    keyword parameters, with their annotations and defaults, become the architecture's
    config keys under ``model:``.
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = (fn, description)
        _ALIASES.update(dict.fromkeys(aliases, name))
        return fn

    return wrap


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
    from mtrec.config import parameter_spec

    return parameter_spec(_builder(name), skip=_FIXED)


def create_model(
    name: str,
    layout: InputLayout,
    task_names: tuple[str, ...],
    *,
    embedding_dim: int = 16,
    output_dims: tuple[int, ...] | None = None,
    **params: Any,
) -> nn.Module:
    """Builds a registered model.

    Example:
        >>> from mtrec.schema import InputLayout
        >>> layout = InputLayout((10,), (0,), (), (), (), 2)
        >>> model = create_model("mmoe", layout, ("ctr", "cvr"), embedding_dim=4, num_experts=2)
        >>> sorted(model.task_names)
        ['ctr', 'cvr']
    """
    return _builder(name)(layout, task_names, embedding_dim=embedding_dim, output_dims=output_dims, **params)
