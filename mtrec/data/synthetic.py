"""Synthetic click log with a known ground-truth model.

This is the embedded default dataset of mtrec: quickstart, tests and benchmarks
all run on it. One row is one impression (a user was shown an item). Labels are
sampled from an explicit probabilistic model, so the true probabilities are
known and the best achievable AUC of every task can be reported next to the
data (``truth["best_auc"]``).

The generator is split in two layers:

* the *world* — every entity's latent parameters (user/item/category vectors,
  biases, fixed mappings such as item -> category, label intercepts). It depends
  only on ``seed`` (plus the requested number of extra columns), never on
  ``rows``, so files of different sizes drawn with the same seed share one
  ground truth;
* the *sample* — which impressions are drawn. It depends on ``seed`` (or on
  ``sample_seed`` when given) and is generated in fixed-size chunks so that
  memory stays bounded and the output does not depend on how it is written.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtrec.files import atomic_write_text, write_file
from mtrec.metrics.functional import sigmoid

__all__ = ["generate_click_log", "write_click_log"]

GENERATOR_NAME = "mtrec.synthetic"
GENERATOR_VERSION = 1

# Fixed chunk size: part of the output definition (each chunk has its own RNG
# stream), so it must not change with the caller's row_group_size or rows.
_CHUNK_ROWS = 1 << 19

_MIN_SPARSE = 8
_MIN_DENSE = 4

_LATENT_DIM = 8
_N_USERS = 100_000
_N_ITEMS = 150_000
_N_AUTHORS = 20_000
_N_CATEGORIES = 300
_N_CITIES = 1_000
_N_HOURS = 24
_N_POSITIONS = 20
_DEVICES = (
    "ios",
    "android",
    "web_desktop",
    "web_mobile",
    "ipad",
    "android_tablet",
    "smart_tv",
    "mac_app",
    "windows_app",
    "other",
)
_DEVICE_PROBS = np.array([0.34, 0.31, 0.11, 0.08, 0.05, 0.04, 0.03, 0.02, 0.015, 0.005])
_EXTRA_CARD_MIN = 10
_EXTRA_CARD_MAX = 50_000
_HIST_MAX = 50
# Each user owns a fixed pool of recent items; a row shows a window of it, so
# the same user has overlapping (not identical) histories across rows.
_HIST_POOL = 64

_TS_START = 1_704_067_200  # 2024-01-01T00:00:00Z, a midnight so hour = UTC hour.
_TS_SPAN_DAYS = 7

_TARGET_CLICK_RATE = 0.05
_TARGET_CONV_RATE = 0.15
_TARGET_SAT_RATE = 0.40
_SAT_DWELL_SECONDS = 30.0
_CALIBRATION_ROWS = 100_000

_BASE_SPARSE = ("user_id", "item_id", "author_id", "category", "city", "device", "hour", "position")
_BASE_DENSE = ("item_price", "user_age", "item_ctr_7d", "video_duration")
_LABELS = ("click", "conversion", "dwell_time", "satisfied")
_EXTRA_ATTACH = ("user", "item", "context")
_DENSE_KINDS = (
    "user_gauss",
    "item_lognorm",
    "noise_gauss",
    "ctx_gauss",
    "noise_lognorm",
    "user_lognorm",
)

# Spawn-key tags of the independent RNG streams. Giving each world component
# its own stream keeps e.g. user factors identical when num_sparse changes.
_S_USERS, _S_ITEMS, _S_AUTHORS, _S_CATS, _S_CITIES, _S_CONTEXT = 1, 2, 3, 4, 5, 6
_S_HISTPOOL, _S_EXTRA_SPARSE, _S_EXTRA_DENSE, _S_CALIB, _S_ROWS = 7, 8, 9, 10, 11

# Weights of the shared part of the click logit; tuned so the best AUCs land in
# the documented ranges.
_W_AFF, _W_UCAT, _W_HIST = 0.38, 0.22, 0.38


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=key))


def _zipf_weights(n: int, a: float, q: float) -> np.ndarray:
    """Zipf-Mandelbrot weights for ranks 1..n: ``1 / (rank + q) ** a``."""
    return (np.arange(1, n + 1, dtype=np.float64) + q) ** -a


def _cdf(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(weights, dtype=np.float64)
    return c / c[-1]


def _draw(cdf: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    # Inverse-CDF sampling; the clip guards against u landing on cdf[-1]
    # through floating rounding.
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return np.minimum(idx, len(cdf) - 1).astype(np.int32)


def _distinct_ints(rng: np.random.Generator, n: int, low: int, high: int) -> np.ndarray:
    """Draws ``n`` distinct int64 values uniformly from ``[low, high)`` in random order."""
    out = np.empty(0, dtype=np.int64)
    while len(out) < n:
        extra = rng.integers(low, high, size=(n - len(out)) + 64 + n // 50, dtype=np.int64)
        pool = np.concatenate([out, extra])
        # Keep first occurrences in draw order so the result stays a function of the stream.
        _, first = np.unique(pool, return_index=True)
        out = pool[np.sort(first)]
    return out[:n]


def _extra_cardinality(index: int) -> int:
    """Cardinality of extra sparse column ``cat_{index}``.

    A golden-ratio low-discrepancy sequence spreads the columns log-uniformly
    over [10, 50_000] whatever num_sparse is, and keeps each column's size a
    pure function of its index.
    """
    frac = ((index - _MIN_SPARSE + 1) * 0.6180339887498949) % 1.0
    span = np.log(_EXTRA_CARD_MAX / _EXTRA_CARD_MIN)
    return int(np.rint(_EXTRA_CARD_MIN * np.exp(frac * span)))


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


def _readonly(*arrays: np.ndarray) -> None:
    # The world is cached and shared between calls: freezing it turns an
    # accidental in-place edit into an error instead of silent corruption.
    for a in arrays:
        a.setflags(write=False)


@dataclass
class _ExtraSparse:
    name: str
    cardinality: int
    attach: str  # "user", "item" or "context"
    value_ids: np.ndarray  # value index -> emitted id (shuffled so id != rank)
    value_cdf: np.ndarray  # popularity of value indices (context columns)
    entity_value: np.ndarray | None  # user/item index -> value index
    click_bias: np.ndarray
    conv_bias: np.ndarray
    sat_bias: np.ndarray


@dataclass
class _ExtraDense:
    name: str
    kind: str
    loading: np.ndarray  # unit vector over the latent space (user/item kinds)
    mu: float
    scale: float
    effect: float  # multiplier of this column's logit contribution


@dataclass
class _CategorySampler:
    """Draws items by popularity within a given category, in O(1) per draw.

    Items of a category are ranked by their global popularity; the
    within-category rank follows a continuous Zipf-Mandelbrot law sampled by
    its closed-form inverse CDF. This avoids a binary search per draw, which
    dominated the cost of building the users' history pools.
    """

    order: np.ndarray  # items sorted by (category, global popularity rank)
    first: np.ndarray  # per category: first position in ``order``
    count: np.ndarray  # per category: number of items (>= 1)
    a: float = 1.05
    q: float = 2.0

    def sample(self, rng: np.random.Generator, cats: np.ndarray) -> np.ndarray:
        # float32 is plenty for a rank below 150k and halves the cost of the powers.
        e = np.float32(1.0 - self.a)
        shift = np.float32(1.0 + self.q)
        n = self.count[cats]
        top = shift**e
        span = top - (n.astype(np.float32) + shift) ** e
        x = (top - rng.random(len(cats), dtype=np.float32) * span) ** (1.0 / e) - shift
        # Truncation maps the tiny negative rounding overshoot at u≈0 to rank 0.
        rank = np.minimum(x.astype(np.int32), n - 1)
        return self.order[self.first[cats] + rank]


@dataclass
class _World:
    """All ground-truth parameters; a function of (seed, num_sparse, num_dense) only."""

    # users
    user_ids: np.ndarray
    user_cdf: np.ndarray
    u_vec: np.ndarray
    u_bias: np.ndarray
    u_intent: np.ndarray
    u_patience: np.ndarray
    u_age: np.ndarray
    u_city: np.ndarray
    u_device: np.ndarray
    u_fav: np.ndarray
    u_hist_mean: np.ndarray
    u_pool: np.ndarray
    # items
    item_ids: np.ndarray
    item_cdf: np.ndarray
    i_vec: np.ndarray
    i_vec_t: np.ndarray
    i_bias: np.ndarray
    i_conv: np.ndarray
    i_cat: np.ndarray
    i_author: np.ndarray
    i_price: np.ndarray
    i_zprice: np.ndarray
    i_duration: np.ndarray
    i_zduration: np.ndarray
    i_ctr_est: np.ndarray
    cat_sampler: _CategorySampler
    cat_cdf: np.ndarray
    # other entities
    author_ids: np.ndarray
    a_quality: np.ndarray
    a_bias: np.ndarray
    cat_names: np.ndarray
    c_vec: np.ndarray
    c_bias: np.ndarray
    c_conv: np.ndarray
    city_ids: np.ndarray
    city_cdf: np.ndarray
    city_bias: np.ndarray
    device_cdf: np.ndarray
    device_bias: np.ndarray
    device_sat: np.ndarray
    hour_bias: np.ndarray
    position_cdf: np.ndarray
    position_bias: np.ndarray
    ts_cdf: np.ndarray
    extra_sparse: list[_ExtraSparse]
    extra_dense: list[_ExtraDense]
    # label intercepts, calibrated on a world-only sample
    b_click: float = 0.0
    b_conv: float = 0.0
    b_sat: float = 0.0


def _build_users(w: dict[str, Any], seed: int) -> None:
    rng = _rng(seed, _S_USERS)
    k = _LATENT_DIM
    # Random 40-bit ids: most exceed 2**31, which exercises int64 handling downstream.
    w["user_ids"] = _distinct_ints(rng, _N_USERS, 1, 1 << 40)
    # The Mandelbrot offset keeps the heaviest user at a plausible share of traffic.
    w["user_cdf"] = _cdf(_zipf_weights(_N_USERS, a=1.1, q=25.0))
    fav = _draw(w["cat_cdf"], rng, 3 * _N_USERS).reshape(_N_USERS, 3)
    taste = 0.5 * w["c_vec"][fav[:, 0]] + 0.3 * w["c_vec"][fav[:, 1]] + 0.2 * w["c_vec"][fav[:, 2]]
    taste /= taste.std()
    w["u_fav"] = fav
    w["u_vec"] = (0.8 * taste + 0.6 * rng.standard_normal((_N_USERS, k))).astype(np.float32)
    w["u_bias"] = rng.normal(0.0, 0.3, _N_USERS)
    w["u_intent"] = rng.standard_normal(_N_USERS)
    w["u_patience"] = rng.standard_normal(_N_USERS)
    w["u_age"] = np.round(18.0 + 52.0 * rng.beta(2.0, 3.5, _N_USERS))
    w["u_city"] = _draw(w["city_cdf"], rng, _N_USERS)
    w["u_device"] = _draw(w["device_cdf"], rng, _N_USERS)
    # Mean history length per user; gamma spread gives both cold and very active users.
    w["u_hist_mean"] = rng.gamma(1.6, 11.0, _N_USERS)


def _build_items(w: dict[str, Any], seed: int) -> None:
    rng = _rng(seed, _S_ITEMS)
    k = _LATENT_DIM
    # > 2**24 so float32 casts of item ids would collide and be caught by tests downstream.
    w["item_ids"] = _distinct_ints(rng, _N_ITEMS, (1 << 25) + 1, 1 << 40)
    pop = _zipf_weights(_N_ITEMS, a=1.05, q=40.0)
    w["item_cdf"] = _cdf(pop)
    cat_pop = _zipf_weights(_N_CATEGORIES, a=0.9, q=5.0)
    cat = _draw(_cdf(cat_pop), rng, _N_ITEMS)
    # Guarantee every category owns at least one item so the per-category sampler is total.
    cat[rng.permutation(_N_ITEMS)[:_N_CATEGORIES]] = np.arange(_N_CATEGORIES, dtype=np.int32)
    w["i_cat"] = cat
    w["i_author"] = _draw(_cdf(_zipf_weights(_N_AUTHORS, a=1.0, q=10.0)), rng, _N_ITEMS)
    i_vec = (0.8 * w["c_vec"][cat] + 0.6 * rng.standard_normal((_N_ITEMS, k))).astype(np.float32)
    w["i_vec"] = i_vec
    w["i_vec_t"] = np.ascontiguousarray(i_vec.T)
    # Popular items are also somewhat better: the popularity signal is real, not just exposure.
    w["i_bias"] = rng.normal(0.0, 0.3, _N_ITEMS) + 0.12 * _standardise(-np.log(np.arange(_N_ITEMS) + 40.0))
    w["i_conv"] = rng.normal(0.0, 0.5, _N_ITEMS)
    log_price = w["c_price_level"][cat] + rng.normal(0.0, 0.8, _N_ITEMS)
    w["i_price"] = np.exp(log_price)
    w["i_zprice"] = _standardise(log_price)
    log_dur = rng.normal(np.log(150.0), 0.9, _N_ITEMS)
    w["i_duration"] = np.clip(np.exp(log_dur), 5.0, 7200.0)
    w["i_zduration"] = _standardise(np.log(w["i_duration"]))
    # A 7-day CTR estimate: impressions scale with popularity, so tail items are noisy.
    share = pop / pop.sum()
    imps = rng.poisson(5.0 + share * 3.0e6)
    true_ctr = sigmoid(np.log(_TARGET_CLICK_RATE / (1 - _TARGET_CLICK_RATE)) + w["i_bias"])
    clicks = rng.binomial(imps, true_ctr)
    w["i_ctr_est"] = (clicks + 0.5) / (imps + 10.0)

    # Item index is the global popularity rank, so a stable sort by category
    # leaves each category's items in descending popularity.
    order = np.argsort(cat, kind="stable").astype(np.int32)
    counts = np.bincount(cat, minlength=_N_CATEGORIES)
    w["cat_sampler"] = _CategorySampler(
        order=order, first=(np.cumsum(counts) - counts).astype(np.int32), count=counts.astype(np.int32)
    )
    w["cat_cdf"] = _cdf(np.bincount(cat, weights=pop, minlength=_N_CATEGORIES))


def _pick_taste_category(
    u_fav: np.ndarray, cat_cdf: np.ndarray, rng: np.random.Generator, users: np.ndarray, p_fav: float
) -> np.ndarray:
    """Category drawn from the user's favourites with prob ``p_fav``, else globally."""
    n = len(users)
    r = rng.random(n, dtype=np.float32)
    # Favourite slots 0/1/2 with weights 0.5/0.3/0.2.
    slot = (r >= 0.5).astype(np.int32) + (r >= 0.8)
    cats = u_fav[users, slot]
    if p_fav < 1.0:
        explore = rng.random(n, dtype=np.float32) >= p_fav
        cats[explore] = _draw(cat_cdf, rng, int(explore.sum()))
    return cats


