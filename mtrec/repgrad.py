"""How the representation-gradient balancing methods combine the tasks' gradients.

Each function takes the ``(n, n)`` Gram matrix ``A[t, s] = g_t . g_s`` of ``n`` task gradients
(those of the tasks present in the batch, each non-zero) and returns ``n`` coefficients ``a``:
the combined gradient is ``sum_t a_t g_t``. Working on the Gram matrix keeps every solver in
``n`` dimensions, whatever the size of the gradients (see :mod:`mtrec.weighting` for where
the gradients come from). Everything here is float64 NumPy on the host.

A combination whose coefficients are all ``1`` is the plain sum of the task gradients, what
``fixed`` weighting applies; the methods are scaled so that tasks whose gradients agree
(all equal) get exactly that, except where a method's own scale is its point (Nash-MTL
fixes ``||d||^2 = n``; Aligned-MTL scales by the smallest singular value).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = [
    "MAX_MIN_NORM_TASKS",
    "aligned_coefficients",
    "cagrad_coefficients",
    "min_norm_coefficients",
    "nash_coefficients",
]

MAX_MIN_NORM_TASKS = 12
"""The exact min-norm solver visits every face of the simplex: ``2 ** n - 1`` small solves."""


def _checked(gram: np.ndarray) -> np.ndarray:
    A = np.asarray(gram, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
        raise ValueError(f"expected a square Gram matrix, got shape {A.shape}")
    if not np.isfinite(A).all():
        raise ValueError("the Gram matrix of the task gradients is not finite")
    return (A + A.T) / 2


def min_norm_coefficients(gram: np.ndarray) -> np.ndarray:
    """The point of minimum norm in the convex hull of the gradients (MGDA; Sener & Koltun,
    NeurIPS 2018): ``alpha`` on the simplex minimising ``alpha^T A alpha``.

    Exact: the minimiser is the minimiser of the equality-constrained problem on some face
    of the simplex, so every face's KKT system is solved (least squares, for singular ``A``)
    and the best non-negative solution is kept.

    Raises:
        ValueError: More than :data:`MAX_MIN_NORM_TASKS` gradients.
    """
    A = _checked(gram)
    n = A.shape[0]
    if n > MAX_MIN_NORM_TASKS:
        raise ValueError(f"the min-norm solver takes at most {MAX_MIN_NORM_TASKS} tasks, got {n}")
    best, best_value = np.full(n, 1.0 / n), math.inf
    for size in range(1, n + 1):
        for face in itertools.combinations(range(n), size):
            idx = list(face)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = A[np.ix_(idx, idx)]
            kkt[:size, size] = 1.0
            kkt[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if (sol < -1e-12).any() or sol.sum() <= 0:
                continue
            alpha = np.zeros(n)
            alpha[idx] = np.clip(sol, 0.0, None)
            alpha /= alpha.sum()
            value = float(alpha @ A @ alpha)
            if value < best_value:
                best, best_value = alpha, value
    return best


def cagrad_coefficients(gram: np.ndarray, c: float) -> np.ndarray:
    """Conflict-averse gradient descent (Liu et al., NeurIPS 2021), times ``n / (1 + c)``.

    With ``g0`` the average gradient, CAGrad's direction maximises the worst task's
    improvement ``min_t g_t . d`` over the ball ``||d - g0|| <= c ||g0||``. Its dual is
    ``min_w  g_w . g0 + c ||g0|| ||g_w||`` over the simplex (``g_w = sum_t w_t g_t``, solved
    here with SciPy's SLSQP), and ``d = g0 + (c ||g0|| / ||g_w||) g_w``. The coefficients
    are those of ``n d / (1 + c)`` (the ``1 / (1 + c)`` rescaling of the paper's code, its
    ``rescale=2``; its default is ``1 / (1 + c^2)``), times ``n`` so that ``c = 0`` is the sum
    of the gradients, ``n`` times their average, exactly as ``fixed`` weighting.
    """
    if not (math.isfinite(c) and c >= 0):
        raise ValueError(f"cagrad: c must be >= 0, got {c}")
    A = _checked(gram)
    n = A.shape[0]
    u = np.full(n, 1.0 / n)
    g0_sq = float(u @ A @ u)
    if c == 0 or n == 1 or g0_sq <= 0:
        return np.ones(n)
    k = c * math.sqrt(g0_sq)
    b = A @ u

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        norm = math.sqrt(max(float(w @ A @ w), 1e-300))
        return float(w @ b) + k * norm, b + k * (A @ w) / norm

    from scipy.optimize import minimize  # (here: scipy.optimize costs ~0.5 s to import, and only CAGrad needs it)

    result = minimize(
        objective,
        u,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n,
        constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)},),
        options={"ftol": 1e-12, "maxiter": 200},
    )
    w = np.clip(result.x, 0.0, None)
    w /= w.sum()
    gw = math.sqrt(max(float(w @ A @ w), 0.0))
    a = u + (k / gw) * w if gw > 0 else u
    return n * a / (1.0 + c)


def nash_coefficients(gram: np.ndarray, *, max_iter: int = 50, tol: float = 1e-10) -> np.ndarray:
    """Nash-MTL (Navon et al., ICML 2022): ``alpha > 0`` with ``(A alpha)_t = 1 / alpha_t``.

    The Nash bargaining solution over the ball gives ``d = sum_t alpha_t g_t`` with
    ``g_t . d = 1 / alpha_t`` for every task, hence ``||d||^2 = n``, and it is invariant to
    each task's scale (a task whose loss is scaled by ``s`` gets ``alpha_t / s``). ``alpha``
    is the maximiser of the concave ``sum_t log (A beta)_t - beta^T A beta / 2``, whose
    stationary points satisfy ``A (1 / (A beta) - beta) = 0``; damped Newton steps from the
    min-norm point (at which every ``g_t . d > 0``, so the logarithms are defined) find it.
    Without such a point (the tasks are Pareto-stationary: ``0`` is in the convex hull)
    there is no direction that improves every task and the coefficients are ``0``. (The
    paper's code first divides the Gram matrix by its Frobenius norm, which rescales ``d``;
    here ``d`` is the bargaining solution of the gradients as they are.)
    """
    A = _checked(gram)
    n = A.shape[0]
    alpha = min_norm_coefficients(A)
    d_sq = float(alpha @ A @ alpha)
    scale = float(np.trace(A)) / n
    if d_sq <= 1e-12 * max(scale, 1e-300):
        return np.zeros(n)
    beta = alpha * math.sqrt(n / d_sq)  # the best multiple of the min-norm point

    def value(x: np.ndarray) -> float:
        Ax = A @ x
        return -math.inf if (Ax <= 0).any() else float(np.log(Ax).sum() - 0.5 * x @ Ax)

    current = value(beta)
    if not math.isfinite(current):  # rounding at a near-stationary min-norm point
        return np.zeros(n)
    for _ in range(max_iter):
        Ab = A @ beta
        grad = A @ (1.0 / Ab) - Ab
        hess = -(A * (1.0 / Ab**2)) @ A - A
        step = np.linalg.lstsq(hess - 1e-12 * scale * np.eye(n), -grad, rcond=None)[0]
        t = 1.0
        while t > 1e-8:
            candidate = beta + t * step
            cand_value = value(candidate)
            if cand_value >= current:
                break
            t /= 2
        else:
            break
        beta, gain, current = candidate, cand_value - current, cand_value
        if gain < tol:
            break
    return beta


def aligned_coefficients(gram: np.ndarray) -> np.ndarray:
    """Aligned-MTL (Senushkin et al., CVPR 2023): the coefficients of ``sum_t ghat_t`` where
    ``Ghat = B G`` has all its non-zero singular values equal to the smallest one of ``G``.

    With ``A = V diag(lambda) V^T`` (the positive eigenvalues only), ``B = sigma_min V
    diag(lambda^(-1/2)) V^T`` and ``sigma_min = sqrt(min lambda)``, so that ``Ghat Ghat^T =
    B A B = sigma_min^2 V V^T``: the aligned gradients are orthogonal with one norm (the
    condition number of the task gradient matrix becomes 1). The combination is
    ``1^T B G``, i.e. coefficients ``B 1``. Orthogonal gradients of one norm are left alone.
    """
    A = _checked(gram)
    n = A.shape[0]
    lam, V = np.linalg.eigh(A)
    tol = max(float(lam.max()), 0.0) * n * np.finfo(np.float64).eps
    keep = lam > tol
    if not keep.any():
        return np.zeros(n)
    lam, V = lam[keep], V[:, keep]
    B = math.sqrt(float(lam.min())) * (V / np.sqrt(lam)) @ V.T
    return B @ np.ones(n)
