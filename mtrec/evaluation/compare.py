"""Several models on the same data: one table, the difference to a baseline and whether it is significant.

Every model is evaluated on the same rows, each task on its own sample space; the AUC
difference to the baseline gets a 95 % interval and p-value from the paired DeLong test
(:func:`mtrec.metrics.delong_paired`), the GAUC difference (with ``group_by``) from a
paired bootstrap over groups (:func:`mtrec.metrics.bootstrap_gauc_paired`).  Negative or
positive transfer is claimed only where the interval excludes 0. With ``affinity``, each
model's task-affinity report (``affinity.json``, from ``train.affinity_every``) comes along.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtrec.errors import MtrecError
from mtrec.evaluation.evaluate import evaluate_model_dir
from mtrec.metrics import bootstrap_gauc_paired, delong_paired
from mtrec.model_dir import load_affinity
from mtrec.tables import format_affinity, text_table

__all__ = ["compare_models", "format_comparison"]

# Baselines in order of preference: a model without any sharing between tasks first.
_REFERENCE_ARCHS = (("independent",), ("shared_embedding", "single_task"))


def _none_if_nan(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _transfer(ci_low: float | None, ci_high: float | None, higher: bool = True) -> str:
    """``negative`` / ``positive`` only when the interval excludes 0, else ``none``."""
    if ci_low is None or ci_high is None:
        return "none"
    if ci_low > 0:
        return "positive" if higher else "negative"
    if ci_high < 0:
        return "negative" if higher else "positive"
    return "none"


def _check_same_tasks(base: str, ref: dict[str, Any], model: str, other: dict[str, Any]) -> None:
    """Refuse models with different task names or a task with another sample space or label."""
    ref_tasks = {t.name: t for t in ref["predictions"]["tasks"]}
    tasks = {t.name: t for t in other["predictions"]["tasks"]}
    if set(ref_tasks) != set(tasks):
        missing = sorted(set(ref_tasks) - set(tasks)) or sorted(set(tasks) - set(ref_tasks))
        where, holder = (model, base) if set(ref_tasks) - set(tasks) else (base, model)
        raise MtrecError(
            f"compare: {where} has no task {', '.join(map(repr, missing))} that {holder} has "
            f"({', '.join(sorted(ref_tasks))} vs {', '.join(sorted(tasks))}): compare models trained on the same tasks"
        )
    for name, t in ref_tasks.items():
        u = tasks[name]
        if t.where != u.where:
            raise MtrecError(
                f"compare: task {name!r} has another sample space in {model} (where: {u.where!r}) than in {base} "
                f"(where: {t.where!r}): the models were not evaluated on the same rows"
            )
        if (t.type, t.label, t.num_classes) != (u.type, u.label, u.num_classes):
            raise MtrecError(
                f"compare: task {name!r} is {u.type} on label {u.label!r} in {model} but {t.type} on label "
                f"{t.label!r} in {base}: not the same task"
            )


def _task_rows(result: dict[str, Any], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mask, labels on the mask, logits on the mask)`` of one task."""
    pred = result["predictions"]
    j = next(i for i, t in enumerate(pred["tasks"]) if t.name == name)
    mask = pred["mask"][:, j]
    return mask, pred["labels"][mask, j], pred["logits"][name][mask]


def _check_same_rows(base: str, ref: dict[str, Any], model: str, other: dict[str, Any]) -> None:
    """Refuse unless both models saw the same rows and, per task, the same sample space and labels."""
    if ref["rows"] != other["rows"]:
        raise MtrecError(f"compare: {model} was evaluated on {other['rows']} rows but {base} on {ref['rows']}")
    for t in ref["predictions"]["tasks"]:
        m_a, y_a, _ = _task_rows(ref, t.name)
        m_b, y_b, _ = _task_rows(other, t.name)
        if not np.array_equal(m_a, m_b) or not np.array_equal(y_a, y_b):
            raise MtrecError(
                f"compare: task {t.name!r} has other rows or labels in {model} than in {base}: "
                "the paired tests need the same rows for both models"
            )


