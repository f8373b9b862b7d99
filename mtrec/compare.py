"""Several models on the same data: one table, lift over a baseline, negative transfer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtrec.errors import MtrecError
from mtrec.evaluate import evaluate_model_dir

__all__ = ["compare_models", "format_comparison"]


def _headline(metrics: dict[str, Any]) -> tuple[str, float | None, bool]:
    """The metric compared per task, its value, and whether higher is better."""
    if "auc" in metrics:
        return "auc", metrics["auc"], True
    if "accuracy" in metrics:
        return "accuracy", metrics["accuracy"], True
    if "rmse" in metrics:
        return "rmse", metrics["rmse"], False
    return "auc", None, True


def compare_models(
    models: Sequence[str | Path], data: str, *, baseline: str | Path | None = None, group_by: str | None = None
) -> dict[str, Any]:
    """Evaluates ``models`` on ``data`` and compares each task with the baseline model.

    The baseline defaults to the first ``single_task`` model among ``models`` (the reference
    every multi-task result is judged against), else the first model. A task is flagged
    ``worse`` (negative transfer) where a model's headline metric (AUC, accuracy, or RMSE)
    is worse than the baseline's.
    """
    paths = [Path(m) for m in models]
    if baseline is not None and Path(baseline) not in paths:
        paths.insert(0, Path(baseline))
    results = {str(p): evaluate_model_dir(p, data, group_by=group_by) for p in paths}
    archs = {model: result["architecture"] for model, result in results.items()}
    if baseline is None:
        base = next((k for k, a in archs.items() if a == "single_task"), str(paths[0]))
    else:
        base = str(Path(baseline))
    base_tasks = results[base]["tasks"]
    table: dict[str, Any] = {}
    for model, result in results.items():
        rows = {}
        for task, metrics in result["tasks"].items():
            name, value, higher = _headline(metrics)
            entry: dict[str, Any] = {"metric": name, "value": value}
            if "gauc" in metrics:
                entry["gauc"] = metrics["gauc"]["gauc"]
            ref = base_tasks.get(task)
            ref_name, ref_value, _ = _headline(ref) if ref is not None else (None, None, True)
            # Lift only between the same metric: a task name may mean another task elsewhere.
            if model != base and value is not None and ref_value is not None and ref_name == name:
                diff = value - ref_value
                entry["lift"] = diff
                entry["lift_percent"] = 100.0 * diff / abs(ref_value) if ref_value else None
                entry["worse"] = diff < 0 if higher else diff > 0
            rows[task] = entry
        table[model] = {"architecture": archs[model], "tasks": rows}
    if not table:
        raise MtrecError("compare: no models given")
    return {"data": str(data), "baseline": base, "models": table}


def format_comparison(comparison: dict[str, Any]) -> str:
    """One row per model and task, lift over the baseline, and a negative-transfer mark."""
    has_gauc = any("gauc" in e for info in comparison["models"].values() for e in info["tasks"].values())
    single = comparison["models"][comparison["baseline"]]["architecture"] == "single_task"
    header = ["model", "arch", "task", "metric", "value", *(["gauc"] if has_gauc else []), "lift", "lift %", ""]
    rows = [header]
    for model, info in comparison["models"].items():
        for task, e in info["tasks"].items():
            value = "n/a" if e["value"] is None else f"{e['value']:.4f}"
            if model == comparison["baseline"]:
                lift, pct, mark = "baseline", "", ""
            elif "lift" in e:
                lift = f"{e['lift']:+.4f}"
                pct = "" if e["lift_percent"] is None else f"{e['lift_percent']:+.2f}"
                mark = ("worse (negative transfer)" if single else "worse") if e["worse"] else ""
            else:
                lift, pct, mark = "-", "", ""
            gauc = [] if not has_gauc else ["-" if e.get("gauc") is None else f"{e['gauc']:.4f}"]
            rows.append([Path(model).name, info["architecture"], task, e["metric"], value, *gauc, lift, pct, mark])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    worse = sum(1 for info in comparison["models"].values() for e in info["tasks"].values() if e.get("worse"))
    lines.append(f"baseline: {comparison['baseline']}; {worse} task result(s) below the baseline")
    return "\n".join(lines)
