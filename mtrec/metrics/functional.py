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
    "accuracy",
    "auc",
    "calibration",
    "log_loss",
    "log_loss_from_logits",
    "mae",
    "multiclass_log_loss",
    "normalized_entropy",
    "positive_rate",
    "pr_auc",
    "pr_curve_points",
    "rmse",
    "sigmoid",
    "roc_curve_points",
]


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function of logits ``z`` (same dtype): ``1 / (1 + exp(-z))``, 0 without an
    overflow warning where ``exp(-z)`` overflows. The one NumPy sigmoid of mtrec (metrics,
    calibration, the report and the synthetic log's generator)."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


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
        return _auc_unweighted(q_val, r_val, query_is_pos)
    w_pos = w[pos_mask]
    w_neg = w[~pos_mask]
    q_w, r_w = (w_pos, w_neg) if query_is_pos else (w_neg, w_pos)
    return _auc_weighted(q_val, r_val, q_w, r_w, query_is_pos)


def _auc_unweighted(q_val: np.ndarray, r_val: np.ndarray, query_is_pos: bool) -> float:
    """AUC from the scores of the query class ``q_val`` searched into the other class ``r_val``."""
    q_sorted = np.sort(q_val)
    r_sorted = np.sort(r_val)
    lo = np.searchsorted(r_sorted, q_sorted, side="left")
    hi = np.searchsorted(r_sorted, q_sorted, side="right")
    # Integer pair counts are exact; Python ints avoid any overflow.
    below = int(lo.sum(dtype=np.int64))
    ties = int((hi - lo).sum(dtype=np.int64))
    total = int(q_val.size) * int(r_val.size)
    if query_is_pos:
        wins = below
    else:
        # "below" counted positives under each negative (the wrong order).
        wins = total - below - ties
    return (2 * wins + ties) / (2 * total)


def _auc_weighted(q_val: np.ndarray, r_val: np.ndarray, q_w: np.ndarray, r_w: np.ndarray, query_is_pos: bool) -> float:
    """Weighted :func:`_auc_unweighted`; ``nan`` when a class has zero total weight."""
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


# --------------------------------------------------------------------------
# Normalized entropy and calibration
# --------------------------------------------------------------------------


def _binary_entropy(p: float) -> float:
    """Entropy (nats) of a Bernoulli(p) variable; ``nan`` when ``p`` is 0 or 1."""
    if not 0.0 < p < 1.0:
        return float("nan")
    return -(p * np.log(p) + (1.0 - p) * np.log1p(-p))


def normalized_entropy(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    sample_weight: ArrayLike | None = None,
    from_logits: bool = False,
    eps: float = 1e-7,
) -> float:
    """Normalized entropy (NE): log loss relative to the base-rate entropy.

    ``NE = log_loss / H(p)`` with ``p`` the (weighted) mean label and
    ``H(p) = -(p log p + (1 - p) log(1 - p))``: the loss of the model divided
    by the loss of always predicting the base rate.  Below 1 means the model
    beats that constant predictor.

    Args:
        y_true: Labels in ``[0, 1]`` (soft labels allowed).
        y_pred: Probabilities, or logits when ``from_logits`` is true.
        sample_weight: Optional non-negative per-sample weights.
        from_logits: Interpret ``y_pred`` as logits (uses the stable
            :func:`log_loss_from_logits`; ``eps`` is then unused).
        eps: Probability clipping margin, as in :func:`log_loss`.

    Returns:
        The normalized entropy, or ``nan`` when the base rate is 0 or 1.

    Raises:
        ValueError: As :func:`log_loss` / :func:`log_loss_from_logits`.
    """
    if from_logits:
        loss = log_loss_from_logits(y_true, y_pred, sample_weight=sample_weight)
    else:
        loss = log_loss(y_true, y_pred, sample_weight=sample_weight, eps=eps)
    y = _soft_labels(_to_numpy(y_true, "y_true"))
    base_rate = _mean(y, _weights(sample_weight))
    entropy = _binary_entropy(base_rate)
    return float(loss / entropy) if np.isfinite(entropy) else float("nan")


def calibration(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    sample_weight: ArrayLike | None = None,
    bins: int = 10,
    strategy: str = "quantile",
) -> dict[str, Any]:
    """Calibration ratio and a reliability table.

    Args:
        y_true: Labels in ``[0, 1]``.
        y_prob: Predicted probabilities in ``[0, 1]``.
        sample_weight: Optional non-negative per-sample weights (means are
            weighted; quantile edges use weighted quantiles).
        bins: Number of bins (``>= 1``).
        strategy: ``"quantile"`` (edges at prediction quantiles, so bins
            hold similar mass; duplicate edges are merged) or ``"uniform"``
            (equal-width bins over ``[0, 1]``).

    Returns:
        ``{"ratio", "mean_pred", "mean_label", "bins"}`` where ``ratio`` is
        ``mean_pred / mean_label`` (``nan`` when the mean label is 0) and
        ``bins`` lists non-empty bins as dicts with ``lower``, ``upper``,
        ``count`` (rows), ``mean_pred`` and ``mean_label``.  Bin ``i`` holds
        predictions in ``[lower, upper)``; the last bin also includes its
        upper edge.

    Raises:
        ValueError: On invalid inputs (as :func:`log_loss`), ``bins < 1`` or
            an unknown ``strategy``.
    """
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    if strategy not in ("quantile", "uniform"):
        raise ValueError(f"strategy must be 'quantile' or 'uniform', got {strategy!r}")
    y = _to_numpy(y_true, "y_true")
    p = _to_numpy(y_prob, "y_prob")
    w = _weights(sample_weight)
    _check_lengths(y_true=y, y_prob=p, sample_weight=w)
    y = _soft_labels(y)
    p = p.astype(np.float64, copy=False)
    if not ((p >= 0.0) & (p <= 1.0)).all():
        raise ValueError("y_prob must lie in [0, 1]")
    mean_pred = _mean(p, w)
    mean_label = _mean(y, w)
    edges = _calibration_edges(p, w, bins, strategy)
    return {
        "ratio": mean_pred / mean_label if mean_label > 0 else float("nan"),
        "mean_pred": mean_pred,
        "mean_label": mean_label,
        "bins": _reliability_table(y, p, w, edges),
    }


def _calibration_edges(p: np.ndarray, w: np.ndarray | None, bins: int, strategy: str) -> np.ndarray:
    """Bin edges of :func:`calibration` (at least two, possibly equal)."""
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, int(bins) + 1)
    order = np.argsort(p, kind="stable")
    ps = p[order]
    mass = np.cumsum(np.ones(len(ps)) if w is None else w[order])
    targets = mass[-1] * np.arange(1, int(bins)) / bins
    inner = ps[np.minimum(np.searchsorted(mass, targets, side="right"), len(ps) - 1)]
    edges = np.unique(np.concatenate(([ps[0]], inner, [ps[-1]])))
    if len(edges) == 1:
        edges = np.array([edges[0], edges[0]])
    return edges