def _untested(why: str, delta: float | None = None) -> dict[str, Any]:
    return {"delta": delta, "ci_low": None, "ci_high": None, "p_value": None, "transfer": "none", "why": why}


def _auc_test(task: Any, y: np.ndarray, z_a: np.ndarray, z_b: np.ndarray, lift: float | None) -> dict[str, Any]:
    """Paired DeLong test of one binary task, or why there is none."""
    if not task.kind.ranks:
        return _untested(f"no paired test for {task.type} tasks", lift)
    if task.sample_weight is not None:
        return _untested("sample-weighted task: the paired DeLong test is unweighted", lift)
    if len(y) == 0:
        return _untested("no rows in this task's sample space")
    pos = int(np.count_nonzero(y == 1))
    if pos == 0 or pos == len(y):
        return _untested("only one class on this task's rows")
    d = delong_paired(y, z_a, z_b)
    if math.isnan(d["se"]):
        return _untested("fewer than two rows of a class on this task's rows", d["delta"])
    ci_low, ci_high = d["ci_low"], d["ci_high"]
    return {
        "delta": d["delta"],
        "ci_low": ci_low,
        "ci_high": ci_high,
        "p_value": d["p_value"],
        "transfer": _transfer(ci_low, ci_high),
    }


def _gauc_test(
    task: Any,
    y: np.ndarray,
    z_a: np.ndarray,
    z_b: np.ndarray,
    keys: np.ndarray,
    *,
    resamples: int,
    seed: int,
    weighting: str,
) -> dict[str, Any]:
    """Paired bootstrap over groups of one binary task's GAUC, or why there is none."""
    if task.sample_weight is not None:
        return _untested("sample-weighted task: the paired bootstrap is unweighted")
    g = bootstrap_gauc_paired(y, z_a, z_b, keys, resamples=resamples, seed=seed, weighting=weighting)
    out: dict[str, Any] = {
        "delta": _none_if_nan(g["delta"]),
        "ci_low": _none_if_nan(g["ci_low"]),
        "ci_high": _none_if_nan(g["ci_high"]),
        "p_value": _none_if_nan(g["p_value"]),
        "groups_used": g["groups_used"],
        "resamples": resamples,
        "seed": seed,
    }
    out["transfer"] = _transfer(out["ci_low"], out["ci_high"])
    if out["p_value"] is None:
        out["why"] = "fewer than two groups with both classes" if g["groups_used"] else "no group with both classes"
    return out


def _default_baseline(archs: dict[str, str]) -> str:
    """The first ``independent`` model, else ``shared_embedding`` / ``single_task``, else the first."""
    for names in _REFERENCE_ARCHS:
        found = next((model for model, arch in archs.items() if arch in names), None)
        if found is not None:
            return found
    return next(iter(archs))


def _model_rows(
    ref: dict[str, Any], result: dict[str, Any], is_base: bool, *, bootstrap: int, seed: int, gauc_weighting: str
) -> dict[str, dict[str, Any]]:
    """One model's entry per task: its headline metric and, unless it is the baseline, the lift
    over the baseline ``ref`` and the paired tests of the difference."""
    base_tasks = ref["tasks"]
    specs = {t.name: t for t in ref["predictions"]["tasks"]}
    rows = {}
    for task, metrics in result["tasks"].items():
        name = specs[task].kind.headline  # the metric compared per task
        value = metrics.get(name)
        entry: dict[str, Any] = {"metric": name, "value": value}
        if "gauc" in metrics:
            entry["gauc"] = metrics["gauc"]["gauc"]
        ref_value = base_tasks[task].get(name)
        if not is_base:
            lift = None
            if value is not None and ref_value is not None:
                lift = value - ref_value
                entry["lift"] = lift
                entry["lift_percent"] = 100.0 * lift / abs(ref_value) if ref_value else None
            mask, y, z_a = _task_rows(ref, task)
            z_b = _task_rows(result, task)[2]
            entry.update(_auc_test(specs[task], y, z_a, z_b, lift))
            if "gauc" in metrics and "gauc" in base_tasks[task]:
                keys = ref["predictions"]["groups"][mask]
                entry["gauc_test"] = _gauc_test(
                    specs[task], y, z_a, z_b, keys, resamples=bootstrap, seed=seed, weighting=gauc_weighting
                )
        rows[task] = entry
    return rows


