"""Rank formulas: :func:`parse_rank` / :func:`rank_score` combine task predictions into one
ranking score, a product ``ctr^1*cvr^0.5`` or a weighted sum ``0.7*ctr+0.3*cvr``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtrec.errors import DataError, MtrecError
from mtrec.expr import parse_formula
from mtrec.schema import Task

__all__ = ["check_rank", "parse_rank", "rank_score"]


def parse_rank(expr: str) -> dict[str, Any]:
    """Parses a rank expression (no ``eval``) into a formula for :func:`rank_score`.

    Two forms:

    * a product of task predictions with exponents, ``ctr^1*cvr^0.5*satisfaction^2``
      (an omitted exponent is 1) -> ``{"type": "product", "exponents": {...}}``;
    * a weighted sum, ``0.7*ctr+0.3*cvr`` (an omitted weight is 1; a weight may be
      negative: ``ctr + -0.5*dislike``) -> ``{"type": "sum", "weights": {...}}``.

    Example:
        >>> parse_rank("ctr^1*cvr^0.5")
        {'type': 'product', 'exponents': {'ctr': 1.0, 'cvr': 0.5}}
        >>> parse_rank("0.7*ctr+0.3*cvr")
        {'type': 'sum', 'weights': {'ctr': 0.7, 'cvr': 0.3}}

    Raises:
        MtrecError: The expression is empty, malformed or mixes products and sums.
    """
    try:
        terms = parse_formula(expr)
    except ValueError as exc:
        raise MtrecError(f"--rank {expr!r}: {exc}") from None
    if len(terms) == 1 and terms[0][0] is None:
        exponents: dict[str, float] = {}
        for name, exponent in terms[0][1]:
            # ctr*ctr is ctr^2: exponents of a repeated task add up.
            exponents[name] = exponents.get(name, 0.0) + (1.0 if exponent is None else exponent)
        return {"type": "product", "exponents": exponents}
    weights: dict[str, float] = {}
    for weight, factors in terms:
        if len(factors) != 1 or factors[0][1] is not None:
            raise MtrecError(
                f"--rank {expr!r}: a sum's terms are 'weight*task'; products and exponents cannot be mixed into a sum"
            )
        name = factors[0][0]
        weights[name] = weights.get(name, 0.0) + (1.0 if weight is None else weight)
    return {"type": "sum", "weights": weights}


def check_rank(formula: Mapping[str, Any], tasks: Sequence[Task]) -> dict[str, float]:
    """Validates a formula against a model's tasks; returns its ``{task: exponent or weight}``.

    Raises:
        MtrecError: Unknown formula type, a task the model does not predict (named), a
            multiclass task, or a non-finite coefficient.
    """
    return _coefficients(formula, {t.name: t.kind.scalar_label for t in tasks})


def _coefficients(formula: Mapping[str, Any], scalar: Mapping[str, bool]) -> dict[str, float]:
    """``scalar``: each task the model predicts, and whether it gives one number per row (can rank)."""
    kind = formula.get("type") if isinstance(formula, Mapping) else None
    key = {"product": "exponents", "sum": "weights"}.get(str(kind))
    if key is None:
        raise MtrecError(f"rank formula: type must be 'product' or 'sum', got {kind!r}")
    coefs = formula.get(key)
    if not isinstance(coefs, Mapping) or not coefs:
        raise MtrecError(f"rank formula: {kind} needs a non-empty {key!r} mapping of task -> number")
    out: dict[str, float] = {}
    for name, value in coefs.items():
        if name not in scalar:
            raise MtrecError(f"rank formula: unknown task {name!r} (the model predicts {', '.join(map(repr, scalar))})")
        if not scalar[name]:
            raise MtrecError(f"rank formula: task {name!r} is multiclass; only binary and regression tasks rank")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise MtrecError(f"rank formula: {key}[{name!r}] must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise MtrecError(f"rank formula: {key}[{name!r}] must be finite, got {value!r}")
        out[name] = number
    return out


def rank_score(preds: Mapping[str, np.ndarray], formula: Mapping[str, Any] | str) -> np.ndarray:
    """One ranking score per row from task predictions (float64).

    Args:
        preds: ``{task: (N,)}`` as returned by :meth:`Ranker.predict`.
        formula: ``{"type": "product", "exponents": {"ctr": 1.0, "cvr": 0.5}}``
            (``prod_t p_t ** a_t``), ``{"type": "sum", "weights": {"ctr": 0.7, "cvr": 0.3}}``
            (``sum_t w_t * p_t``), or an expression for :func:`parse_rank`.

    Example:
        >>> preds = {"ctr": np.array([0.1, 0.4]), "cvr": np.array([0.25, 0.04])}
        >>> rank_score(preds, "ctr*cvr^0.5").round(4).tolist()
        [0.05, 0.08]

    Raises:
        MtrecError: The formula names a task that is not in ``preds`` or is multiclass.
        DataError: The score is not finite for some row (``ctr^-1000`` overflows, a
            negative value to a fractional power is NaN): checked like the predictions.
    """
    text = formula if isinstance(formula, str) else None
    if isinstance(formula, str):
        formula = parse_rank(formula)
    coefs = _coefficients(formula, {name: np.ndim(v) == 1 for name, v in preds.items()})
    n = len(next(iter(preds.values()))) if preds else 0
    # Overflow and invalid powers are reported once, below, not as numpy warnings.
    with np.errstate(all="ignore"):
        if formula["type"] == "product":
            score = np.ones(n, np.float64)
            for name, a in coefs.items():
                score *= np.power(np.asarray(preds[name], np.float64), a)
        else:
            score = np.zeros(n, np.float64)
            for name, w in coefs.items():
                score += w * np.asarray(preds[name], np.float64)
    bad = ~np.isfinite(score)
    if bad.any():
        i = int(np.argmax(bad))
        row = ", ".join(f"{name}={float(preds[name][i]):.6g}" for name in coefs)
        shown = text.strip() if text is not None else _formula_text(formula["type"], coefs)
        raise DataError(
            f"rank formula {shown!r} gives a non-finite score for {int(bad.sum())} of {n} row(s) "
            f"(e.g. {row} gives {score[i]})"
        )
    return score


def _formula_text(kind: str, coefs: Mapping[str, float]) -> str:
    """A formula as the expression :func:`parse_rank` reads back: ``ctr^1*cvr^0.5``, ``0.7*ctr+0.3*cvr``."""
    if kind == "product":
        return "*".join(f"{name}^{a:g}" for name, a in coefs.items())
    return "+".join(f"{w:g}*{name}" for name, w in coefs.items())
