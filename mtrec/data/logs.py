"""Real multi-task click logs in the formats people have, as prepared Parquet folders.

Three public formats, each converted as it is (real column names, the IDs as they
appear in the file) by one ``prepare_*`` function with the signature
``(source, output, *, seed=0, overwrite=False) -> manifest``:

* :func:`prepare_ali_ccp`: Ali-CCP (Alibaba click and conversion prediction, the ESMM
  paper's data) as distributed by torch-rechub: comma-separated with a header, labels
  ``click`` and ``purchase``, 23 label-encoded sparse fields with numeric names (``101``,
  ``109_14``, ...) and 8 dense fields (``D109_14``, ...), in train/val/test files.
* :func:`prepare_aliexpress`: the AliExpress multi-task format (also FuxiCTR's
  ``tiny-mtl``): ``search_id``, ``categorical_1..16``, ``numerical_1..63``, ``click``,
  ``conversion``, in train/test files.
* :func:`prepare_byterec`: the ICME-2019 ByteDance short-video log: tab-separated, no
  header, labels ``finish`` and ``like``, one file split by ``time``.

IDs are read as Int64 straight from the text (never through a float, so 64-bit IDs
survive), dense fields as Float32 (what the model computes in; it halves the files of the
full datasets), labels as Int8 0/1. Any file that does not fit its format raises a
one-line :class:`~mtrec.errors.DataError` naming the file, the line and the column, and
nothing is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mtrec.data.prepared import file_md5, read_source, write_prepared
from mtrec.errors import DataError

__all__ = [
    "ALI_CCP",
    "ALIEXPRESS",
    "BYTEREC",
    "LogFormat",
    "prepare_ali_ccp",
    "prepare_aliexpress",
    "prepare_byterec",
    "read_log",
]

_DTYPES: dict[str, pl.DataType] = {"label": pl.Int64(), "id": pl.Int64(), "int": pl.Int64(), "dense": pl.Float32()}
_EXPECTED = {"label": "0 or 1", "id": "an integer ID", "int": "an integer", "dense": "a number"}


@dataclass(frozen=True)
class LogFormat:
    """The layout of one log format.

    Args:
        name: Human-readable name used in error messages.
        columns: ``(name, kind)`` in the canonical order; kind is ``label`` (0/1,
            written as Int8), ``id`` (categorical, Int64), ``int`` (an integer that is
            not an ID, such as a timestamp; Int64) or ``dense`` (Float32).
        separator: Field separator.
        has_header: Whether the first line names the columns. Files with a header may
            hold the columns in any order; files without one must hold them in
            ``columns`` order.
        header_hint: Short description of the expected columns for error messages.
    """

    name: str
    columns: tuple[tuple[str, str], ...]
    separator: str
    has_header: bool
    header_hint: str

    def names(self, kind: str | None = None) -> tuple[str, ...]:
        """Column names (of one kind, if given) in canonical order."""
        return tuple(n for n, k in self.columns if kind is None or k == kind)


ALI_CCP_SPARSE = (
    "101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "210", "216", "508",
    "509", "702", "853", "301", "109_14", "110_14", "127_14", "150_14",
)  # fmt: skip
ALI_CCP_DENSE = ("D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853")
ALI_CCP = LogFormat(
    name="Ali-CCP",
    columns=(
        ("click", "label"),
        ("purchase", "label"),
        *((c, "id") for c in ALI_CCP_SPARSE),
        *((c, "dense") for c in ALI_CCP_DENSE),
    ),
    separator=",",
    has_header=True,
    header_hint="click, purchase, 23 sparse fields 101..150_14 and 8 dense fields D109_14..D853",
)

ALIEXPRESS = LogFormat(
    name="AliExpress",
    columns=(
        ("search_id", "id"),
        *((f"categorical_{i}", "id") for i in range(1, 17)),
        *((f"numerical_{i}", "dense") for i in range(1, 64)),
        ("click", "label"),
        ("conversion", "label"),
    ),
    separator=",",
    has_header=True,
    header_hint="search_id, categorical_1..16, numerical_1..63, click, conversion",
)

BYTEREC_IDS = ("uid", "user_city", "item_id", "author_id", "item_city", "channel", "music_id", "device")
BYTEREC = LogFormat(
    name="ByteRec",
    columns=(
        ("uid", "id"),
        ("user_city", "id"),
        ("item_id", "id"),
        ("author_id", "id"),
        ("item_city", "id"),
        ("channel", "id"),
        ("finish", "label"),
        ("like", "label"),
        ("music_id", "id"),
        ("device", "id"),
        ("time", "int"),
        ("duration_time", "int"),
    ),
    separator="\t",
    has_header=False,
    header_hint=(
        "uid, user_city, item_id, author_id, item_city, channel, finish, like, music_id, device, time, duration_time"
    ),
)

# File names looked for in a source folder, full datasets first, then the samples.
ALI_CCP_FILES = {
    "train": ("ali_ccp_train.csv", "ali_ccp_train_sample.csv", "train.csv"),
    "valid": ("ali_ccp_val.csv", "ali_ccp_val_sample.csv", "val.csv", "valid.csv"),
    "test": ("ali_ccp_test.csv", "ali_ccp_test_sample.csv", "test.csv"),
}
ALIEXPRESS_FILES = {
    "train": ("train.csv", "aliexpress_train.csv", "aliexpress_train_sample.csv"),
    "test": ("test.csv", "aliexpress_test.csv", "aliexpress_test_sample.csv"),
}
# final_track2_train.txt is the challenge's full file; byterec_sample.txt the 200-row sample.
BYTEREC_FILES = ("final_track2_train.txt", "byterec_sample.txt")

ALIEXPRESS_VALID_FRACTION = 0.2
BYTEREC_SPLITS = (("train", 0.70), ("valid", 0.15), ("test", 0.15))
_SEPARATOR_NAMES = {",": "comma", "\t": "tab"}


# --------------------------------------------------------------------------- reading


def _file_columns(path: Path, fmt: LogFormat) -> list[str]:
    """The column names of the file in file order, checked against the format.

    Lines ending in a separator (an empty last field, as some exporters write) are
    tolerated, in the header or in the data: the names then end with the empty column
    ``""``, which :func:`read_log` checks is empty and drops.
    """
    try:
        with open(path, "rb") as fh:
            first, second = fh.readline(), fh.readline()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not first.strip():
        raise DataError(f"{path}: empty first line, expected the {fmt.name} columns ({fmt.header_hint})")
    try:
        line = first.decode("utf-8").rstrip("\r\n")
        data_line = (second if fmt.has_header else first).decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise DataError(f"{path}: the first lines are not UTF-8 text, expected the {fmt.name} format") from None
    fields = [f.strip().strip('"') for f in line.split(fmt.separator)]
    trailing = len(fields) > 1 and fields[-1] == ""
    if trailing:
        fields = fields[:-1]
    # A trailing separator on the data lines only: one field more than the header, empty.
    trailing |= data_line.endswith(fmt.separator) and data_line.count(fmt.separator) == len(fields)
    sep = _SEPARATOR_NAMES.get(fmt.separator, repr(fmt.separator))
    if not fmt.has_header:
        if len(fields) != len(fmt.columns):
            raise DataError(
                f"{path}: line 1 has {len(fields)} {sep}-separated fields, expected {len(fmt.columns)} "
                f"({fmt.header_hint})"
            )
        return [*fmt.names(), *([""] if trailing else [])]
    if len(fields) == 1 and len(fmt.columns) > 1:
        raise DataError(f"{path}: line 1 holds no {sep}, expected a {sep}-separated {fmt.name} header")
    duplicated = sorted({f for f in fields if fields.count(f) > 1})
    if duplicated:
        raise DataError(f"{path}: header names column(s) {', '.join(map(repr, duplicated))} more than once")
    missing = [c for c in fmt.names() if c not in fields]
    unexpected = [f for f in fields if f not in set(fmt.names())]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"lacks column(s) {', '.join(map(repr, missing))}")
        if unexpected:
            problems.append(f"has unexpected column(s) {', '.join(map(repr, unexpected))}")
        raise DataError(f"{path}: header {' and '.join(problems)}; expected the {fmt.name} columns ({fmt.header_hint})")
    return [*fields, *([""] if trailing else [])]


def _line(fmt: LogFormat, row: int) -> int:
    # 1-based line of a data row (no field of these formats spans lines).
    return row + 1 + int(fmt.has_header)


def _read_csv(path: Path, fmt: LogFormat, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    # The header (already checked) is skipped rather than parsed, so that the names, and
    # an empty column for trailing separators, are exactly those of _file_columns.
    return pl.read_csv(path, separator=fmt.separator, has_header=False, skip_rows=int(fmt.has_header), schema=schema)


def _read_typed(path: Path, fmt: LogFormat, names: list[str]) -> pl.DataFrame:
    kinds = dict(fmt.columns)
    schema = {n: (_DTYPES[kinds[n]] if n else pl.String()) for n in names}
    try:
        return _read_csv(path, fmt, schema)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    except pl.exceptions.PolarsError as exc:
        # The typed read is the fast path; only on failure is the file read again as
        # text to find the line and column at fault.
        raise _diagnose(path, fmt, names, exc) from None


def _diagnose(path: Path, fmt: LogFormat, names: list[str], exc: Exception) -> DataError:
    """A one-line error for a file that polars could not read with the format's types."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        text = _read_csv(path, fmt, {n: pl.String() for n in names})
    except pl.exceptions.PolarsError:
        return _ragged_line(path, fmt, len(names)) or DataError(f"{path}: cannot be read as {fmt.name} ({reason})")
    kinds = dict(fmt.columns)
    for name in names:
        if not name:
            continue
        raw = text.get_column(name)
        lost = raw.cast(_DTYPES[kinds[name]], strict=False).is_null() & raw.is_not_null()
        if lost.any():
            row = int(lost.arg_true()[0])
            return DataError(
                f"{path}: line {_line(fmt, row)}: column {name!r} holds {raw[row]!r}, expected {_EXPECTED[kinds[name]]}"
            )
    return DataError(f"{path}: cannot be read as {fmt.name} ({reason})")


