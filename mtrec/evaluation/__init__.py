"""Offline evaluation of model directories: exact per-task metrics (:func:`evaluate_model_dir`),
paired significance against a baseline (:func:`compare_models`) and the HTML report."""

from mtrec.evaluation.compare import compare_models, format_comparison
from mtrec.evaluation.evaluate import evaluate_model_dir

__all__ = ["compare_models", "evaluate_model_dir", "format_comparison"]
