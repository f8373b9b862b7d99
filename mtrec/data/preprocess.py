"""Fit once on the training data, encode everything the same way afterwards.

* Sparse features: a frequency-ordered vocabulary (values seen at least ``min_freq``
  times get indices ``1..V``; nulls, rare and unseen values share index 0), or a
  stable 64-bit hash into ``hash_buckets`` buckets. IDs stay int64 throughout.
* Dense features: null/NaN/inf fill, optional log1p, standardisation with training
  statistics.
* List features: encoded with their own vocabulary or the one of a sparse feature
  (``vocab_from``), truncated to the last ``max_len`` items and padded.
* Labels: each task's label where its ``where`` expression holds, with a mask.

The fitted state is saved as JSON plus one Parquet file per vocabulary: nothing is
pickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtrec.errors import DataError, ModelError
from mtrec.expr import parse_where
from mtrec.schema import DenseFeature, InputLayout, Schema, SequenceFeature, SparseFeature, Task

__all__ = ["EncodedColumns", "Preprocessor"]

_STATE_VERSION = 1


@dataclass
class EncodedColumns:
    """Encoded columns as contiguous numpy arrays (see :class:`mtrec.batch.Batch`)."""

    sparse: np.ndarray
    dense: np.ndarray
    sequences: list[np.ndarray]
    seq_lengths: np.ndarray
    labels: np.ndarray
    label_mask: np.ndarray
    sample_weight: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of all columns."""
        arrays = [self.sparse, self.dense, *self.sequences, self.seq_lengths, self.labels, self.label_mask]
        if self.sample_weight is not None:
            arrays.append(self.sample_weight)
        return sum(int(a.nbytes) for a in arrays)

    def take(self, rows: np.ndarray) -> EncodedColumns:
        """Rows at ``rows`` (an index array or boolean mask)."""
        return EncodedColumns(
            self.sparse[rows],
            self.dense[rows],
            [s[rows] for s in self.sequences],
            self.seq_lengths[rows],
            self.labels[rows],
            self.label_mask[rows],
            None if self.sample_weight is None else self.sample_weight[rows],
        )

    @staticmethod
    def concat(parts: list[EncodedColumns]) -> EncodedColumns:
        """Concatenates chunks row-wise."""
        if len(parts) == 1:
            return parts[0]
        return EncodedColumns(
            np.concatenate([p.sparse for p in parts]),
            np.concatenate([p.dense for p in parts]),
            [np.concatenate([p.sequences[i] for p in parts]) for i in range(len(parts[0].sequences))],
            np.concatenate([p.seq_lengths for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.label_mask for p in parts]),
            None if parts[0].sample_weight is None else np.concatenate([p.sample_weight for p in parts]),
        )


