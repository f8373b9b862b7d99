"""Accumulators that collect predictions batch by batch and compute exact metrics.

AUC cannot be computed exactly from per-batch summaries, so the accumulators
keep every (label, prediction) pair -- and nothing else: features never
reach them, which keeps memory at a few bytes per evaluated sample.  Chunks
are copied on ``update`` so that callers may reuse their buffers.

Typical use in an evaluation loop::

    acc = BinaryAccumulator()
    for batch in loader:
        acc.update(batch.click, torch.sigmoid(model(batch)))
    print(acc.compute())
"""

from __future__ import annotations

import numpy as np

from mtrec.metrics import functional as F
from mtrec.metrics.functional import ArrayLike

__all__ = ["BinaryAccumulator", "RegressionAccumulator"]


class _ChunkStore:
    """Append-only storage of aligned (label, prediction) chunks.

    Args:
        label_dtype: dtype labels are stored in.
        pred_dtype: dtype predictions are stored in.
    """

    def __init__(self, label_dtype: np.dtype, pred_dtype: np.dtype) -> None:
        self._label_dtype = np.dtype(label_dtype)
        self._pred_dtype = np.dtype(pred_dtype)
        self._labels: list[np.ndarray] = []
        self._preds: list[np.ndarray] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def _append(self, labels: np.ndarray, preds: np.ndarray) -> None:
        # np.array copies by default, detaching us from the caller's buffer
        # (and from tensor storage shared through .numpy()).
        self._labels.append(np.array(labels, dtype=self._label_dtype))
        self._preds.append(np.array(preds, dtype=self._pred_dtype))
        self._count += len(labels)

    def _gather(self) -> tuple[np.ndarray, np.ndarray]:
        # Collapse to a single chunk so that repeated compute() calls (e.g.
        # periodic logging) do not re-concatenate everything each time.
        if len(self._labels) > 1:
            self._labels = [np.concatenate(self._labels)]
            self._preds = [np.concatenate(self._preds)]
        if not self._labels:
            return (
                np.empty(0, dtype=self._label_dtype),
                np.empty(0, dtype=self._pred_dtype),
            )
        return self._labels[0], self._preds[0]

    def reset(self) -> None:
        """Drop everything seen so far."""
        self._labels = []
        self._preds = []
        self._count = 0


def _pair(y_true: ArrayLike, y_pred: ArrayLike, pred_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Convert one batch to numpy and check that labels and predictions align."""
    y = F._to_numpy(y_true, "y_true")
    p = F._to_numpy(y_pred, pred_name)
    if len(y) != len(p):
        raise ValueError(f"inconsistent input lengths: y_true={len(y)}, {pred_name}={len(p)}")
    return y, p


class BinaryAccumulator(_ChunkStore):
    """Exact AUC / log loss over all batches of a binary task.

    Labels are stored as int8 and predicted probabilities as float32.  Note
    that the float32 storage is what AUC sees: scores that differ only beyond
    float32 precision count as ties.
    """

    def __init__(self) -> None:
        super().__init__(np.int8, np.float32)

    def update(self, y_true: ArrayLike, y_score: ArrayLike) -> None:
        """Append one batch.

        Inputs are validated here rather than in :meth:`compute` so that an
        error points at the offending batch.

        Args:
            y_true: Binary labels (0/1 or bool), 1-D.
            y_score: Predicted probabilities of the positive class in
                ``[0, 1]``, same length as ``y_true``.

        Raises:
            ValueError: On mismatched lengths, labels outside {0, 1}, or
                probabilities that are NaN or outside ``[0, 1]``.
        """
        y, p = _pair(y_true, y_score, "y_score")
        if len(y) == 0:
            return
        F._binary_mask(y)
        if not ((p >= 0) & (p <= 1)).all():
            raise ValueError("y_score must be probabilities in [0, 1] (NaN is rejected)")
        self._append(y, p)

    def compute(self) -> dict[str, float | int]:
        """Compute metrics over every sample seen since the last reset.

        Returns:
            A dict with ``auc`` (``nan`` when one class is missing),
            ``logloss``, ``count``, ``positives``, ``mean_pred`` and
            ``mean_label``.  With no samples the float entries are ``nan``
            and the counts are 0.
        """
        labels, preds = self._gather()
        n = len(labels)
        if n == 0:
            nan = float("nan")
            return {
                "auc": nan,
                "logloss": nan,
                "count": 0,
                "positives": 0,
                "mean_pred": nan,
                "mean_label": nan,
            }
        positives = int(np.count_nonzero(labels))
        return {
            "auc": F.auc(labels, preds),
            "logloss": F.log_loss(labels, preds),
            "count": n,
            "positives": positives,
            # float64 accumulation: float32 sums drift over millions of rows.
            "mean_pred": float(preds.mean(dtype=np.float64)),
            "mean_label": positives / n,
        }


class RegressionAccumulator(_ChunkStore):
    """Exact RMSE / MAE over all batches of a regression task.

    Values are stored as float64 because regression targets such as dwell
    times or counts can lose meaningful precision in float32.
    """

    def __init__(self) -> None:
        super().__init__(np.float64, np.float64)

    def update(self, y_true: ArrayLike, y_pred: ArrayLike) -> None:
        """Append one batch.

        Args:
            y_true: Finite targets, 1-D.
            y_pred: Finite predictions, same length as ``y_true``.

        Raises:
            ValueError: On mismatched lengths or non-finite values.
        """
        y, p = _pair(y_true, y_pred, "y_pred")
        if len(y) == 0:
            return
        F._as_float64(y, "y_true")
        F._as_float64(p, "y_pred")
        self._append(y, p)

    def compute(self) -> dict[str, float | int]:
        """Compute metrics over every sample seen since the last reset.

        Returns:
            A dict with ``rmse``, ``mae``, ``count``, ``mean_pred`` and
            ``mean_label``.  With no samples the float entries are ``nan``
            and ``count`` is 0.
        """
        labels, preds = self._gather()
        n = len(labels)
        if n == 0:
            nan = float("nan")
            return {
                "rmse": nan,
                "mae": nan,
                "count": 0,
                "mean_pred": nan,
                "mean_label": nan,
            }
        return {
            "rmse": F.rmse(labels, preds),
            "mae": F.mae(labels, preds),
            "count": n,
            "mean_pred": float(preds.mean()),
            "mean_label": float(labels.mean()),
        }
