"""The one safe expression parser: task sample spaces (``where: "click == 1"``) and rank
formulas (``--rank "ctr^1*cvr^0.5"``).

Both are parsed with :mod:`ast` and checked node by node: a ``where`` accepts only comparisons
of a column with a constant, ``and`` / ``or`` / ``not`` and parentheses; a formula only sums of
products of numbers and task names with numeric exponents. Nothing is ever ``eval``-ed.

Example:
    >>> import numpy as np
    >>> w = parse_where("click == 1 and dwell >= 30")
    >>> w.columns
    ('click', 'dwell')
    >>> w.evaluate({"click": np.array([1, 1, 0]), "dwell": np.array([40.0, 2.0, 50.0])}).tolist()
    [True, False, False]
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

__all__ = ["MAX_WHERE_DEPTH", "MAX_WHERE_LENGTH", "Term", "WhereExpr", "parse_formula", "parse_where"]

MAX_WHERE_LENGTH = 1000
"""Longest expression accepted, in characters: a sample space is a few comparisons, and the
bound keeps Python's parser (which recurses per nesting level and raises RecursionError or
MemoryError on ``not`` x 3,000) far from its limits."""
MAX_WHERE_DEPTH = 32
"""Deepest nesting of ``and`` / ``or`` / ``not`` / comparisons accepted: checking and
evaluating the tree recurse once per level."""

_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}


@dataclass(frozen=True)
class WhereExpr:
    """A parsed ``where`` expression."""

    text: str
    tree: ast.expr
    columns: tuple[str, ...]
    constant_kinds: tuple[tuple[str, str], ...] = ()
    """(column, "str" | "number") for every comparison, to check against column types."""

    def evaluate(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Evaluates to a boolean mask.

        A row where any column the expression uses is null (None or NaN) is outside the
        sample space, whatever the operators (``!=`` and ``not`` included).
        """
        mask = np.asarray(_eval(self.tree, columns), dtype=bool)
        for name in self.columns:
            x = np.asarray(columns[name])
            if x.dtype.kind == "f":
                mask &= ~np.isnan(x)
            elif x.dtype == object:
                mask &= np.array([v is not None and v == v for v in x], dtype=bool)
        return mask


def _parse_tree(text: str, example: str, max_depth: int | None) -> ast.expr:
    """The ast of an expression of at most :data:`MAX_WHERE_LENGTH` characters (and
    ``max_depth`` levels); ``ValueError`` with the reason (one line) otherwise."""
    if len(text) > MAX_WHERE_LENGTH:
        raise ValueError(f"expected an expression of at most {MAX_WHERE_LENGTH} characters, got {len(text)}")
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError):
        raise ValueError(f"cannot parse {text!r} (expected e.g. {example})") from None
    except (RecursionError, MemoryError):
        raise ValueError(f"expected an expression nested at most {MAX_WHERE_DEPTH} levels deep") from None
    if max_depth is not None:
        depth = _depth(tree)
        if depth > max_depth:
            raise ValueError(f"expected an expression nested at most {max_depth} levels deep, got {depth}")
    return tree


def parse_where(text: str) -> WhereExpr:
    """Parses and checks an expression; raises ValueError with the reason (one line).

    At most :data:`MAX_WHERE_LENGTH` characters and :data:`MAX_WHERE_DEPTH` levels, so that
    no RecursionError or MemoryError can come out of parsing, checking or evaluating it.
    """
    tree = _parse_tree(text, '"click == 1"', MAX_WHERE_DEPTH)
    cols: list[str] = []
    kinds: list[tuple[str, str]] = []
    _check(tree, cols, text, kinds)
    return WhereExpr(text, tree, tuple(dict.fromkeys(cols)), tuple(dict.fromkeys(kinds)))


# ----------------------------------------------------------------------------- rank formulas
# A task name may hold hyphens (``my-task``), which Python reads as a minus: inside a name
# (between word characters) a hyphen is spelled as this identifier text while parsing.
_NAME_HYPHEN = re.compile(r"(?<=[A-Za-z0-9_])-(?=[A-Za-z_])")
_HYPHEN_IN_NAME = "__hyphen__"
_FORMULA_FORMS = "expected a product like 'ctr^1*cvr^0.5' or a weighted sum like '0.7*ctr+0.3*cvr'"

Term = tuple[float | None, list[tuple[str, float | None]]]
"""One term of a formula: its weight (``None``: none written) and its ``(task, exponent)`` factors."""


def parse_formula(text: str) -> list[Term]:
    """The terms of a rank formula, ``ctr^1*cvr^0.5`` or ``0.7*ctr + -0.5*dislike``: a sum
    (``+``) of terms, each a product (``*``) of at most one number and task names with
    optional numeric exponents (``^``). Parsed with :mod:`ast` like ``where``; ``ValueError``
    (one line) for anything else."""
    if not text.strip():
        raise ValueError("empty expression")
    if "**" in text or _HYPHEN_IN_NAME in text:
        raise ValueError(_FORMULA_FORMS)
    source = _NAME_HYPHEN.sub(_HYPHEN_IN_NAME, text.strip()).replace("^", "**")
    try:
        tree = _parse_tree(source, "'ctr^1*cvr^0.5'", None)
    except ValueError as exc:
        raise ValueError(_FORMULA_FORMS if str(exc).startswith("cannot parse") else str(exc)) from None
    return [_formula_term(node) for node in _chain(tree, ast.Add)]