def _extra_sparse_role(index: int) -> tuple[str, bool]:
    """(attachment, informative) of extra sparse column ``cat_{index}``."""
    attach = _EXTRA_ATTACH[(index - _MIN_SPARSE) % 3]
    # Every fourth column is pure noise: a model should learn to ignore it.
    return attach, (index - _MIN_SPARSE) % 4 != 3


def _build_extra_sparse(w: dict[str, Any], seed: int, num_sparse: int) -> None:
    roles = {j: _extra_sparse_role(j) for j in range(_MIN_SPARSE, num_sparse)}

    def effect_sd(base: float, n_cols: int) -> float:
        # Shrink per-column effects as columns are added so the total signal
        # (and so the best AUC) stays in range for any num_sparse.
        return min(0.25, base / np.sqrt(max(n_cols, 1)))

    click_sd = effect_sd(0.6, sum(inf for _, inf in roles.values()))
    conv_sd = effect_sd(0.4, sum(inf and a == "item" for a, inf in roles.values()))
    sat_sd = effect_sd(0.4, sum(inf and a == "context" for a, inf in roles.values()))
    cols: list[_ExtraSparse] = []
    for j, (attach, informative) in roles.items():
        rng = _rng(seed, _S_EXTRA_SPARSE, j)
        card = _extra_cardinality(j)
        value_cdf = _cdf(_zipf_weights(card, a=1.1, q=1.0))
        entity_value = None
        if attach == "user":
            entity_value = _draw(value_cdf, rng, _N_USERS)
        elif attach == "item":
            entity_value = _draw(value_cdf, rng, _N_ITEMS)
        zeros = np.zeros(card)
        click_bias = rng.normal(0.0, click_sd, card) if informative else zeros
        conv_bias = rng.normal(0.0, conv_sd, card) if informative and attach == "item" else zeros
        sat_bias = rng.normal(0.0, sat_sd, card) if informative and attach == "context" else zeros
        cols.append(
            _ExtraSparse(
                name=f"cat_{j:02d}",
                cardinality=card,
                attach=attach,
                value_ids=rng.permutation(card).astype(np.int64),
                value_cdf=value_cdf,
                entity_value=entity_value,
                click_bias=click_bias,
                conv_bias=conv_bias,
                sat_bias=sat_bias,
            )
        )
    w["extra_sparse"] = cols


