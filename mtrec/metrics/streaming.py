"""Accumulators that collect predictions batch by batch and compute exact metrics.

AUC cannot be computed exactly from per-batch summaries, so the accumulators
keep every (label, prediction) pair -- and nothing else: features never
reach them, which keeps memory at a few bytes per evaluated sample.  Chunks
are copied on ``update`` so that callers may reuse their buffers.

:class:`GroupedBinaryAccumulator` additionally keeps a group key per row
(user or query id) and reports group AUC.

Typical use in an evaluation loop::

    acc = BinaryAccumulator()
    for batch in loader:
        acc.update(batch.click, torch.sigmoid(model(batch)))
    print(acc.compute())
"""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from mtrec.metrics import functional as F
from mtrec.metrics.functional import ArrayLike
from mtrec.metrics.grouped import _as_group_array, gauc

__all__ = ["BinaryAccumulator", "GroupedBinaryAccumulator", "RegressionAccumulator"]


class _ChunkStore:
    """Append-only storage of aligned (label, prediction) chunks.

    Args:
        label_dtype: dtype labels are stored in.
        pred_dtype: dtype predictions are stored in.
    """

    def __init__(self, label_dtype: DTypeLike, pred_dtype: DTypeLike) -> None:
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
            ``logloss``, ``normalized_entropy`` (``nan`` when one class is
            missing), ``pr_auc`` (``nan`` without positives),
            ``calibration_ratio`` (mean prediction / mean label, ``nan``
            without positives), ``count``, ``positives``, ``mean_pred`` and
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
                "normalized_entropy": nan,
                "pr_auc": nan,
                "calibration_ratio": nan,
                "count": 0,
                "positives": 0,
                "mean_pred": nan,
                "mean_label": nan,
            }
        positives = int(np.count_nonzero(labels))
        logloss = F.log_loss(labels, preds)
        # float64 accumulation: float32 sums drift over millions of rows.
        mean_pred = float(preds.mean(dtype=np.float64))
        mean_label = positives / n
        entropy = F._binary_entropy(mean_label)
        return {
            "auc": F.auc(labels, preds),
            "logloss": logloss,
            "normalized_entropy": float(logloss / entropy) if np.isfinite(entropy) else float("nan"),
            "pr_auc": F.pr_auc(labels, preds),
            "calibration_ratio": mean_pred / mean_label if positives else float("nan"),
            "count": n,
            "positives": positives,
            "mean_pred": mean_pred,
            "mean_label": mean_label,
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


class GroupedBinaryAccumulator:
    """Exact group AUC (GAUC) over all batches of a binary task.

    Keeps only labels (int8), scores (float32, like
    :class:`BinaryAccumulator`: scores equal in float32 are ties) and group
    keys.  Integer keys are stored as int64; string keys are mapped to
    int64 codes on arrival through a dictionary that grows with the number
    of distinct groups, so a long evaluation never stores strings per row.
    One accumulator takes either integer or string keys, not both.

    Args:
        weighting: ``"impressions"`` or ``"clicks"``, as in
            :func:`mtrec.metrics.gauc`.
    """

    def __init__(self, weighting: str = "impressions") -> None:
        if weighting not in ("impressions", "clicks"):
            raise ValueError(f"weighting must be 'impressions' or 'clicks', got {weighting!r}")
        self.weighting = weighting
        self._store = _ChunkStore(np.int8, np.float32)
        self._groups: list[np.ndarray] = []
        self._key_codes: dict | None = None  # set once string keys are seen
        self._key_kind: str | None = None

    def __len__(self) -> int:
        return len(self._store)

    def _encode_groups(self, arr: np.ndarray) -> tuple[np.ndarray, str, dict | None]:
        """Return ``(int64 codes, key kind, string-key dictionary or None)``."""
        kind = "int" if arr.dtype.kind in "biu" else "other"
        if self._key_kind is not None and kind != self._key_kind:
            raise ValueError("group keys must keep one type (integers or strings) across updates")
        if kind == "int":
            if arr.dtype == np.uint64 and len(arr) and int(arr.max()) >= 2**63:
                raise ValueError("uint64 group keys >= 2**63 are not supported")
            return arr.astype(np.int64), kind, None
        try:
            uniques, inverse = np.unique(arr, return_inverse=True)
        except TypeError as exc:
            raise ValueError("groups must be integers or strings of one type") from exc
        if uniques.dtype.kind == "f" and np.isnan(uniques).any():
            raise ValueError("groups contains NaN")
        codes = self._key_codes if self._key_codes is not None else {}
        mapped = np.fromiter(
            (codes.setdefault(k, len(codes)) for k in uniques.tolist()), dtype=np.int64, count=len(uniques)
        )
        return mapped[inverse.reshape(-1)], kind, codes

    def update(self, y_true: ArrayLike, y_score: ArrayLike, groups: ArrayLike) -> None:
        """Append one batch.

        Args:
            y_true: Binary labels (0/1 or bool), 1-D.
            y_score: Real-valued scores (NaN rejected), same length.
            groups: Group key per row (integers or strings), same length.

        Raises:
            ValueError: On mismatched lengths, labels outside {0, 1}, NaN
                scores or group keys of a different type than before.
        """
        y, s = _pair(y_true, y_score, "y_score")
        grp = _as_group_array(groups)
        if len(grp) != len(y):
            raise ValueError(f"inconsistent input lengths: y_true={len(y)}, groups={len(grp)}")
        if len(y) == 0:
            return
        F._binary_mask(y)
        if s.dtype.kind == "f" and np.isnan(s).any():
            raise ValueError("y_score contains NaN")
        codes, kind, key_codes = self._encode_groups(grp)
        # Commit only after every check has passed.
        if key_codes is not None:
            self._key_codes = key_codes
        self._key_kind = kind
        self._groups.append(codes)
        self._store._append(y, s)

    def compute(self) -> dict[str, float | int]:
        """GAUC over every sample seen since the last reset.

        Returns:
            The dict of :func:`mtrec.metrics.gauc` plus ``count``.  With no
            samples ``gauc`` is ``nan`` and the counts are 0.
        """
        labels, scores = self._store._gather()
        if len(self._groups) > 1:
            self._groups = [np.concatenate(self._groups)]
        if len(labels) == 0:
            return {
                "gauc": float("nan"),
                "groups": 0,
                "groups_used": 0,
                "groups_skipped_one_class": 0,
                "rows_used": 0,
                "count": 0,
            }
        out = gauc(labels, scores, self._groups[0], weighting=self.weighting)
        out["count"] = len(labels)
        return out

    def reset(self) -> None:
        """Drop everything seen so far."""
        self._store.reset()
        self._groups = []
        self._key_codes = None
        self._key_kind = None
