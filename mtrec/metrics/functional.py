"""Exact, whole-set evaluation metrics as pure numpy functions.

Every function accepts numpy arrays, Python sequences or torch tensors (torch
is never imported here; tensors are recognised by duck typing) and returns a
plain Python ``float``.  Inputs must be 1-D, or column vectors of shape
``(n, 1)`` as produced by single-output heads.

Conventions shared by all functions:

* ``sample_weight`` is optional; weights must be finite and non-negative.
* Empty input, mismatched lengths, NaN values and out-of-domain labels raise
  ``ValueError`` -- silently producing a number from broken data is worse than
  failing loudly in an evaluation loop.
* A metric that is mathematically undefined for valid data (AUC with only one
  class present) returns ``float('nan')`` so that callers can report it as
  undefined instead of crashing a long evaluation run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "auc",
    "log_loss",
    "log_loss_from_logits",
    "mae",
    "positive_rate",
    "rmse",
]

ArrayLike = Any  # numpy array, Python sequence or torch tensor


# --------------------------------------------------------------------------
# Input conversion and validation helpers
# --------------------------------------------------------------------------


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    """Convert ``x`` to a 1-D numpy array without importing torch.

    Args:
        x: Array-like input (numpy array, list, torch tensor, ...).
        name: Argument name used in error messages.

    Returns:
        A 1-D numpy array (possibly a view of the caller's memory).

    Raises:
        ValueError: If the input is not 1-D or an ``(n, 1)`` column.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach().cpu()
        # numpy has no bfloat16, so widen it before crossing over.
        if str(getattr(t, "dtype", "")) == "torch.bfloat16":
            t = t.float()
        arr = t.numpy()
    else:
        arr = np.asarray(x)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (or shape (n, 1)), got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}") from exc
    return arr