def _build_extra_dense(w: dict[str, Any], seed: int, num_dense: int) -> None:
    kinds = [_DENSE_KINDS[(j - _MIN_DENSE) % len(_DENSE_KINDS)] for j in range(_MIN_DENSE, num_dense)]
    cols: list[_ExtraDense] = []
    for j, kind in zip(range(_MIN_DENSE, num_dense), kinds, strict=True):
        rng = _rng(seed, _S_EXTRA_DENSE, j)
        loading = rng.standard_normal(_LATENT_DIM)
        loading /= np.linalg.norm(loading)
        cols.append(
            _ExtraDense(
                name=f"num_{j:02d}",
                kind=kind,
                loading=loading.astype(np.float32),
                mu=float(rng.normal(0.0, 2.0)),
                scale=float(rng.uniform(0.5, 3.0)),
                # Same reasoning as for sparse effects: repeats of a kind share its signal budget.
                effect=1.0 / float(np.sqrt(kinds.count(kind))),
            )
        )
    w["extra_dense"] = cols


def _traffic_cdf() -> np.ndarray:
    """Cumulative traffic over the 7-day window, per minute (diurnal + weekend)."""
    minutes = np.arange(_TS_SPAN_DAYS * 24 * 60, dtype=np.float64)
    hour = (minutes / 60.0) % 24.0
    day = minutes // (24 * 60)
    # Evening peak around 20:00, trough around 04:00; 2024-01-06/07 are a weekend.
    rate = 1.0 + 0.75 * np.cos(2.0 * np.pi * (hour - 20.0) / 24.0)
    rate *= np.where(day >= 5, 1.2, 1.0)
    cdf = np.concatenate([[0.0], np.cumsum(rate)])
    return cdf / cdf[-1]


