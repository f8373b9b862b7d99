"""Per-task losses restricted to each task's sample space.

Rows outside a task's sample space (for CVR: the unclicked rows) contribute nothing to
its loss. How the sum over the task's rows is normalised is ``train.loss_normalization``:

* ``sample_space`` (the default): the (sample-weighted) mean over the task's rows, so a
  task on ~5 % of the rows (CVR on clicks) weighs as much as one on every row (CTR);
* ``impressions``: the (sample-weighted) sum over the task's rows divided by the number
  of rows in the batch (every impression), so a task weighs in proportion to the share of
  the batch in its sample space; with unit sample weights it equals the ``sample_space``
  loss times ``rows in the space / batch rows``.
"""

from __future__ import annotations

import torch

from mtrec.schema import Task

__all__ = ["LOSS_NORMALIZATIONS", "multitask_loss", "task_losses"]

LOSS_NORMALIZATIONS = ("sample_space", "impressions")


def task_losses(
    logits: dict[str, torch.Tensor],
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    tasks: tuple[Task, ...],
    sample_weight: torch.Tensor | None = None,
    normalization: str = "sample_space",
) -> dict[str, torch.Tensor]:
    """Unweighted per-task losses over each task's sample space.

    Args:
        logits: ``{task: (B,)}`` (``(B, N)`` for a multiclass task).
        labels: ``(B, T)`` labels in task order (class indices for multiclass).
        label_mask: ``(B, T)`` True where a row belongs to the task's sample space.
        tasks: Task specs in the column order of ``labels``.
        sample_weight: Optional ``(B, T)`` row weights.
        normalization: ``sample_space``: each task's loss is the (weighted) mean over its
            rows (sum of ``weight * loss`` over the rows in the space divided by the sum of
            their weights). ``impressions``: the same sum divided by ``B``, the rows of the
            batch (sample weights then count in absolute terms, not relative to each other).

    Returns:
        ``{task: scalar}``; a task with no row of its sample space in the batch gives 0.
    """
    if normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"normalization: expected one of {', '.join(LOSS_NORMALIZATIONS)}, got {normalization!r}")
    out: dict[str, torch.Tensor] = {}
    for j, task in enumerate(tasks):
        z = logits[task.name]
        z = z if z.dtype == torch.float64 else z.float()  # (float64: the task-affinity lookahead)
        m = label_mask[:, j]
        w = m.to(z.dtype) if sample_weight is None else torch.where(m, sample_weight[:, j], 0.0)
        per_row = task.kind.loss(task, z, labels[:, j])
        # where() rather than a product so that a non-finite value outside the sample
        # space cannot leak into the loss as nan * 0.
        total = torch.where(m, per_row * w, 0.0).sum()
        if normalization == "impressions":
            # A host int: no device read (the batch size is known), and under DDP the
            # trainer rescales it to the global batch (mtrec.training.distributed.global_mean_scale).
            out[task.name] = total / max(int(m.shape[0]), 1)
        else:
            out[task.name] = total / w.sum().clamp(min=1e-12)
    return out


def multitask_loss(
    logits: dict[str, torch.Tensor],
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    tasks: tuple[Task, ...],
    sample_weight: torch.Tensor | None = None,
    normalization: str = "sample_space",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of the per-task losses (see :func:`task_losses`) times each task's ``weight``.

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
    losses = task_losses(logits, labels, label_mask, tasks, sample_weight, normalization)
    total = labels.new_zeros(())
    for task in tasks:
        total = total + task.weight * losses[task.name]
    return total, {k: v.detach() for k, v in losses.items()}
