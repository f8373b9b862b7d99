"""From the ``data:`` section of a config to fitted preprocessing and encoded columns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from mtrec.data.parquet import iter_row_groups, read_table, resolve_paths
from mtrec.data.preprocess import EncodedColumns, Preprocessor
from mtrec.errors import ConfigError, DataError
from mtrec.schema import Schema

__all__ = ["TrainingData", "encode_files", "load_training_data"]


@dataclass
class TrainingData:
    """Fitted preprocessing with the encoded training and validation rows."""

    preprocessor: Preprocessor
    train: EncodedColumns
    valid: EncodedColumns
    train_files: list[Path]
    valid_files: list[Path]


def _columns(schema: Schema, with_labels: bool) -> list[str]:
    cols = schema.input_columns()
    if with_labels:
        cols += schema.label_columns()
    return list(dict.fromkeys(cols))


def _encode(pre: Preprocessor, table: pa.Table, source: str, with_labels: bool) -> EncodedColumns:
    # Encode in chunks so that temporary arrays stay small for big tables.
    step = 262_144
    parts = [
        pre.transform(table.slice(start, step), source=source, with_labels=with_labels)
        for start in range(0, table.num_rows, step)
    ]
    return EncodedColumns.concat(parts)


def encode_files(pre: Preprocessor, spec: str | Sequence[str], *, with_labels: bool = True) -> EncodedColumns:
    """Reads and encodes Parquet data row group by row group with fitted preprocessing."""
    paths = resolve_paths(spec)
    cols = _columns(pre.schema, with_labels)
    parts = [pre.transform(t, source=str(p), with_labels=with_labels) for p, t in iter_row_groups(paths, cols)]
    if not parts or sum(p.num_rows for p in parts) == 0:
        raise DataError(f"{spec}: no rows")
    return EncodedColumns.concat(parts)


def load_training_data(
    schema: Schema, train: str | None, valid: str | None, *, valid_fraction: float, seed: int
) -> TrainingData:
    """Reads training data, fits preprocessing on the training rows and encodes both splits.

    Without ``valid``, a seeded random ``valid_fraction`` of the training rows is held out
    before fitting, so validation rows never shape the vocabularies or statistics.
    """
    if train is None:
        raise ConfigError("data.train: required (a Parquet file, folder or glob)")
    train_files = resolve_paths(train)
    cols = _columns(schema, True)
    table = read_table(train_files, cols)
    source = str(train_files[0]) if len(train_files) == 1 else str(train)
    if valid is None:
        rng = np.random.default_rng(seed)
        is_valid = rng.random(table.num_rows) < valid_fraction
        if is_valid.all() or not is_valid.any():
            raise DataError(f"{source}: too few rows ({table.num_rows}) to hold out a validation split")
        train_table = table.filter(pa.array(~is_valid))
        valid_table = table.filter(pa.array(is_valid))
        valid_files = train_files
    else:
        valid_files = resolve_paths(valid)
        train_table = table
        valid_table = read_table(valid_files, cols)
    pre = Preprocessor.fit(schema, train_table, source=source)
    valid_source = source if valid is None else str(valid)
    return TrainingData(
        preprocessor=pre,
        train=_encode(pre, train_table, source, True),
        valid=_encode(pre, valid_table, valid_source, True),
        train_files=train_files,
        valid_files=valid_files,
    )