@functools.lru_cache(maxsize=2)
def _build_world(seed: int, num_sparse: int, num_dense: int) -> _World:
    w: dict[str, Any] = {}
    k = _LATENT_DIM

    rng = _rng(seed, _S_CATS)
    w["c_vec"] = rng.standard_normal((_N_CATEGORIES, k)).astype(np.float32)
    w["c_bias"] = rng.normal(0.0, 0.25, _N_CATEGORIES)
    w["c_conv"] = rng.normal(0.0, 0.4, _N_CATEGORIES)
    w["c_price_level"] = rng.normal(3.0, 0.9, _N_CATEGORIES)
    w["cat_names"] = np.array([f"cat_{i:03d}" for i in rng.permutation(_N_CATEGORIES)], dtype=object)

    rng = _rng(seed, _S_CITIES)
    w["city_ids"] = _distinct_ints(rng, _N_CITIES, 1, 100_000)
    w["city_cdf"] = _cdf(_zipf_weights(_N_CITIES, a=1.0, q=2.0))
    w["city_bias"] = rng.normal(0.0, 0.15, _N_CITIES)

    rng = _rng(seed, _S_CONTEXT)
    w["device_cdf"] = _cdf(_DEVICE_PROBS)
    w["device_bias"] = rng.normal(0.0, 0.2, len(_DEVICES))
    w["device_sat"] = rng.normal(0.0, 0.3, len(_DEVICES))
    hours = np.arange(_N_HOURS)
    w["hour_bias"] = 0.15 * np.cos(2.0 * np.pi * (hours - 21.0) / 24.0) + rng.normal(0.0, 0.03, _N_HOURS)
    positions = np.arange(1, _N_POSITIONS + 1, dtype=np.float64)
    w["position_cdf"] = _cdf(positions**-0.8)
    w["position_bias"] = -0.35 * np.log(positions)
    w["ts_cdf"] = _traffic_cdf()

    rng = _rng(seed, _S_AUTHORS)
    w["author_ids"] = _distinct_ints(rng, _N_AUTHORS, 100_000, 1_000_000_000)
    w["a_quality"] = rng.standard_normal(_N_AUTHORS)
    w["a_bias"] = rng.normal(0.0, 0.2, _N_AUTHORS)

    _build_items(w, seed)
    _build_users(w, seed)

    rng = _rng(seed, _S_HISTPOOL)
    users = np.repeat(np.arange(_N_USERS, dtype=np.int32), _HIST_POOL)
    cats = _pick_taste_category(w["u_fav"], w["cat_cdf"], rng, users, p_fav=0.8)
    w["u_pool"] = w["cat_sampler"].sample(rng, cats).reshape(_N_USERS, _HIST_POOL)

    _build_extra_sparse(w, seed, num_sparse)
    _build_extra_dense(w, seed, num_dense)
    del w["c_price_level"]

    world = _World(**w)
    for value in w.values():
        if isinstance(value, np.ndarray):
            _readonly(value)
    sampler = w["cat_sampler"]
    _readonly(sampler.order, sampler.first, sampler.count)
    for col in world.extra_sparse:
        _readonly(col.value_ids, col.value_cdf, col.click_bias, col.conv_bias, col.sat_bias)
        if col.entity_value is not None:
            _readonly(col.entity_value)
    _calibrate(world, seed)
    return world


