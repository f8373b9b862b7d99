"""Parquet in, encoded column tensors out. Knows nothing about models."""

from mtrec.data.batches import TensorColumns
from mtrec.data.loading import TrainingData, encode_files, load_training_data
from mtrec.data.parquet import iter_row_groups, read_table, resolve_paths
from mtrec.data.preprocess import EncodedColumns, Preprocessor

__all__ = [
    "EncodedColumns",
    "Preprocessor",
    "TensorColumns",
    "TrainingData",
    "encode_files",
    "iter_row_groups",
    "load_training_data",
    "read_table",
    "resolve_paths",
]
