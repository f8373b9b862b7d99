"""Parquet files, folders and globs -> Arrow tables, read row group by row group.

Every failure names the file: a path that matches nothing, a file that is not
Parquet, a missing column.
"""

from __future__ import annotations

import fnmatch
import glob
import heapq
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mtrec.errors import DataError

__all__ = ["iter_row_groups", "open_parquet", "read_table", "resolve_paths"]


def resolve_paths(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expands a file, a folder or a glob (or a list of them) into Parquet files, each real file once.

    * A folder holds every ``*.parquet`` file at any depth below it (hidden ones too), in
      sorted order.
    * A glob follows :func:`glob.glob` with ``recursive=True``: ``*`` and ``**`` skip hidden
      names, only files are kept (of any name), in sorted order.
    * Symlinks are followed, folders and globs alike, but every folder is entered and every
      file taken once, by real path: a link back to a folder already walked (``latest -> .``,
      ``up -> ..``) is skipped, so loops end, and a file reached twice (through two links, or
      listed twice) counts once. Paths reached without crossing a symlink win, then the
      first in sorted order; the paths returned are those names, not the real paths.
    * What was skipped (loops, folders and files already included, broken links, folders
      that cannot be read) is printed as one ``mtrec: warning:`` line on stderr, or is part
      of the error when no file is left.

    Raises:
        DataError: The path does not exist, or the folder or glob leaves no file.
    """
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    state = _Resolution()
    out: list[Path] = []
    for item in items:
        out.extend(state.resolve(str(item)))
    if state.skipped:
        _warn(", ".join(map(str, items)), state.skipped)
    return out


@dataclass(order=True)
class _Dir:
    """A folder still to list, ordered so that paths without symlinks come first, then by name."""

    via_link: bool
    parts: tuple[str, ...]
    index: int
    path: Path = field(compare=False)


class _Resolution:
    """Which real folders and files one :func:`resolve_paths` call has taken, and what it skipped."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}  # real path -> the name it was taken under
        self.skipped: list[str] = []

    def resolve(self, text: str) -> list[Path]:
        path = Path(text)
        if path.is_dir():
            found = self._walk(path, ("**", "*.parquet"), hidden=True)
            if not found:
                raise DataError(f"{path}: folder contains no *.parquet files{_listed(self.skipped)}")
            return self._take(found)
        if path.is_file():
            return self._take([(False, path)])
        if glob.has_magic(text):
            parts = path.parts
            fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
            root = Path(*parts[:fixed]) if fixed else Path()
            # A pattern ending in a separator matches folders only: no files.
            ok = root.is_dir() and not text.endswith(("/", os.sep))
            found = self._walk(root, parts[fixed:], hidden=False) if ok else []
            if not found:
                raise DataError(f"{text}: pattern matches no files{_listed(self.skipped)}")
            return self._take(found)
        raise DataError(f"{text}: no such file or folder")

    def _walk(self, root: Path, pattern: Sequence[str], *, hidden: bool) -> list[tuple[bool, Path]]:
        """Files below ``root`` matching the path components ``pattern`` (``**``: any folders).

        Each as ``(reached through a symlink, name)``; files reached twice are sorted out by :meth:`_take`.
        """
        visited: dict[tuple[str, int], Path] = {}  # (real folder, pattern index) -> name it was walked under
        names: dict[str, Path] = {}  # real folder -> the first name it was reached under
        queue = [_Dir(False, root.parts, 0, root)]
        found: list[tuple[bool, Path]] = []
        last = len(pattern) - 1
        while queue:
            d = heapq.heappop(queue)
            real = os.path.realpath(d.path)
            if d.path != root:
                # A link to a folder that holds the link itself (``latest -> .``, ``up -> ../..``)
                # is a loop, walked already or not: following it would walk the folder again.
                parent = os.path.realpath(d.path.parent)
                if parent == real or parent.startswith(real.rstrip(os.sep) + os.sep):
                    self.skipped.append(f"{d.path} (symlink loop back to {names.get(real, real)})")
                    continue
            names.setdefault(real, d.path)
            first = visited.setdefault((real, d.index), d.path)
            if first != d.path:
                self.skipped.append(f"{d.path} (same folder as {first})")
                continue
            if first is not d.path:
                continue  # the same folder reached twice by one pattern (``**/**``): nothing new
            try:
                with os.scandir(d.path) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                self.skipped.append(f"{d.path} (cannot be read: {exc.strerror or type(exc).__name__})")
                continue
            # ``**`` also matches no folder at all: the folder itself is matched against what follows.
            indices = [d.index]
            while pattern[indices[-1]] == "**" and indices[-1] < last:
                indices.append(indices[-1] + 1)
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                    is_link = entry.is_symlink()
                except OSError:
                    is_dir, is_link = False, False
                path = d.path / entry.name
                for i in indices:
                    part = pattern[i]
                    if part == "**":
                        if not hidden and entry.name.startswith("."):
                            continue
                        if is_dir:
                            heapq.heappush(queue, _Dir(d.via_link or is_link, path.parts, i, path))
                        elif i == last:
                            self._file(found, entry, path, d.via_link or is_link)
                        continue
                    if not _matches(entry.name, part, hidden):
                        continue
                    if i < last:
                        if is_dir:
                            heapq.heappush(queue, _Dir(d.via_link or is_link, path.parts, i + 1, path))
                    elif not is_dir:
                        self._file(found, entry, path, d.via_link or is_link)
        return found

    def _file(self, found: list[tuple[bool, Path]], entry: os.DirEntry[str], path: Path, via_link: bool) -> None:
        try:
            is_file = entry.is_file()
        except OSError:
            is_file = False
        if is_file:
            found.append((via_link, path))
        elif entry.is_symlink() and not os.path.exists(path):
            self.skipped.append(f"{path} (broken symlink)")

    def _take(self, found: list[tuple[bool, Path]]) -> list[Path]:
        """The files not taken yet, one name per real file, in sorted order."""
        taken = []
        for _, path in sorted(set(found), key=lambda f: (f[0], f[1].parts)):
            real = os.path.realpath(path)
            first = self.files.setdefault(real, path)
            if first is path:
                taken.append(path)
            elif first != path:
                self.skipped.append(f"{path} (same file as {first})")
            else:
                self.skipped.append(f"{path} (listed twice)")
        return sorted(taken)


def _matches(name: str, part: str, hidden: bool) -> bool:
    if not glob.has_magic(part):
        return name == part
    if not hidden and name.startswith(".") and not part.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, part)


