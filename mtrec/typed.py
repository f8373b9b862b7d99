"""Signatures read as config keys: a leaf module that the config and every registry share."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Sequence
from typing import Any

__all__ = ["parameter_spec"]


def parameter_spec(fn: Any, skip: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """Keyword parameters of ``fn`` with their annotation and default, for strict configs."""
    hints = typing.get_type_hints(fn)
    spec = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in skip or name == "self" or p.default is inspect.Parameter.empty:
            continue
        spec[name] = (hints.get(name, Any), p.default)
    return spec