def compare_models(
    models: Sequence[str | Path],
    data: str,
    *,
    baseline: str | Path | None = None,
    group_by: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    gauc_weighting: str = "impressions",
    affinity: bool = False,
) -> dict[str, Any]:
    """Evaluates ``models`` on ``data`` and tests each task's difference to the baseline model.

    The baseline defaults to the first ``independent`` model among ``models`` (one tower
    per task and nothing shared: the reference multi-task learning must beat), else the
    first ``shared_embedding`` or ``single_task`` model, else the first model.

    Each model's entry per task holds the headline ``metric`` (AUC, accuracy or RMSE), its
    ``value``, ``lift`` and ``lift_percent`` over the baseline, and for binary tasks the
    paired DeLong test of the AUC difference on the task's own rows: ``delta``
    (``AUC - AUC_baseline``), the 95 % interval ``ci_low`` / ``ci_high``, ``p_value`` and
    ``transfer``: ``negative`` or ``positive`` only where the interval excludes 0, else
    ``none``.  Where no test is possible (one class on the task's rows, a regression or
    multiclass or sample-weighted task) the interval and ``p_value`` are ``None`` and
    ``why`` says why.  With ``group_by``, ``gauc_test`` holds the same keys for the GAUC
    difference from a paired bootstrap over groups (``bootstrap`` resamples, ``seed``).

    Args:
        models: Model directories.
        data: Labelled Parquet data, the same rows for every model.
        baseline: The model the others are compared with (added if not in ``models``).
        group_by: Group column for GAUC (e.g. ``user_id``).
        bootstrap: GAUC bootstrap resamples.
        seed: Seed of the GAUC bootstrap.
        gauc_weighting: ``impressions`` or ``clicks``: how groups are weighted in GAUC.
        affinity: Also give each model's ``affinity`` (its ``affinity.json``, ``None`` without one).

    Raises:
        MtrecError: On no models, models trained on different task names, a task with
            another sample space (``where``), label or type in two models, or data that
            does not give both models the same rows.
    """
    if bootstrap < 1:
        raise MtrecError(f"compare: --bootstrap must be >= 1, got {bootstrap}")
    if not 0 <= seed < 2**32:
        raise MtrecError(f"compare: --seed must be in [0, 2^32 - 1], got {seed}")
    paths = [Path(m) for m in models]
    if baseline is not None and Path(baseline) not in paths:
        paths.insert(0, Path(baseline))
    if not paths:
        raise MtrecError("compare: no models given")
    results: dict[str, dict[str, Any]] = {}
    for p in paths:
        result = evaluate_model_dir(p, data, group_by=group_by, gauc_weighting=gauc_weighting, keep_predictions=True)
        if results:  # refuse as soon as a model does not match the first one
            first = next(iter(results))
            _check_same_tasks(first, results[first], str(p), result)
            _check_same_rows(first, results[first], str(p), result)
        results[str(p)] = result
    archs = {model: result["architecture"] for model, result in results.items()}
    base = _default_baseline(archs) if baseline is None else str(Path(baseline))
    tests: dict[str, Any] = {"bootstrap": bootstrap, "seed": seed, "gauc_weighting": gauc_weighting}
    table = {
        model: {"architecture": archs[model], "tasks": _model_rows(results[base], result, model == base, **tests)}
        for model, result in results.items()
    }
    if affinity:
        for model in table:
            table[model]["affinity"] = load_affinity(model)
    return {
        "data": str(data),
        "baseline": base,
        "test": {
            "confidence": 0.95,
            "auc": "paired DeLong (Sun & Xu 2014 midranks)",
            **({"gauc": "paired bootstrap over groups", "group_by": group_by} if group_by else {}),
            **({"resamples": bootstrap, "seed": seed} if group_by else {}),
        },
        "models": table,
    }