def _ragged_line(path: Path, fmt: LogFormat, expected: int) -> DataError | None:
    """The first line with more fields than the header, if any (only run on failure)."""
    sep = _SEPARATOR_NAMES.get(fmt.separator, repr(fmt.separator))
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            count = line.rstrip("\r\n").count(fmt.separator) + 1
            if count > expected:
                return DataError(f"{path}: line {number} has {count} {sep}-separated fields, expected {expected}")
    return None


def read_log(path: Path, fmt: LogFormat) -> pl.DataFrame:
    """Reads one log file into a typed frame with the format's columns in canonical order.

    Args:
        path: The CSV/TSV file.
        fmt: Its format (:data:`ALI_CCP`, :data:`ALIEXPRESS` or :data:`BYTEREC`).

    Returns:
        IDs and integers as Int64, dense fields as Float32, labels as Int8 in {0, 1}.
        Blank lines are skipped.

    Raises:
        DataError: The header or field count does not match the format, a value does
            not parse as its column's type, a value is empty, or a label is not 0/1.
    """
    names = _file_columns(path, fmt)
    frame = _read_typed(path, fmt, names)
    expected = list(fmt.names())
    # A blank line reads as a row of nulls; it carries nothing, so it is skipped rather
    # than reported (files often end with one).
    blank = frame.select(pl.all_horizontal(pl.col(expected).is_null())).to_series()
    if "" in frame.columns:
        extra = frame.get_column("").is_not_null() & ~blank
        if extra.any():
            row = int(extra.arg_true()[0])
            raise DataError(
                f"{path}: line {_line(fmt, row)}: value {frame.get_column('')[row]!r} after the last column "
                f"{names[-2]!r}, expected nothing"
            )
    kinds = dict(fmt.columns)
    for name in expected:
        empty = frame.get_column(name).is_null() & ~blank
        if empty.any():
            row = int(empty.arg_true()[0])
            raise DataError(
                f"{path}: line {_line(fmt, row)}: column {name!r} is empty, expected {_EXPECTED[kinds[name]]}"
            )
    for name in fmt.names("label"):
        col = frame.get_column(name)
        bad = ~col.is_in([0, 1]) & ~blank
        if bad.any():
            row = int(bad.arg_true()[0])
            raise DataError(f"{path}: line {_line(fmt, row)}: label column {name!r} holds {col[row]}, expected 0 or 1")
    frame = frame.filter(~blank).select(expected)
    if frame.height == 0:
        raise DataError(f"{path}: no data rows")
    return frame.with_columns(pl.col(list(fmt.names("label"))).cast(pl.Int8))


