"""What the labels of a run look like before it trains: correlations between tasks."""

from __future__ import annotations

from typing import Any

import numpy as np

from mtrec.tables import format_matrix

__all__ = ["format_correlations", "label_correlations"]


def label_correlations(labels: np.ndarray, mask: np.ndarray, tasks: Any) -> dict[str, dict[str, float | None]]:
    """Pearson correlation of every pair of labels over the rows both tasks cover.

    It tells whether tasks are related enough to share (MMoE's advantage grows as they
    become less related). Multiclass labels are skipped; ``None`` where undefined.
    """
    names = [t.name for t in tasks if t.kind.scalar_label]
    cols = [j for j, t in enumerate(tasks) if t.kind.scalar_label]
    out: dict[str, dict[str, float | None]] = {}
    for a, ja in zip(names, cols, strict=True):
        out[a] = {}
        for b, jb in zip(names, cols, strict=True):
            both = mask[:, ja] & mask[:, jb]
            x, y = labels[both, ja].astype(np.float64), labels[both, jb].astype(np.float64)
            if both.sum() < 2 or x.std() == 0 or y.std() == 0:
                out[a][b] = None
            else:
                out[a][b] = float(np.corrcoef(x, y)[0, 1])
    return out


def format_correlations(corr: dict[str, dict[str, float | None]]) -> str:
    names = list(corr)
    rows = [[corr[a][b] for b in names] for a in names]
    return format_matrix("label correlation (rows both tasks cover):", names, rows)
