"""``mtrec evaluate``: a model directory's exact per-task metrics on Parquet data, each on its task's sample space."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from mtrec.data.batches import TensorColumns
from mtrec.predict import predict_logits
from mtrec.tasks import compute_metrics

if TYPE_CHECKING:
    from mtrec.schema import Task

__all__ = ["evaluate_model_dir"]


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
    masks and group keys are kept, never the encoded features (gate diagnostics: the first row group).

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
    from mtrec.data.parquet import iter_row_groups, resolve_paths
    from mtrec.diagnostics import gate_diagnostics
    from mtrec.errors import DataError
    from mtrec.model_dir import load_model_dir

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
    if loaded.calibration:
        result["calibrated"] = _calibrated_metrics(loaded.calibration, z_all, y_all, m_all, tasks, w_all)
    if group_by is not None:
        keys = np.concatenate(groups)
        _add_gauc(result["tasks"], tasks, z_all, y_all, m_all, w_all, keys, gauc_weighting)
        result["group_by"] = group_by
    if gates is not None:
        result["gates"] = gates
    if keep_predictions:
        result["predictions"] = {"logits": z_all, "labels": y_all, "mask": m_all, "tasks": tasks}
        result["predictions"].update(sample_weight=w_all, groups=keys if group_by is not None else None)
    return result


def _calibrated_metrics(
    calibration: dict[str, Any],
    z: dict[str, np.ndarray],
    y: np.ndarray,
    m: np.ndarray,
    tasks: tuple[Task, ...],
    w: np.ndarray | None,
) -> dict[str, Any]:
    """The calibrated tasks' metrics with the model's calibration applied (``tasks`` holds the raw ones)."""
    eps = 1e-7
    cal_z = dict(z)
    for name, calibrator in calibration.items():
        p = np.clip(calibrator.apply_logits(z[name]).astype(np.float64), eps, 1 - eps)
        cal_z[name] = (np.log(p) - np.log1p(-p)).astype(np.float32)
    metrics = compute_metrics(cal_z, y, m, tasks, w)
    return {name: metrics[name] for name in calibration}


def _add_gauc(
    metrics: dict[str, Any],
    tasks: Sequence[Task],
    logits: dict[str, np.ndarray],
    labels: np.ndarray,
    mask: np.ndarray,
    weights: np.ndarray | None,
    keys: np.ndarray,
    weighting: str,
) -> None:
    """Adds ``"gauc"`` to each ranking task's metrics, over that task's own sample space."""
    from mtrec.metrics import gauc

    for j, task in enumerate(tasks):
        m = mask[:, j]
        if not task.kind.ranks or not m.any():
            continue
        # dict[str, Any]: "gauc" may become None below
        g = metrics[task.name]["gauc"] = cast(
            "dict[str, Any]",
            gauc(
                labels[m, j],
                logits[task.name][m],
                keys[m],
                sample_weight=None if weights is None else weights[m, j],
                weighting=weighting,
            ),
        )
        if math.isnan(g["gauc"]):
            g["gauc"] = None  # JSON has no NaN; "groups_used": 0 says why


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