def _solve_intercept(logit: np.ndarray, weight: np.ndarray | None, target: float) -> float:
    """Intercept b with weighted mean of sigmoid(b + logit) equal to ``target`` (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        mean = np.average(sigmoid(mid + logit), weights=weight)
        if mean < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _calibrate(world: _World, seed: int) -> None:
    """Fixes the three label intercepts on a world-only sample.

    The calibration sample uses its own RNG stream, so intercepts (hence the
    true model) do not depend on rows or sample_seed.
    """
    rng = _rng(seed, _S_CALIB)
    rows = _sample_rows(world, rng, 0, _CALIBRATION_ROWS, _CALIBRATION_ROWS)
    world.b_click = _solve_intercept(rows["click_logit"], None, _TARGET_CLICK_RATE)
    p_click = sigmoid(world.b_click + rows["click_logit"])
    # Conditional rates are defined among clicks, so weight each row by its click probability.
    world.b_conv = _solve_intercept(rows["conv_logit"], p_click, _TARGET_CONV_RATE)
    world.b_sat = _solve_intercept(rows["sat_logit"], p_click, _TARGET_SAT_RATE)


def _sample_time(w: _World, out: dict[str, np.ndarray], row_start: int, n: int, total_rows: int) -> np.ndarray:
    """Fills request_ts and hour: monotone in the global row index, shaped by diurnal traffic."""
    frac = (np.arange(row_start, row_start + n, dtype=np.float64) + 0.5) / total_rows
    minute = np.interp(frac, w.ts_cdf, np.arange(len(w.ts_cdf), dtype=np.float64))
    ts = _TS_START + np.floor(minute * 60.0).astype(np.int64)
    hour = (ts // 3600) % 24
    out["request_ts"] = ts
    out["hour"] = hour
    return hour


def _sample_impressions(
    w: _World, rng: np.random.Generator, out: dict[str, np.ndarray], n: int
) -> tuple[np.ndarray, ...]:
    """Draws who sees what: ``(user, item, cat, author, position, city, device)``, 0-based."""
    user = _draw(w.user_cdf, rng, n)
    # A share of impressions comes from a personalised candidate source (the
    # user's favourite categories), the rest from global popularity.
    personal = rng.random(n) < 0.35
    item = _draw(w.item_cdf, rng, n)
    n_personal = int(personal.sum())
    if n_personal:
        cats = _pick_taste_category(w.u_fav, w.cat_cdf, rng, user[personal], p_fav=1.0)
        item[personal] = w.cat_sampler.sample(rng, cats)
    cat = w.i_cat[item]
    author = w.i_author[item]
    position = _draw(w.position_cdf, rng, n)
    city = w.u_city[user].copy()
    travel = rng.random(n) < 0.1
    city[travel] = _draw(w.city_cdf, rng, int(travel.sum()))
    device = w.u_device[user].copy()
    switch = rng.random(n) < 0.15
    device[switch] = _draw(w.device_cdf, rng, int(switch.sum()))

    out["user"], out["item"], out["cat"], out["author"] = user, item, cat, author
    out["position"] = position + 1
    out["city"], out["device"] = city, device
    return user, item, cat, author, position, city, device


def _sample_history(
    w: _World, rng: np.random.Generator, out: dict[str, np.ndarray], n: int, user: np.ndarray, iv: np.ndarray
) -> np.ndarray:
    """Draws each row's history (a window of the user's recent-item pool); returns its match with the item."""
    k = _LATENT_DIM
    hist_len = np.minimum(rng.poisson(w.u_hist_mean[user]), _HIST_MAX).astype(np.int32)
    start = np.floor(rng.random(n) * (_HIST_POOL - hist_len + 1)).astype(np.int32)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(hist_len, out=offsets[1:])
    total = int(offsets[-1])
    row_of = np.repeat(np.arange(n, dtype=np.int32), hist_len)
    slot = np.arange(total, dtype=np.int32) - offsets[:-1][row_of] + start[row_of]
    hist_items = w.u_pool[user[row_of], slot]
    del slot
    out["hist_offsets"], out["hist_items"] = offsets, hist_items

    # Mean history vector, one latent dimension at a time to keep memory at O(total).
    hist_match = np.zeros(n)
    for d in range(k):
        summed = np.bincount(row_of, weights=w.i_vec_t[d][hist_items], minlength=n)
        hist_match += summed * iv[:, d]
    del row_of
    hist_match /= np.maximum(hist_len, 1) * np.sqrt(k)
    return hist_match


def _sample_extra_dense(
    w: _World,
    rng: np.random.Generator,
    out: dict[str, np.ndarray],
    n: int,
    user: np.ndarray,
    uv: np.ndarray,
    iv: np.ndarray,
    logits: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """Draws the extra dense columns into ``out``, adding their effects to the (click, conv, sat) logits in place."""
    click, _, sat = logits
    for col in w.extra_dense:
        if col.kind == "user_gauss":
            signal = uv @ col.loading
            z = signal + 0.35 * rng.standard_normal(n)
            click += 0.12 * col.effect * signal
            values = col.mu + col.scale * z
        elif col.kind == "item_lognorm":
            signal = iv @ col.loading
            click += 0.12 * col.effect * signal
            values = np.exp(0.3 * col.mu + 0.5 * signal + 0.15 * rng.standard_normal(n))
        elif col.kind == "ctx_gauss":
            # Context signal (think session engagement) that exists only in this column.
            z = rng.standard_normal(n)
            click += 0.25 * col.effect * z
            sat += 0.2 * col.effect * z
            values = col.mu + col.scale * z
        elif col.kind == "user_lognorm":
            # Noisy proxy of the purchase-intent factor: informative for conversion only.
            values = np.exp(0.3 * col.mu + 0.6 * w.u_intent[user] + 0.5 * rng.standard_normal(n))
        elif col.kind == "noise_gauss":
            values = col.mu + col.scale * rng.standard_normal(n)
        else:  # noise_lognorm
            values = np.exp(0.3 * col.mu + 0.8 * rng.standard_normal(n))
        out[col.name] = values.astype(np.float32)


def _sample_extra_sparse(
    w: _World,
    rng: np.random.Generator,
    out: dict[str, np.ndarray],
    n: int,
    user: np.ndarray,
    item: np.ndarray,
    logits: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """Draws the extra sparse columns into ``out``, adding their biases to the (click, conv, sat) logits in place."""
    click, conv, sat = logits
    for col in w.extra_sparse:
        if col.attach == "user":
            vidx = cast(np.ndarray, col.entity_value)[user]
        elif col.attach == "item":
            vidx = cast(np.ndarray, col.entity_value)[item]
        else:
            vidx = _draw(col.value_cdf, rng, n)
        click += col.click_bias[vidx]
        conv += col.conv_bias[vidx]
        sat += col.sat_bias[vidx]
        out[col.name] = col.value_ids[vidx]


def _sample_rows(w: _World, rng: np.random.Generator, row_start: int, n: int, total_rows: int) -> dict[str, np.ndarray]:
    """Draws ``n`` impressions (features + label logits, without intercepts).

    ``row_start``/``total_rows`` place the chunk on the global time axis so that
    request_ts increases with the row index over the whole file.
    """
    out: dict[str, np.ndarray] = {}
    sqrt_k = np.sqrt(_LATENT_DIM)
    hour = _sample_time(w, out, row_start, n, total_rows)
    user, item, cat, author, position, city, device = _sample_impressions(w, rng, out, n)

    # --- latent interactions.
    uv = w.u_vec[user]
    iv = w.i_vec[item]
    hist_match = _sample_history(w, rng, out, n, user, iv)
    aff = np.einsum("ij,ij->i", uv, iv, dtype=np.float64) / sqrt_k
    ucat = np.einsum("ij,ij->i", uv, w.c_vec[cat], dtype=np.float64) / sqrt_k

    # --- dense features.
    price = w.i_price[item] * np.exp(rng.normal(0.0, 0.05, n))  # per-impression discounting
    age = w.u_age[user]
    out["item_price"] = price
    out["user_age"] = age.astype(np.float32)
    out["user_age_null"] = rng.random(n) < 0.02
    out["item_ctr_7d"] = w.i_ctr_est[item].astype(np.float32)
    out["video_duration"] = w.i_duration[item].astype(np.float32)

    click = (
        _W_AFF * aff
        + _W_UCAT * ucat
        + _W_HIST * hist_match
        + w.i_bias[item]
        + w.u_bias[user]
        + w.a_bias[author]
        + w.c_bias[cat]
        + w.city_bias[city]
        + w.device_bias[device]
        + w.hour_bias[hour]
        + w.position_bias[position]
    )
    conv = 0.35 * aff + 1.0 * w.u_intent[user] - 0.6 * w.i_zprice[item] + w.c_conv[cat] + w.i_conv[item]
    conv += 0.015 * (age - 40.0)
    sat = (
        0.35 * aff
        + 0.3 * hist_match
        + 0.9 * w.a_quality[author]
        + 0.6 * w.u_patience[user]
        - 0.5 * w.i_zduration[item]
        + w.device_sat[device]
    )
    _sample_extra_dense(w, rng, out, n, user, uv, iv, (click, conv, sat))
    _sample_extra_sparse(w, rng, out, n, user, item, (click, conv, sat))

    out["click_logit"], out["conv_logit"], out["sat_logit"] = click, conv, sat
    return out


def _validate(rows: int, seed: int, num_sparse: int, num_dense: int, sample_seed: int | None) -> None:
    def is_int(x: object) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not is_int(rows) or rows < 1:
        raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if sample_seed is not None and (not is_int(sample_seed) or sample_seed < 0):
        raise ValueError(f"sample_seed must be None or a non-negative integer, got {sample_seed!r}")
    if not is_int(num_sparse) or num_sparse < _MIN_SPARSE:
        raise ValueError(
            f"num_sparse must be an integer >= {_MIN_SPARSE} (the 8 base sparse columns), got {num_sparse!r}"
        )
    if not is_int(num_dense) or num_dense < _MIN_DENSE:
        raise ValueError(f"num_dense must be an integer >= {_MIN_DENSE} (the 4 base dense columns), got {num_dense!r}")


def _column_names(num_sparse: int, num_dense: int) -> dict[str, list[str]]:
    return {
        "sparse": [*_BASE_SPARSE, *(f"cat_{j:02d}" for j in range(_MIN_SPARSE, num_sparse))],
        "dense": [*_BASE_DENSE, *(f"num_{j:02d}" for j in range(_MIN_DENSE, num_dense))],
        "list": ["hist_item_ids"],
        "labels": list(_LABELS),
        "timestamp": ["request_ts"],
    }


def _schema(num_sparse: int, num_dense: int) -> pa.Schema:
    names = _column_names(num_sparse, num_dense)
    string_cols = {"category", "device"}
    fields = [pa.field(c, pa.string() if c in string_cols else pa.int64()) for c in names["sparse"]]
    fields.append(pa.field("item_price", pa.float64()))
    fields += [pa.field(c, pa.float32()) for c in names["dense"][1:]]
    fields.append(pa.field("hist_item_ids", pa.list_(pa.int64())))
    fields += [
        pa.field("click", pa.int64()),
        pa.field("conversion", pa.int64()),
        pa.field("dwell_time", pa.float32()),
        pa.field("satisfied", pa.int64()),
        pa.field("request_ts", pa.int64()),
    ]
    return pa.schema(fields)


@dataclass
class _Chunk:
    table: pa.Table
    p_click: np.ndarray
    p_conv: np.ndarray
    p_sat: np.ndarray
    click: np.ndarray
    conversion: np.ndarray
    satisfied: np.ndarray


def _generate_chunk(w: _World, schema: pa.Schema, seed: int, sample_seed: int | None, index: int, rows: int) -> _Chunk:
    row_start = index * _CHUNK_ROWS
    n = min(_CHUNK_ROWS, rows - row_start)
    # Distinct spawn-key shapes keep "no sample_seed" and every sample_seed apart.
    key = (_S_ROWS, 0, index) if sample_seed is None else (_S_ROWS, 1, sample_seed, index)
    rng = _rng(seed, *key)
    r = _sample_rows(w, rng, row_start, n, rows)

    p_click = sigmoid(w.b_click + r["click_logit"])
    p_conv = sigmoid(w.b_conv + r["conv_logit"])
    sat_logit = w.b_sat + r["sat_logit"]
    p_sat = sigmoid(sat_logit)
    # Labels are sampled hierarchically: click first, then the post-click outcomes.
    click = rng.random(n) < p_click
    conversion = click & (rng.random(n) < p_conv)
    # Dwell = 30 s * exp(0.55 * (sat_logit + logistic noise)), so dwell >= 30 s happens
    # with probability exactly sigmoid(sat_logit) = p_sat.
    u = rng.random(n)
    noise = np.log(u + 1e-300) - np.log1p(-u)
    dwell = np.clip(_SAT_DWELL_SECONDS * np.exp(0.55 * (sat_logit + noise)), 0.5, 7200.0).astype(np.float32)
    dwell[~click] = 0.0
    # Derive satisfied from the stored float32 value so the identity holds exactly on disk.
    satisfied = click & (dwell >= _SAT_DWELL_SECONDS)

    offsets = pa.array(r["hist_offsets"], type=pa.int32())
    hist_values = pa.array(w.item_ids[r["hist_items"]], type=pa.int64())
    columns: dict[str, pa.Array] = {
        "user_id": pa.array(w.user_ids[r["user"]]),
        "item_id": pa.array(w.item_ids[r["item"]]),
        "author_id": pa.array(w.author_ids[r["author"]]),
        "category": pa.array(w.cat_names, type=pa.string()).take(pa.array(r["cat"])),
        "city": pa.array(w.city_ids[r["city"]]),
        "device": pa.array(_DEVICES, type=pa.string()).take(pa.array(r["device"])),
        "hour": pa.array(r["hour"].astype(np.int64)),
        "position": pa.array(r["position"].astype(np.int64)),
        "user_age": pa.array(r["user_age"], mask=r["user_age_null"]),
        "hist_item_ids": pa.ListArray.from_arrays(offsets, hist_values),
        "click": pa.array(click.astype(np.int64)),
        "conversion": pa.array(conversion.astype(np.int64)),
        "dwell_time": pa.array(dwell),
        "satisfied": pa.array(satisfied.astype(np.int64)),
        "request_ts": pa.array(r["request_ts"]),
    }
    arrays = [columns[f.name] if f.name in columns else pa.array(r[f.name]).cast(f.type) for f in schema]
    table = pa.Table.from_arrays(arrays, schema=schema)
    return _Chunk(
        table=table,
        p_click=p_click,
        p_conv=p_conv,
        p_sat=p_sat,
        click=click,
        conversion=conversion,
        satisfied=satisfied,
    )


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Exact ROC AUC with ties counted as half (Mann-Whitney U), or None for one class.

    Implemented here rather than via scikit-learn to keep its import (about a
    second) off the generation path; the unit tests cross-check the two.
    """
    labels = np.asarray(labels, dtype=bool)
    n = labels.size
    n_pos = int(labels.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.concatenate([[0], np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]) + 1])
    ends = np.append(starts[1:], n)
    # Tied scores share the average of their 1-based ranks.
    mean_rank = (starts + 1 + ends) / 2.0
    pos_in_group = np.add.reduceat(labels[order].astype(np.int64), starts)
    rank_sum = float(np.dot(mean_rank, pos_in_group))
    u_stat = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u_stat / (n_pos * n_neg)