def _is_id_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _plain(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One contiguous array, dictionary encoding removed."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    return arr


def _id_values(source: str, name: str, col: pa.ChunkedArray | pa.Array, *, is_list: bool) -> pa.Array:
    arr = _plain(col)
    if is_list:
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
            raise DataError(f"{source}: column {name!r} has type {arr.type}, expected a list of ints or strings")
        arr = _plain(pc.list_flatten(arr))
    if pa.types.is_integer(arr.type):
        # uint64 IDs >= 2**63 keep their bit pattern: still distinct, still stable.
        return arr.cast(pa.int64(), safe=arr.type != pa.uint64())
    if not _is_id_type(arr.type):
        what = "a list of ints or strings" if is_list else "int or string IDs"
        raise DataError(f"{source}: column {name!r} has type {arr.type}, expected {what}")
    if pa.types.is_large_string(arr.type):
        # polars writes large_string, pyarrow string: one type, so files of both mix.
        return arr.cast(pa.string())
    return arr


def _id_type(col: pa.ChunkedArray | pa.Array, *, is_list: bool) -> pa.DataType | None:
    """The type :func:`_id_values` gives a column's IDs (int64 or string), read off its type alone.

    None when the column holds no IDs (the encoding then says what is wrong with it).
    """
    t = col.type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if is_list:
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
            return None
        t = t.value_type
        if pa.types.is_dictionary(t):
            t = t.value_type
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.string()
    return None


def _check_shared(source: str, seq: SequenceFeature, f: SparseFeature, seq_type: pa.DataType, own: pa.DataType) -> None:
    """A list column and the sparse feature whose IDs it shares (``vocab_from``) hold one ID type."""
    if seq_type != own:
        shared = "hashed IDs" if f.hash_buckets is not None else "vocabulary"
        raise DataError(
            f"{source}: list column {seq.name!r} holds {seq_type} but {f.name!r}, whose {shared} it shares "
            f"(vocab_from), holds {own}"
        )


def _splitmix64(values: np.ndarray) -> np.ndarray:
    # A fixed integer mix so that hashed IDs are identical across processes, versions
    # and machines (Python's and polars' hashes are not).
    z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash_ids(arr: pa.Array, buckets: int) -> np.ndarray:
    """Maps values to ``1..buckets`` (nulls to 0) with a stable hash."""
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_integer(arr.type):
        ints = arr.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        mixed = _splitmix64(ints)
    else:
        encoded = pc.dictionary_encode(arr.fill_null(""))
        uniques = encoded.dictionary.to_pylist()
        digests = np.array(
            [int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little") for u in uniques],
            dtype=np.uint64,
        )
        mixed = digests[encoded.indices.to_numpy(zero_copy_only=False)]
    out = (mixed % np.uint64(buckets)).astype(np.int64) + 1
    out[~valid] = 0
    return out


class _VocabCounts:
    """Running value counts of one vocabulary (a sparse feature plus the lists sharing it).

    Per-table counts are merged into the running total lazily, once the pending ones
    outnumber it, so that merging costs amortised O(distinct values per table) rather
    than O(vocabulary) per table.
    """

    # Pending counts below this many rows are never merged early (merging is per call, not per row).
    merge_at = 1 << 16

    def __init__(self, name: str) -> None:
        self.name = name
        self.type: pa.DataType | None = None
        self.total: pl.DataFrame | None = None
        self.pending: list[pl.DataFrame] = []
        self.pending_rows = 0

    def add(self, source: str, column: str, values: pa.Array) -> None:
        if self.type is None:
            self.type = values.type
        elif values.type != self.type:
            raise DataError(
                f"{source}: column {column!r} holds {values.type} in one part of the data and {self.type} in another"
            )
        counts = pl.Series("v", values).drop_nulls().value_counts(name="n")
        # value_counts gives u32 counts; int64 so that sums over many tables cannot overflow.
        self.pending.append(counts.with_columns(pl.col("n").cast(pl.Int64)))
        self.pending_rows += counts.height
        if self.pending_rows > max(self.total.height if self.total is not None else 0, self.merge_at):
            self._merge()

    def _merge(self) -> None:
        frames = ([self.total] if self.total is not None else []) + self.pending
        merged = frames[0] if len(frames) == 1 else pl.concat(frames).group_by("v").agg(pl.col("n").sum())
        self.total, self.pending, self.pending_rows = merged, [], 0

    def finish(self, min_freq: int, max_vocab: int | None) -> pa.Array:
        self._merge()
        counts = self.total
        assert counts is not None  # finish() is only called after at least one add()
        # Most frequent first; ties by value so the vocabulary does not depend on row order.
        counts = counts.filter(pl.col("n") >= min_freq).sort(["n", "v"], descending=[True, False])
        if max_vocab is not None:
            counts = counts.head(max_vocab)
        return counts.get_column("v").to_arrow()


class _DenseMoments:
    """Running statistics of one dense column, exact however the rows are split.

    The fill value (the mean of the finite raw values unless configured) is known only at
    the end, so the transformed statistics are kept over the finite rows alone, as
    (count, mean, M2) merged with Chan et al.'s pairwise update (stable where sums of
    squares cancel), and the non-finite rows join at the end as one group of
    ``n_nonfinite`` copies of ``g(fill)`` with M2 = 0.
    """

    def __init__(self, f: DenseFeature) -> None:
        self.f = f
        self.log = f.transform in ("log1p", "log1p_standardize")
        self.standardize = f.transform in ("standardize", "log1p_standardize")
        self.n_finite = 0
        self.n_nonfinite = 0
        self.raw_sum = 0.0
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def _g(self, x: np.ndarray) -> np.ndarray:
        return np.log1p(np.clip(x, 0.0, None)) if self.log else x

    def _join(self, n: int, mean: float, m2: float) -> None:
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta * delta * (self.n * n / total)
        self.n = total

    def add(self, x: np.ndarray) -> None:
        finite = np.isfinite(x)
        good = x[finite]
        self.n_finite += int(good.size)
        self.n_nonfinite += int(x.size - good.size)
        self.raw_sum += float(good.sum())
        if self.standardize and good.size:
            g = self._g(good)
            mean = float(g.mean())
            self._join(int(g.size), mean, float(np.square(g - mean).sum()))

    def finish(self, source: str) -> dict[str, float]:
        f = self.f
        if f.clean and self.n_nonfinite:
            raise DataError(
                f"{source}: column {f.name!r} has {self.n_nonfinite} null/NaN/inf values but is declared clean"
            )
        fill = f.fill if f.fill is not None else (self.raw_sum / self.n_finite if self.n_finite else 0.0)
        mean, std = 0.0, 1.0
        if self.standardize:
            self._join(self.n_nonfinite, float(self._g(np.array([fill], dtype=np.float64))[0]), 0.0)
            mean = self.mean
            std = math.sqrt(self.m2 / self.n) if self.n else float("nan")
            if not np.isfinite(std) or std < 1e-12:
                std = 1.0
        return {"fill": float(fill), "mean": float(mean), "std": float(std)}


class _FitState:
    """What :meth:`Preprocessor.fit_stream` keeps between tables."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.rows = 0
        self.shared: dict[str, list[SequenceFeature]] = {}
        for seq in schema.sequence:
            if seq.vocab_from is not None:
                self.shared.setdefault(seq.vocab_from, []).append(seq)
        self.vocabs = {f.name: _VocabCounts(f.name) for f in schema.sparse if f.hash_buckets is None}
        self.vocabs.update({s.name: _VocabCounts(s.name) for s in schema.sequence if s.vocab_from is None})
        self.dense = {f.name: _DenseMoments(f) for f in schema.dense}

    def update(self, table: pa.Table, source: str) -> None:
        if table.num_rows == 0:
            return
        self.rows += table.num_rows
        for f in self.schema.sparse:
            own = _id_values(source, f.name, table.column(f.name), is_list=False)
            # A hashed feature is checked for its type only (hashing needs no state), and so
            # are the lists sharing it: an int and a string ID hash differently.
            counts = self.vocabs[f.name] if f.hash_buckets is None else None
            if counts is not None:
                counts.add(source, f.name, own)
            for seq in self.shared.get(f.name, []):
                values = _id_values(source, seq.name, table.column(seq.name), is_list=True)
                _check_shared(source, seq, f, values.type, own.type)
                if counts is not None:
                    counts.add(source, seq.name, values)
        for s in self.schema.sequence:
            if s.vocab_from is None:
                self.vocabs[s.name].add(source, s.name, _id_values(source, s.name, table.column(s.name), is_list=True))
        for d in self.schema.dense:
            self.dense[d.name].add(Preprocessor._dense_values(source, d, table.column(d.name)))

    def finish(self, source: str) -> tuple[dict[str, pa.Array], dict[str, dict[str, float]]]:
        if self.rows == 0:
            raise DataError(f"{source}: no training rows to fit preprocessing on")
        vocabs: dict[str, pa.Array] = {}
        for f in self.schema.sparse:
            if f.hash_buckets is None:
                vocabs[f.name] = self.vocabs[f.name].finish(f.min_freq, f.max_vocab)
        for s in self.schema.sequence:
            if s.vocab_from is None:
                vocabs[s.name] = self.vocabs[s.name].finish(s.min_freq, None)
        return vocabs, {f.name: self.dense[f.name].finish(source) for f in self.schema.dense}


class Preprocessor:
    """Fitted encoding of a :class:`~mtrec.schema.Schema`.

    Example:
        >>> import pyarrow as pa
        >>> from mtrec.schema import Schema, SparseFeature, Task
        >>> schema = Schema(sparse=(SparseFeature("u"),), tasks=(Task("ctr", label="click"),))
        >>> table = pa.table({"u": [7, 7, 9], "click": [1, 0, 1]})
        >>> pre = Preprocessor.fit(schema, table)
        >>> pre.transform(table).sparse[:, 0].tolist()
        [1, 1, 2]
    """

    def __init__(
        self,
        schema: Schema,
        vocabs: dict[str, pa.Array],
        dense_stats: dict[str, dict[str, float]],
    ) -> None:
        self.schema = schema
        self.vocabs = vocabs
        self.dense_stats = dense_stats

    # ----------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, schema: Schema, table: pa.Table, *, source: str = "training data") -> Preprocessor:
        """Fits vocabularies and dense statistics on ``table`` (the training rows only)."""
        return cls.fit_stream(schema, [table], source=source)

    @classmethod
    def fit_stream(cls, schema: Schema, tables: Iterable[pa.Table], *, source: str) -> Preprocessor:
        """Fits the same state as :meth:`fit` on the concatenation of ``tables``, one table at a time.

        Only running state is held: per-vocabulary value counts and, per dense feature, a
        handful of float64 sums. The result does not depend on how the rows are split
        into tables (up to float rounding of the dense statistics, ~1e-15 relative).

        Args:
            schema: Features and tasks to fit.
            tables: The training rows in any number of tables (e.g. one per Parquet row
                group), each holding at least the schema's input columns.
            source: Names the data in error messages.

        Raises:
            DataError: No rows at all, a column of the wrong type (or of different types in
                different tables), or null/NaN/inf in a dense column declared clean.

        Example:
            >>> import pyarrow as pa
            >>> from mtrec.schema import Schema, SparseFeature, Task
            >>> schema = Schema(sparse=(SparseFeature("u"),), tasks=(Task("ctr", label="click"),))
            >>> parts = [pa.table({"u": [7, 9]}), pa.table({"u": [9]})]
            >>> Preprocessor.fit_stream(schema, parts, source="demo").vocabs["u"].to_pylist()
            [9, 7]
        """
        state = _FitState(schema)
        for table in tables:
            state.update(table, source)
        return cls(schema, *state.finish(source))

    @staticmethod
    def _dense_values(source: str, f: DenseFeature, col: pa.ChunkedArray | pa.Array) -> np.ndarray:
        arr = _plain(col)
        if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)):
            raise DataError(f"{source}: column {f.name!r} has type {arr.type}, expected a number")
        return arr.cast(pa.float64()).to_numpy(zero_copy_only=False)

    # ----------------------------------------------------------------- layout
    def table_owners(self) -> list[tuple[str, int | None]]:
        """Each embedding table's owner, in table order: (sparse feature or sequence name, its
        hash buckets or None). A sequence with ``vocab_from`` reads its feature's table."""
        schema = self.schema
        owners: list[tuple[str, int | None]] = [(f.name, f.hash_buckets) for f in schema.sparse]
        return owners + [(s.name, None) for s in schema.sequence if s.vocab_from is None]

    def layout(self) -> InputLayout:
        """Embedding tables and encoded widths for building a model."""
        schema = self.schema
        owners = self.table_owners()
        table_of = {name: i for i, (name, _) in enumerate(owners)}
        return InputLayout(
            table_sizes=tuple(len(self.vocabs[n]) + 1 if b is None else b + 1 for n, b in owners),
            sparse_tables=tuple(table_of[f.name] for f in schema.sparse),
            sequence_tables=tuple(table_of[s.vocab_from or s.name] for s in schema.sequence),
            sequence_max_len=tuple(s.max_len for s in schema.sequence),
            sequence_pooling=tuple(s.pooling for s in schema.sequence),
            num_dense=len(schema.dense),
            sequence_targets=_sequence_targets(schema),
            sparse_names=tuple(f.name for f in schema.sparse),
        )

    def cardinality(self, f: SparseFeature) -> int:
        """Rows of the feature's table, including the reserved index 0."""
        if f.hash_buckets is not None:
            return f.hash_buckets + 1
        return len(self.vocabs[f.name]) + 1

    # ----------------------------------------------------------------- encoding
    def _lookup(self, source: str, name: str, values: pa.Array, vocab: pa.Array) -> np.ndarray:
        if values.type != vocab.type:
            try:
                values = values.cast(vocab.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DataError(
                    f"{source}: column {name!r} has type {values.type} but the model was trained on {vocab.type}"
                ) from None
        idx = pc.index_in(values, value_set=vocab)
        return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1

    def _encode_sparse(self, source: str, f: SparseFeature, col: pa.ChunkedArray) -> np.ndarray:
        values = _id_values(source, f.name, col, is_list=False)
        if f.hash_buckets is not None:
            return _hash_ids(values, f.hash_buckets)
        return self._lookup(source, f.name, values, self.vocabs[f.name])

    def _encode_dense(self, source: str, f: DenseFeature, col: pa.ChunkedArray) -> np.ndarray:
        x = self._dense_values(source, f, col)
        finite = np.isfinite(x)
        if f.clean and not finite.all():
            raise DataError(
                f"{source}: column {f.name!r} has {int((~finite).sum())} null/NaN/inf values but is declared clean"
            )
        st = self.dense_stats[f.name]
        x = np.where(finite, x, st["fill"])
        if f.transform in ("log1p", "log1p_standardize"):
            x = np.log1p(np.clip(x, 0.0, None))
        if f.transform in ("standardize", "log1p_standardize"):
            x = (x - st["mean"]) / st["std"]
        with np.errstate(over="ignore"):
            out = x.astype(np.float32)
        if not np.isfinite(out).all():
            raise DataError(
                f"{source}: column {f.name!r} has values too large for float32 after its {f.transform} transform "
                f"(use transform: log1p or log1p_standardize)"
            )
        return out

    def _encode_sequence(self, source: str, index: int, col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        s = self.schema.sequence[index]
        arr = _plain(col)
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
            raise DataError(f"{source}: column {s.name!r} has type {arr.type}, expected a list of ints or strings")
        offsets = arr.offsets.to_numpy().astype(np.int64)
        first = int(offsets[0])
        # Values by the offsets rather than list_flatten, which skips values under null slots.
        values = _id_values(source, s.name, arr.values.slice(first, int(offsets[-1]) - first), is_list=False)
        vocab_name = s.vocab_from if s.vocab_from is not None else s.name
        hashed = next((f for f in self.schema.sparse if f.name == vocab_name and f.hash_buckets is not None), None)
        if hashed is not None:
            codes = _hash_ids(values, hashed.hash_buckets)  # type: ignore[arg-type]
        else:
            codes = self._lookup(source, s.name, values, self.vocabs[vocab_name])
        lengths = np.diff(offsets)
        lengths[np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)] = 0
        kept = np.minimum(lengths, s.max_len)
        start = offsets[:-1] - first + (lengths - kept)  # keep the last max_len items
        positions = np.arange(s.max_len, dtype=np.int64)
        valid = positions[None, :] < kept[:, None]
        gather = np.where(valid, start[:, None] + positions[None, :], 0)
        out = codes[gather] if codes.size else np.zeros(gather.shape, dtype=np.int64)
        out[~valid] = 0
        return np.ascontiguousarray(out, dtype=np.int64), kept

    def _sample_space(self, source: str, t: Task, table: pa.Table) -> np.ndarray:
        n = table.num_rows
        if t.where is None:
            return np.ones(n, dtype=bool)
        expr = parse_where(t.where)
        cols = {}
        for c in expr.columns:
            if c not in table.column_names:
                raise DataError(f"{source}: column {c!r} used by tasks.{t.name}.where is missing")
            cols[c] = _plain(table.column(c)).to_numpy(zero_copy_only=False)
        for c, kind in expr.constant_kinds:
            ctype = _plain(table.column(c)).type
            is_text = pa.types.is_string(ctype) or pa.types.is_large_string(ctype)
            is_num = pa.types.is_integer(ctype) or pa.types.is_floating(ctype) or pa.types.is_boolean(ctype)
            if (kind == "str" and not is_text) or (kind == "number" and not is_num):
                raise DataError(
                    f"{source}: tasks.{t.name}.where {t.where!r} compares column {c!r} ({ctype}) "
                    f"with a {'string' if kind == 'str' else 'number'}"
                )
        try:
            return expr.evaluate(cols)
        except TypeError:
            raise DataError(
                f"{source}: tasks.{t.name}.where {t.where!r} compares columns with constants of another type"
            ) from None

    @staticmethod
    def _numeric(source: str, table: pa.Table, column: str, what: str) -> np.ndarray:
        arr = _plain(table.column(column))
        if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)):
            raise DataError(f"{source}: {what} has type {arr.type}, expected numbers")
        return arr.cast(pa.float64()).to_numpy(zero_copy_only=False)

    def _task_label(self, source: str, t: Task, ys: np.ndarray) -> np.ndarray:
        """Checks the labels of a task's sample space and applies its label transform."""
        where = f"label column {t.label!r} (task {t.name})"
        if t.kind.real_valued:
            nonfinite = ~np.isfinite(ys)
            if nonfinite.any():
                raise DataError(
                    f"{source}: {where} has {int(nonfinite.sum())} null/NaN/inf value(s) in its sample space"
                )
        bad, expected = t.kind.bad_labels(t, ys)
        if np.any(bad):
            example = ys[bad][0]
            shown = "null/NaN" if not np.isfinite(example) else repr(float(example))
            raise DataError(
                f"{source}: {where} has {int(np.sum(bad))} value(s) outside {expected} in its sample space "
                f"(e.g. {shown})"
            )
        return np.log1p(ys) if t.label_transform == "log1p" else ys

    def _encode_labels(self, source: str, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        n = table.num_rows
        schema = self.schema
        tasks = schema.output_tasks
        labels = np.zeros((n, len(tasks)), dtype=np.float32)
        mask = np.zeros((n, len(tasks)), dtype=bool)
        weights = np.ones((n, len(tasks)), dtype=np.float32) if any(t.sample_weight for t in tasks) else None
        for j, t in enumerate(schema.tasks):
            space = self._sample_space(source, t, table)
            y = self._numeric(source, table, t.label, f"label column {t.label!r} (task {t.name})")
            labels[space, j] = self._task_label(source, t, y[space])
            mask[:, j] = space
            if t.sample_weight is not None and weights is not None:
                what = f"sample_weight column {t.sample_weight!r} (task {t.name})"
                w = self._numeric(source, table, t.sample_weight, what)[space]
                bad = ~np.isfinite(w) | (w < 0)
                if bad.any():
                    raise DataError(
                        f"{source}: sample_weight column {t.sample_weight!r} (task {t.name}) has {int(bad.sum())} "
                        f"null, negative or non-finite value(s) in the task's sample space"
                    )
                weights[space, j] = w
        if schema.esmm is not None:
            # CTCVR on every impression: clicked and converted. The CVR column is already 0
            # outside its sample space.
            names = schema.task_names
            ctr, cvr = names.index(schema.esmm.ctr), names.index(schema.esmm.cvr)
            labels[:, -1] = labels[:, ctr] * labels[:, cvr]
            mask[:, -1] = mask[:, ctr]
            if weights is not None:
                weights[:, -1] = weights[:, ctr]
        return labels, mask, weights

    def transform(self, table: pa.Table, *, source: str = "data", with_labels: bool = True) -> EncodedColumns:
        """Encodes a table (features and, with ``with_labels``, labels and sample-space masks)."""
        schema = self.schema
        n = table.num_rows
        missing = [c for c in schema.input_columns() if c not in table.column_names]
        if with_labels:
            missing += [c for c in schema.label_columns() if c not in table.column_names]
        if missing:
            raise DataError(f"{source}: missing column(s) {', '.join(map(repr, dict.fromkeys(missing)))}")
        sparse = np.empty((n, len(schema.sparse)), dtype=np.int64)
        for j, f in enumerate(schema.sparse):
            sparse[:, j] = self._encode_sparse(source, f, table.column(f.name))
        dense = np.empty((n, len(schema.dense)), dtype=np.float32)
        for j, d in enumerate(schema.dense):
            dense[:, j] = self._encode_dense(source, d, table.column(d.name))
        sequences, lengths = [], np.zeros((n, len(schema.sequence)), dtype=np.int64)
        hashed = {f.name: f for f in schema.sparse if f.hash_buckets is not None}
        for s in schema.sequence:
            # Fitting checks lists sharing a vocabulary or hashed IDs; the hashed ones are checked
            # again on every table, as an int and a string ID hash differently (vocabulary lookups
            # convert the IDs to the vocabulary's type instead).
            if s.vocab_from in hashed:
                own = _id_type(table.column(s.vocab_from), is_list=False)
                seq_type = _id_type(table.column(s.name), is_list=True)
                if own is not None and seq_type is not None:
                    _check_shared(source, s, hashed[s.vocab_from], seq_type, own)
        for j, s in enumerate(schema.sequence):
            ids, kept = self._encode_sequence(source, j, table.column(s.name))
            sequences.append(ids)
            lengths[:, j] = kept
        weights = None
        if with_labels:
            labels, mask, weights = self._encode_labels(source, table)
        else:
            labels = np.zeros((n, len(schema.output_tasks)), dtype=np.float32)
            mask = np.zeros((n, len(schema.output_tasks)), dtype=bool)
        return EncodedColumns(sparse, dense, sequences, lengths, labels, mask, weights)

    # ----------------------------------------------------------------- persistence
    def save(self, directory: Path) -> None:
        """Writes ``state.json`` and ``vocab_<i>.parquet`` files into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        files = {}
        for i, (name, vocab) in enumerate(self.vocabs.items()):
            fname = f"vocab_{i}.parquet"
            pq.write_table(pa.table({"value": vocab}), directory / fname)
            files[name] = {"file": fname, "size": len(vocab), "type": str(vocab.type)}
        state: dict[str, Any] = {"version": _STATE_VERSION, "vocabularies": files, "dense": self.dense_stats}
        (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))

    @classmethod
    def load(cls, schema: Schema, directory: Path) -> Preprocessor:
        """Reads the state written by :meth:`save`."""
        try:
            state = json.loads((directory / "state.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{directory / 'state.json'}: cannot read preprocessing state ({exc})") from None
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ModelError(f"{directory / 'state.json'}: unsupported preprocessing state version")
        vocabs = {}
        try:
            entries = [
                (name, directory / info["file"], int(info["size"])) for name, info in state["vocabularies"].items()
            ]
            dense = {k: {s: float(v[s]) for s in ("fill", "mean", "std")} for k, v in state["dense"].items()}
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ModelError(f"{directory / 'state.json'}: malformed preprocessing state ({exc!r})") from None
        for name, path, size in entries:
            try:
                vocab = pq.read_table(path).column("value").combine_chunks()
            except (OSError, pa.ArrowInvalid, KeyError) as exc:
                raise ModelError(f"{path}: cannot read vocabulary of {name!r} ({exc})") from None
            if len(vocab) != size:
                raise ModelError(f"{path}: vocabulary of {name!r} has {len(vocab)} values, expected {size}")
            vocabs[name] = vocab
        expected = {f.name for f in schema.sparse if f.hash_buckets is None}
        expected |= {s.name for s in schema.sequence if s.vocab_from is None}
        if set(vocabs) != expected or set(dense) != {f.name for f in schema.dense}:
            raise ModelError(f"{directory}: preprocessing state does not match the model's config")
        return cls(schema, vocabs, dense)


def _sequence_targets(schema: Schema) -> tuple[int, ...]:
    """:attr:`InputLayout.sequence_targets`: each list's attention target column, -1 for none
    (empty when no list pools by target attention)."""
    if all(s.pooling != "target_attention" for s in schema.sequence):
        return ()
    column = {f.name: i for i, f in enumerate(schema.sparse)}
    return tuple(column[s.target] if s.target is not None else -1 for s in schema.sequence)
