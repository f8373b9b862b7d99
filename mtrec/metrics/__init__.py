"""Evaluation metrics: exact functional forms and streaming accumulators."""

from mtrec.metrics.functional import (
    auc,
    log_loss,
    log_loss_from_logits,
    mae,
    positive_rate,
    rmse,
)
from mtrec.metrics.streaming import BinaryAccumulator, RegressionAccumulator

__all__ = [
    "BinaryAccumulator",
    "RegressionAccumulator",
    "auc",
    "log_loss",
    "log_loss_from_logits",
    "mae",
    "positive_rate",
    "rmse",
]