def _rate(num: np.ndarray, den: np.ndarray | None = None) -> float | None:
    if den is None:
        return float(num.mean()) if num.size else None
    count = int(den.sum())
    return float(num[den].sum() / count) if count else None


class _TruthAccumulator:
    """Collects true probabilities and sampled labels across chunks for the truth dict."""

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {
            k: [] for k in ("p_click", "p_conv", "p_sat", "click", "conversion", "satisfied")
        }

    def add(self, chunk: _Chunk) -> None:
        for name, parts in self._parts.items():
            parts.append(getattr(chunk, name))

    def finish(self, rows: int, seed: int, sample_seed: int | None, num_sparse: int, num_dense: int) -> dict[str, Any]:
        a = {k: np.concatenate(v) for k, v in self._parts.items()}
        click, conv, sat = a["click"], a["conversion"], a["satisfied"]
        w = _build_world(seed, num_sparse, num_dense)
        cardinalities: dict[str, int] = {
            "user_id": _N_USERS,
            "item_id": _N_ITEMS,
            "author_id": _N_AUTHORS,
            "category": _N_CATEGORIES,
            "city": _N_CITIES,
            "device": len(_DEVICES),
            "hour": _N_HOURS,
            "position": _N_POSITIONS,
        }
        cardinalities.update({c.name: c.cardinality for c in w.extra_sparse})
        cardinalities["hist_item_ids"] = _N_ITEMS
        return {
            "generator": GENERATOR_NAME,
            "version": GENERATOR_VERSION,
            "rows": int(rows),
            "seed": int(seed),
            "sample_seed": None if sample_seed is None else int(sample_seed),
            "num_sparse": int(num_sparse),
            "num_dense": int(num_dense),
            "rates": {
                "click": _rate(click),
                "conversion_given_click": _rate(conv, click),
                "satisfied_given_click": _rate(sat, click),
            },
            "best_auc": {
                "click": _auc(click, a["p_click"]),
                "conversion": _auc(conv[click], a["p_conv"][click]),
                "satisfied": _auc(sat[click], a["p_sat"][click]),
                "ctcvr": _auc(conv, a["p_click"] * a["p_conv"]),
            },
            "best_auc_spaces": {
                "click": "all rows",
                "conversion": "click == 1",
                "satisfied": "click == 1",
                "ctcvr": "all rows, label click*conversion, score p_click*p_conv",
            },
            "columns": _column_names(num_sparse, num_dense),
            "cardinalities": cardinalities,
        }


