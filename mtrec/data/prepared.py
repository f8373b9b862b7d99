"""A prepared dataset folder: one Parquet file per split plus ``dataset.json``.

Every ``mtrec datasets NAME --source ... --output DIR`` step ends here. The folder is
built under a temporary name, sealed and renamed into place by :mod:`mtrec.files`, so
an interrupted run leaves nothing behind, and ``--overwrite`` only ever replaces a
folder that mtrec wrote (its manifest checks out), never an arbitrary folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from mtrec.errors import DataError
from mtrec.files import atomic_write_text, claim_output, staged_dir, write_file

__all__ = ["MANIFEST", "file_md5", "is_prepared_dir", "read_source", "write_prepared"]

MANIFEST = "dataset.json"
DATASET_KIND = "dataset"


def is_prepared_dir(path: Path) -> bool:
    """Whether ``path`` is a folder written by :func:`write_prepared`."""
    return (path / MANIFEST).is_file()


def file_md5(path: Path) -> str:
    """The md5 of a file (recorded in manifests so a result names its exact source)."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_source(source: Path, names: tuple[str, ...]) -> Path:
    """The first of ``names`` that exists in folder ``source`` (or ``source`` itself if a file)."""
    if source.is_file():
        return source
    if not source.is_dir():
        raise DataError(f"{source}: no such file or folder")
    for name in names:
        if (source / name).is_file():
            return source / name
    raise DataError(f"{source}: expected one of {', '.join(names)} in this folder")


def write_prepared(
    output: Path, splits: Mapping[str, pl.DataFrame], manifest: Mapping[str, Any], *, overwrite: bool
) -> dict[str, Any]:
    """Writes ``splits`` as ``output/<split>.parquet`` and the manifest, atomically.

    Args:
        output: The folder to create.
        splits: Split name -> data frame (for example ``train``, ``valid``, ``test``).
        manifest: What produced the data (source, md5, seed, tasks, ...). Rows and
            columns per split are added here.
        overwrite: Replace an existing prepared folder.

    Returns:
        The manifest as written.
    """
    what = "a folder written by `mtrec datasets`"
    with claim_output(output, kind=DATASET_KIND, overwrite=overwrite, what=what) as out:
        with staged_dir(out, DATASET_KIND) as staging:
            info = dict(manifest)
            info["splits"] = {}
            for name, frame in splits.items():
                path = staging / f"{name}.parquet"

                def write(tmp: Path, frame: pl.DataFrame = frame) -> None:
                    frame.write_parquet(tmp, row_group_size=65536)

                write_file(path, write)
                info["splits"][name] = {"file": path.name, "rows": frame.height}
            info["columns"] = {c: str(t) for c, t in next(iter(splits.values())).schema.items()}
            atomic_write_text(staging / MANIFEST, json.dumps(info, indent=2) + "\n")
    return info
