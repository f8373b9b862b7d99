"""Model registry: ``register_backbone`` / ``register_model`` / ``create_model`` / ``list_models``.

Most architectures differ only in the network between the feature input and the task towers:
they register that backbone with :func:`register_backbone`, and the registry owns the rest
(the embedding, the towers, their dropout). An architecture that builds more than a backbone
(its own input module, towers that talk to each other) registers a whole builder with
:func:`register_model`.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, Literal

from torch import nn

from mtrec.models.base import DEFAULT_EMBEDDING, EmbeddingSpec, MultiTaskModel
from mtrec.nn.gates import GateSpec
from mtrec.schema import InputLayout
from mtrec.typed import parameter_spec

__all__ = [
    "check_embedding_mode",
    "gate_keys",
    "create_model",
    "list_models",
    "model_parameters",
    "register_backbone",
    "register_model",
]

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], str]] = {}
# Former names that saved model directories may still carry: built, never listed.
_ALIASES: dict[str, str] = {}
# Models whose embedding is part of what they are (independent: per task; shared_embedding: one
# set): they take no other embedding mode, and say why.
_FIXED_EMBEDDING: dict[str, str] = {}
_FIXED = ("layout", "task_names", "embedding", "output_dims")
# What a backbone is given rather than configured with: its input width, the task count and
# the dropout it shares with the towers.
_BACKBONE_FIXED = ("in_dim", "num_tasks", "dropout")


def gate_keys(
    *,
    gate: Literal["softmax", "dselect_k"] = "softmax",
    gate_k: int = 2,
    gate_gamma: float = 1.0,
    gate_entropy: float = 0.0,
    expert_balance: float = 0.0,
    expert_norm: bool = False,
) -> dict[str, Any]:
    """The gate keys of every mixture-of-experts backbone registered with ``gated=True``, as
    the backbone takes them: ``gate`` a :class:`~mtrec.nn.gates.GateSpec` (softmax or
    DSelect-k with ``gate_k`` selectors, smooth-step width ``gate_gamma`` and selector-entropy
    penalty ``gate_entropy``; ``expert_balance``, the weight of the importance-CV²
    load-balancing loss) and ``expert_norm`` (HoME's expert normalisation)."""
    return {"gate": GateSpec(gate, gate_k, gate_gamma, gate_entropy, expert_balance), "expert_norm": expert_norm}


_GATE_KEYS = tuple(inspect.signature(gate_keys).parameters)


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
        _add(name, description, fn, aliases, fixed_embedding)
        return fn

    return wrap


def register_backbone(
    name: str,
    description: str,
    *,
    aliases: tuple[str, ...] = (),
    fixed_embedding: str | None = None,
    model: type[MultiTaskModel] = MultiTaskModel,
    table_set_per_task: bool = False,
    gated: bool = False,
) -> Callable[[Callable[..., nn.Module]], Callable[..., MultiTaskModel]]:
    """Registers an architecture by its backbone ``fn(in_dim, num_tasks, *, ..., dropout) -> nn.Module``
    (``(B, in_dim) -> (B, T, out_dim)``, with an ``out_dim`` attribute).

    The model is :meth:`MultiTaskModel.assemble`: the feature input (as ``embedding`` says),
    the backbone on it, one tower per task. Its config keys are the backbone's keyword
    parameters, then ``tower_hidden`` (default ``(64,)``) and ``dropout``, which the backbone
    and the towers share. ``model`` is the :class:`MultiTaskModel` subclass to build (one
    that says what it shares), ``table_set_per_task`` gives every task its own embedding
    tables (``embedding_copies``, see :class:`~mtrec.models.base.FeatureInput`). ``gated``: the
    backbone takes ``gate`` and ``expert_norm`` as :func:`gate_keys` makes them, and the
    model's config keys are :func:`gate_keys`'s instead. The decorator returns the whole model
    builder,
    ``builder(layout, task_names, *, embedding, output_dims, tower_hidden, dropout, ...)``.
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., MultiTaskModel]:
        taken = ("gate", "expert_norm") if gated else ()
        own = tuple(parameter_spec(fn, skip=(*_BACKBONE_FIXED, *taken)))

        def build(
            layout: InputLayout,
            task_names: tuple[str, ...],
            *,
            embedding: EmbeddingSpec = DEFAULT_EMBEDDING,
            output_dims: tuple[int, ...] | None = None,
            tower_hidden: tuple[int, ...] = (64,),
            dropout: float = 0.0,
            **params: Any,
        ) -> MultiTaskModel:
            if gated:
                params = {k: v for k, v in params.items() if k not in _GATE_KEYS} | gate_keys(
                    **{k: v for k, v in params.items() if k in _GATE_KEYS}
                )
            return model.assemble(
                layout,
                task_names,
                embedding=embedding,
                output_dims=output_dims,
                tower_hidden=tower_hidden,
                dropout=dropout,
                embedding_copies=len(task_names) if table_set_per_task else 1,
                backbone=lambda in_dim: fn(in_dim, len(task_names), dropout=dropout, **params),
            )

        build.__name__ = build.__qualname__ = fn.__name__
        build.__doc__ = f"Builds the {name} multi-task model ({description})."
        _show_backbone_keywords(build, fn, own, extra=gate_keys if gated else None)
        _add(name, description, build, aliases, fixed_embedding)
        return build

    return wrap


def _show_backbone_keywords(
    build: Callable[..., Any],
    backbone: Callable[..., Any],
    names: tuple[str, ...],
    *,
    extra: Callable[..., Any] | None = None,
) -> None:
    """Gives ``build`` (which passes ``**params`` on to ``backbone``) the signature it has in
    effect: the backbone's keywords ``names`` (then ``extra``'s keywords) before
    ``tower_hidden``, so that ``help()``, ``inspect`` and :func:`~mtrec.typed.parameter_spec`
    see every config key with its type."""
    own = inspect.signature(backbone).parameters
    hints = {**typing.get_type_hints(build), **typing.get_type_hints(backbone)}
    keys = [own[n].replace(kind=inspect.Parameter.KEYWORD_ONLY) for n in names]
    if extra is not None:
        hints |= typing.get_type_hints(extra)
        keys += list(inspect.signature(extra).parameters.values())
    params = [p for p in inspect.signature(build).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    at = [p.name for p in params].index("tower_hidden")
    params[at:at] = keys
    build.__signature__ = inspect.signature(build).replace(parameters=params)  # type: ignore[attr-defined]
    build.__annotations__ = {p.name: hints[p.name] for p in params if p.name in hints} | {"return": hints["return"]}


def _add(
    name: str,
    description: str,
    builder: Callable[..., nn.Module],
    aliases: tuple[str, ...],
    fixed_embedding: str | None,
) -> None:
    if name in _REGISTRY or name in _ALIASES:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = (builder, description)
    _ALIASES.update(dict.fromkeys(aliases, name))
    if fixed_embedding is not None:
        _FIXED_EMBEDDING[name] = fixed_embedding


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
    cross_layers: int = 0,
    cross_rank: int | None = None,
    output_dims: tuple[int, ...] | None = None,
    **params: Any,
) -> nn.Module:
    """Builds a registered model (the embedding keys and the cross layers: see
    :class:`~mtrec.models.base.EmbeddingSpec`).

    Example:
        >>> from mtrec.schema import InputLayout
        >>> layout = InputLayout((10,), (0,), (), (), (), 2)
        >>> model = create_model("mmoe", layout, ("ctr", "cvr"), embedding_dim=4, num_experts=2)
        >>> sorted(model.task_names)
        ['ctr', 'cvr']
    """
    builder = _builder(name)
    check_embedding_mode(name, embedding)
    spec = EmbeddingSpec(
        dim=embedding_dim,
        mode=embedding,
        task_dim=task_embedding_dim,
        dropout=embedding_dropout,
        cross_layers=cross_layers,
        cross_rank=cross_rank,
    )
    return builder(layout, task_names, embedding=spec, output_dims=output_dims, **params)
