"""Task kinds: what being a ``binary``, ``regression`` or ``multiclass`` task means, in one place.

A :class:`TaskKind` owns everything that differs between kinds: the per-row loss, the inverse
link from logits to what a ranking pipeline consumes, the label check, the metric bundle on a
task's sample space, the headline metric and its direction, and the metrics a monitor may name.
Everything else asks ``task.kind`` (:attr:`mtrec.schema.Task.kind`) instead of comparing
``task.type`` with a string.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch.nn import functional as F

from mtrec.metrics.functional import auc, log_loss_from_logits, mae, pr_auc, rmse, sigmoid

__all__ = [
    "BINARY",
    "KINDS",
    "MULTICLASS",
    "REGRESSION",
    "TaskKind",
    "compute_metrics",
    "higher_is_better",
    "summary_metric",
]


class _TaskFields(Protocol):
    """The fields of :class:`mtrec.schema.Task` a kind reads (schema imports this module)."""

    @property
    def name(self) -> str: ...
    @property
    def num_classes(self) -> int | None: ...
    @property
    def loss(self) -> str: ...
    @property
    def huber_delta(self) -> float: ...
    @property
    def label_transform(self) -> str: ...


class TaskKind:
    """The behaviour of one kind of task; subclasses are the three kinds, one instance each."""

    name: ClassVar[str]
    #: The metric ``mtrec compare`` and the progress lines lead with.
    headline: ClassVar[str]
    #: Metrics a ``train.monitor`` of ``<task>.<metric>`` may name.
    monitorable: ClassVar[tuple[str, ...]]
    #: Whether a ranking metric (AUC, GAUC, ROC, DeLong) is defined for the task's scores.
    ranks: ClassVar[bool] = False
    #: Whether the label is one number whose mean and correlations mean something.
    scalar_label: ClassVar[bool] = True
    #: What the mean of the labels is called.
    label_mean: ClassVar[str] = "mean label"
    #: Whether ``num_classes`` is the kind's (else it must not be set).
    has_classes: ClassVar[bool] = False
    #: Whether ``loss: huber`` and ``label_transform`` are allowed (real-valued labels).
    real_valued: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"TaskKind({self.name!r})"

    def output_dim(self, task: _TaskFields) -> int:
        """Logits the task's tower produces."""
        return 1

    def output_columns(self, task: _TaskFields) -> list[str]:
        """The columns its predictions take in a table of scores."""
        return [task.name]

    def loss(self, task: _TaskFields, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-row loss of logits ``z`` against labels ``y`` (unreduced)."""
        raise NotImplementedError

    def inverse_link(self, task: _TaskFields, z: torch.Tensor) -> torch.Tensor:
        """Logits -> what a ranking pipeline consumes (probabilities or values)."""
        raise NotImplementedError

    def bad_labels(self, task: _TaskFields, ys: np.ndarray) -> tuple[np.ndarray, str]:
        """Mask of labels (of the sample space, as float64) the kind rejects, and what it expects."""
        raise NotImplementedError

    def metrics(self, task: _TaskFields, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> dict[str, Any]:
        """The kind's metric bundle over a sample space (float64 logits, labels, weights)."""
        raise NotImplementedError

    def short(self, m: dict[str, Any]) -> str | None:
        """The headline metric for a one-line summary (``auc 0.7213``); ``None`` if not computed."""
        if self.headline not in m:
            return None
        value, label = m[self.headline], {"accuracy": "acc"}.get(self.headline, self.headline)
        return f"{label} n/a" if value is None else f"{label} {value:.4f}"


class _Binary(TaskKind):
    name = "binary"
    headline = "auc"
    monitorable = ("auc", "logloss")
    ranks = True
    label_mean = "positive rate"

    def loss(self, task: _TaskFields, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(z, y, reduction="none")

    def inverse_link(self, task: _TaskFields, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(z)

    def bad_labels(self, task: _TaskFields, ys: np.ndarray) -> tuple[np.ndarray, str]:
        return ~((ys == 0) | (ys == 1)), "{0, 1}"

    def metrics(self, task: _TaskFields, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> dict[str, Any]:
        p = sigmoid(z)
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


class _Regression(TaskKind):
    name = "regression"
    headline = "rmse"
    monitorable = ("rmse", "mae")
    real_valued = True

    def loss(self, task: _TaskFields, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if task.loss == "huber":
            return F.huber_loss(z, y, reduction="none", delta=task.huber_delta)
        return (z - y).square()

    def inverse_link(self, task: _TaskFields, z: torch.Tensor) -> torch.Tensor:
        return torch.expm1(z) if task.label_transform == "log1p" else z

    def bad_labels(self, task: _TaskFields, ys: np.ndarray) -> tuple[np.ndarray, str]:
        # (non-finite labels are refused before, with their own message)
        bad = (ys < 0) if task.label_transform == "log1p" else np.zeros(ys.shape, dtype=bool)
        return bad, "numbers >= 0 (label_transform: log1p)"

    def metrics(self, task: _TaskFields, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> dict[str, Any]:
        if task.label_transform == "log1p":
            z, y = np.expm1(z), np.expm1(y)
        return {
            "rmse": rmse(y, z, sample_weight=w),
            "mae": mae(y, z, sample_weight=w),
            "mean_pred": float(np.average(z, weights=w)),
            "mean_label": float(np.average(y, weights=w)),
        }


class _Multiclass(TaskKind):
    name = "multiclass"
    headline = "accuracy"
    monitorable = ("accuracy", "logloss")
    scalar_label = False
    has_classes = True

    def output_dim(self, task: _TaskFields) -> int:
        return task.num_classes or 1

    def output_columns(self, task: _TaskFields) -> list[str]:
        return [f"{task.name}_c{k}" for k in range(self.output_dim(task))]

    def loss(self, task: _TaskFields, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Labels outside the sample space are 0, a valid class, so the loss is defined there
        # and then masked out.
        return F.cross_entropy(z, y.long(), reduction="none")

    def inverse_link(self, task: _TaskFields, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(z, dim=-1)

    def bad_labels(self, task: _TaskFields, ys: np.ndarray) -> tuple[np.ndarray, str]:
        bad = ~((ys >= 0) & (ys < (task.num_classes or 0)) & (ys == np.round(ys)))
        return bad, f"the classes [0, {task.num_classes})"

    def metrics(self, task: _TaskFields, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> dict[str, Any]:
        shifted = z - z.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        labels = y.astype(np.int64)
        nll = -log_probs[np.arange(len(labels)), labels]
        return {
            "accuracy": float(np.average(z.argmax(axis=1) == labels, weights=w)),
            "logloss": float(np.average(nll, weights=w)),
            "num_classes": int(z.shape[1]),
        }


BINARY, REGRESSION, MULTICLASS = _Binary(), _Regression(), _Multiclass()
KINDS: dict[str, TaskKind] = {k.name: k for k in (BINARY, REGRESSION, MULTICLASS)}


_HIGHER_IS_BETTER = ("auc", "accuracy", "pr_auc")


def higher_is_better(metric: str) -> bool:
    """Direction of a metric (``auc``, ``rmse``, ...) or a ``train.monitor`` value (``mean_auc``,
    ``loss``, ``<task>.<metric>``)."""
    return metric == "mean_auc" or metric.rpartition(".")[2] in _HIGHER_IS_BETTER


def compute_metrics(
    logits: dict[str, np.ndarray],
    labels: np.ndarray,
    label_mask: np.ndarray,
    tasks: Sequence[Any],
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
        else:
            entry.update(task.kind.metrics(task, z, y, w))
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