def _check_lengths(**arrays: np.ndarray | None) -> int:
    """Validate that all given arrays are non-empty and equally long.

    Args:
        **arrays: Named arrays; ``None`` entries are skipped.

    Returns:
        The common length.

    Raises:
        ValueError: On empty input or mismatched lengths.
    """
    present = {k: v for k, v in arrays.items() if v is not None}
    lengths = {k: len(v) for k, v in present.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise ValueError(f"inconsistent input lengths: {desc}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError("metrics are undefined on empty input")
    return n


def _as_float64(x: np.ndarray, name: str) -> np.ndarray:
    """Cast to float64 and reject NaN and infinities.

    Args:
        x: Numeric array.
        name: Argument name used in error messages.

    Returns:
        The float64 array.

    Raises:
        ValueError: If any value is not finite.
    """
    out = x.astype(np.float64, copy=False)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


def _binary_mask(y_true: np.ndarray) -> np.ndarray:
    """Return the boolean positive mask of strictly binary labels.

    Args:
        y_true: Labels of any numeric dtype.

    Returns:
        Boolean array, ``True`` where the label is 1.

    Raises:
        ValueError: If any label is not 0 or 1 (NaN included).
    """
    if y_true.dtype == np.bool_:
        return y_true
    pos = y_true == 1
    if not (pos | (y_true == 0)).all():
        bad = y_true[~(pos | (y_true == 0))][:5]
        raise ValueError(f"y_true must contain only 0 and 1, found e.g. {bad.tolist()}")
    return pos


def _soft_labels(y_true: np.ndarray) -> np.ndarray:
    """Return labels as float64, allowing soft targets in ``[0, 1]``.

    Args:
        y_true: Labels of any numeric dtype.

    Returns:
        float64 labels.

    Raises:
        ValueError: If any label is NaN or outside ``[0, 1]``.
    """
    y = y_true.astype(np.float64, copy=False)
    # Written so that NaN fails the check as well.
    if not ((y >= 0.0) & (y <= 1.0)).all():
        raise ValueError("y_true must lie in [0, 1]")
    return y


def _weights(sample_weight: ArrayLike | None) -> np.ndarray | None:
    """Convert and validate optional sample weights.

    Args:
        sample_weight: Optional weights.

    Returns:
        float64 weights, or ``None`` when not given.

    Raises:
        ValueError: If weights are NaN, infinite or negative.
    """
    if sample_weight is None:
        return None
    w = _as_float64(_to_numpy(sample_weight, "sample_weight"), "sample_weight")
    if (w < 0).any():
        raise ValueError("sample_weight must be non-negative")
    return w


def _mean(values: np.ndarray, w: np.ndarray | None) -> float:
    """(Weighted) arithmetic mean.

    Args:
        values: float64 values.
        w: Optional validated weights of the same length.

    Returns:
        The mean as a Python float.

    Raises:
        ValueError: If all weights are zero (the mean is then a caller bug,
            not a property of the data).
    """
    if w is None:
        return float(values.mean())
    total = float(w.sum())
    if total <= 0.0:
        raise ValueError("sample_weight sums to zero")
    return float(np.dot(w, values) / total)


# --------------------------------------------------------------------------
# Ranking
# --------------------------------------------------------------------------


def _sortable_scores(y_score: np.ndarray) -> np.ndarray:
    """Prepare scores for sorting and reject NaN.

    The native dtype is kept where possible: float32 sorts faster than
    float64 and widening cannot change the order or the tie structure, while
    casting large int64 scores to float64 could merge distinct values.

    Args:
        y_score: Numeric scores.

    Returns:
        Scores in a dtype numpy can sort directly.

    Raises:
        ValueError: If any score is NaN.
    """
    if y_score.dtype == np.bool_:
        return y_score.view(np.uint8)
    if y_score.dtype == np.float16:
        y_score = y_score.astype(np.float32)
    if y_score.dtype.kind == "f" and np.isnan(y_score).any():
        raise ValueError("y_score contains NaN")
    return y_score


def auc(
    y_true: ArrayLike,
    y_score: ArrayLike,
    sample_weight: ArrayLike | None = None,
) -> float:
    """Exact area under the ROC curve.

    Equal to ``sklearn.metrics.roc_auc_score``: tied scores count half a
    correctly ordered pair (mid-rank convention).  Infinite scores are
    allowed and ordered as usual.

    The implementation never sorts the full array jointly.  It sorts each
    class separately and uses ``searchsorted`` of the smaller class into the
    larger one to count, for each sample, the opposite-class samples strictly
    below and tied with it.  Sorting values (rather than argsorting) is what
    makes the unweighted case fast; the weighted case needs the permutation
    to carry weights and therefore argsorts.

    Args:
        y_true: Binary labels (0/1 or bool).
        y_score: Real-valued scores; higher means more likely positive.
        sample_weight: Optional non-negative per-sample weights.

    Returns:
        The AUC in ``[0, 1]``, or ``nan`` if only one class is present (or one
        class has zero total weight).

    Raises:
        ValueError: On empty input, mismatched lengths, labels outside
            {0, 1}, NaN scores or invalid weights.
    """
    y = _to_numpy(y_true, "y_true")
    s = _to_numpy(y_score, "y_score")
    w = _weights(sample_weight)
    _check_lengths(y_true=y, y_score=s, sample_weight=w)
    pos_mask = _binary_mask(y)
    s = _sortable_scores(s)

    s_pos = s[pos_mask]
    s_neg = s[~pos_mask]
    if s_pos.size == 0 or s_neg.size == 0:
        return float("nan")

    # Query the smaller class into the larger one: only the larger class
    # must be fully sorted for binary search, and searchsorted with sorted
    # queries walks memory monotonically.
    query_is_pos = s_pos.size <= s_neg.size
    q_val, r_val = (s_pos, s_neg) if query_is_pos else (s_neg, s_pos)

    if w is None:
        q_sorted = np.sort(q_val)
        r_sorted = np.sort(r_val)
        lo = np.searchsorted(r_sorted, q_sorted, side="left")
        hi = np.searchsorted(r_sorted, q_sorted, side="right")
        # Integer pair counts are exact; Python ints avoid any overflow.
        below = int(lo.sum(dtype=np.int64))
        ties = int((hi - lo).sum(dtype=np.int64))
        total = int(s_pos.size) * int(s_neg.size)
        if query_is_pos:
            wins = below
        else:
            # "below" counted positives under each negative (the wrong order).
            wins = total - below - ties
        return (2 * wins + ties) / (2 * total)

    w_pos = w[pos_mask]
    w_neg = w[~pos_mask]
    q_w, r_w = (w_pos, w_neg) if query_is_pos else (w_neg, w_pos)
    total = float(q_w.sum()) * float(r_w.sum())
    if total == 0.0:
        return float("nan")
    r_order = np.argsort(r_val)
    r_sorted = r_val[r_order]
    # Leading zero so that cum[k] is the weight of the first k sorted items.
    r_cum = np.concatenate(([0.0], np.cumsum(r_w[r_order])))
    q_order = np.argsort(q_val)
    q_sorted = q_val[q_order]
    q_w = q_w[q_order]
    lo = np.searchsorted(r_sorted, q_sorted, side="left")
    hi = np.searchsorted(r_sorted, q_sorted, side="right")
    below_w = r_cum[lo]
    below = float(np.dot(q_w, below_w))
    ties = float(np.dot(q_w, r_cum[hi] - below_w))
    wins = below if query_is_pos else total - below - ties
    return (wins + 0.5 * ties) / total


# --------------------------------------------------------------------------
# Probabilistic losses
# --------------------------------------------------------------------------


def log_loss(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    sample_weight: ArrayLike | None = None,
    eps: float = 1e-7,
) -> float:
    """Mean binary cross-entropy of predicted probabilities.

    Probabilities are clipped to ``[eps, 1 - eps]`` so that a single
    confident mistake yields a large but finite loss.  For hard labels and
    probabilities inside that interval this equals
    ``sklearn.metrics.log_loss(y_true, y_prob, labels=[0, 1])``.  Soft targets
    in ``[0, 1]`` (e.g. distillation labels) are accepted as well.

    Args:
        y_true: Labels in ``[0, 1]``.
        y_prob: Predicted probabilities of the positive class, in ``[0, 1]``.
        sample_weight: Optional non-negative per-sample weights.
        eps: Clipping margin, ``0 < eps < 0.5``.

    Returns:
        The (weighted) mean log loss in nats.

    Raises:
        ValueError: On empty input, mismatched lengths, labels or
            probabilities outside ``[0, 1]``, NaN values, invalid weights or
            an invalid ``eps``.
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
    y = _to_numpy(y_true, "y_true")
    p = _to_numpy(y_prob, "y_prob")
    w = _weights(sample_weight)
    _check_lengths(y_true=y, y_prob=p, sample_weight=w)
    y = _soft_labels(y)
    p = p.astype(np.float64, copy=False)
    # Out-of-range probabilities signal a bug upstream (e.g. logits passed
    # by mistake); clipping would hide it.
    if not ((p >= 0.0) & (p <= 1.0)).all():
        raise ValueError("y_prob must lie in [0, 1] (pass logits to log_loss_from_logits)")
    p = np.clip(p, eps, 1.0 - eps)
    losses = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))
    return _mean(losses, w)


def log_loss_from_logits(
    y_true: ArrayLike,
    logits: ArrayLike,
    sample_weight: ArrayLike | None = None,
) -> float:
    """Mean binary cross-entropy computed directly from logits.

    Uses ``softplus(z) - y * z`` written as
    ``max(z, 0) - y * z + log1p(exp(-|z|))``, which never overflows and keeps
    full precision for confident predictions, so no clipping is needed.

    Args:
        y_true: Labels in ``[0, 1]``.
        logits: Raw (pre-sigmoid) scores; must be finite.
        sample_weight: Optional non-negative per-sample weights.

    Returns:
        The (weighted) mean log loss in nats.

    Raises:
        ValueError: On empty input, mismatched lengths, labels outside
            ``[0, 1]``, non-finite logits or invalid weights.
    """
    y = _to_numpy(y_true, "y_true")
    z = _to_numpy(logits, "logits")
    w = _weights(sample_weight)
    _check_lengths(y_true=y, logits=z, sample_weight=w)
    y = _soft_labels(y)
    z = _as_float64(z, "logits")
    losses = np.maximum(z, 0.0) - y * z + np.log1p(np.exp(-np.abs(z)))
    return _mean(losses, w)


# --------------------------------------------------------------------------
# Regression and label statistics
# --------------------------------------------------------------------------


def _regression_inputs(
    y_true: ArrayLike, y_pred: ArrayLike, sample_weight: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Convert and validate inputs shared by :func:`rmse` and :func:`mae`."""
    y = _to_numpy(y_true, "y_true")
    p = _to_numpy(y_pred, "y_pred")
    w = _weights(sample_weight)
    _check_lengths(y_true=y, y_pred=p, sample_weight=w)
    return _as_float64(y, "y_true"), _as_float64(p, "y_pred"), w


def rmse(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    sample_weight: ArrayLike | None = None,
) -> float:
    """Root mean squared error.

    Args:
        y_true: Finite targets.
        y_pred: Finite predictions.
        sample_weight: Optional non-negative per-sample weights.

    Returns:
        ``sqrt(weighted mean of (y_pred - y_true) ** 2)``.

    Raises:
        ValueError: On empty input, mismatched lengths, non-finite values or
            invalid weights.
    """
    y, p, w = _regression_inputs(y_true, y_pred, sample_weight)
    diff = p - y
    return float(np.sqrt(_mean(diff * diff, w)))


def mae(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    sample_weight: ArrayLike | None = None,
) -> float:
    """Mean absolute error.

    Args:
        y_true: Finite targets.
        y_pred: Finite predictions.
        sample_weight: Optional non-negative per-sample weights.

    Returns:
        The weighted mean of ``|y_pred - y_true|``.

    Raises:
        ValueError: On empty input, mismatched lengths, non-finite values or
            invalid weights.
    """
    y, p, w = _regression_inputs(y_true, y_pred, sample_weight)
    return _mean(np.abs(p - y), w)


def positive_rate(y_true: ArrayLike, sample_weight: ArrayLike | None = None) -> float:
    """Fraction of positive labels.

    Args:
        y_true: Binary labels (0/1 or bool).
        sample_weight: Optional non-negative per-sample weights.

    Returns:
        The (weighted) share of samples labelled 1.

    Raises:
        ValueError: On empty input, mismatched lengths, labels outside
            {0, 1} or invalid weights.
    """
    y = _to_numpy(y_true, "y_true")
    w = _weights(sample_weight)
    _check_lengths(y_true=y, sample_weight=w)
    return _mean(_binary_mask(y).astype(np.float64), w)
