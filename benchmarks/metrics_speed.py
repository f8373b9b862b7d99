"""Speed of exact AUC and GAUC against the usual sklearn / pandas baselines.

Prints one JSON object.  Run from the repository root::

    python benchmarks/metrics_speed.py            # 5M rows, 100k users
    python benchmarks/metrics_speed.py --rows 200000 --groups 5000   # smoke run

Data (seeded): ~5% positives, float32 scores (as model heads produce) with
some signal, users with Zipf-like activity (a few heavy users, a long tail
of users with a handful of impressions) and 40-bit user ids.

* AUC: ``mtrec.metrics.auc`` vs ``sklearn.metrics.roc_auc_score``, median of
  ``--repeats`` runs each.
* GAUC: ``mtrec.metrics.gauc`` vs a pandas groupby calling
  ``roc_auc_score`` per group.  The pandas loop costs roughly a constant per
  group, so unless ``--full-baseline`` is given it is timed on a random
  subset of groups and extrapolated linearly by group count (the JSON says
  so); agreement is checked on that subset, to 1e-9.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from mtrec.metrics import auc, gauc

AUC_TARGET = 5.0
GAUC_TARGET = 20.0


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls and the last result."""
    times = []
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def make_data(rows: int, groups: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded synthetic click log: labels, float32 scores, user ids."""
    rng = np.random.default_rng(seed)
    # Zipf-like user activity: P(user k) ~ 1 / (k + 10) ** 1.1.
    activity = 1.0 / (np.arange(groups) + 10.0) ** 1.1
    activity /= activity.sum()
    user_index = rng.choice(groups, size=rows, p=activity)
    user_ids = rng.choice(2**40, size=groups, replace=False).astype(np.int64)
    # Per-user click propensity around a 5% base rate.
    user_logit = rng.normal(-3.5, 0.7, size=groups)
    logit = user_logit[user_index] + rng.normal(0.0, 1.0, size=rows)
    y = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
    # Noisy model with signal; float32 rounding creates realistic ties.
    score = (1.0 / (1.0 + np.exp(-(0.8 * logit + rng.normal(0.0, 1.0, size=rows))))).astype(np.float32)
    return {"y": y, "score": score, "groups": user_ids[user_index]}


def pandas_gauc(y: np.ndarray, score: np.ndarray, groups: np.ndarray) -> float:
    """Baseline: pandas groupby + sklearn roc_auc_score per group (impressions-weighted)."""
    frame = pd.DataFrame({"y": y, "score": score, "g": groups})
    num = den = 0.0
    for _, part in frame.groupby("g", sort=False):
        labels = part["y"].to_numpy()
        if labels.min() == labels.max():
            continue
        num += len(part) * roc_auc_score(labels, part["score"].to_numpy())
        den += len(part)
    return num / den if den else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--groups", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-groups", type=int, default=5_000, help="groups timed for the pandas baseline")
    parser.add_argument("--full-baseline", action="store_true", help="time pandas on all groups")
    args = parser.parse_args()

    data = make_data(args.rows, args.groups, args.seed)
    y, score, groups = data["y"], data["score"], data["groups"]

    # ---------------- AUC ----------------
    t_ours, auc_ours = _median_time(lambda: auc(y, score), args.repeats)
    t_sk, auc_sk = _median_time(lambda: roc_auc_score(y, score), args.repeats)
    score64 = score.astype(np.float64) + np.random.default_rng(1).random(len(score)) * 1e-12
    t_ours64, auc_ours64 = _median_time(lambda: auc(y, score64), args.repeats)

    # ---------------- GAUC ----------------
    t_gauc, g_out = _median_time(lambda: gauc(y, score, groups), args.repeats)
    t_gauc_clicks, _ = _median_time(lambda: gauc(y, score, groups, weighting="clicks"), 1)
    weights = np.random.default_rng(2).random(len(y)) + 0.5
    t_gauc_w, _ = _median_time(lambda: gauc(y, score, groups, sample_weight=weights), 1)

    n_present = int(np.unique(groups).size)
    if args.full_baseline or args.baseline_groups >= n_present:
        subset_ids = np.unique(groups)
    else:
        subset_ids = np.random.default_rng(3).choice(np.unique(groups), size=args.baseline_groups, replace=False)
    in_subset = np.isin(groups, subset_ids)
    ys, ss, gs = y[in_subset], score[in_subset], groups[in_subset]
    t0 = time.perf_counter()
    baseline_value = pandas_gauc(ys, ss, gs)
    t_pandas_subset = time.perf_counter() - t0
    extrapolated = len(subset_ids) < n_present
    t_pandas = t_pandas_subset * n_present / len(subset_ids)
    ours_subset = gauc(ys, ss, gs)["gauc"]

    gauc_diff = abs(ours_subset - baseline_value)
    result = {
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpu": platform.machine()},
        "data": {
            "rows": int(len(y)),
            "positive_rate": round(float(y.mean()), 5),
            "score_dtype": str(score.dtype),
            "groups_present": n_present,
            "largest_group_rows": int(np.unique(groups, return_counts=True)[1].max()),
            "seed": args.seed,
        },
        "auc": {
            "mtrec_s": round(t_ours, 4),
            "sklearn_s": round(t_sk, 4),
            "speedup": round(t_sk / t_ours, 2),
            "target_speedup": AUC_TARGET,
            "meets_target": t_sk / t_ours >= AUC_TARGET,
            "abs_diff": abs(auc_ours - auc_sk),
            "agree_1e-9": abs(auc_ours - auc_sk) <= 1e-9,
            "mtrec_float64_scores_s": round(t_ours64, 4),
            "value": auc_ours,
            "value_float64_scores": auc_ours64,
            "repeats": args.repeats,
            "timing": "median",
        },
        "gauc": {
            "mtrec_s": round(t_gauc, 4),
            "mtrec_clicks_weighting_s": round(t_gauc_clicks, 4),
            "mtrec_with_sample_weight_s": round(t_gauc_w, 4),
            "pandas_sklearn_s": round(t_pandas, 2),
            "pandas_sklearn_extrapolated": extrapolated,
            "pandas_sklearn_note": (
                f"timed on {len(subset_ids)} random groups ({int(in_subset.sum())} rows, "
                f"{t_pandas_subset:.2f} s) and scaled linearly by group count to {n_present}"
                if extrapolated
                else "timed on all groups"
            ),
            "speedup": round(t_pandas / t_gauc, 1),
            "target_speedup": GAUC_TARGET,
            "meets_target": t_pandas / t_gauc >= GAUC_TARGET,
            "agreement_checked_on": "baseline subset" if extrapolated else "all groups",
            "abs_diff": gauc_diff,
            "agree_1e-9": gauc_diff <= 1e-9,
            "value": g_out["gauc"],
            "groups_used": g_out["groups_used"],
            "groups_skipped_one_class": g_out["groups_skipped_one_class"],
            "rows_used": g_out["rows_used"],
            "repeats": args.repeats,
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
