"""No function in mtrec/ longer than MAX_LINES (read with ast; docstrings count).

DEBT lists functions allowed to be longer, each with the length it had when listed: a listed
function may only shrink, and leaves the list once it fits. Issue 14 split every function that
was listed, so the list is empty; any function over the limit fails.
"""

import ast

from tests.unit.architecture.imports import PACKAGE, modules

MAX_LINES = 80

DEBT: dict[str, int] = {}


def function_lengths() -> dict[str, int]:
    out = {}
    for path in modules().values():
        rel = path.relative_to(PACKAGE.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                key = f"{rel}:{node.name}"
                out[key] = max(out.get(key, 0), node.end_lineno - node.lineno + 1)
    return out


def test_no_function_is_longer_than_the_limit():
    too_long = {k: n for k, n in function_lengths().items() if n > MAX_LINES and k not in DEBT}
    assert too_long == {}


def test_listed_long_functions_only_shrink():
    lengths = function_lengths()
    grown = {k: (lengths[k], limit) for k, limit in DEBT.items() if lengths.get(k, 0) > limit}
    assert grown == {}
    fitted = [k for k in DEBT if lengths.get(k, 0) <= MAX_LINES]
    assert fitted == [], "these now fit the limit: take them off DEBT"
