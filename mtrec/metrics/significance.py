"""Is model B better than model A on the same rows? Paired tests for AUC and GAUC.

Two models scored on the *same* rows give correlated AUCs: a test that treats them as
independent samples overstates the uncertainty of the difference (and a comparison of two
separate confidence intervals is worse still).  Two paired tests are provided:

* :func:`delong_paired` -- the DeLong, DeLong & Clarke-Pearson (1988) test for two
  correlated AUCs, computed with the O(n log n) midrank algorithm of Sun & Xu (2014).
  The variance of ``AUC_B - AUC_A`` comes from the covariance of the structural
  components (placement values) of the positives and of the negatives.  Ties count half
  a pair, as in ``sklearn.metrics.roc_auc_score``.
* :func:`bootstrap_gauc_paired` -- a paired bootstrap over groups for the GAUC
  difference: groups (users) are resampled with replacement, the same groups for both
  models; each group's AUC is computed once per model with the exact per-group code of
  :mod:`mtrec.metrics.grouped`.

Both are unweighted: there is no trivial weighted DeLong variance, so sample weights are
not accepted.  Undefined results (one class only, too few rows or groups) are ``nan``.
"""

from __future__ import annotations

import math

import numpy as np

from mtrec.metrics import functional as F
from mtrec.metrics.functional import ArrayLike
from mtrec.metrics.grouped import _WEIGHTINGS, _as_group_array, _group_codes, _per_group_auc, _score_codes, _sorted_runs

__all__ = ["bootstrap_gauc_paired", "delong_paired"]

_Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` where tied values share the mean of their ranks.

    Args:
        x: 1-D sortable values.

    Returns:
        float64 midranks in the input order.
    """
    n = len(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    start = np.empty(n, dtype=bool)
    start[:1] = True
    np.not_equal(xs[1:], xs[:-1], out=start[1:])
    first = np.flatnonzero(start)
    last = np.append(first[1:], n)  # one past each run
    # Ranks first+1 .. last share their mean (first + 1 + last) / 2.
    mid = np.repeat((first + 1 + last) / 2.0, last - first)
    out = np.empty(n, dtype=np.float64)
    out[order] = mid
    return out


def _placements(pos: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and the structural components of one model (Sun & Xu 2014).

    Args:
        pos: Boolean positive mask.
        s: Sortable scores.

    Returns:
        ``(auc, v10, v01)``: ``v10[i]`` is the fraction of negatives a positive beats
        (ties half), ``v01[j]`` the fraction of positives that beat a negative.
    """
    m, n = int(pos.sum()), int((~pos).sum())
    tz = _midranks(s)
    tx = _midranks(s[pos])
    ty = _midranks(s[~pos])
    v10 = (tz[pos] - tx) / n
    v01 = 1.0 - (tz[~pos] - ty) / m
    auc = float((tz[pos].sum() - m * (m + 1) / 2.0) / (m * n))
    return auc, v10, v01


def _two_sided_p(z: float) -> float:
    """Two-sided p-value of a standard normal statistic."""
    return float(math.erfc(abs(z) / math.sqrt(2.0)))


def delong_paired(y: ArrayLike, score_a: ArrayLike, score_b: ArrayLike) -> dict[str, float]:
    """Paired DeLong test for the AUC difference of two models on the same rows.

    ``delta = AUC_B - AUC_A``; its variance is
    ``Var(V10_A - V10_B) / m + Var(V01_A - V01_B) / n`` with the structural components
    ``V10`` (one per positive, ``m`` of them) and ``V01`` (one per negative, ``n``),
    unbiased (``ddof=1``) covariances as in DeLong et al. (1988).  The z statistic
    ``delta / se`` gives a two-sided normal p-value and the 95 % interval
    ``delta +- 1.96 se``.

    Args:
        y: Binary labels (0/1 or bool).
        score_a: Scores of the baseline model A; higher means more likely positive.
        score_b: Scores of model B on the same rows.

    Returns:
        ``delta``, ``se``, ``ci_low``, ``ci_high``, ``p_value``, ``auc_a``, ``auc_b``
        as floats.  With only one class everything is ``nan``; with fewer than two
        rows of a class the AUCs and ``delta`` are defined, the rest is ``nan``.  When
        ``se`` is 0 (e.g. identical rankings) the interval is ``[delta, delta]`` and
        ``p_value`` is 1 if ``delta`` is 0, else 0.

    Raises:
        ValueError: On empty input, mismatched lengths, labels outside {0, 1} or NaN
            scores.
    """
    yy = F._to_numpy(y, "y")
    a = F._to_numpy(score_a, "score_a")
    b = F._to_numpy(score_b, "score_b")
    F._check_lengths(y=yy, score_a=a, score_b=b)
    pos = F._binary_mask(yy)
    a, b = F._sortable_scores(a), F._sortable_scores(b)
    nan = float("nan")
    m, n = int(pos.sum()), int(len(pos) - pos.sum())
    out = dict.fromkeys(("delta", "se", "ci_low", "ci_high", "p_value", "auc_a", "auc_b"), nan)
    if m == 0 or n == 0:
        return out
    auc_a, v10_a, v01_a = _placements(pos, a)
    auc_b, v10_b, v01_b = _placements(pos, b)
    delta = auc_b - auc_a
    out.update(auc_a=auc_a, auc_b=auc_b, delta=delta)
    if m < 2 or n < 2:
        return out
    # Var(X - Y) of the paired differences equals S_aa + S_bb - 2 S_ab of the 2x2 covariance.
    var = float(np.var(v10_a - v10_b, ddof=1) / m + np.var(v01_a - v01_b, ddof=1) / n)
    se = math.sqrt(max(var, 0.0))
    if se == 0.0:
        p = 1.0 if delta == 0.0 else 0.0
    else:
        p = _two_sided_p(delta / se)
    out.update(se=se, ci_low=delta - _Z95 * se, ci_high=delta + _Z95 * se, p_value=p)
    return out


def _group_stats(
    pos: np.ndarray, codes: tuple[np.ndarray, int], g: np.ndarray, gbits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-group ``(numerator, positives, negatives, rows)`` in group-code order."""
    sc, sbits = codes
    run_start, group_start, y_sorted, _ = _sorted_runs(g, gbits, sc, sbits, pos, None)
    return _per_group_auc(run_start, group_start, y_sorted, None)


def _paired_group_stats(
    pos: np.ndarray, a: np.ndarray, b: np.ndarray, grp: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-group ``(numerator_a, numerator_b, positives, negatives, rows)`` of both models."""
    # One group coding for both models, so both per-group arrays are in the same group order.
    codes_a, codes_b = _score_codes(a), _score_codes(b)
    g, gbits = _group_codes(grp, max_bits=64 - max(codes_a[1], codes_b[1]) - 1)
    num_a, pos_g, neg_g, rows_g = _group_stats(pos, codes_a, g, gbits)
    num_b = _group_stats(pos, codes_b, g, gbits)[0]
    return num_a, num_b, pos_g, neg_g, rows_g


def _bootstrap_interval(w: np.ndarray, wd: np.ndarray, resamples: int, seed: int) -> dict[str, float]:
    """``ci_low``, ``ci_high``, ``p_value`` of ``sum(wd) / sum(w)`` over groups resampled with replacement."""
    k = len(w)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 4_000_000 // k))  # resamples per draw, bounding memory
    deltas = np.empty(resamples, dtype=np.float64)
    for lo in range(0, resamples, chunk):
        hi = min(lo + chunk, resamples)
        idx = rng.integers(0, k, size=(hi - lo, k))
        deltas[lo:hi] = wd[idx].sum(axis=1) / w[idx].sum(axis=1)
    ci_low, ci_high = np.quantile(deltas, [0.025, 0.975])
    tail = min(int(np.count_nonzero(deltas <= 0.0)), int(np.count_nonzero(deltas >= 0.0)))
    return {
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "p_value": min(1.0, 2.0 * (1 + tail) / (resamples + 1)),
    }


def bootstrap_gauc_paired(
    y: ArrayLike,
    score_a: ArrayLike,
    score_b: ArrayLike,
    groups: ArrayLike,
    *,
    resamples: int = 1000,
    seed: int = 0,
    weighting: str = "impressions",
) -> dict[str, float]:
    """Paired bootstrap over groups for the GAUC difference of two models on the same rows.

    GAUC is the weighted mean of the per-group AUCs over the groups holding both classes
    (as :func:`mtrec.metrics.gauc`, unweighted rows); each group's AUC is computed once
    per model.  Each resample draws that many of those groups with replacement, the same
    draw for both models, and recomputes ``delta = GAUC_B - GAUC_A`` from the drawn
    groups' AUCs and weights.  The interval is the 2.5 / 97.5 % percentile interval of
    the resampled deltas; the p-value is two-sided,
    ``min(1, 2 (1 + min(#{delta* <= 0}, #{delta* >= 0})) / (resamples + 1))``.

    Args:
        y: Binary labels (0/1 or bool).
        score_a: Scores of the baseline model A.
        score_b: Scores of model B on the same rows.
        groups: Group key per row (user or query id): integers or strings.
        resamples: Bootstrap resamples (>= 1).
        seed: Seed of the resampling (same seed, same result).
        weighting: ``"impressions"`` (rows per group) or ``"clicks"`` (positives).

    Returns:
        ``delta``, ``ci_low``, ``ci_high``, ``p_value``, ``gauc_a``, ``gauc_b`` (floats)
        and ``groups_used``, ``resamples``, ``seed``.  With no group holding both classes
        everything is ``nan``; with one such group the interval and p-value are ``nan``.

    Raises:
        ValueError: On empty input, mismatched lengths, labels outside {0, 1}, NaN
            scores, NaN/missing group keys, ``resamples < 1`` or an unknown ``weighting``.
    """
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    yy = F._to_numpy(y, "y")
    a = F._to_numpy(score_a, "score_a")
    b = F._to_numpy(score_b, "score_b")
    grp = _as_group_array(groups)
    F._check_lengths(y=yy, score_a=a, score_b=b, groups=grp)
    pos = F._binary_mask(yy)
    a, b = F._sortable_scores(a), F._sortable_scores(b)
    num_a, num_b, pos_g, neg_g, rows_g = _paired_group_stats(pos, a, b, grp)

    used = (pos_g > 0) & (neg_g > 0)
    k = int(np.count_nonzero(used))
    nan = float("nan")
    out: dict[str, float] = {
        "delta": nan,
        "ci_low": nan,
        "ci_high": nan,
        "p_value": nan,
        "gauc_a": nan,
        "gauc_b": nan,
        "groups_used": k,
        "resamples": int(resamples),
        "seed": int(seed),
    }
    if k == 0:
        return out
    pairs = pos_g[used] * neg_g[used]
    auc_a, auc_b = num_a[used] / pairs, num_b[used] / pairs
    w = (pos_g[used] if weighting == "clicks" else rows_g[used]).astype(np.float64)
    gauc_a = float(np.dot(w, auc_a) / w.sum())
    gauc_b = float(np.dot(w, auc_b) / w.sum())
    out.update(gauc_a=gauc_a, gauc_b=gauc_b, delta=gauc_b - gauc_a)
    if k < 2:
        return out
    out.update(_bootstrap_interval(w, w * (auc_b - auc_a), resamples, seed))
    return out