# --------------------------------------------------------------------------- splits and manifest


def _source_entry(path: Path, frame: pl.DataFrame) -> dict[str, Any]:
    return {"file": path.name, "md5": file_md5(path), "rows": frame.height}


def _positive_rate(splits: dict[str, pl.DataFrame], labels: tuple[str, ...]) -> dict[str, float]:
    rows = sum(f.height for f in splits.values())
    return {label: sum(int(f.get_column(label).sum()) for f in splits.values()) / rows for label in labels}


def _folder(source: Path, fmt: LogFormat, files: Mapping[str, tuple[str, ...]]) -> Path:
    if source.is_file():
        expected = "; ".join(f"{split}: {' or '.join(names)}" for split, names in files.items())
        raise DataError(f"{source}: is a file, expected the {fmt.name} folder holding {expected}")
    return source


def _manifest(
    dataset: str,
    fmt: LogFormat,
    sources: list[dict[str, Any]],
    splits: dict[str, pl.DataFrame],
    seed: int,
    protocol: str,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "format": fmt.name,
        "source": sources,
        "seed": seed,
        "protocol": protocol,
        "tasks": list(fmt.names("label")),
        "features": {"sparse": list(fmt.names("id")), "dense": list(fmt.names("dense"))},
        "not_features": [],
        "positive_rate": _positive_rate(splits, fmt.names("label")),
        **extra,
    }


