"""From the ``data:`` section of a config to fitted preprocessing and encoded columns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from mtrec.data.parquet import iter_row_groups, read_table, resolve_paths
from mtrec.data.preprocess import EncodedColumns, Preprocessor
from mtrec.errors import ConfigError, DataError
from mtrec.schema import Schema

if TYPE_CHECKING:
    from mtrec.data.streaming import ParquetStream

__all__ = [
    "StreamingData",
    "TrainingData",
    "encode_files",
    "encoded_row_bytes",
    "load_streaming_data",
    "load_training_data",
    "resolve_data_mode",
]


@dataclass
class TrainingData:
    """Fitted preprocessing with the encoded training and validation rows."""

    preprocessor: Preprocessor
    train: EncodedColumns
    valid: EncodedColumns
    train_files: list[Path]
    valid_files: list[Path]


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
    cols = pre.schema.read_columns(with_labels)
    parts = [pre.transform(t, source=str(p), with_labels=with_labels) for p, t in iter_row_groups(paths, cols)]
    if not parts or sum(p.num_rows for p in parts) == 0:
        raise DataError(f"{spec}: no rows")
    return EncodedColumns.concat(parts)


def load_training_data(
    schema: Schema,
    train: str | None,
    valid: str | None,
    *,
    valid_fraction: float,
    seed: int,
    preprocessor: Preprocessor | None = None,
) -> TrainingData:
    """Reads training data, fits preprocessing on the training rows and encodes both splits.

    Without ``valid``, a seeded random ``valid_fraction`` of the training rows is held out
    before fitting, so validation rows never shape the vocabularies or statistics. A given
    ``preprocessor`` (a warm start's, reused) encodes both splits as it is, unfitted.
    """
    if train is None:
        raise ConfigError("data.train: required (a Parquet file, folder or glob)")
    train_files = resolve_paths(train)
    cols = schema.read_columns()
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
    pre = preprocessor or Preprocessor.fit(schema, train_table, source=source)
    valid_source = source if valid is None else str(valid)
    return TrainingData(
        preprocessor=pre,
        train=_encode(pre, train_table, source, True),
        valid=_encode(pre, valid_table, valid_source, True),
        train_files=train_files,
        valid_files=valid_files,
    )


def encoded_row_bytes(schema: Schema) -> int:
    """Bytes one encoded training row takes in memory (int64 IDs, float32 values and labels)."""
    tasks = len(schema.output_tasks)
    weights = 4 * tasks if any(t.sample_weight is not None for t in schema.tasks) else 0
    sequences = sum(8 * s.max_len + 8 for s in schema.sequence)
    return 8 * len(schema.sparse) + 4 * len(schema.dense) + sequences + 5 * tasks + weights


def resolve_data_mode(mode: str, schema: Schema, train: str | None, budget_mb: float) -> tuple[str, float]:
    """``memory`` or ``stream`` for ``data.mode``, and the estimated encoded size in MiB.

    ``auto`` streams when the encoded training rows (row counts from the Parquet
    metadata, nothing read) would take more than ``budget_mb``.
    """
    from mtrec.data.parquet import open_parquet

    if train is None:
        raise ConfigError("data.train: required (a Parquet file, folder or glob)")
    rows = sum(open_parquet(p).metadata.num_rows for p in resolve_paths(train))
    size_mb = rows * encoded_row_bytes(schema) / 2**20
    if mode == "auto":
        mode = "stream" if size_mb > budget_mb else "memory"
    return mode, size_mb


@dataclass
class StreamingData:
    """Fitted preprocessing, the training rows as a stream and the validation rows encoded."""

    preprocessor: Preprocessor
    train: ParquetStream
    valid: EncodedColumns
    train_files: list[Path]
    valid_files: list[Path]


def load_streaming_data(
    schema: Schema,
    train: str | None,
    valid: str | None,
    *,
    valid_fraction: float,
    seed: int,
    batch_size: int,
    shuffle_buffer: int,
    read_ahead: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    preprocessor: Preprocessor | None = None,
) -> StreamingData:
    """Like :func:`load_training_data`, without ever holding the training rows.

    Preprocessing is fitted in one streamed pass; without ``valid`` the same rows as in
    memory mode are held out (and only those are kept, encoded, for validation). Every
    rank fits on all training rows, so every rank holds identical preprocessing without
    any communication. A given ``preprocessor`` is used as it is, as in memory mode.
    """
    # streaming.py builds on this module's helpers, so it is imported here.
    from mtrec.data.streaming import ParquetStream, fit_preprocessor_stream, iter_tables

    if train is None:
        raise ConfigError("data.train: required (a Parquet file, folder or glob)")
    train_files = resolve_paths(train)
    source = str(train_files[0]) if len(train_files) == 1 else str(train)
    holdout = (valid_fraction, seed) if valid is None else None
    pre = preprocessor or fit_preprocessor_stream(schema, train_files, holdout=holdout, source=source)
    stream = ParquetStream(
        train_files,
        pre,
        batch_size=batch_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        read_ahead=read_ahead,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        holdout=holdout,
    )
    if valid is None:
        cols = schema.read_columns()
        parts = [
            pre.transform(t, source=source)
            for t in iter_tables(train_files, cols, holdout=holdout, keep="holdout")
            if t.num_rows
        ]
        valid_enc = EncodedColumns.concat(parts)
        valid_files = train_files
    else:
        valid_files = resolve_paths(valid)
        valid_enc = encode_files(pre, valid)
    return StreamingData(pre, stream, valid_enc, train_files, valid_files)