def _summary(skipped: Sequence[str], limit: int = 5) -> str:
    """``a (why); b (why) and 3 more``."""
    more = f" and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return "; ".join(skipped[:limit]) + more


def _listed(skipped: Sequence[str]) -> str:
    return f" (skipped: {_summary(skipped)})" if skipped else ""


# Warnings already printed: train resolves data.train more than once and says it once.
_WARNED: set[str] = set()


def _warn(label: str, skipped: Sequence[str]) -> None:
    n = len(skipped)
    line = f"mtrec: warning: {label}: skipped {n} entr{'y' if n == 1 else 'ies'}: {_summary(skipped)}"
    if line not in _WARNED:
        _WARNED.add(line)
        print(line, file=sys.stderr, flush=True)


def open_parquet(path: Path) -> pq.ParquetFile:
    """Opens a Parquet file; one that is not Parquet, or repeats a column name, gives a one-line DataError.

    Every command opens its input files here (train, evaluate and score check all of them
    before reading rows), so a repeated name, which makes a column ambiguous, is refused
    whichever column it is.
    """
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable Parquet file ({reason})") from None
    names = pf.schema_arrow.names
    if len(set(names)) < len(names):
        pf.close()
        repeated = next(n for i, n in enumerate(names) if n in names[:i])
        raise DataError(f"{path}: duplicate column name {repeated!r}")
    return pf


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