# --------------------------------------------------------------------------- the datasets


def prepare_ali_ccp(source: Path, output: Path, *, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Writes ``output/{train,valid,test}.parquet`` from Ali-CCP's train/val/test CSV files.

    The files are kept as they were split by their publisher (train -> train, val ->
    valid, test -> test); rows keep their file order.

    Args:
        source: Folder with ``ali_ccp_{train,val,test}.csv`` (or the ``*_sample.csv`` files).
        output: Folder to create.
        seed: Unused (the split is the publisher's); recorded in the manifest.
        overwrite: Replace a folder written earlier by ``mtrec datasets``.

    Returns:
        The manifest written to ``output/dataset.json``.

    Example:
        >>> prepare_ali_ccp(Path("../shared/data/samples/ali-ccp"), Path("data/ali-ccp"))  # doctest: +SKIP
    """
    folder = _folder(Path(source), ALI_CCP, ALI_CCP_FILES)
    paths = {split: read_source(folder, names) for split, names in ALI_CCP_FILES.items()}
    splits = {split: read_log(path, ALI_CCP) for split, path in paths.items()}
    manifest = _manifest(
        "ali-ccp",
        ALI_CCP,
        [_source_entry(paths[s], splits[s]) for s in splits],
        splits,
        seed,
        "the publisher's train/val/test files as train/valid/test, rows in file order",
    )
    return write_prepared(Path(output), splits, manifest, overwrite=overwrite)


def _holdout_searches(path: Path, search_id: pl.Series, fraction: float, seed: int) -> np.ndarray:
    """Marks the rows of a seeded ``fraction`` of the distinct search IDs.

    The impressions of one search page are correlated (same query, same moment); holding
    out whole searches keeps a page from sitting on both sides of the split.
    """
    searches = search_id.unique(maintain_order=True).to_numpy()
    if searches.shape[0] < 2:
        raise DataError(
            f"{path}: column 'search_id' has {searches.shape[0]} distinct value(s), expected at least 2 "
            f"to hold out a validation split"
        )
    count = min(searches.shape[0] - 1, max(1, round(fraction * searches.shape[0])))
    chosen = searches[np.random.default_rng(seed).choice(searches.shape[0], size=count, replace=False)]
    return np.isin(search_id.to_numpy(), chosen)


def prepare_aliexpress(source: Path, output: Path, *, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Writes ``output/{train,valid,test}.parquet`` from AliExpress-format train/test CSV files.

    The test file becomes ``test``; a seeded 20 % of the training file's searches
    (all rows of each chosen ``search_id``) becomes ``valid``. Rows keep their file order.

    Args:
        source: Folder with ``train.csv``/``test.csv`` (FuxiCTR's tiny-mtl, the full
            per-country datasets) or ``aliexpress_{train,test}_sample.csv``.
        output: Folder to create.
        seed: Seed of the validation split.
        overwrite: Replace a folder written earlier by ``mtrec datasets``.

    Returns:
        The manifest written to ``output/dataset.json``.

    Example:
        >>> prepare_aliexpress(Path("../shared/data/samples/tiny-mtl"), Path("data/aliexpress"))  # doctest: +SKIP
    """
    folder = _folder(Path(source), ALIEXPRESS, ALIEXPRESS_FILES)
    paths = {split: read_source(folder, names) for split, names in ALIEXPRESS_FILES.items()}
    train = read_log(paths["train"], ALIEXPRESS)
    test = read_log(paths["test"], ALIEXPRESS)
    held = pl.Series(_holdout_searches(paths["train"], train.get_column("search_id"), ALIEXPRESS_VALID_FRACTION, seed))
    splits = {"train": train.filter(~held), "valid": train.filter(held), "test": test}
    manifest = _manifest(
        "aliexpress",
        ALIEXPRESS,
        [_source_entry(paths["train"], train), _source_entry(paths["test"], test)],
        splits,
        seed,
        f"test file as test; {ALIEXPRESS_VALID_FRACTION:.0%} of the training file's search_ids (seeded, all rows "
        f"of a search together) as valid, the rest as train; rows in file order",
        valid_fraction=ALIEXPRESS_VALID_FRACTION,
        # search_id names a search page: it groups rows (and the split) but a new page's ID
        # says nothing, so it is no feature.
        features={"sparse": [f"categorical_{i}" for i in range(1, 17)], "dense": list(ALIEXPRESS.names("dense"))},
        not_features=["search_id"],
    )
    return write_prepared(Path(output), splits, manifest, overwrite=overwrite)


def prepare_byterec(source: Path, output: Path, *, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Writes ``output/{train,valid,test}.parquet`` from the ByteDance short-video log.

    The rows are sorted by ``time`` (stably) and cut into the earliest 70 % (train), the
    next 15 % (valid) and the last 15 % (test): a model is validated and tested on
    impressions later than everything it was trained on, as it would be in production.
    ``-1`` (the log's marker of an unknown city, music or author) is kept as a value of
    its own, so it gets its own embedding.

    Args:
        source: The ``.txt`` file or a folder holding ``final_track2_train.txt`` or
            ``byterec_sample.txt``.
        output: Folder to create.
        seed: Unused (the split is by time); recorded in the manifest.
        overwrite: Replace a folder written earlier by ``mtrec datasets``.

    Returns:
        The manifest written to ``output/dataset.json``.

    Example:
        >>> prepare_byterec(Path("../shared/data/samples/byterec"), Path("data/byterec"))  # doctest: +SKIP
    """
    path = read_source(Path(source), BYTEREC_FILES)
    frame = read_log(path, BYTEREC).sort("time", maintain_order=True)
    bounds = np.round(np.cumsum([f for _, f in BYTEREC_SPLITS]) * frame.height).astype(np.int64)
    splits: dict[str, pl.DataFrame] = {}
    start = 0
    for (name, _), stop in zip(BYTEREC_SPLITS, bounds, strict=True):
        splits[name] = frame.slice(start, int(stop) - start)
        start = int(stop)
    if any(f.height == 0 for f in splits.values()):
        raise DataError(f"{path}: {frame.height} data row(s), too few to split 70/15/15 by time")
    manifest = _manifest(
        "byterec",
        BYTEREC,
        [_source_entry(path, frame)],
        splits,
        seed,
        "rows sorted by time; earliest 70% train, next 15% valid, last 15% test (seed unused)",
        # duration_time is a number, not an ID; time orders the splits and is no feature.
        features={"sparse": list(BYTEREC_IDS), "dense": ["duration_time"]},
        not_features=["time"],
        split_column="time",
        missing_marker=-1,
    )
    return write_prepared(Path(output), splits, manifest, overwrite=overwrite)
