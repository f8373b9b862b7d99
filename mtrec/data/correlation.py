"""Two regression tasks with a chosen task correlation (Ma et al., KDD 2018, section 4).

The synthetic study of the MMoE paper ("Modeling Task Relationships in Multi-task
Learning with Multi-gate Mixture-of-Experts") controls how related two tasks are with
one number, the cosine ``p`` between the tasks' weight vectors:

1. draw two orthogonal unit vectors ``u1, u2`` in ``R^d``;
2. ``w1 = c * u1`` and ``w2 = c * (p * u1 + sqrt(1 - p^2) * u2)``, so that
   ``cos(w1, w2) = p``;
3. draw ``alpha_j, beta_j`` (``j = 1..m``) once;
4. for every row ``x ~ N(0, I_d)`` and
   ``y_i = w_i^T x + sum_j sin(alpha_j * w_i^T x + beta_j) + eps_i``.

The Pearson correlation of ``y1`` and ``y2`` is not exactly ``p`` (the sinusoids are
non-linear) but it rises with ``p``, and at ``p = 1`` the two labels differ only by
noise. The paper gives neither the values of ``alpha_j, beta_j`` nor whether the noise
``N(0, 0.01)`` states a variance or a standard deviation. ``noise_std`` defaults to 0.1
(variance 0.01); ``sinusoids="normal"`` (the default) draws ``alpha_j, beta_j`` from
``N(0, 1)`` with the world's seed, which gives smooth labels, and ``"harmonic"`` uses
``alpha_j = j, beta_j = (j - 1)^2`` (the choice of Google Research's public generator for
this procedure), which gives labels oscillating up to ``m`` times faster and so much
harder to fit.

Like :mod:`mtrec.data.synthetic`, the generator has two layers: the *world*
(``u1, u2, alpha, beta``, see :func:`correlated_task_world`) depends only on ``seed``,
the *sample* (the rows ``x`` and the noise) on ``sample_seed`` (default ``seed``). So the
same ``seed`` at different correlations shares ``u1, u2, alpha, beta`` and, with the same
``sample_seed``, even the rows ``x``: only ``p`` changes. A test file of the same world is
drawn with another ``sample_seed``.

Example:
    >>> df = generate_correlated_tasks(1000, 0.5, seed=0)
    >>> df.shape, df.columns[:2], df.columns[-2:]
    ((1000, 102), ['x_000', 'x_001'], ['y1', 'y2'])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from mtrec.files import write_file

__all__ = ["CorrelatedTaskWorld", "correlated_task_world", "generate_correlated_tasks", "write_correlated_tasks"]

Sinusoids = Literal["normal", "harmonic"]

# Keys that separate the world's random stream from the rows' (see _rng).
_WORLD_STREAM = 0
_SAMPLE_STREAM = 1


@dataclass(frozen=True)
class CorrelatedTaskWorld:
    """The ground truth shared by every row: the task weights and the sinusoids.

    Attributes:
        correlation: The requested cosine ``p`` between ``w1`` and ``w2``.
        w1: ``(d,)`` weights of task 1, ``c * u1``.
        w2: ``(d,)`` weights of task 2, ``c * (p * u1 + sqrt(1 - p^2) * u2)``.
        alphas: ``(m,)`` frequencies of the sinusoids.
        betas: ``(m,)`` phases of the sinusoids.
    """

    correlation: float
    w1: np.ndarray
    w2: np.ndarray
    alphas: np.ndarray
    betas: np.ndarray

    def labels(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free labels ``(y1, y2)``, each ``(N,)``, of rows ``x`` ``(N, d)``."""
        out = []
        for w in (self.w1, self.w2):
            z = x @ w  # (N,)
            # (N, m) sinusoids summed over m; m is small, so the temporary is cheap.
            out.append(z + np.sin(np.multiply.outer(z, self.alphas) + self.betas).sum(axis=1))
        return out[0], out[1]


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _validate_world(
    correlation: float, seed: int, dim: int, num_sinusoids: int, scale: float, sinusoids: Sinusoids
) -> None:
    if not _is_real(correlation) or not -1.0 <= float(correlation) <= 1.0:
        raise ValueError(f"correlation must be a number in [-1, 1], got {correlation!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not _is_int(dim) or dim < 2:
        raise ValueError(f"dim must be an integer >= 2 (two orthogonal directions are needed), got {dim!r}")
    if not _is_int(num_sinusoids) or num_sinusoids < 0:
        raise ValueError(f"num_sinusoids must be an integer >= 0, got {num_sinusoids!r}")
    if not _is_real(scale) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if sinusoids not in ("normal", "harmonic"):
        raise ValueError(f"sinusoids must be 'normal' or 'harmonic', got {sinusoids!r}")


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def correlated_task_world(
    correlation: float,
    *,
    seed: int = 0,
    dim: int = 100,
    num_sinusoids: int = 10,
    scale: float = 1.0,
    sinusoids: Sinusoids = "normal",
) -> CorrelatedTaskWorld:
    """The task weights and sinusoid parameters for one ``seed`` and correlation.

    ``u1, u2, alpha, beta`` depend on ``seed`` only, so worlds of one seed at different
    correlations differ only in how ``w2`` mixes ``u1`` and ``u2``.

    Args:
        correlation: Cosine ``p`` of the two weight vectors, in ``[-1, 1]``.
        seed: Seed of the world, >= 0.
        dim: Input dimension ``d``, >= 2.
        num_sinusoids: Number ``m`` of sinusoids in each label, >= 0.
        scale: The factor ``c`` of both weight vectors, > 0.
        sinusoids: ``normal``: ``alpha_j, beta_j ~ N(0, 1)`` drawn with ``seed``;
            ``harmonic``: ``alpha_j = j``, ``beta_j = (j - 1)^2`` for ``j = 1..m``.

    Returns:
        The world; ``cos(w1, w2) == correlation`` up to rounding.

    Raises:
        ValueError: If an argument is out of range.
    """
    _validate_world(correlation, seed, dim, num_sinusoids, scale, sinusoids)
    p = float(correlation)
    rng = _rng(seed, _WORLD_STREAM)
    # Gram-Schmidt on two Gaussian vectors: a uniformly random orthonormal pair.
    u1 = rng.standard_normal(dim)
    u1 /= np.linalg.norm(u1)
    u2 = rng.standard_normal(dim)
    u2 -= (u2 @ u1) * u1
    u2 /= np.linalg.norm(u2)
    if sinusoids == "normal":
        alphas = rng.standard_normal(num_sinusoids)
        betas = rng.standard_normal(num_sinusoids)
    else:
        alphas = np.arange(1, num_sinusoids + 1, dtype=np.float64)
        betas = np.arange(num_sinusoids, dtype=np.float64) ** 2
    w1 = scale * u1
    w2 = scale * (p * u1 + math.sqrt(max(0.0, 1.0 - p * p)) * u2)
    return CorrelatedTaskWorld(correlation=p, w1=w1, w2=w2, alphas=alphas, betas=betas)


def generate_correlated_tasks(
    rows: int,
    correlation: float,
    *,
    seed: int = 0,
    sample_seed: int | None = None,
    dim: int = 100,
    num_sinusoids: int = 10,
    scale: float = 1.0,
    noise_std: float = 0.1,
    sinusoids: Sinusoids = "normal",
) -> pl.DataFrame:
    """Draws rows of the two-task regression problem of Ma et al. (KDD 2018).

    Args:
        rows: Number of rows, >= 1.
        correlation: Cosine ``p`` of the tasks' weight vectors, in ``[-1, 1]``.
        seed: Seed of the world (see :func:`correlated_task_world`) and, unless
            ``sample_seed`` is given, of the rows.
        sample_seed: Seed of the rows ``x`` and the label noise only: another value
            draws new rows (a test set) from the same world.
        dim: Input dimension ``d``, >= 2.
        num_sinusoids: Number ``m`` of sinusoids in each label, >= 0.
        scale: The factor ``c`` of both weight vectors, > 0.
        noise_std: Standard deviation of the label noise, >= 0.
        sinusoids: ``normal`` or ``harmonic`` (see :func:`correlated_task_world`).

    Returns:
        A frame with Float32 columns ``x_000 .. x_{d-1}`` (the inputs) and ``y1``,
        ``y2`` (the labels).

    Raises:
        ValueError: If an argument is out of range.
    """
    _validate_world(correlation, seed, dim, num_sinusoids, scale, sinusoids)
    if not _is_int(rows) or rows < 1:
        raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
    if sample_seed is not None and (not _is_int(sample_seed) or sample_seed < 0):
        raise ValueError(f"sample_seed must be None or a non-negative integer, got {sample_seed!r}")
    if not _is_real(noise_std) or not math.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    world = correlated_task_world(
        correlation, seed=seed, dim=dim, num_sinusoids=num_sinusoids, scale=scale, sinusoids=sinusoids
    )
    rng = _rng(seed if sample_seed is None else sample_seed, _SAMPLE_STREAM)
    x = rng.standard_normal((rows, dim))
    y1, y2 = world.labels(x)
    # Noise is drawn after x, task 1 then task 2, so x does not depend on noise_std.
    y1 = y1 + noise_std * rng.standard_normal(rows)
    y2 = y2 + noise_std * rng.standard_normal(rows)
    width = max(3, len(str(dim - 1)))
    columns = {f"x_{j:0{width}d}": x[:, j].astype(np.float32) for j in range(dim)}
    columns["y1"] = y1.astype(np.float32)
    columns["y2"] = y2.astype(np.float32)
    return pl.DataFrame(columns)


def write_correlated_tasks(
    path: str | Path,
    rows: int,
    correlation: float,
    *,
    seed: int = 0,
    sample_seed: int | None = None,
    dim: int = 100,
    num_sinusoids: int = 10,
    scale: float = 1.0,
    noise_std: float = 0.1,
    sinusoids: Sinusoids = "normal",
) -> Path:
    """Writes :func:`generate_correlated_tasks` to a Parquet file, atomically.

    The file is written to a temporary name in the destination directory and moved
    into place, so a reader never sees a partial file.

    Args:
        path: Destination Parquet path; its directory must exist.
        rows: Number of rows, >= 1.
        correlation: Cosine of the tasks' weight vectors, in ``[-1, 1]``.
        seed: Seed of the world and, unless ``sample_seed`` is given, of the rows.
        sample_seed: Seed of the rows and noise only.
        dim: Input dimension, >= 2.
        num_sinusoids: Sinusoids per label, >= 0.
        scale: Factor of both weight vectors, > 0.
        noise_std: Standard deviation of the label noise, >= 0.
        sinusoids: ``normal`` or ``harmonic`` (see :func:`correlated_task_world`).

    Returns:
        The path written.

    Raises:
        ValueError: If an argument is out of range.
    """
    df = generate_correlated_tasks(
        rows,
        correlation,
        seed=seed,
        sample_seed=sample_seed,
        dim=dim,
        num_sinusoids=num_sinusoids,
        scale=scale,
        noise_std=noise_std,
        sinusoids=sinusoids,
    )
    path = Path(path)
    write_file(path, lambda tmp: df.write_parquet(tmp))
    return path
