"""Prediction over encoded columns and exact per-task metrics on each task's sample space."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtrec.data.batches import TensorColumns
from mtrec.metrics import auc, log_loss_from_logits, mae, pr_auc, rmse
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
    logloss = log_loss_from_logits(y, z, sample_weight=w)
    mean_pred, mean_label = float(np.average(p, weights=w)), float(np.average(y, weights=w))
    ap = pr_auc(y, z, sample_weight=w) if y.any() else float("nan")
    entropy = (
        -(mean_label * math.log(mean_label) + (1 - mean_label) * math.log(1 - mean_label))
        if 0 < mean_label < 1
        else 0.0
    )
    entry: dict[str, Any] = {
        "auc": None if math.isnan(a) else a,
        "logloss": logloss,
        "normalized_entropy": logloss / entropy if entropy > 0 else None,
        "pr_auc": None if math.isnan(ap) else ap,
        "calibration": mean_pred / mean_label if mean_label > 0 else None,
        "positives": int(y.sum()),
        "mean_pred": mean_pred,
        "mean_label": mean_label,
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
    ``note``), ``logloss``, ``normalized_entropy`` (log loss over the entropy of the base
    rate), ``pr_auc``, ``calibration`` (mean prediction / mean label), ``count``,
    ``positives``, ``mean_pred`` and ``mean_label``;
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


def evaluate_model_dir(
    model_dir: str | Path,
    data: str,
    *,
    batch_size: int | None = None,
    group_by: str | None = None,
    gauc_weighting: str = "impressions",
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """Evaluates a saved model on labelled Parquet data with its own preprocessing.

    The data is streamed row group by row group: only predictions, labels, sample-space
    masks and group keys are kept, never the encoded features. Gate diagnostics are
    computed on the first row group.

    Args:
        model_dir: A model directory written by training.
        data: Parquet file, folder or glob with the label columns.
        batch_size: Rows per prediction batch (default: the config's eval batch size).
        group_by: Column for group AUC (e.g. ``user_id``), computed per binary task.
        gauc_weighting: ``impressions`` or ``clicks``: how groups are weighted in GAUC.
        keep_predictions: Also return ``"predictions"`` (logits, labels, masks, tasks,
            ``sample_weight`` and the ``group_by`` keys ``groups``, or ``None``) for plots
            and paired tests.
    """
    from mtrec.checkpoint import load_model_dir
    from mtrec.data.parquet import iter_row_groups, resolve_paths
    from mtrec.diagnostics import gate_diagnostics
    from mtrec.errors import DataError
    from mtrec.metrics import gauc

    loaded = load_model_dir(model_dir)
    schema = loaded.config.schema
    tasks = schema.output_tasks
    names = tuple(t.name for t in tasks)
    batch_size = batch_size or loaded.config.train.eval_batch_size
    paths = resolve_paths(data)
    columns = list(dict.fromkeys([*schema.input_columns(), *schema.label_columns(), *([group_by] if group_by else [])]))
    logits: dict[str, list[np.ndarray]] = {n: [] for n in names}
    labels, masks, weights, groups = [], [], [], []
    gates = None
    if group_by is not None:
        _check_group_column(paths, group_by)
    for path, table in iter_row_groups(paths, columns):
        if table.num_rows == 0:
            continue
        enc = loaded.preprocessor.transform(table, source=str(path))
        cols = TensorColumns.from_encoded(enc)
        for name, z in predict_logits(loaded.model, cols, names, batch_size=batch_size).items():
            logits[name].append(z)
        labels.append(enc.labels)
        masks.append(enc.label_mask)
        if enc.sample_weight is not None:
            weights.append(enc.sample_weight)
        if group_by is not None:
            groups.append(table.column(group_by).to_numpy(zero_copy_only=False))
        if len(labels) == 1:  # the first non-empty row group
            gates = gate_diagnostics(loaded.model, cols, batch_size=batch_size)
    if not labels:
        raise DataError(f"{data}: no rows to evaluate")
    z_all = {n: np.concatenate(v) for n, v in logits.items()}
    y_all, m_all = np.concatenate(labels), np.concatenate(masks)
    w_all = np.concatenate(weights) if weights else None
    result: dict[str, Any] = {
        "model": str(model_dir),
        "architecture": loaded.config.model.name,
        "data": str(data),
        "rows": int(y_all.shape[0]),
        "tasks": compute_metrics(z_all, y_all, m_all, tasks, w_all),
    }
    if group_by is not None:
        keys = np.concatenate(groups)
        for j, task in enumerate(tasks):
            if task.type != "binary":
                continue
            m = m_all[:, j]
            if m.any():
                g = result["tasks"][task.name]["gauc"] = gauc(
                    y_all[m, j],
                    z_all[task.name][m],
                    keys[m],
                    sample_weight=None if w_all is None else w_all[m, j],
                    weighting=gauc_weighting,
                )
                if math.isnan(g["gauc"]):
                    g["gauc"] = None  # JSON has no NaN; "groups_used": 0 says why
        result["group_by"] = group_by
    if gates is not None:
        result["gates"] = gates
    if keep_predictions:
        result["predictions"] = {"logits": z_all, "labels": y_all, "mask": m_all, "tasks": tasks}
        result["predictions"].update(sample_weight=w_all, groups=keys if group_by is not None else None)
    return result


def _check_group_column(paths: list[Path], column: str) -> None:
    """A GAUC group column must be int, string or bool and free of nulls, in every file."""
    import pyarrow as pa

    from mtrec.data.parquet import open_parquet
    from mtrec.errors import DataError

    for path in paths:
        pf = open_parquet(path)
        if column not in pf.schema_arrow.names:
            raise DataError(f"{path}: missing column(s) {column!r}")
        t = pf.schema_arrow.field(column).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if not (
            pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t)
        ):
            raise DataError(f"{path}: group column {column!r} has type {t}, expected ints, strings or booleans")
        meta = pf.metadata
        col = pf.schema_arrow.names.index(column)
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(col).statistics
            if stats is None or not stats.has_null_count:
                if pf.read_row_group(i, columns=[column]).column(0).null_count:
                    raise DataError(f"{path}: group column {column!r} has nulls")
            elif stats.null_count:
                raise DataError(f"{path}: group column {column!r} has nulls")