def _ci(e: dict[str, Any]) -> str:
    if e.get("ci_low") is None:
        return "-"
    return f"[{e['ci_low']:+.4f}, {e['ci_high']:+.4f}]"


def _p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _word(e: dict[str, Any], reference: bool) -> str:
    if e.get("p_value") is None:
        return f"no test ({e['why']})" if e.get("why") else ""
    if e["transfer"] == "none":
        return "no significant difference"
    if reference:
        return f"{e['transfer']} transfer"
    return "significantly worse" if e["transfer"] == "negative" else "significantly better"


def format_comparison(comparison: dict[str, Any]) -> str:
    """One row per model, task and metric (AUC, and GAUC with ``group_by``): value, lift over
    the baseline, the paired difference with its 95 % interval and p-value, and the verdict."""
    base = comparison["baseline"]
    reference = any(comparison["models"][base]["architecture"] in names for names in _REFERENCE_ARCHS)
    header = ["model", "arch", "task", "metric", "value", "lift", "lift %", "delta", "95% CI", "p", ""]
    rows = [header]
    counts = {"negative": 0, "positive": 0, "none": 0}
    for model, info in comparison["models"].items():
        for task, e in info["tasks"].items():
            value = "n/a" if e["value"] is None else f"{e['value']:.4f}"
            tests = [(e["metric"], value, e)]
            if "gauc" in e:
                gvalue = "n/a" if e["gauc"] is None else f"{e['gauc']:.4f}"
                tests.append(("gauc", gvalue, e.get("gauc_test", {})))
            for metric, shown, t in tests:
                if model == base:
                    cells = ["baseline", "", "", "", "", ""]
                else:
                    delta = "-" if t.get("delta") is None else f"{t['delta']:+.4f}"
                    if metric == "gauc":
                        lift, pct = delta, ""
                    elif "lift" in e:
                        lift = f"{e['lift']:+.4f}"
                        pct = "" if e["lift_percent"] is None else f"{e['lift_percent']:+.2f}"
                    else:
                        lift, pct = "-", ""
                    cells = [lift, pct, delta, _ci(t), _p(t.get("p_value")), _word(t, reference)]
                    if t.get("p_value") is not None:
                        counts[t["transfer"]] += 1
                rows.append([Path(model).name, info["architecture"], task, metric, shown, *cells])
    lines = text_table(rows, align="left").split("\n")
    test = comparison.get("test", {})
    how = "paired DeLong for AUC"
    if "gauc" in test:
        how += f", paired bootstrap over {test['group_by']} groups for GAUC"
        how += f" ({test['resamples']} resamples, seed {test['seed']})"
    worse, better = "significantly worse", "significantly better"
    if reference:
        worse, better = "negative transfer", "positive transfer"
    lines.append(
        f"baseline: {base} ({comparison['models'][base]['architecture']}); 95% CI and p: {how}; "
        f"tested results: {counts['negative']} {worse}, {counts['positive']} {better}, "
        f"{counts['none']} with no significant difference"
    )
    return "\n".join(lines + _affinity_lines(comparison))


def _affinity_lines(comparison: dict[str, Any]) -> list[str]:
    """Each model's task affinity, where the comparison holds it (``compare --affinity``)."""
    lines = []
    for model, info in comparison["models"].items():
        if "affinity" not in info:
            continue
        doc = info["affinity"]
        shown = "no affinity.json (train with train.affinity_every: N)" if doc is None else format_affinity(doc)
        lines += ["", f"{Path(model).name} ({info['architecture']}): {shown}"]
    return lines
