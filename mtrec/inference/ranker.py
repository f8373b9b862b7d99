"""A trained model in a ranking pipeline: :func:`load_model` reads a model directory into a
:class:`Ranker`, whose :meth:`Ranker.predict` takes a pandas or polars DataFrame, a pyarrow
Table or RecordBatch, or a dict of arrays and returns per-task predictions: probabilities for
binary tasks, values on the label's original scale for regression tasks, class probabilities
``(N, C)`` for multiclass tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mtrec.batch import Batch
from mtrec.config import Config
from mtrec.data.batches import TensorColumns
from mtrec.data.preprocess import EncodedColumns
from mtrec.errors import DataError
from mtrec.model_dir import LoadedModel, load_model_dir
from mtrec.predict import predict_logits
from mtrec.schema import Task

__all__ = ["Ranker", "load_model"]


def _is_frame(data: Any, package: str) -> bool:
    # Duck-typed by module so that pandas and polars are never imported just to check.
    return type(data).__module__.split(".")[0] == package


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OverflowError):
        return "an integer does not fit in int64; pass IDs >= 2**63 as uint64 or as strings"
    text = str(exc.args[0]) if isinstance(exc, pa.ArrowException) and exc.args else str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


# What converting a column can raise: Arrow's errors, and pandas/Python ones for object columns.
_CONVERSION_ERRORS = (pa.ArrowException, TypeError, ValueError, OverflowError)


def _to_table(data: Any, columns: Sequence[str], source: str) -> pa.Table:
    """The ``columns`` of ``data`` as a pyarrow Table; every missing column listed at once.

    Raises:
        DataError: A feature column is missing (all are listed), appears twice, or cannot be
            converted to Arrow (mixed types in an object column, integers beyond int64).
    """
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        labels: list[Any] = list(data.column_names)
    elif _is_frame(data, "pandas") or _is_frame(data, "polars"):
        labels = list(data.columns)
    elif isinstance(data, Mapping):
        labels = list(data)
    else:
        raise TypeError(
            f"expected a pandas/polars DataFrame, a pyarrow Table/RecordBatch or a dict of arrays, "
            f"got {type(data).__name__}"
        )
    # Columns are found by their names as strings (a pandas column may be labelled by a number).
    label_of: dict[str, Any] = {}
    repeated = []
    for label in labels:
        if str(label) in label_of:
            repeated.append(str(label))
        label_of.setdefault(str(label), label)
    missing = [c for c in columns if c not in label_of]
    if missing:
        raise DataError(f"{source}: missing feature column(s) {', '.join(map(repr, missing))}")
    twice = [c for c in dict.fromkeys(repeated) if c in columns]
    if twice:
        raise DataError(f"{source}: duplicate column name {twice[0]!r}")
    # Only the feature columns are converted: extra columns (of any type) are ignored.
    if isinstance(data, pa.Table):
        return data.select(list(columns))
    arrays = {}
    for c in columns:
        try:
            if _is_frame(data, "pandas"):
                arrays[c] = pa.Table.from_pandas(data[[label_of[c]]], preserve_index=False).column(0)
            elif _is_frame(data, "polars"):
                arrays[c] = data.select(label_of[c]).to_arrow().column(0)
            else:
                arrays[c] = pa.array(data[label_of[c]])
        except _CONVERSION_ERRORS as exc:
            raise DataError(f"{source}: column {c!r} cannot be converted ({_reason(exc)})") from None
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) > 1:
        raise DataError(f"{source}: columns have different lengths {sorted(lengths)}")
    return pa.table(arrays)


class Ranker:
    """A trained model ready to score: preprocessing + network + output transforms.

    Args:
        loaded: A model directory read by :func:`mtrec.model_dir.load_model_dir`.
        device: Where the network runs (``cpu``, ``cuda``, ...).

    Attributes:
        config: The resolved training config.
        module: The plain ``torch.nn.Module`` (eval mode); ``module(batch)`` returns
            logits ``{task: (B,) or (B, C)}``.
        tasks: The predicted tasks (``Schema.output_tasks``: ESMM adds ``ctcvr``).
        task_names: Their names, the keys of :meth:`predict`'s result, in that order.
        feature_columns: The input columns the model reads.

    Example:
        >>> ranker = load_model("runs/mmoe")  # doctest: +SKIP
        >>> preds = ranker.predict(df)  # doctest: +SKIP
        >>> preds["ctr"].shape, preds["ctr"].dtype  # doctest: +SKIP
        ((1000,), dtype('float32'))
        >>> logits = ranker.module(ranker.encode(df))  # doctest: +SKIP
    """

    def __init__(self, loaded: LoadedModel, *, device: str | torch.device = "cpu") -> None:
        self.config: Config = loaded.config
        self.preprocessor = loaded.preprocessor
        self.meta = loaded.meta
        self.device = torch.device(device)
        self.module: torch.nn.Module = loaded.model.to(self.device).eval()
        self.tasks: tuple[Task, ...] = self.config.schema.output_tasks
        self.task_names: tuple[str, ...] = tuple(t.name for t in self.tasks)
        self._by_name = {t.name: t for t in self.tasks}
        self._kinds = {t.name: t.kind for t in self.tasks}
        self.feature_columns: tuple[str, ...] = tuple(self.config.schema.input_columns())
        self.calibration = dict(loaded.calibration)  # binary task -> Calibrator (train.calibration)

    def __repr__(self) -> str:
        return f"Ranker(model={self.config.model.name!r}, tasks={list(self.task_names)})"

    def _encode(self, data: Any, source: str) -> EncodedColumns:
        table = _to_table(data, self.feature_columns, source)
        if table.num_rows == 0:
            table = self._typed_empty(table)
        return self.preprocessor.transform(table, source=source, with_labels=False)

    def _typed_empty(self, table: pa.Table) -> pa.Table:
        """A 0-row table whose untyped columns (an empty pandas object column is ``null``) get the model's types.

        Typed columns are kept, so a 0-row input is checked like a 0-row Parquet file.
        """
        s = self.config.schema
        vocabs = self.preprocessor.vocabs

        def fill(name: str, t: pa.DataType) -> None:
            nonlocal table
            i = table.column_names.index(name)
            if pa.types.is_null(table.column(i).type):
                table = table.set_column(i, name, pa.array([], t))

        for f in s.sparse:
            fill(f.name, vocabs[f.name].type if f.name in vocabs else pa.int64())
        for d in s.dense:
            fill(d.name, pa.float64())
        for q in s.sequence:
            vocab = q.vocab_from or q.name
            if vocab in vocabs:
                fill(q.name, pa.list_(vocabs[vocab].type))
            else:  # hashed IDs: the type of the sparse column they share (checked by the encoding)
                t = table.column(vocab).type if q.vocab_from is not None else pa.int64()
                fill(q.name, pa.list_(t.value_type if pa.types.is_dictionary(t) else t))
        return table

    def encode(self, data: Any, *, source: str = "input") -> Batch:
        """Encodes feature columns with the saved preprocessing into a :class:`~mtrec.batch.Batch`.

        Unseen and null categories map to the reserved index 0. The batch is on the
        ranker's device; ``labels``/``label_mask`` are zeros.

        Args:
            data: pandas/polars DataFrame, pyarrow Table/RecordBatch or dict of arrays/lists.
            source: Name used in error messages.

        Raises:
            DataError: A feature column is missing (all are listed) or has the wrong type.
        """
        return TensorColumns.from_encoded(self._encode(data, source)).all.to(self.device)

    def predict(
        self, data: Any, *, batch_size: int = 16384, source: str = "input", calibrated: bool = True
    ) -> dict[str, np.ndarray]:
        """Predictions for every row, in input row order.

        Args:
            data: pandas/polars DataFrame, pyarrow Table/RecordBatch or dict of arrays/lists;
                extra columns are ignored.
            batch_size: Rows per forward pass.
            source: Name used in error messages.
            calibrated: Apply the model's saved calibration (``train.calibration``) to the
                binary tasks' probabilities; no effect on a model without one.

        Returns:
            ``{task: array}`` in ``task_names`` order, float32: ``(N,)`` probabilities for
            binary tasks (calibrated where the model has a calibration), ``(N,)`` values for
            regression tasks (``expm1`` applied when the task trained on ``log1p`` labels),
            ``(N, C)`` class probabilities for multiclass.
            A 0-row input gives 0-row arrays of these shapes.

        Raises:
            DataError: A feature column is missing (all are listed), appears twice, cannot
                be converted (mixed types in an object column, integers beyond int64) or
                has the wrong type.
        """
        return self.predict_encoded(self._encode(data, source), batch_size=batch_size, calibrated=calibrated)

    def predict_encoded(
        self, enc: EncodedColumns, *, batch_size: int = 16384, calibrated: bool = True
    ) -> dict[str, np.ndarray]:
        """:meth:`predict` on columns already encoded by the model's preprocessor."""
        calibration = self.calibration if calibrated else {}

        def output(name: str, z: torch.Tensor) -> torch.Tensor:
            if name in calibration:  # from the logit (Platt is exact there): no saturated sigmoid
                return torch.from_numpy(calibration[name].apply_logits(z.cpu().numpy()))
            return self._kinds[name].inverse_link(self._by_name[name], z)

        return predict_logits(
            self.module,
            TensorColumns.from_encoded(enc),
            self.task_names,
            batch_size=batch_size,
            device=self.device,
            transform=output,
            widths={t.name: t.output_dim for t in self.tasks},
        )


def load_model(model_dir: str | Path, *, device: str | torch.device = "cpu") -> Ranker:
    """Reads a model directory written by ``mtrec train`` into a :class:`Ranker`.

    Example:
        >>> ranker = mtrec.load_model("runs/mmoe")  # doctest: +SKIP
        >>> ranker.predict(pandas_df)["ctr"]  # doctest: +SKIP
    """
    return Ranker(load_model_dir(model_dir), device=device)
