"""Paired significance tests: DeLong for two correlated AUCs, a paired group bootstrap for GAUC."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mtrec.metrics import auc, bootstrap_gauc_paired, delong_paired, gauc


def delong_reference(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """The original O(n^2) DeLong et al. (1988): placement values V10 / V01 and their covariance."""
    pos = y == 1
    out = {}
    v10, v01 = [], []
    for name, s in (("a", a), ("b", b)):
        x, yy = s[pos][:, None], s[~pos][None, :]
        psi = (x > yy) + 0.5 * (x == yy)  # psi[i, j]: positive i against negative j
        out[f"auc_{name}"] = float(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    s = s10 / pos.sum() + s01 / (~pos).sum()
    var = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    delta = out["auc_b"] - out["auc_a"]
    se = math.sqrt(var)
    out.update(delta=delta, se=se, p_value=math.erfc(abs(delta / se) / math.sqrt(2)))
    out.update(ci_low=delta - 1.959963984540054 * se, ci_high=delta + 1.959963984540054 * se)
    return out


def correlated(n: int, seed: int, gain: float = 0.0, rate: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two correlated scores; B separates the classes better by ``gain``."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rate).astype(np.int64)
    common = rng.normal(size=n)
    a = common + 0.8 * y + rng.normal(size=n)
    b = common + (0.8 + gain) * y + rng.normal(size=n)
    return y, a, b


@pytest.mark.parametrize("seed", range(6))
def test_delong_matches_the_quadratic_reference_with_ties(seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 120))
    y, a, b = correlated(n, seed)
    a, b = np.round(a, 0), np.round(b * 2, 0) / 2  # few distinct values: many ties, within and across classes
    if seed % 2:
        a = a.astype(np.float32)  # dtype does not matter
    got, ref = delong_paired(y, a, b), delong_reference(y, a.astype(np.float64), b)
    for key in ("delta", "se", "ci_low", "ci_high", "p_value", "auc_a", "auc_b"):
        assert abs(got[key] - ref[key]) < 1e-12, (key, got[key], ref[key])
    assert abs(got["auc_a"] - roc_auc_score(y, a)) < 1e-12
    assert abs(got["auc_b"] - roc_auc_score(y, b)) < 1e-12
    assert got["auc_a"] == pytest.approx(auc(y, a), abs=1e-12)


def test_delong_variance_agrees_with_a_paired_bootstrap():
    y, a, b = correlated(1200, 7, gain=0.1)
    d = delong_paired(y, a, b)
    rng = np.random.default_rng(0)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    diffs = []
    for _ in range(4000):  # stratified: each class resampled on its own, as DeLong holds m and n fixed
        rows = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        diffs.append(auc(y[rows], b[rows]) - auc(y[rows], a[rows]))
    boot_var = float(np.var(diffs, ddof=1))
    assert d["se"] ** 2 == pytest.approx(boot_var, rel=0.10)
    assert d["delta"] == pytest.approx(float(np.mean(diffs)), abs=0.2 * d["se"])


def test_delong_identical_scores_give_delta_0_and_p_1():
    y, a, _ = correlated(500, 1)
    d = delong_paired(y, a, a.copy())
    assert d["delta"] == 0.0 and d["se"] == 0.0 and d["p_value"] == 1.0
    assert d["ci_low"] == d["ci_high"] == 0.0
    # A monotone transform ranks the rows the same way: still no difference at all.
    d = delong_paired(y, a, np.exp(a))
    assert d["delta"] == 0.0 and d["p_value"] == 1.0


def test_delong_a_clearly_better_model_is_significant():
    y, a, b = correlated(5000, 2, gain=0.6)
    d = delong_paired(y, a, b)
    assert d["p_value"] < 1e-3 and d["ci_low"] > 0 and d["delta"] > 0.03
    swapped = delong_paired(y, b, a)  # the same test the other way round
    assert swapped["delta"] == -d["delta"] and swapped["p_value"] == d["p_value"] and swapped["ci_high"] < 0


def test_delong_a_noise_difference_is_not_significant():
    ps = [delong_paired(*correlated(2000, seed))["p_value"] for seed in range(40)]
    assert 0.0 < min(ps) and np.mean(np.array(ps) < 0.05) <= 0.15  # about 5 % false positives


def test_delong_undefined_cases_are_nan_and_bad_input_raises():
    y = np.zeros(10, dtype=np.int64)
    d = delong_paired(y, np.arange(10.0), np.arange(10.0))
    assert all(math.isnan(v) for v in d.values())
    y[3] = 1  # one positive: AUCs and delta exist, no variance
    d = delong_paired(y, np.arange(10.0), -np.arange(10.0))
    assert d["auc_a"] == pytest.approx(3 / 9) and d["auc_b"] == pytest.approx(6 / 9)
    assert math.isnan(d["se"]) and math.isnan(d["p_value"])
    with pytest.raises(ValueError, match="only 0 and 1"):
        delong_paired(np.array([0, 2, 1]), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="inconsistent input lengths"):
        delong_paired(np.array([0, 1, 1]), np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        delong_paired(np.array([0, 1, 1]), np.array([0.0, np.nan, 1.0]), np.zeros(3))


def grouped(n: int, seed: int, gain: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    y, a, b = correlated(n, seed, gain)
    rng = np.random.default_rng(seed + 100)
    groups = rng.integers(0, n // 20, n) * 7919 + 2**40  # unordered, sparse, large keys
    return y, a, b, groups


@pytest.mark.parametrize("weighting", ["impressions", "clicks"])
def test_bootstrap_gauc_point_estimates_are_mtrec_gauc(weighting: str):
    y, a, b, groups = grouped(4000, 3)
    a = np.round(a, 1)  # ties inside groups
    r = bootstrap_gauc_paired(y, a, b, groups, resamples=200, weighting=weighting)
    ga, gb = gauc(y, a, groups, weighting=weighting), gauc(y, b, groups, weighting=weighting)
    assert r["gauc_a"] == pytest.approx(ga["gauc"], abs=1e-12)
    assert r["gauc_b"] == pytest.approx(gb["gauc"], abs=1e-12)
    assert r["delta"] == pytest.approx(gb["gauc"] - ga["gauc"], abs=1e-12)
    assert r["groups_used"] == ga["groups_used"] and r["resamples"] == 200
    strings = np.array([f"u{g}" for g in groups])  # string keys give the same groups
    assert bootstrap_gauc_paired(y, a, b, strings, resamples=200, weighting=weighting)["delta"] == pytest.approx(
        r["delta"], abs=1e-12
    )


def test_bootstrap_gauc_is_seeded_and_its_interval_holds_the_estimate():
    y, a, b, groups = grouped(4000, 4, gain=0.05)
    r1 = bootstrap_gauc_paired(y, a, b, groups, resamples=500, seed=11)
    assert r1 == bootstrap_gauc_paired(y, a, b, groups, resamples=500, seed=11)
    r2 = bootstrap_gauc_paired(y, a, b, groups, resamples=500, seed=12)
    assert r2["delta"] == r1["delta"] and r2["ci_low"] != r1["ci_low"]
    for r in (r1, r2):
        assert r["ci_low"] < r["delta"] < r["ci_high"] and 0.0 < r["p_value"] <= 1.0


def test_bootstrap_gauc_identical_models_and_a_clearly_better_one():
    y, a, b, groups = grouped(6000, 5, gain=1.0)
    same = bootstrap_gauc_paired(y, a, a.copy(), groups, resamples=300)
    assert same["delta"] == 0.0 and same["ci_low"] == same["ci_high"] == 0.0 and same["p_value"] == 1.0
    better = bootstrap_gauc_paired(y, a, b, groups, resamples=300)
    assert better["ci_low"] > 0 and better["p_value"] == pytest.approx(2 / 301)


def test_bootstrap_gauc_without_enough_groups_and_bad_input():
    y = np.array([0, 1, 0, 0, 1, 1])
    s = np.arange(6.0)
    one = bootstrap_gauc_paired(y, s, -s, np.array([1, 1, 2, 2, 3, 3]))  # only group 1 has both classes
    assert one["groups_used"] == 1 and one["delta"] == pytest.approx(-1.0) and math.isnan(one["p_value"])
    none = bootstrap_gauc_paired(y, s, -s, np.arange(6))
    assert none["groups_used"] == 0 and math.isnan(none["delta"])
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_gauc_paired(y, s, s, np.zeros(6), resamples=0)
    with pytest.raises(ValueError, match="weighting"):
        bootstrap_gauc_paired(y, s, s, np.zeros(6), weighting="users")
    with pytest.raises(ValueError, match="inconsistent input lengths"):
        bootstrap_gauc_paired(y, s, s, np.zeros(5))
