"""Atomic writes: temporary names renamed into place, with ordinary file modes.

Every output mtrec writes (model folders, prepared datasets, scores, reports) goes
through here, so a reader never sees half a file and an interrupted run leaves nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mtrec.errors import MtrecError

__all__ = ["DIR_MODE", "FILE_MODE", "atomic_write_text", "finalize_dir", "fresh_staging", "staging_dir"]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Temporary files and folders are created private (0600 / 0700); what is renamed into
# place gets the modes an ordinary file or folder would have under the user's umask.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same folder."""
    if path.is_dir():
        raise MtrecError(f"{path}: is a folder, expected a file name")
    if not path.parent.is_dir():
        raise MtrecError(f"{path.parent}: no such folder")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; outputs are ordinary files
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def staging_dir(output: Path) -> Path:
    """Where a model directory is built before it is complete."""
    output = output.resolve()
    return output.with_name(output.name + ".incomplete")


def fresh_staging(output: Path, *, overwrite: bool, owned: Callable[[Path], bool], what: str) -> Path:
    """Checks that folder ``output`` may be written and returns a fresh staging folder beside it.

    ``--overwrite`` only ever replaces a folder that ``owned`` recognises (a model
    directory, a prepared dataset), never an arbitrary folder (data, home, ...).

    Args:
        output: The folder to create or replace.
        overwrite: Whether an existing ``output`` may be replaced.
        owned: Whether an existing folder is one this kind of output may replace.
        what: Names that kind of folder in the refusal, e.g. ``"an mtrec model directory"``.
    """
    output = output.resolve()
    if output.exists() and not overwrite:
        raise MtrecError(f"{output}: already exists (pass --overwrite to replace it)")
    if output.exists() and not output.is_dir():
        raise MtrecError(f"{output}: exists and is not a folder")
    if output.exists() and any(output.iterdir()) and not owned(output):
        raise MtrecError(f"{output}: is not {what}; refusing to replace it")
    for parent in output.parents:
        if parent.exists() and not parent.is_dir():
            raise MtrecError(f"{parent}: is a file, so {output} cannot be a folder")
    staging = staging_dir(output)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def finalize_dir(staging: Path, output: Path) -> None:
    """Moves a complete staging folder to ``output``, replacing an old one only now."""
    output = output.resolve()
    if output.exists():
        old = output.with_name(output.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old)
    else:
        os.replace(staging, output)
