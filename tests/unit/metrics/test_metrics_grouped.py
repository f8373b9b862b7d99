"""Tests for GAUC, PR-AUC, normalized entropy, calibration, curves and multiclass metrics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from mtrec.metrics import (
    BinaryAccumulator,
    GroupedBinaryAccumulator,
    accuracy,
    auc,
    calibration,
    gauc,
    log_loss,
    log_loss_from_logits,
    multiclass_log_loss,
    normalized_entropy,
    pr_auc,
    pr_curve_points,
    roc_curve_points,
)

# --------------------------------------------------------------------------
# Reference implementations (slow, obviously correct)
# --------------------------------------------------------------------------


def _reference_gauc(
    y: np.ndarray,
    s: np.ndarray,
    groups: np.ndarray,
    w: np.ndarray | None = None,
    weighting: str = "impressions",
) -> dict[str, float | int]:
    """pandas groupby + sklearn.metrics.roc_auc_score per group."""
    frame = pd.DataFrame({"y": y, "s": s, "g": groups, "w": np.ones(len(y)) if w is None else w})
    num = den = 0.0
    used = rows_used = n_groups = 0
    for _, part in frame.groupby("g", sort=False):
        n_groups += 1
        pos_w = part["w"][part["y"] == 1].sum()
        neg_w = part["w"][part["y"] == 0].sum()
        if pos_w <= 0 or neg_w <= 0:
            continue
        value = skm.roc_auc_score(part["y"], part["s"], sample_weight=None if w is None else part["w"])
        if weighting == "clicks":
            weight = pos_w
        else:
            weight = len(part) if w is None else part["w"].sum()
        num += weight * value
        den += weight
        used += 1
        rows_used += len(part)
    return {
        "gauc": num / den if used else float("nan"),
        "groups": n_groups,
        "groups_used": used,
        "groups_skipped_one_class": n_groups - used,
        "rows_used": rows_used,
    }


def _random_case(rng: np.random.Generator, n: int, n_groups: int) -> tuple[np.ndarray, ...]:
    """Labels, tie-heavy scores and group ids (some one-class groups)."""
    groups = rng.integers(0, n_groups, size=n) * 7 - 50  # negative, non-dense keys
    rate = rng.uniform(0.05, 0.6)
    y = (rng.random(n) < rate).astype(np.int64)
    s = np.round(rng.random(n), int(rng.integers(1, 3)))  # 10 or 100 distinct values
    return y, s, groups


def _assert_gauc_equal(got: dict, expected: dict) -> None:
    for key in ("groups", "groups_used", "groups_skipped_one_class", "rows_used"):
        assert got[key] == expected[key], key
    if math.isnan(expected["gauc"]):
        assert math.isnan(got["gauc"])
    else:
        assert got["gauc"] == pytest.approx(expected["gauc"], abs=1e-9)


# --------------------------------------------------------------------------
# GAUC
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weighting", ["impressions", "clicks"])
def test_gauc_matches_sklearn_per_group_loop(seed: int, weighting: str) -> None:
    rng = np.random.default_rng(seed)
    for n, n_groups in ((30, 4), (400, 25), (2_000, 80)):
        y, s, groups = _random_case(rng, n, n_groups)
        expected = _reference_gauc(y, s, groups, weighting=weighting)
        assert expected["groups_skipped_one_class"] >= 0
        _assert_gauc_equal(gauc(y, s, groups, weighting=weighting), expected)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weighting", ["impressions", "clicks"])
def test_gauc_weighted_matches_sklearn_per_group_loop(seed: int, weighting: str) -> None:
    rng = np.random.default_rng(50 + seed)
    for n, n_groups in ((40, 5), (2_000, 80)):
        y, s, groups = _random_case(rng, n, n_groups)
        w = rng.random(n) * 3.0
        w[rng.random(n) < 0.1] = 0.0
        expected = _reference_gauc(y, s, groups, w=w, weighting=weighting)
        _assert_gauc_equal(gauc(y, s, groups, sample_weight=w, weighting=weighting), expected)


@pytest.mark.parametrize("weighting", ["impressions", "clicks"])
def test_gauc_string_groups_match_sklearn(weighting: str) -> None:
    rng = np.random.default_rng(7)
    y, s, groups = _random_case(rng, 2_000, 60)
    names = np.array([f"user_{g}" for g in groups])
    expected = _reference_gauc(y, s, groups, weighting=weighting)
    _assert_gauc_equal(gauc(y, s, names, weighting=weighting), expected)
    _assert_gauc_equal(gauc(y, s, names.astype(object).tolist(), weighting=weighting), expected)


def test_gauc_wide_and_float_group_keys_match_int_keys() -> None:
    rng = np.random.default_rng(8)
    y, s, groups = _random_case(rng, 1_500, 50)
    expected = gauc(y, s, groups)
    # Key spans of 2**62 or more are too wide for offset codes: hashed.
    _assert_gauc_equal(gauc(y, s, groups.astype(np.int64) * 2**54 + 17), expected)
    _assert_gauc_equal(gauc(y, s, (groups + 50).astype(np.uint64) * np.uint64(2**55)), expected)
    as_float = (groups + 50).astype(np.float64)
    as_float[as_float == 0] = -0.0  # -0.0 and 0.0 must be the same group
    as_float[: len(as_float) // 2][as_float[: len(as_float) // 2] == -0.0] = 0.0
    _assert_gauc_equal(gauc(y, s, as_float), expected)


@pytest.mark.parametrize(
    "score_kind", ["float64", "float32", "float64_continuous", "int", "bool", "logits_with_inf", "huge_int"]
)
def test_gauc_score_dtypes_match_sklearn(score_kind: str) -> None:
    rng = np.random.default_rng(11)
    n = 1_500
    y, s, groups = _random_case(rng, n, 40)
    s = {
        "float64": s,
        "float32": s.astype(np.float32),
        "float64_continuous": rng.random(n),  # not float32-representable: dense-rank path
        "int": rng.integers(-3, 4, size=n),
        "bool": rng.random(n) < 0.5,
        "logits_with_inf": np.where(rng.random(n) < 0.05, np.inf, rng.normal(size=n)) * rng.choice([-1.0, 1.0], n),
        "huge_int": rng.integers(-(2**62), 2**62, size=n) // 2**55 * 2**55,
    }[score_kind]
    # sklearn cannot handle infinities, but a monotone map onto finite values
    # preserves order and ties.
    ref_scores = np.arctan(s) if score_kind == "logits_with_inf" else s
    expected = _reference_gauc(y, ref_scores, groups)
    _assert_gauc_equal(gauc(y, s, groups), expected)
    w = rng.random(n) + 0.1
    _assert_gauc_equal(gauc(y, s, groups, sample_weight=w), _reference_gauc(y, ref_scores, groups, w=w))


def test_gauc_wide_keys_use_fallback_sort() -> None:
    # Integer scores spanning ~2**61 keep a 61-bit offset code; with 30 dense
    # group codes the packed key would need more than 64 bits, so the lexsort
    # fallback runs (weighted and unweighted) and must agree as well.
    rng = np.random.default_rng(12)
    n = 1_000
    y, _, small = _random_case(rng, n, 30)
    keys = np.array([-(2**63), 2**63 - 1, 0, 12345, 7], dtype=np.int64)[small % 5] + small
    s = rng.integers(-(2**10), 2**10, size=n, dtype=np.int64) * 2**50  # ties, exact in float64
    s[0], s[1] = -(2**60), 2**60 - 2**50
    w = rng.random(n) + 0.1
    for weights in (None, w):
        for weighting in ("impressions", "clicks"):
            expected = _reference_gauc(y, s, keys, w=weights, weighting=weighting)
            _assert_gauc_equal(gauc(y, s, keys, sample_weight=weights, weighting=weighting), expected)


def test_gauc_skips_and_counts_one_class_groups() -> None:
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    s = np.array([0.9, 0.1, 0.5, 0.6, 0.3, 0.2, 0.4, 0.4])
    g = np.array([1, 1, 2, 2, 3, 3, 4, 4])
    out = gauc(y, s, g)
    assert out == {
        "gauc": pytest.approx(0.75),  # groups 1 (AUC 1) and 4 (tie: 0.5)
        "groups": 4,
        "groups_used": 2,
        "groups_skipped_one_class": 2,
        "rows_used": 4,
    }
    # A class present only with zero weight does not make a group usable.
    weighted = gauc(y, s, g, sample_weight=[1, 1, 1, 1, 1, 1, 1, 0])
    assert weighted["groups_used"] == 1 and weighted["gauc"] == 1.0


def test_gauc_single_group_equals_auc() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.2).astype(int)
    s = np.round(rng.random(500), 2)
    assert gauc(y, s, np.zeros(500, dtype=int))["gauc"] == pytest.approx(auc(y, s), abs=1e-12)


def test_gauc_one_class_overall_is_nan() -> None:
    out = gauc([1, 1, 1], [0.1, 0.2, 0.3], [0, 1, 1])
    assert math.isnan(out["gauc"])
    assert out["groups"] == 2 and out["groups_used"] == 0 and out["groups_skipped_one_class"] == 2
    assert out["rows_used"] == 0


@pytest.mark.parametrize(
    ("y", "s", "g", "kwargs"),
    [
        ([], [], [], {}),  # empty
        ([0, 1], [0.1, 0.2], [1], {}),  # groups length mismatch
        ([0, 1], [0.1], [1, 1], {}),  # score length mismatch
        ([0, 2], [0.1, 0.2], [1, 1], {}),  # bad label
        ([0, 1], [0.1, np.nan], [1, 1], {}),  # NaN score
        ([0, 1], [0.1, 0.2], [1.0, np.nan], {}),  # NaN group
        ([0, 1], [0.1, 0.2], ["a", None], {}),  # missing group
        ([0, 1], [0.1, 0.2], np.array(["a", 1], dtype=object), {}),  # mixed key types
        ([0, 1], [0.1, 0.2], [1, 1], {"weighting": "users"}),
        ([0, 1], [0.1, 0.2], [1, 1], {"sample_weight": [1.0, -1.0]}),
        ([0, 1], [0.1, 0.2], [[1, 1], [1, 1]], {}),  # 2-D groups
    ],
)
def test_gauc_rejects_bad_input(y: list, s: list, g: list, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        gauc(y, s, g, **kwargs)


def test_grouped_accumulator_equals_functional() -> None:
    rng = np.random.default_rng(21)
    for keys_as_str in (False, True):
        for weighting in ("impressions", "clicks"):
            acc = GroupedBinaryAccumulator(weighting=weighting)
            ys, ss, gs = [], [], []
            for size in (1, 0, 250, 40, 1_200):
                y = (rng.random(size) < 0.3).astype(np.int64)
                s = np.round(rng.random(size), 2)
                g = rng.integers(0, 60, size=size)
                acc.update(y, s, np.array([f"u{k}" for k in g]) if keys_as_str else g)
                ys.append(y)
                ss.append(s.astype(np.float32))
                gs.append(g)
            y_all, s_all, g_all = np.concatenate(ys), np.concatenate(ss), np.concatenate(gs)
            out = acc.compute()
            expected = gauc(y_all, s_all, g_all, weighting=weighting)
            assert out.pop("count") == len(y_all) == len(acc)
            # String keys are coded in arrival order, so groups (and the
            # float summation order) may differ from the functional call.
            _assert_gauc_equal(out, expected)
            _assert_gauc_equal(out, _reference_gauc(y_all, s_all, g_all, weighting=weighting))
            assert acc.compute()["gauc"] == out["gauc"]  # unchanged after the chunk merge
    acc.reset()
    empty = acc.compute()
    assert math.isnan(empty["gauc"]) and empty["count"] == 0 and len(acc) == 0


def test_grouped_accumulator_rejects_bad_batches() -> None:
    acc = GroupedBinaryAccumulator()
    acc.update([0, 1], [0.2, 0.8], [5, 5])
    with pytest.raises(ValueError):
        acc.update([0, 1], [0.2, 0.8], [5])
    with pytest.raises(ValueError):
        acc.update([0, 1], [0.2, np.nan], [5, 5])
    with pytest.raises(ValueError):
        acc.update([0, 1], [0.2, 0.3], ["a", "b"])  # key type changed
    with pytest.raises(ValueError):
        GroupedBinaryAccumulator(weighting="views")
    assert acc.compute() == {
        "gauc": 1.0,
        "groups": 1,
        "groups_used": 1,
        "groups_skipped_one_class": 0,
        "rows_used": 2,
        "count": 2,
    }


# --------------------------------------------------------------------------
# PR-AUC (average precision)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_pr_auc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for n in (2, 9, 300, 4_000):
        for rate in (0.05, 0.5, 0.9):
            y = (rng.random(n) < rate).astype(np.int64)
            y[0], y[-1] = 0, 1
            w = rng.random(n) * 2.0
            w[rng.random(n) < 0.1] = 0.0
            w[-1] = 1.0
            for s in (rng.random(n), np.round(rng.random(n), 1), rng.integers(0, 3, n), rng.normal(size=n)):
                assert pr_auc(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-9)
                got = pr_auc(y, s, sample_weight=w)
                assert got == pytest.approx(skm.average_precision_score(y, s, sample_weight=w), abs=1e-9)


def test_pr_auc_edge_cases() -> None:
    assert pr_auc([0, 1], [0.1, 0.9]) == 1.0
    assert pr_auc([1, 1], [0.1, 0.9]) == 1.0
    assert pr_auc([0, 1, 0, 1], [0.5] * 4) == 0.5
    assert math.isnan(pr_auc([0, 0], [0.1, 0.9]))
    assert math.isnan(pr_auc([0, 1], [0.1, 0.9], sample_weight=[1.0, 0.0]))
    with pytest.raises(ValueError):
        pr_auc([], [])
    with pytest.raises(ValueError):
        pr_auc([0, 1], [0.1, np.nan])


# --------------------------------------------------------------------------
# Normalized entropy and calibration
# --------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_normalized_entropy_formula(weighted: bool) -> None:
    rng = np.random.default_rng(4)
    n = 2_000
    y = (rng.random(n) < 0.1).astype(np.int64)
    z = rng.normal(size=n) - 2.0
    p = 1.0 / (1.0 + np.exp(-z))
    w = rng.random(n) if weighted else None
    base = np.average(y, weights=w)
    entropy = -(base * np.log(base) + (1 - base) * np.log(1 - base))
    assert normalized_entropy(y, p, sample_weight=w) == pytest.approx(log_loss(y, p, w) / entropy, rel=1e-12)
    got = normalized_entropy(y, z, sample_weight=w, from_logits=True)
    assert got == pytest.approx(log_loss_from_logits(y, z, w) / entropy, rel=1e-12)
    # Predicting the base rate everywhere scores exactly 1.
    assert normalized_entropy(y, np.full(n, base), sample_weight=w) == pytest.approx(1.0, rel=1e-9)


def test_normalized_entropy_undefined_for_one_class() -> None:
    assert math.isnan(normalized_entropy([1, 1], [0.3, 0.9]))
    assert math.isnan(normalized_entropy([0, 0], [0.0, 5.0], from_logits=True))
    with pytest.raises(ValueError):
        normalized_entropy([], [])


@pytest.mark.parametrize("strategy", ["quantile", "uniform"])
@pytest.mark.parametrize("weighted", [False, True])
def test_calibration_bins_cover_all_rows(strategy: str, weighted: bool) -> None:
    rng = np.random.default_rng(8)
    n = 3_001
    p = rng.beta(1.0, 8.0, size=n)
    p[:200] = 0.05  # a heavy tie straddling a quantile edge
    y = (rng.random(n) < p).astype(np.int64)
    w = rng.random(n) + 0.5 if weighted else None
    out = calibration(y, p, sample_weight=w, bins=10, strategy=strategy)
    wt = np.ones(n) if w is None else w
    assert out["mean_pred"] == pytest.approx(np.dot(wt, p) / wt.sum(), rel=1e-12)
    assert out["mean_label"] == pytest.approx(np.dot(wt, y) / wt.sum(), rel=1e-12)
    assert out["ratio"] == pytest.approx(np.dot(wt, p) / np.dot(wt, y), rel=1e-12)
    bins = out["bins"]
    assert 1 <= len(bins) <= 10
    assert sum(b["count"] for b in bins) == n
    assert all(b["count"] > 0 for b in bins)
    assert all(b["lower"] <= b["mean_pred"] <= b["upper"] for b in bins)
    assert all(a["upper"] <= b["lower"] for a, b in zip(bins, bins[1:], strict=False))
    # Bin means recombine into the global means.
    masses = [b["count"] if w is None else None for b in bins]
    if w is None:
        total = sum(m * b["mean_pred"] for m, b in zip(masses, bins, strict=True))
        assert total / n == pytest.approx(out["mean_pred"], rel=1e-12)
    if strategy == "quantile" and not weighted:
        counts = [b["count"] for b in bins]
        assert max(counts) - min(counts) <= 250  # roughly equal mass despite the tie


def test_calibration_edge_cases() -> None:
    out = calibration([0, 0, 0], [0.2, 0.2, 0.2])
    assert math.isnan(out["ratio"]) and len(out["bins"]) == 1 and out["bins"][0]["count"] == 3
    out = calibration([0, 1], [0.0, 1.0], bins=1, strategy="uniform")
    assert out["ratio"] == 1.0 and out["bins"][0]["count"] == 2
    for kwargs in ({"bins": 0}, {"strategy": "kmeans"}):
        with pytest.raises(ValueError):
            calibration([0, 1], [0.1, 0.2], **kwargs)
    with pytest.raises(ValueError):
        calibration([0, 1], [0.1, 1.2])


# --------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_roc_curve_points_endpoints_monotonic_and_area(weighted: bool) -> None:
    rng = np.random.default_rng(13)
    n = 20_000
    y = (rng.random(n) < 0.2).astype(np.int64)
    s = np.round(rng.random(n) + 0.3 * y, 3)
    w = rng.random(n) + 0.1 if weighted else None
    fpr, tpr = roc_curve_points(y, s, sample_weight=w, max_points=200)
    assert 2 <= len(fpr) <= 200 and len(fpr) == len(tpr)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    # The full-resolution curve equals sklearn's and integrates to the AUC.
    fpr_full, tpr_full = roc_curve_points(y, s, sample_weight=w, max_points=10**9)
    sk_fpr, sk_tpr, _ = skm.roc_curve(y, s, sample_weight=w, drop_intermediate=False)
    np.testing.assert_allclose(fpr_full, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr_full, sk_tpr, atol=1e-12)
    assert np.trapezoid(tpr_full, fpr_full) == pytest.approx(auc(y, s, w), abs=1e-9)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc(y, s, w), abs=5e-3)


def test_pr_curve_points_endpoints_and_sklearn() -> None:
    rng = np.random.default_rng(14)
    n = 5_000
    y = (rng.random(n) < 0.3).astype(np.int64)
    s = np.round(rng.random(n) + 0.2 * y, 2)
    recall, precision = pr_curve_points(y, s, max_points=50)
    assert len(recall) <= 50
    assert (recall[0], precision[0]) == (0.0, 1.0)
    assert recall[-1] == 1.0 and precision[-1] == pytest.approx(y.mean())
    assert (np.diff(recall) >= 0).all()
    r_full, p_full = pr_curve_points(y, s, max_points=10**9)
    sk_p, sk_r, _ = skm.precision_recall_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(r_full, sk_r[::-1], atol=1e-12)
    np.testing.assert_allclose(p_full, sk_p[::-1], atol=1e-12)


def test_curves_small_and_degenerate() -> None:
    fpr, tpr = roc_curve_points([0, 1], [0.1, 0.9])
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 1.0, 1.0])
    fpr, tpr = roc_curve_points([1, 1], [0.1, 0.9])
    assert np.isnan(fpr).all() and tpr[0] == 0.0 and tpr[-1] == 1.0
    with pytest.raises(ValueError):
        roc_curve_points([0, 1], [0.1, 0.9], max_points=1)
    with pytest.raises(ValueError):
        pr_curve_points([], [])


# --------------------------------------------------------------------------
# Multiclass
# --------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_multiclass_metrics_match_sklearn(weighted: bool) -> None:
    rng = np.random.default_rng(15)
    n, k = 1_000, 5
    y = rng.integers(0, k, size=n)
    z = rng.normal(scale=3.0, size=(n, k))
    z[:10] += 500.0  # large logits must not overflow
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    w = rng.random(n) if weighted else None
    clipped = np.clip(probs, 1e-300, 1.0)
    expected = skm.log_loss(y, clipped / clipped.sum(axis=1, keepdims=True), sample_weight=w, labels=range(k))
    assert multiclass_log_loss(y, z, sample_weight=w) == pytest.approx(expected, rel=1e-6)
    in_range = (probs[np.arange(n), y] > 1e-7).all()
    if in_range:
        assert multiclass_log_loss(y, probs, from_logits=False, sample_weight=w) == pytest.approx(expected, rel=1e-6)
    assert accuracy(y, z, sample_weight=w) == pytest.approx(
        skm.accuracy_score(y, z.argmax(axis=1), sample_weight=w), abs=1e-12
    )
    assert accuracy(y, z.argmax(axis=1), sample_weight=w) == accuracy(y, z, sample_weight=w)


def test_multiclass_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        multiclass_log_loss([0, 3], np.zeros((2, 3)))  # class out of range
    with pytest.raises(ValueError):
        multiclass_log_loss([0, 1], np.zeros(2))  # not 2-D
    with pytest.raises(ValueError):
        multiclass_log_loss([0, 1], [[0.5, -0.1], [0.5, 0.5]], from_logits=False)
    with pytest.raises(ValueError):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError):
        accuracy([], [])


# --------------------------------------------------------------------------
# BinaryAccumulator extensions
# --------------------------------------------------------------------------


def test_binary_accumulator_reports_new_metrics() -> None:
    rng = np.random.default_rng(16)
    acc = BinaryAccumulator()
    ys, ps = [], []
    for size in (100, 900):
        y = (rng.random(size) < 0.2).astype(np.int64)
        p = np.round(rng.random(size), 2)
        acc.update(y, p)
        ys.append(y)
        ps.append(p.astype(np.float32))
    y_all, p_all = np.concatenate(ys), np.concatenate(ps)
    out = acc.compute()
    assert out["normalized_entropy"] == pytest.approx(normalized_entropy(y_all, p_all), rel=1e-12)
    assert out["pr_auc"] == pytest.approx(skm.average_precision_score(y_all, p_all), abs=1e-9)
    assert out["calibration_ratio"] == pytest.approx(calibration(y_all, p_all)["ratio"], rel=1e-9)
    acc.reset()
    acc.update([0, 0], [0.1, 0.2])
    out = acc.compute()
    assert math.isnan(out["normalized_entropy"]) and math.isnan(out["pr_auc"])
    assert math.isnan(out["calibration_ratio"])
