"""Per-task losses restricted to each task's sample space.

A task's loss is the (sample-weighted) mean over the rows of the batch inside its
sample space (for CVR: the clicked rows); rows outside contribute nothing, not even to
the denominator.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from mtrec.schema import Task

__all__ = ["multitask_loss", "task_losses"]


def _per_row(task: Task, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task.type == "binary":
        return F.binary_cross_entropy_with_logits(z, y, reduction="none")
    if task.type == "multiclass":
        # Labels outside the sample space are 0, a valid class, so the loss is defined there
        # and then masked out.
        return F.cross_entropy(z, y.long(), reduction="none")
    if task.loss == "huber":
        return F.huber_loss(z, y, reduction="none", delta=task.huber_delta)
    return (z - y).square()


def task_losses(
    logits: dict[str, torch.Tensor],
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    tasks: tuple[Task, ...],
    sample_weight: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Unweighted per-task losses, each the mean over the task's sample space.

    Args:
        logits: ``{task: (B,)}`` (``(B, N)`` for a multiclass task).
        labels: ``(B, T)`` labels in task order (class indices for multiclass).
        label_mask: ``(B, T)`` True where a row belongs to the task's sample space.
        tasks: Task specs in the column order of ``labels``.
        sample_weight: Optional ``(B, T)`` row weights.

    Returns:
        ``{task: scalar}``; a task with no row of its sample space in the batch gives 0.
    """
    out: dict[str, torch.Tensor] = {}
    for j, task in enumerate(tasks):
        z = logits[task.name].float()
        m = label_mask[:, j]
        w = m.to(z.dtype) if sample_weight is None else torch.where(m, sample_weight[:, j], 0.0)
        per_row = _per_row(task, z, labels[:, j])
        # where() rather than a product so that a non-finite value outside the sample
        # space cannot leak into the loss as nan * 0.
        out[task.name] = torch.where(m, per_row * w, 0.0).sum() / w.sum().clamp(min=1e-12)
    return out


def multitask_loss(
    logits: dict[str, torch.Tensor],
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    tasks: tuple[Task, ...],
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of the per-task losses times each task's ``weight``.

    Returns:
        The total loss and ``{task: loss}`` (detached).

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
    losses = task_losses(logits, labels, label_mask, tasks, sample_weight)
    total = labels.new_zeros(())
    for task in tasks:
        total = total + task.weight * losses[task.name]
    return total, {k: v.detach() for k, v in losses.items()}
