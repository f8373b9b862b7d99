"""Prediction over encoded columns and exact per-task metrics on each task's sample space."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtrec.data.batches import TensorColumns
from mtrec.data.loading import encode_files
from mtrec.metrics import auc, log_loss_from_logits, mae, rmse
from mtrec.schema import Task

__all__ = ["compute_metrics", "evaluate_model_dir", "predict_logits", "summary_metric"]


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    columns: TensorColumns,
    task_names: tuple[str, ...],
    *,
    batch_size: int = 16384,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """Logits for every row in input row order: ``{task: (N,)}`` (``(N, C)`` for C classes), fp32."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in task_names}
    rows = 0
    try:
        for batch in columns.iter_batches(batch_size):
            logits = model(batch.to(device, non_blocking=True))
            for name in task_names:
                chunks[name].append(logits[name].float().cpu().numpy())
            rows += len(batch)
    finally:
        model.train(was_training)
    if rows != columns.num_rows:
        raise AssertionError(f"predicted {rows} of {columns.num_rows} rows")
    out = {name: np.concatenate(parts) if parts else np.zeros(0, np.float32) for name, parts in chunks.items()}
    if not all(np.isfinite(v).all() for v in out.values()):
        from mtrec.errors import DataError

        raise DataError("the model produced non-finite predictions (check the inputs for extreme values)")
    return out


def _binary(z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> dict[str, Any]:
    p = 1.0 / (1.0 + np.exp(-z))
    a = auc(y, z, sample_weight=w)
    entry: dict[str, Any] = {
        "auc": None if math.isnan(a) else a,
        "logloss": log_loss_from_logits(y, z, sample_weight=w),
        "positives": int(y.sum()),
        "mean_pred": float(np.average(p, weights=w)),
        "mean_label": float(np.average(y, weights=w)),
    }
    if entry["auc"] is None:
        entry["note"] = "AUC undefined: only one class in the sample space"
    return entry


def _multiclass(z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> dict[str, Any]:
    shifted = z - z.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    labels = y.astype(np.int64)
    nll = -log_probs[np.arange(len(labels)), labels]
    return {
        "accuracy": float(np.average(z.argmax(axis=1) == labels, weights=w)),
        "logloss": float(np.average(nll, weights=w)),
        "num_classes": int(z.shape[1]),
    }


def compute_metrics(
    logits: dict[str, np.ndarray],
    labels: np.ndarray,
    label_mask: np.ndarray,
    tasks: tuple[Task, ...],
    sample_weight: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Exact metrics per task over the rows of its sample space (sample-weighted if given).

    Binary tasks get ``auc`` (``None`` when the space holds one class only, with a
    ``note``), ``logloss``, ``count``, ``positives``, ``mean_pred`` and ``mean_label``;
    regression tasks ``rmse``, ``mae``, ``mean_pred`` and ``mean_label`` on the label's
    original scale (after undoing ``label_transform``); multiclass tasks ``accuracy``
    and ``logloss``.
    """
    result: dict[str, dict[str, Any]] = {}
    for j, task in enumerate(tasks):
        m = label_mask[:, j]
        z = logits[task.name][m].astype(np.float64)
        y = labels[m, j].astype(np.float64)
        w = None if sample_weight is None else sample_weight[m, j].astype(np.float64)
        entry: dict[str, Any] = {"count": int(m.sum())}
        if entry["count"] == 0 or (w is not None and w.sum() <= 0):
            entry["note"] = "no rows (or no weight) in the sample space"
        elif task.type == "binary":
            entry.update(_binary(z, y, w))
        elif task.type == "multiclass":
            entry.update(_multiclass(z, y, w))
        else:
            if task.label_transform == "log1p":
                z, y = np.expm1(z), np.expm1(y)
            entry.update(
                rmse=rmse(y, z, sample_weight=w),
                mae=mae(y, z, sample_weight=w),
                mean_pred=float(np.average(z, weights=w)),
                mean_label=float(np.average(y, weights=w)),
            )
        result[task.name] = entry
    return result


def summary_metric(metrics: dict[str, dict[str, Any]], monitor: str, loss: float | None = None) -> float | None:
    """The value of ``monitor`` (``mean_auc``, ``loss``, ``task.metric``); ``None`` if undefined."""
    if monitor == "loss":
        return loss
    if monitor == "mean_auc":
        values = [m["auc"] for m in metrics.values() if m.get("auc") is not None]
        return float(np.mean(values)) if values else None
    task, _, name = monitor.partition(".")
    return metrics.get(task, {}).get(name)


def evaluate_model_dir(model_dir: str | Path, data: str, *, batch_size: int | None = None) -> dict[str, Any]:
    """Evaluates a saved model on labelled Parquet data with its own preprocessing."""
    from mtrec.checkpoint import load_model_dir

    loaded = load_model_dir(model_dir)
    enc = encode_files(loaded.preprocessor, data)
    columns = TensorColumns.from_encoded(enc)
    tasks = loaded.config.schema.output_tasks
    logits = predict_logits(
        loaded.model,
        columns,
        tuple(t.name for t in tasks),
        batch_size=batch_size or loaded.config.train.eval_batch_size,
    )
    from mtrec.diagnostics import gate_diagnostics

    result = {
        "model": str(model_dir),
        "data": str(data),
        "rows": enc.num_rows,
        "tasks": compute_metrics(logits, enc.labels, enc.label_mask, tasks, enc.sample_weight),
    }
    gates = gate_diagnostics(loaded.model, columns, batch_size=batch_size or loaded.config.train.eval_batch_size)
    if gates is not None:
        result["gates"] = gates
    return result
