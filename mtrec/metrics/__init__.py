"""Evaluation metrics: exact functional forms and streaming accumulators."""

from mtrec.metrics.functional import (
    accuracy,
    auc,
    calibration,
    log_loss,
    log_loss_from_logits,
    mae,
    multiclass_log_loss,
    normalized_entropy,
    positive_rate,
    pr_auc,
    pr_curve_points,
    rmse,
    roc_curve_points,
    sigmoid,
)
from mtrec.metrics.grouped import gauc
from mtrec.metrics.significance import bootstrap_gauc_paired, delong_paired
from mtrec.metrics.streaming import BinaryAccumulator, GroupedBinaryAccumulator, RegressionAccumulator

__all__ = [
    "BinaryAccumulator",
    "GroupedBinaryAccumulator",
    "RegressionAccumulator",
    "accuracy",
    "auc",
    "bootstrap_gauc_paired",
    "calibration",
    "delong_paired",
    "gauc",
    "log_loss",
    "log_loss_from_logits",
    "mae",
    "multiclass_log_loss",
    "normalized_entropy",
    "positive_rate",
    "pr_auc",
    "pr_curve_points",
    "rmse",
    "sigmoid",
    "roc_curve_points",
]
