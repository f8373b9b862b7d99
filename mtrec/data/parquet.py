"""Parquet files, folders and globs -> Arrow tables, read row group by row group.

Every failure names the file: a path that matches nothing, a file that is not
Parquet, a missing column.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mtrec.errors import DataError

__all__ = ["iter_row_groups", "open_parquet", "read_table", "resolve_paths"]


def resolve_paths(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expands a file, a folder (every ``*.parquet`` below it) or a glob into sorted files."""
    if isinstance(spec, (list, tuple)):
        out: list[Path] = []
        for item in spec:
            out.extend(resolve_paths(item))
        return out
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise DataError(f"{path}: folder contains no *.parquet files")
        return files
    if path.is_file():
        return [path]
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{text}: pattern matches no files")
        return files
    raise DataError(f"{text}: no such file or folder")


def open_parquet(path: Path) -> pq.ParquetFile:
    """Opens a Parquet file; a file that is not Parquet gives a one-line DataError."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable Parquet file ({reason})") from None


def _check_columns(path: Path, pf: pq.ParquetFile, columns: Sequence[str]) -> None:
    names = set(pf.schema_arrow.names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}")


def iter_row_groups(paths: Sequence[Path], columns: Sequence[str]) -> Iterator[tuple[Path, pa.Table]]:
    """Yields ``(file, table)`` per row group, with only ``columns``, checking each file first."""
    for path in paths:
        pf = open_parquet(path)
        _check_columns(path, pf, columns)
        for i in range(pf.num_row_groups):
            try:
                yield path, pf.read_row_group(i, columns=list(columns))
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(f"{path}: row group {i} cannot be decoded ({str(exc).splitlines()[0]})") from None


def read_table(paths: Sequence[Path], columns: Sequence[str]) -> pa.Table:
    """Reads ``columns`` of all files into one table (schemas must agree)."""
    parts = [t for _, t in iter_row_groups(paths, columns)]
    if not parts:
        raise DataError(f"{paths[0] if paths else 'input'}: no rows")
    try:
        table = pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{paths[0]}: files disagree on column types ({str(exc).splitlines()[0]})") from None
    if table.num_rows == 0:
        raise DataError(f"{paths[0]}: no rows")
    return table
