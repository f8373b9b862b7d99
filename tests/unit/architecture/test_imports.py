"""The package's import graph: no circles, and the lower rooms never reach up.

Read with ast over every module of mtrec/ (imports inside functions count too: a lazy import
is still a dependency, only a hidden one).
"""

import pytest

from tests.unit.architecture.imports import cycles, graph

# Room -> the mtrec modules (prefixes) it must never import. nn/ works on any tensor (no schema,
# no data, no model), models/ builds modules from a layout (no files, no data, no training), data/
# turns files into tensors (no model); none of them knows the stages above it.
ABOVE = ("mtrec.training", "mtrec.inference", "mtrec.evaluation", "mtrec.cli", "mtrec.model_dir")
FORBIDDEN = {
    "mtrec.nn": ("mtrec.schema", "mtrec.config", "mtrec.data", "mtrec.models", "mtrec.files", *ABOVE),
    "mtrec.models": ("mtrec.config", "mtrec.data", "mtrec.files", *ABOVE),
    "mtrec.data": ("mtrec.models", "mtrec.nn", *ABOVE),
    "mtrec.metrics": ("mtrec.models", "mtrec.nn", "mtrec.data", *ABOVE),
    "mtrec.weighting": ("mtrec.models", "mtrec.nn", "mtrec.data", "mtrec.config", *ABOVE),
}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_graph_sees_the_package():
    g = graph()
    assert "mtrec.models.registry" in g["mtrec.models.cgc"]
    assert "mtrec.nn.experts" in g["mtrec.models.cgc"]
    assert len(g) > 40


def test_no_import_circles():
    assert cycles(graph()) == []


def test_cycles_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_lower_rooms_do_not_import_upward(room):
    bad = [
        f"{module} imports {target}"
        for module, targets in sorted(graph().items())
        if _within(module, room)
        for target in sorted(targets)
        if any(_within(target, f) for f in FORBIDDEN[room])
    ]
    assert bad == []


# Leaves: shared helpers every room may use, so they import no other mtrec module.
LEAVES = ("mtrec.errors", "mtrec.typed", "mtrec.tables", "mtrec._version")


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_nothing_of_mtrec(leaf):
    assert sorted(t for t in graph()[leaf] if _within(t, "mtrec")) == []
