"""Per-task losses restricted to each task's sample space.

A task's loss is the mean over the rows of the batch inside its sample space (for CVR:
the clicked rows); rows outside contribute nothing, not even to the denominator.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from mtrec.schema import Task

__all__ = ["multitask_loss"]


def multitask_loss(
    logits: dict[str, torch.Tensor],
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    tasks: tuple[Task, ...],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of masked per-task losses.

    Args:
        logits: ``{task: (B,)}`` model outputs.
        labels: ``(B, T)`` labels in task order.
        label_mask: ``(B, T)`` True where a row belongs to the task's sample space.
        tasks: Task specs in the column order of ``labels``.

    Returns:
        The total loss and ``{task: loss}`` (detached). A task with no row of its sample
        space in the batch contributes 0.

    Example:
        >>> from mtrec.schema import Task
        >>> tasks = (Task("ctr", label="click"), Task("cvr", label="conv", where="click == 1"))
        >>> logits = {"ctr": torch.zeros(2), "cvr": torch.tensor([0.0, 100.0])}
        >>> labels = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
        >>> mask = torch.tensor([[True, True], [True, False]])
        >>> total, parts = multitask_loss(logits, labels, mask, tasks)
        >>> round(parts["cvr"].item(), 4)  # the unclicked row's huge logit is ignored
        0.6931
    """
    total = labels.new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    for j, task in enumerate(tasks):
        z = logits[task.name].float()
        y = labels[:, j]
        m = label_mask[:, j]
        if task.type == "binary":
            per_row = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        else:
            per_row = (z - y).square()
        # where() rather than a product so that a non-finite value outside the sample
        # space cannot leak into the loss as nan * 0.
        loss = torch.where(m, per_row, 0.0).sum() / m.sum().clamp(min=1)
        parts[task.name] = loss.detach()
        total = total + task.weight * loss
    return total, parts