def _chain(node: ast.expr, op: type) -> list[ast.expr]:
    """The operands of ``a op b op c`` from left to right (iteratively: chains may be long)."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.BinOp) and isinstance(n.op, op):
            stack += [n.right, n.left]
        else:
            out.append(n)
    return out


def _formula_term(node: ast.expr) -> Term:
    weight: float | None = None
    factors: list[tuple[str, float | None]] = []
    for f in _chain(node, ast.Mult):
        if isinstance(f, ast.Name):
            factors.append((f.id.replace(_HYPHEN_IN_NAME, "-"), None))
        elif isinstance(f, ast.BinOp) and isinstance(f.op, ast.Pow) and isinstance(f.left, ast.Name):
            factors.append((f.left.id.replace(_HYPHEN_IN_NAME, "-"), _formula_number(f.right)))
        elif weight is None:
            weight = _formula_number(f)
        else:
            raise ValueError(_FORMULA_FORMS)
    if not factors:
        raise ValueError(_FORMULA_FORMS)
    return weight, factors


def _formula_number(node: ast.expr) -> float:
    sign = 1.0
    while isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign = -sign if isinstance(node.op, ast.USub) else sign
        node = node.operand
    if not (
        isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    ):
        raise ValueError(_FORMULA_FORMS)
    value = sign * float(node.value)
    if not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    return value


def _depth(tree: ast.expr) -> int:
    """Deepest chain of expression nodes, counted without recursion (the tree may be deep)."""
    deepest = 0
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node) if isinstance(child, ast.expr))
    return deepest


def _check(node: ast.expr, cols: list[str], text: str, kinds: list[tuple[str, str]]) -> None:
    if isinstance(node, ast.BoolOp):
        for v in node.values:
            _check(v, cols, text, kinds)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        _check(node.operand, cols, text, kinds)
    elif isinstance(node, ast.Compare):
        node.left = _fold_sign(node.left)
        node.comparators = [_fold_sign(c) for c in node.comparators]
        if len(node.ops) != 1 or type(node.ops[0]) not in _COMPARE:
            raise ValueError(f"in {text!r}: use one of == != < <= > >= per comparison")
        left, right = node.left, node.comparators[0]
        if isinstance(left, ast.Name) and isinstance(right, ast.Constant):
            cols.append(left.id)
        elif isinstance(right, ast.Name) and isinstance(left, ast.Constant):
            cols.append(right.id)
        else:
            raise ValueError(f"in {text!r}: each comparison must be between a column and a constant")
        const = right if isinstance(right, ast.Constant) else left
        if not isinstance(const, ast.Constant) or not isinstance(const.value, (int, float, str, bool)):
            raise ValueError(f"in {text!r}: constants must be numbers or strings")
        name = left.id if isinstance(left, ast.Name) else cast(ast.Name, right).id
        kinds.append((name, "str" if isinstance(const.value, str) else "number"))
    elif isinstance(node, ast.Name):
        cols.append(node.id)
    else:
        raise ValueError(f"in {text!r}: only comparisons, 'and', 'or', 'not' and parentheses are allowed")


def _fold_sign(node: ast.expr) -> ast.expr:
    """``-1`` parses as a unary minus applied to ``1``; make it one constant."""
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, (ast.USub, ast.UAdd))
        and isinstance(node.operand, ast.Constant)
        and isinstance(node.operand.value, (int, float))
        and not isinstance(node.operand.value, bool)
    ):
        value = node.operand.value
        return ast.Constant(-value if isinstance(node.op, ast.USub) else value)
    return node


def _eval(node: ast.expr, columns: Mapping[str, np.ndarray]) -> np.ndarray:
    if isinstance(node, ast.BoolOp):
        parts = [_eval(v, columns) for v in node.values]
        combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
        out = parts[0]
        for p in parts[1:]:
            out = combine(out, p)
        return out
    if isinstance(node, ast.UnaryOp):
        return np.logical_not(_eval(node.operand, columns))
    if isinstance(node, ast.Name):
        x = np.asarray(columns[node.id])
        if x.dtype.kind == "f":
            return (x != 0) & ~np.isnan(x)
        return np.asarray([bool(v) if v is not None else False for v in x]) if x.dtype == object else x.astype(bool)
    assert isinstance(node, ast.Compare)
    op = _COMPARE[type(node.ops[0])]
    left, right = node.left, node.comparators[0]
    lv = columns[left.id] if isinstance(left, ast.Name) else left.value  # type: ignore[attr-defined]
    rv = columns[right.id] if isinstance(right, ast.Name) else right.value  # type: ignore[attr-defined]
    with np.errstate(invalid="ignore"):
        return np.asarray(op(lv, rv), dtype=bool)
