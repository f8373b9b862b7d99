"""The examples in mtrec's docstrings run and print what they show (so that, e.g., the model
list in ``mtrec/__init__.py`` cannot go stale)."""

import doctest
import importlib

import pytest

from tests.unit.architecture.imports import modules

WITH_EXAMPLES = sorted(
    name for name, path in modules().items() if ">>>" in path.read_text() and not name.endswith("__main__")
)


def test_examples_are_found():
    assert {"mtrec", "mtrec.models.registry", "mtrec.weighting", "mtrec.expr"} <= set(WITH_EXAMPLES)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, report=False)
    assert result.failed == 0, (
        f"{name}: {result.failed} of {result.attempted} examples failed (run pytest --doctest-modules {name})"
    )
