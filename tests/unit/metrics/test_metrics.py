"""Unit tests for mtrec.metrics (functional forms and streaming accumulators)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from mtrec.metrics import (
    BinaryAccumulator,
    RegressionAccumulator,
    auc,
    log_loss,
    log_loss_from_logits,
    mae,
    positive_rate,
    rmse,
)

SEEDS = range(6)
SIZES = (3, 17, 200, 5_000)
POS_RATES = (0.05, 0.5, 0.9)


def _labels(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Random binary labels guaranteed to contain both classes."""
    y = (rng.random(n) < rate).astype(np.int64)
    y[0], y[-1] = 0, 1
    return y


def _score_variants(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Continuous scores and several tie-heavy variants of them."""
    s = rng.random(n)
    return {
        "continuous": s,
        "float32": s.astype(np.float32),
        "round2": np.round(s, 2),
        "round1": np.round(s, 1),
        "small_int": rng.integers(0, 4, size=n),
        "logits": rng.normal(scale=3.0, size=n),
    }


# --------------------------------------------------------------------------
# AUC
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_auc_matches_sklearn_property(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for n in SIZES:
        for rate in POS_RATES:
            y = _labels(rng, n, rate)
            for name, s in _score_variants(rng, n).items():
                expected = skm.roc_auc_score(y, s)
                assert auc(y, s) == pytest.approx(expected, abs=1e-9), (n, rate, name)


@pytest.mark.parametrize("seed", SEEDS)
def test_auc_weighted_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    for n in SIZES:
        for rate in POS_RATES:
            y = _labels(rng, n, rate)
            w = rng.random(n) * 3.0
            # Some exact zeros: they must simply drop out of the pair counts.
            w[rng.random(n) < 0.1] = 0.0
            w[0] = w[-1] = 1.0
            for name, s in _score_variants(rng, n).items():
                expected = skm.roc_auc_score(y, s, sample_weight=w)
                got = auc(y, s, sample_weight=w)
                assert got == pytest.approx(expected, abs=1e-9), (n, rate, name)


def test_auc_integer_weights_equal_repetition() -> None:
    rng = np.random.default_rng(7)
    y = _labels(rng, 300, 0.3)
    s = np.round(rng.random(300), 1)
    w = rng.integers(1, 4, size=300)
    assert auc(y, s, w) == pytest.approx(auc(np.repeat(y, w), np.repeat(s, w)), abs=1e-12)


def test_auc_tiny_and_degenerate_cases() -> None:
    assert auc([0, 1], [0.2, 0.8]) == 1.0
    assert auc([0, 1], [0.8, 0.2]) == 0.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert auc([1, 0, 1, 0, 0], np.full(5, 3.0)) == 0.5
    assert auc([True, False], [1, 0]) == 1.0


def test_auc_separable_and_reversed() -> None:
    rng = np.random.default_rng(3)
    y = _labels(rng, 1_000, 0.2)
    s = y + rng.random(1_000) * 0.5
    assert auc(y, s) == 1.0
    assert auc(y, -s) == 0.0
    assert auc(y, s, sample_weight=rng.random(1_000) + 0.1) == pytest.approx(1.0)


def test_auc_infinite_scores_are_ordered() -> None:
    y = [0, 0, 1, 1]
    s = [-np.inf, 0.0, 1.0, np.inf]
    assert auc(y, s) == 1.0


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], [1.0]])
def test_auc_single_class_is_nan(labels: list[float]) -> None:
    assert math.isnan(auc(labels, np.linspace(0, 1, len(labels))))


def test_auc_zero_weight_class_is_nan() -> None:
    assert math.isnan(auc([0, 1, 1], [0.1, 0.5, 0.7], sample_weight=[1.0, 0.0, 0.0]))


@pytest.mark.parametrize(
    ("y", "s", "w"),
    [
        ([0, 2, 1], [0.1, 0.2, 0.3], None),  # label outside {0, 1}
        ([0, 0.5, 1], [0.1, 0.2, 0.3], None),  # fractional label
        ([0, np.nan, 1], [0.1, 0.2, 0.3], None),  # NaN label
        ([0, 1, 1], [0.1, np.nan, 0.3], None),  # NaN score
        ([0, 1, 1], [0.1, 0.2], None),  # length mismatch
        ([], [], None),  # empty
        ([0, 1], [0.1, 0.2], [1.0, -1.0]),  # negative weight
        ([0, 1], [0.1, 0.2], [1.0, np.nan]),  # NaN weight
        ([0, 1], [0.1, 0.2], [1.0]),  # weight length mismatch
        ([[0, 1], [1, 0]], [[0.1, 0.2], [0.3, 0.4]], None),  # not 1-D
    ],
)
def test_auc_rejects_bad_input(y: list, s: list, w: list | None) -> None:
    with pytest.raises(ValueError):
        auc(y, s, sample_weight=w)


def test_auc_accepts_column_vectors() -> None:
    y = np.array([[0], [1], [0], [1]])
    s = np.array([[0.1], [0.9], [0.4], [0.3]])
    assert auc(y, s) == skm.roc_auc_score(y.ravel(), s.ravel())


# --------------------------------------------------------------------------
# Log loss
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS[:3])
@pytest.mark.parametrize("weighted", [False, True])
def test_log_loss_matches_sklearn(seed: int, weighted: bool) -> None:
    rng = np.random.default_rng(seed)
    n = 2_000
    y = _labels(rng, n, 0.3)
    # Keep probabilities inside [eps, 1 - eps] so that the clipping margins,
    # which differ from sklearn's, never engage.
    p = np.clip(rng.random(n), 1e-4, 1 - 1e-4)
    w = rng.random(n) if weighted else None
    expected = skm.log_loss(y, p, sample_weight=w, labels=[0, 1])
    assert log_loss(y, p, sample_weight=w) == pytest.approx(expected, abs=1e-9)


def test_log_loss_clips_extreme_probabilities() -> None:
    value = log_loss([1, 0], [0.0, 1.0], eps=1e-7)
    assert value == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_log_loss_accepts_soft_labels() -> None:
    y = np.array([0.25, 0.75])
    p = np.array([0.4, 0.6])
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert log_loss(y, p) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("y", "p", "eps"),
    [
        ([0, 2], [0.1, 0.2], 1e-7),
        ([0, 1], [0.1, 1.5], 1e-7),
        ([0, 1], [0.1, np.nan], 1e-7),
        ([0, 1], [0.1], 1e-7),
        ([], [], 1e-7),
        ([0, 1], [0.1, 0.2], 0.0),
    ],
)
def test_log_loss_rejects_bad_input(y: list, p: list, eps: float) -> None:
    with pytest.raises(ValueError):
        log_loss(y, p, eps=eps)


@pytest.mark.parametrize("weighted", [False, True])
def test_log_loss_from_logits_matches_probability_form(weighted: bool) -> None:
    rng = np.random.default_rng(11)
    n = 2_000
    y = _labels(rng, n, 0.4)
    z = rng.normal(scale=4.0, size=n)  # moderate: sigmoid never hits the clip
    w = rng.random(n) if weighted else None
    p = 1.0 / (1.0 + np.exp(-z))
    expected = log_loss(y, p, sample_weight=w, eps=1e-15)
    got = log_loss_from_logits(y, z, sample_weight=w)
    assert got == pytest.approx(expected, abs=1e-9)


def test_log_loss_from_logits_is_stable_for_large_logits() -> None:
    z = np.array([100.0, -100.0, 100.0, -100.0])
    y = np.array([1, 0, 0, 1])
    value = log_loss_from_logits(y, z)
    assert math.isfinite(value)
    # Two confident hits (~0 loss) and two confident misses (~100 each).
    assert value == pytest.approx(50.0, rel=1e-12)
    assert log_loss_from_logits([1, 0], [100.0, -100.0]) == pytest.approx(math.exp(-100.0), rel=1e-6)


def test_log_loss_from_logits_rejects_infinite_logits() -> None:
    with pytest.raises(ValueError):
        log_loss_from_logits([0, 1], [0.0, np.inf])


# --------------------------------------------------------------------------
# Regression metrics and positive rate
# --------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_rmse_mae_match_sklearn(weighted: bool) -> None:
    rng = np.random.default_rng(5)
    n = 1_000
    y = rng.normal(size=n) * 10
    p = y + rng.normal(size=n)
    w = rng.random(n) if weighted else None
    assert rmse(y, p, sample_weight=w) == pytest.approx(skm.mean_squared_error(y, p, sample_weight=w) ** 0.5, abs=1e-9)
    assert mae(y, p, sample_weight=w) == pytest.approx(skm.mean_absolute_error(y, p, sample_weight=w), abs=1e-9)


def test_regression_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        rmse([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        mae([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError):
        rmse([], [])
    with pytest.raises(ValueError):
        mae([1.0, 2.0], [1.0, 2.0], sample_weight=[0.0, 0.0])


def test_positive_rate() -> None:
    assert positive_rate([0, 1, 1, 0]) == 0.5
    assert positive_rate([0, 1], sample_weight=[3.0, 1.0]) == 0.25
    with pytest.raises(ValueError):
        positive_rate([0, 2])
    with pytest.raises(ValueError):
        positive_rate([])


# --------------------------------------------------------------------------
# Streaming accumulators
# --------------------------------------------------------------------------


def test_binary_accumulator_equals_functional_on_concatenation() -> None:
    rng = np.random.default_rng(21)
    acc = BinaryAccumulator()
    ys, ps = [], []
    for size in (1, 50, 0, 333, 1_000):
        y = (rng.random(size) < 0.2).astype(np.int64)
        p = np.round(rng.random(size), 3)  # rounding adds cross-chunk ties
        acc.update(y, p)
        ys.append(y)
        ps.append(p.astype(np.float32))
    y_all, p_all = np.concatenate(ys), np.concatenate(ps)

    out = acc.compute()
    assert out["count"] == len(y_all) == len(acc)
    assert out["positives"] == int(y_all.sum())
    assert out["auc"] == pytest.approx(auc(y_all, p_all), abs=1e-12)
    assert out["logloss"] == pytest.approx(log_loss(y_all, p_all), abs=1e-12)
    assert out["mean_pred"] == pytest.approx(float(p_all.astype(np.float64).mean()))
    assert out["mean_label"] == pytest.approx(y_all.mean())
    # A second compute (after the internal chunk merge) gives the same answer.
    assert acc.compute() == out

    acc.reset()
    empty = acc.compute()
    assert empty["count"] == 0 and empty["positives"] == 0 and len(acc) == 0
    assert math.isnan(empty["auc"]) and math.isnan(empty["logloss"])


def test_binary_accumulator_copies_caller_buffers() -> None:
    acc = BinaryAccumulator()
    y = np.array([0, 1], dtype=np.int8)
    p = np.array([0.2, 0.8], dtype=np.float32)
    acc.update(y, p)
    p[:] = [0.9, 0.1]  # caller reuses its buffer
    assert acc.compute()["auc"] == 1.0


def test_binary_accumulator_single_class_and_bad_input() -> None:
    acc = BinaryAccumulator()
    acc.update([1, 1], [0.3, 0.9])
    out = acc.compute()
    assert math.isnan(out["auc"]) and math.isfinite(out["logloss"])
    with pytest.raises(ValueError):
        acc.update([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        acc.update([0, 1], [0.1, 1.2])
    with pytest.raises(ValueError):
        acc.update([0, 1], [0.1])
    assert acc.compute()["count"] == 2  # failed updates leave no trace


def test_regression_accumulator_equals_functional_on_concatenation() -> None:
    rng = np.random.default_rng(22)
    acc = RegressionAccumulator()
    ys, ps = [], []
    for size in (7, 400, 93):
        y = rng.exponential(30.0, size=size)
        p = y + rng.normal(size=size)
        acc.update(y, p)
        ys.append(y)
        ps.append(p)
    y_all, p_all = np.concatenate(ys), np.concatenate(ps)
    out = acc.compute()
    assert out["count"] == len(y_all)
    assert out["rmse"] == pytest.approx(rmse(y_all, p_all), abs=1e-12)
    assert out["mae"] == pytest.approx(mae(y_all, p_all), abs=1e-12)
    assert out["mean_pred"] == pytest.approx(p_all.mean())
    assert out["mean_label"] == pytest.approx(y_all.mean())
    acc.reset()
    assert acc.compute()["count"] == 0 and math.isnan(acc.compute()["rmse"])
    with pytest.raises(ValueError):
        acc.update([1.0, np.inf], [1.0, 2.0])


# --------------------------------------------------------------------------
# torch interop
# --------------------------------------------------------------------------


def test_torch_tensors_accepted() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    y_np = _labels(rng, 500, 0.3)
    z_np = rng.normal(size=500).astype(np.float32)
    y = torch.from_numpy(y_np)
    z = torch.from_numpy(z_np).requires_grad_(True)  # .detach() is exercised
    p = torch.sigmoid(z)

    assert auc(y, z) == pytest.approx(skm.roc_auc_score(y_np, z_np), abs=1e-9)
    assert auc(y, z.to(torch.bfloat16)) == pytest.approx(
        skm.roc_auc_score(y_np, z.detach().to(torch.bfloat16).float().numpy()), abs=1e-9
    )
    p_np = p.detach().numpy().astype(np.float64)
    assert log_loss(y, p) == pytest.approx(log_loss(y_np, p_np), abs=1e-9)
    assert log_loss_from_logits(y, z) == pytest.approx(log_loss_from_logits(y_np, z_np), abs=1e-12)
    assert rmse(y.float(), p) == pytest.approx(rmse(y_np, p_np), abs=1e-9)
    assert positive_rate(y.bool()) == pytest.approx(y_np.mean())

    acc = BinaryAccumulator()
    acc.update(y[:200], p[:200].unsqueeze(1))  # (n, 1) head output
    acc.update(y[200:], p[200:])
    assert acc.compute()["auc"] == pytest.approx(auc(y_np, p_np.astype(np.float32)))


def test_binary_accumulator_keys_are_stable() -> None:
    acc = BinaryAccumulator()
    expected = {
        "auc",
        "logloss",
        "normalized_entropy",
        "pr_auc",
        "calibration_ratio",
        "count",
        "positives",
        "mean_pred",
        "mean_label",
    }
    assert set(acc.compute()) == expected  # empty
    acc.update([0, 1, 1], [0.2, 0.6, 0.9])
    out = acc.compute()
    assert set(out) == expected
    assert out["pr_auc"] == 1.0
    assert out["calibration_ratio"] == pytest.approx((0.2 + 0.6 + 0.9) / 2.0, rel=1e-6)
