"""``mtrec --help`` and every subcommand's ``--help`` answer without importing torch (the
first fixed cost a new user meets); ``import mtrec`` defers torch to the first use of a name."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from mtrec.cli import _parser


def _commands() -> list[list[str]]:
    out: list[list[str]] = [[]]

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    out.append([*prefix, name])
                    walk(child, [*prefix, name])

    walk(_parser(), [])
    return out


COMMANDS = _commands()


def _modules_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint('TORCH', *sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.strip().splitlines()[-1].split()[1:])  # the help text comes first


def test_every_command_is_probed():
    names = {" ".join(c) for c in COMMANDS}
    assert {"", "train", "evaluate", "score", "compare", "export", "models", "datasets synthetic"} <= names


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "mtrec" for c in COMMANDS])
def test_help_does_not_import_torch(command):
    code = (
        "from mtrec.cli import main\n"
        "try:\n"
        f"    main({[*command, '--help']!r})\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
    )
    assert _modules_after(code) == set()


def test_import_mtrec_defers_torch_until_a_name_needs_it():
    assert _modules_after("import mtrec\nassert mtrec.__version__ and mtrec.MtrecError") == set()
    assert "torch" in _modules_after("import mtrec\nassert callable(mtrec.train)")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import mtrec

        mtrec.nope  # noqa: B018