def _prepare(rows: int, seed: int, num_sparse: int, num_dense: int) -> tuple[pa.Schema, list[int], _World]:
    world = _build_world(int(seed), int(num_sparse), int(num_dense))
    schema = _schema(num_sparse, num_dense)
    return schema, list(range((rows + _CHUNK_ROWS - 1) // _CHUNK_ROWS)), world


def generate_click_log(
    rows: int,
    *,
    seed: int = 0,
    num_sparse: int = 20,
    num_dense: int = 10,
    sample_seed: int | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Generates a synthetic click log in memory.

    Args:
        rows: Number of impressions (rows), >= 1.
        seed: Seed of the ground-truth world (entity parameters, mappings,
            intercepts) and, unless ``sample_seed`` is given, of the row sampling.
        num_sparse: Number of sparse columns, >= 8 (8 base + ``cat_08``...).
        num_dense: Number of dense columns, >= 4 (4 base + ``num_04``...).
        sample_seed: When given, only the row sampling uses this seed; the
            ground truth of ``seed`` is unchanged (e.g. an eval file for a
            model trained on another file of the same world).

    Returns:
        The table (one row per impression) and the JSON-serialisable ``truth``
        dict (rates, best achievable AUCs, column groups, cardinalities).

    Raises:
        ValueError: If an argument is out of range.
    """
    _validate(rows, seed, num_sparse, num_dense, sample_seed)
    schema, chunk_ids, world = _prepare(rows, seed, num_sparse, num_dense)
    acc = _TruthAccumulator()
    tables = []
    for i in chunk_ids:
        chunk = _generate_chunk(world, schema, seed, sample_seed, i, rows)
        acc.add(chunk)
        tables.append(chunk.table)
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return table, acc.finish(rows, seed, sample_seed, num_sparse, num_dense)


def write_click_log(
    path: str | Path,
    rows: int,
    *,
    seed: int = 0,
    num_sparse: int = 20,
    num_dense: int = 10,
    row_group_size: int = 65536,
    sample_seed: int | None = None,
) -> dict[str, Any]:
    """Writes a synthetic click log to Parquet, streaming chunk by chunk.

    The Parquet file and ``<path>.truth.json`` are each written through
    :mod:`mtrec.files` (a temporary beside the destination, then renamed), so
    readers never see a partial file. The data is identical
    to ``generate_click_log`` with the same arguments.

    Args:
        path: Destination Parquet path; its directory must exist.
        rows: Number of impressions (rows), >= 1.
        seed: Seed of the ground-truth world (see ``generate_click_log``).
        num_sparse: Number of sparse columns, >= 8.
        num_dense: Number of dense columns, >= 4.
        row_group_size: Maximum rows per Parquet row group, >= 1.
        sample_seed: Optional seed of the row sampling only.

    Returns:
        The ``truth`` dict, as also written to ``<path>.truth.json``.

    Raises:
        ValueError: If an argument is out of range.
    """
    _validate(rows, seed, num_sparse, num_dense, sample_seed)
    if isinstance(row_group_size, bool) or not isinstance(row_group_size, (int, np.integer)) or row_group_size < 1:
        raise ValueError(f"row_group_size must be an integer >= 1, got {row_group_size!r}")
    path = Path(path)
    truth_path = path.with_name(path.name + ".truth.json")
    schema, chunk_ids, world = _prepare(rows, seed, num_sparse, num_dense)
    acc = _TruthAccumulator()

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema) as writer:
            for i in chunk_ids:
                chunk = _generate_chunk(world, schema, seed, sample_seed, i, rows)
                acc.add(chunk)
                writer.write_table(chunk.table, row_group_size=int(row_group_size))
                del chunk

    write_file(path, write)
    truth = acc.finish(rows, seed, sample_seed, num_sparse, num_dense)
    atomic_write_text(truth_path, json.dumps(truth, indent=2) + "\n")
    return truth