def _reliability_table(y: np.ndarray, p: np.ndarray, w: np.ndarray | None, edges: np.ndarray) -> list[dict[str, Any]]:
    """The non-empty bins of :func:`calibration`, with their (weighted) mean prediction and label."""
    n_bins = len(edges) - 1
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    wt = np.ones(len(p)) if w is None else w
    w_bin = np.bincount(idx, weights=wt, minlength=n_bins)
    p_bin = np.bincount(idx, weights=wt * p, minlength=n_bins)
    y_bin = np.bincount(idx, weights=wt * y, minlength=n_bins)
    table = []
    for i in np.flatnonzero(counts):
        has_mass = w_bin[i] > 0
        table.append(
            {
                "lower": float(edges[i]),
                "upper": float(edges[i + 1]),
                "count": int(counts[i]),
                "mean_pred": float(p_bin[i] / w_bin[i]) if has_mass else float("nan"),
                "mean_label": float(y_bin[i] / w_bin[i]) if has_mass else float("nan"),
            }
        )
    return table


# --------------------------------------------------------------------------
# Precision-recall and curves
# --------------------------------------------------------------------------


def _binary_ranking_inputs(
    y_true: ArrayLike, y_score: ArrayLike, sample_weight: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Convert and validate (labels, scores, weights) of a ranking metric."""
    y = _to_numpy(y_true, "y_true")
    s = _to_numpy(y_score, "y_score")
    w = _weights(sample_weight)
    _check_lengths(y_true=y, y_score=s, sample_weight=w)
    return _binary_mask(y), _sortable_scores(s), w


def _threshold_sweep(pos: np.ndarray, s: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (tp, fp) mass at each distinct score, from high to low.

    Returns:
        ``(tps, fps)``: entry ``k`` counts the samples whose score is at
        least the ``k``-th largest distinct score (ties grouped).
    """
    order = np.argsort(s)[::-1]
    s_desc = s[order]
    y_desc = pos[order]
    last = np.flatnonzero(np.append(s_desc[1:] != s_desc[:-1], True))
    if w is None:
        tps = np.cumsum(y_desc, dtype=np.int64)[last].astype(np.float64)
        fps = (last + 1) - tps
    else:
        w_desc = w[order]
        wy = np.where(y_desc, w_desc, 0.0)
        tps = np.cumsum(wy)[last]
        fps = np.cumsum(w_desc - wy)[last]
    return tps, fps


def pr_auc(
    y_true: ArrayLike,
    y_score: ArrayLike,
    sample_weight: ArrayLike | None = None,
) -> float:
    """Average precision: the step-wise area under the precision-recall curve.

    ``AP = sum_k (R_k - R_{k-1}) * P_k`` over distinct score thresholds from
    high to low (tied scores form one step), equal to
    ``sklearn.metrics.average_precision_score``.  No interpolation is used.

    Each distinct positive score ``v`` contributes its share of the positive
    mass times the precision at threshold ``v``; precision only needs the
    mass of each class at or above ``v``, found by sorting the two classes
    separately and a ``searchsorted`` of the positive scores into the
    negatives (the same approach as :func:`auc`).

    Args:
        y_true: Binary labels (0/1 or bool).
        y_score: Real-valued scores; higher means more likely positive.
        sample_weight: Optional non-negative per-sample weights.

    Returns:
        Average precision in ``[0, 1]``, or ``nan`` without positive mass.

    Raises:
        ValueError: On empty input, mismatched lengths, labels outside
            {0, 1}, NaN scores or invalid weights.
    """
    pos, s, w = _binary_ranking_inputs(y_true, y_score, sample_weight)
    s_pos = s[pos]
    s_neg = s[~pos]
    if s_pos.size == 0:
        return float("nan")
    if w is None:
        sp = np.sort(s_pos)
        sn = np.sort(s_neg)
        starts = np.flatnonzero(np.concatenate(([True], sp[1:] != sp[:-1])))
        mass = np.diff(starts, append=sp.size).astype(np.float64)
        tp = (sp.size - starts).astype(np.float64)
        fp = (sn.size - np.searchsorted(sn, sp[starts], side="left")).astype(np.float64)
        return float(np.dot(mass, tp / (tp + fp)) / sp.size)

    w_pos = w[pos]
    w_neg = w[~pos]
    total_pos = float(w_pos.sum())
    if total_pos == 0.0:
        return float("nan")
    op = np.argsort(s_pos)
    sp, wp = s_pos[op], w_pos[op]
    on = np.argsort(s_neg)
    sn = s_neg[on]
    # Suffix sums accumulated from the top: mass at or above each position.
    wp_above = np.cumsum(wp[::-1])[::-1]
    wn_above = np.append(np.cumsum(w_neg[on][::-1])[::-1], 0.0)
    starts = np.flatnonzero(np.concatenate(([True], sp[1:] != sp[:-1])))
    mass = np.add.reduceat(wp, starts)
    keep = mass > 0  # a step without positive mass adds nothing (and may be 0/0)
    tp = wp_above[starts][keep]
    fp = wn_above[np.searchsorted(sn, sp[starts][keep], side="left")]
    return float(np.dot(mass[keep], tp / (tp + fp)) / total_pos)


def _downsample_curve(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ``max_points`` points spread evenly along the curve.

    Points are chosen by cumulative path length (L1), so steep and flat
    stretches are both represented; the first and last points are always
    kept exactly.
    """
    if len(x) <= max_points:
        return x, y
    dist = np.concatenate(([0.0], np.cumsum(np.abs(np.diff(x)) + np.abs(np.diff(np.nan_to_num(y))))))
    targets = np.linspace(0.0, dist[-1], max_points)
    idx = np.unique(np.concatenate(([0], np.searchsorted(dist, targets[1:-1]), [len(x) - 1])))
    return x[idx], y[idx]


def _nan_divide(a: np.ndarray, b: np.ndarray | float) -> np.ndarray:
    """``a / b`` with ``nan`` wherever ``b`` is zero, without warnings."""
    b = np.broadcast_to(np.asarray(b, dtype=np.float64), a.shape)
    out = np.full(a.shape, np.nan)
    np.divide(a, b, out=out, where=b != 0)
    return out


def roc_curve_points(
    y_true: ArrayLike,
    y_score: ArrayLike,
    sample_weight: ArrayLike | None = None,
    max_points: int = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr)`` downsampled for plotting.

    The full curve has one point per distinct score (ties grouped) plus the
    origin; it is reduced to at most ``max_points`` points spread along the
    curve.  The endpoints ``(0, 0)`` and ``(1, 1)`` are always exact.

    Args:
        y_true: Binary labels (0/1 or bool).
        y_score: Real-valued scores.
        sample_weight: Optional non-negative per-sample weights.
        max_points: Maximum number of points returned (``>= 2``).

    Returns:
        ``(fpr, tpr)`` float64 arrays, both non-decreasing.  When a class is
        missing its axis is all ``nan``.

    Raises:
        ValueError: On invalid inputs or ``max_points < 2``.
    """
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    pos, s, w = _binary_ranking_inputs(y_true, y_score, sample_weight)
    tps, fps = _threshold_sweep(pos, s, w)
    tps = np.concatenate(([0.0], tps))
    fps = np.concatenate(([0.0], fps))
    fpr = _nan_divide(fps, fps[-1])
    tpr = _nan_divide(tps, tps[-1])
    return _downsample_curve(fpr, tpr, int(max_points))


def pr_curve_points(
    y_true: ArrayLike,
    y_score: ArrayLike,
    sample_weight: ArrayLike | None = None,
    max_points: int = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall curve ``(recall, precision)`` downsampled for plotting.

    Starts at ``(0, 1)`` (the convention of
    ``sklearn.metrics.precision_recall_curve``) and ends at recall 1 with
    the base rate as precision.

    Args:
        y_true: Binary labels (0/1 or bool).
        y_score: Real-valued scores.
        sample_weight: Optional non-negative per-sample weights.
        max_points: Maximum number of points returned (``>= 2``).

    Returns:
        ``(recall, precision)`` float64 arrays; recall is non-decreasing.
        Recall is all ``nan`` without positives.

    Raises:
        ValueError: On invalid inputs or ``max_points < 2``.
    """
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    pos, s, w = _binary_ranking_inputs(y_true, y_score, sample_weight)
    tps, fps = _threshold_sweep(pos, s, w)
    recall = np.concatenate(([0.0], _nan_divide(tps, tps[-1])))
    precision = np.concatenate(([1.0], _nan_divide(tps, tps + fps)))
    return _downsample_curve(recall, precision, int(max_points))


# --------------------------------------------------------------------------
# Multiclass
# --------------------------------------------------------------------------


def _class_labels(y_true: ArrayLike) -> np.ndarray:
    """Integer class indices (1-D, non-negative)."""
    y = _to_numpy(y_true, "y_true")
    if y.dtype.kind == "f":
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise ValueError("y_true must contain integer class indices")
    y = y.astype(np.int64)
    if (y < 0).any():
        raise ValueError("y_true class indices must be non-negative")
    return y


def _matrix(x: ArrayLike, name: str) -> np.ndarray:
    """Convert a 2-D ``(n, classes)`` array-like to float64."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().float().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (n, classes), got {arr.shape}")
    return arr


def accuracy(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    sample_weight: ArrayLike | None = None,
) -> float:
    """Share of correctly predicted labels.

    Args:
        y_true: Class labels (integers; binary or multiclass).
        y_pred: Predicted labels of the same shape, or a 2-D
            ``(n, classes)`` array of scores/logits (argmax is taken).
        sample_weight: Optional non-negative per-sample weights.

    Returns:
        The (weighted) accuracy in ``[0, 1]``.

    Raises:
        ValueError: On empty input, mismatched lengths or invalid weights.
    """
    y = _to_numpy(y_true, "y_true")
    if np.ndim(y_pred) == 2 and np.shape(y_pred)[1] > 1:
        pred = _matrix(y_pred, "y_pred").argmax(axis=1)
    else:
        pred = _to_numpy(y_pred, "y_pred")
    w = _weights(sample_weight)
    _check_lengths(y_true=y, y_pred=pred, sample_weight=w)
    return _mean((y == pred).astype(np.float64), w)


def multiclass_log_loss(
    y_true: ArrayLike,
    logits_or_probs: ArrayLike,
    from_logits: bool = True,
    sample_weight: ArrayLike | None = None,
    eps: float = 1e-7,
) -> float:
    """Mean categorical cross-entropy.

    Args:
        y_true: Integer class indices in ``[0, classes)``.
        logits_or_probs: ``(n, classes)`` logits (``from_logits=True``; a
            stable log-softmax is used) or probabilities (rows are
            renormalised to sum to 1 and clipped to ``[eps, 1]``).
        from_logits: Whether the second argument holds logits.
        sample_weight: Optional non-negative per-sample weights.
        eps: Probability clipping margin (probabilities only).

    Returns:
        The (weighted) mean loss in nats.

    Raises:
        ValueError: On empty input, mismatched lengths, class indices out of
            range, non-finite values, negative probabilities or invalid
            weights.
    """
    y = _class_labels(y_true)
    z = _matrix(logits_or_probs, "logits_or_probs")
    w = _weights(sample_weight)
    _check_lengths(y_true=y, logits_or_probs=z, sample_weight=w)
    if not np.isfinite(z).all():
        raise ValueError("logits_or_probs contains NaN or infinite values")
    if (y >= z.shape[1]).any():
        raise ValueError(f"y_true has class indices >= number of classes ({z.shape[1]})")
    rows = np.arange(len(y))
    if from_logits:
        zmax = z.max(axis=1)
        log_norm = zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1))
        losses = log_norm - z[rows, y]
    else:
        if (z < 0).any():
            raise ValueError("probabilities must be non-negative (pass from_logits=True for logits)")
        total = z.sum(axis=1)
        if (total <= 0).any():
            raise ValueError("each probability row must have positive mass")
        p = np.clip(z[rows, y] / total, eps, 1.0)
        losses = -np.log(p)
    return _mean(losses, w)
