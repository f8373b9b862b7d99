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
) -> np.ndarray:
    """Logits for every row, ``(N, T)`` float32 in ``task_names`` order, input row order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    out = np.empty((columns.num_rows, len(task_names)), dtype=np.float32)
    start = 0
    try:
        for batch in columns.iter_batches(batch_size):
            logits = model(batch.to(device, non_blocking=True))
            stop = start + len(batch)
            for j, name in enumerate(task_names):
                out[start:stop, j] = logits[name].float().cpu().numpy()
            start = stop
    finally:
        model.train(was_training)
    if start != columns.num_rows:
        raise AssertionError(f"predicted {start} of {columns.num_rows} rows")
    if not np.isfinite(out).all():
        from mtrec.errors import DataError

        raise DataError("the model produced non-finite predictions (check the inputs for extreme values)")
    return out


def compute_metrics(
    logits: np.ndarray, labels: np.ndarray, label_mask: np.ndarray, tasks: tuple[Task, ...]
) -> dict[str, dict[str, Any]]:
    """Exact metrics per task over the rows of its sample space.

    Binary tasks get ``auc`` (``None`` when the space holds one class only, with a
    ``note``), ``logloss``, ``count``, ``positives``, ``mean_pred`` and ``mean_label``;
    regression tasks ``rmse``, ``mae``, ``count``, ``mean_pred`` and ``mean_label``.
    """
    result: dict[str, dict[str, Any]] = {}
    for j, task in enumerate(tasks):
        m = label_mask[:, j]
        z = logits[m, j].astype(np.float64)
        y = labels[m, j].astype(np.float64)
        entry: dict[str, Any] = {"count": int(m.sum())}
        if entry["count"] == 0:
            entry["note"] = "no rows in the sample space"
            result[task.name] = entry
            continue
        if task.type == "binary":
            p = 1.0 / (1.0 + np.exp(-z))
            a = auc(y, z)
            entry.update(
                auc=None if math.isnan(a) else a,
                logloss=log_loss_from_logits(y, z),
                positives=int(y.sum()),
                mean_pred=float(p.mean()),
                mean_label=float(y.mean()),
            )
            if entry["auc"] is None:
                entry["note"] = "AUC undefined: only one class in the sample space"
        else:
            entry.update(rmse=rmse(y, z), mae=mae(y, z), mean_pred=float(z.mean()), mean_label=float(y.mean()))
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
    tasks = loaded.config.tasks
    logits = predict_logits(
        loaded.model,
        columns,
        tuple(t.name for t in tasks),
        batch_size=batch_size or loaded.config.train.eval_batch_size,
    )
    return {
        "model": str(model_dir),
        "data": str(data),
        "rows": enc.num_rows,
        "tasks": compute_metrics(logits, enc.labels, enc.label_mask, tasks),
    }
