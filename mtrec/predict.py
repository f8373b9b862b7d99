"""The one prediction loop: a model over encoded columns, in row order, batch by batch.

Training's validation, evaluation, diagnostics, export checks and :class:`mtrec.inference.Ranker`
all predict through :func:`predict_logits`. It sits beside :mod:`mtrec.batch`, below every
stage that needs it (training validates with it, so it cannot live in a stage above training).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from mtrec.data.batches import TensorColumns
from mtrec.errors import DataError

__all__ = ["predict_logits"]


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    columns: TensorColumns,
    task_names: tuple[str, ...],
    *,
    batch_size: int = 16384,
    device: torch.device | str = "cpu",
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    widths: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Outputs for every row in input row order: ``{task: (N,)}`` (``(N, C)`` for C classes), fp32.

    Logits, or ``transform(task, logits)`` of each batch when given (a ranker's probabilities).
    ``widths`` gives each task's output columns, so that 0 rows still give ``(0, C)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = columns.num_rows
    out: dict[str, np.ndarray] = {}
    if n == 0:
        for name in task_names:
            width = (widths or {}).get(name, 1)
            out[name] = np.zeros((0, width) if width > 1 else 0, np.float32)
        return out
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            logits = model(columns.slice(start, stop).to(device, non_blocking=True))
            for name in task_names:
                z = logits[name].float()
                z = transform(name, z) if transform is not None else z
                if name not in out:  # written straight into one result: no per-batch lists
                    out[name] = np.empty((n, *z.shape[1:]), np.float32)
                out[name][start:stop] = z.cpu().numpy()
    finally:
        model.train(was_training)
    for name, v in out.items():
        if not np.isfinite(v).all():
            raise DataError(f"the model produced non-finite {name} predictions (check the inputs for extreme values)")
    return out
