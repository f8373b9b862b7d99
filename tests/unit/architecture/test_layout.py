"""Unit tests mirror the package: tests/unit/<package>/ holds the tests of mtrec/<package>/."""

from pathlib import Path

from tests.unit.architecture.imports import PACKAGE

UNIT = Path(__file__).resolve().parents[1]


def test_every_unit_test_folder_names_a_package():
    folders = [p for p in UNIT.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))]
    strays = [p.name for p in folders if p.name != "architecture" and not (PACKAGE / p.name / "__init__.py").is_file()]
    assert strays == []
    assert {p.name for p in folders} >= {"data", "models", "nn", "metrics", "training", "inference"}


def test_top_level_unit_tests_are_about_top_level_modules():
    """A test file left in tests/unit/ is named after a module of mtrec/ (test_<module>[_<aspect>].py)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    unmatched = [
        p.name
        for p in UNIT.glob("test_*.py")
        if not any(p.stem == f"test_{m}" or p.stem.startswith(f"test_{m}_") for m in modules)
    ]
    assert unmatched == []


def test_no_module_is_shadowed_by_a_name_of_its_package():
    """``mtrec.train`` is the function and ``mtrec.training`` the package: no package binds a
    submodule's name to something else (which made ``import mtrec.train`` mean two things)."""
    import importlib
    import pkgutil
    import types

    import mtrec

    shadowed = []
    packages = [mtrec] + [
        importlib.import_module(m.name) for m in pkgutil.walk_packages(mtrec.__path__, "mtrec.") if m.ispkg
    ]
    for pkg in packages:
        for sub in pkgutil.iter_modules(pkg.__path__):
            bound = getattr(pkg, sub.name, None)
            if bound is not None and not isinstance(bound, types.ModuleType):
                shadowed.append(f"{pkg.__name__}.{sub.name}")
    assert shadowed == []
    assert callable(mtrec.train) and isinstance(importlib.import_module("mtrec.training"), types.ModuleType)
