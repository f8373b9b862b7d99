"""Per-task probability calibration (``train.calibration: platt | isotonic``).

Ranking formulas such as ``ctr * cvr ** a`` need probabilities that match the observed rates,
which a model trained on a re-weighted or re-sampled log (or with a balancing method) rarely
gives. After training, each binary task gets a monotone map from the model's probability to a
calibrated one, fitted on the validation split, on the task's own sample space:

* ``platt`` (Platt, 1999): ``p' = sigmoid(a z + b)`` on the logit ``z``, a one-feature logistic
  regression (scikit-learn);
* ``isotonic`` (Zadrozny & Elkan, KDD 2002): the non-decreasing step-linear map that fits the
  labels best in squared error (scikit-learn's isotonic regression, pool-adjacent-violators),
  applied by linear interpolation between its thresholds and clipped at the ends, its values
  kept within ``[1 / (n + 2), 1 - 1 / (n + 2)]`` for ``n`` fitted rows. On the rows it was fitted
  on, its mean prediction equals the label mean (exactly, unless that bound binds). It needs
  many positives: on a small validation split ``platt`` (two numbers) generalises better.

Both keep the order of the scores up to ties (isotonic pools neighbours into one value), so
AUC moves little. A calibrator is a few numbers, saved in the model directory as plain JSON
(:data:`mtrec.model_dir.CALIBRATION`) and read back with every field checked: nothing is
unpickled. ESMM's ``ctcvr`` is calibrated on its own labels (click x conversion, every row),
not as the product of the calibrated ``ctr`` and ``cvr``: the product of two calibrated
probabilities is not a calibrated probability of both unless the two are independent given
the score, so ``ctcvr`` then differs from ``ctr * cvr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtrec.errors import DataError, ModelError
from mtrec.metrics.functional import sigmoid

__all__ = ["METHODS", "Calibrator", "check_calibration_data", "fit_calibrator"]

METHODS = ("none", "platt", "isotonic")


@dataclass(frozen=True)
class Calibrator:
    """A fitted calibration of one binary task.

    Attributes:
        method: ``platt`` or ``isotonic``.
        a, b: Platt's slope and intercept on the logit.
        x, y: Isotonic thresholds: probabilities (increasing) and their calibrated values.
        rows: Validation rows it was fitted on.
    """

    method: str
    a: float = 1.0
    b: float = 0.0
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    rows: int = 0

    def apply_logits(self, z: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of the model's logits ``z`` (float32, same shape): Platt on the
        logit itself, exact where the float32 probability would have saturated."""
        z = np.asarray(z, dtype=np.float64)
        if self.method == "platt":
            return sigmoid(self.a * z + self.b).astype(np.float32)
        return np.interp(sigmoid(z), self.x, self.y).astype(np.float32)

    def apply(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of the model's probabilities ``p`` (float32, same shape)."""
        p = np.asarray(p, dtype=np.float64)
        if self.method == "platt":
            z = np.log(np.clip(p, 1e-12, 1.0)) - np.log(np.clip(1.0 - p, 1e-12, 1.0))
            out = sigmoid(self.a * z + self.b)
        else:
            out = np.interp(p, self.x, self.y)
        return out.astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        if self.method == "platt":
            return {"method": "platt", "a": self.a, "b": self.b, "rows": self.rows}
        return {"method": "isotonic", "x": list(self.x), "y": list(self.y), "rows": self.rows}

    @classmethod
    def from_json(cls, raw: Any, where: str) -> Calibrator:
        """Reads :meth:`to_json`'s output back; :class:`ModelError` naming ``where`` if it is not."""
        if not isinstance(raw, dict) or raw.get("method") not in ("platt", "isotonic"):
            raise ModelError(f"{where}: expected an object with method platt or isotonic")
        rows = raw.get("rows", 0)
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise ModelError(f"{where}.rows: expected an integer >= 0")
        if raw["method"] == "platt":
            a, b = raw.get("a"), raw.get("b")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (a, b)):
                raise ModelError(f"{where}: platt needs finite numbers a and b")
            return cls("platt", a=float(a), b=float(b), rows=rows)  # type: ignore[arg-type]
        x, y = raw.get("x"), raw.get("y")
        if not (isinstance(x, list) and isinstance(y, list) and len(x) == len(y) >= 1):
            raise ModelError(f"{where}: isotonic needs lists x and y of one length >= 1")
        try:
            xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        except (TypeError, ValueError):
            raise ModelError(f"{where}: isotonic x and y must be numbers") from None
        if xs.ndim != 1 or not (np.isfinite(xs).all() and np.isfinite(ys).all()):
            raise ModelError(f"{where}: isotonic x and y must be finite numbers")
        if (np.diff(xs) < 0).any() or (np.diff(ys) < 0).any() or ys.min() < 0 or ys.max() > 1:
            raise ModelError(f"{where}: isotonic x and y must be non-decreasing, y within [0, 1]")
        return cls("isotonic", x=tuple(xs.tolist()), y=tuple(ys.tolist()), rows=rows)


def check_calibration_data(task: str, labels: np.ndarray, where: str) -> None:
    """Raises :class:`DataError` unless ``labels`` (a task's validation sample space) has both classes."""
    n = int(labels.size)
    if n == 0:
        raise DataError(f"train.calibration: task {task!r} has no row in its sample space in {where}")
    positives = int((labels > 0.5).sum())
    if positives in (0, n):
        kind = "positive" if positives else "negative"
        raise DataError(
            f"train.calibration: task {task!r} has only {kind} labels in its {n} rows of {where}; "
            "a calibration needs both classes"
        )


def fit_calibrator(
    method: str, logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None, *, task: str = "task"
) -> Calibrator:
    """Fits ``method`` on one task's validation logits and 0/1 labels (its sample space)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    check_calibration_data(task, y, "the validation split")
    w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        # A large C: the plain maximum-likelihood fit of two numbers on many rows.
        lr = LogisticRegression(C=1e6, max_iter=1000).fit(z.reshape(-1, 1), y > 0.5, sample_weight=w)
        return Calibrator("platt", a=float(lr.coef_[0, 0]), b=float(lr.intercept_[0]), rows=int(y.size))
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        p = sigmoid(z)
        # Bounded away from 0 and 1 by 1 / (n + 2): a block of the fit with no positive (or no
        # negative) would otherwise say "never" (or "always"), an infinite log loss for the next row.
        eps = 1.0 / (y.size + 2)
        iso = IsotonicRegression(y_min=eps, y_max=1.0 - eps, increasing=True, out_of_bounds="clip")
        iso.fit(p, y, sample_weight=w)
        return Calibrator(
            "isotonic", x=tuple(iso.X_thresholds_.tolist()), y=tuple(iso.y_thresholds_.tolist()), rows=int(y.size)
        )
    raise ValueError(f"unknown calibration {method!r} (expected platt or isotonic)")
