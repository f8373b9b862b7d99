"""Single-task baseline: one independent network per task.

The reference point every multi-task paper compares against (e.g. Ma et al., KDD 2018;
Tang et al., RecSys 2020): task ``t`` is predicted by its own MLP and tower, and no dense
parameter is shared between tasks.

The embedding tables stay shared through :class:`~mtrec.models.base.FeatureInput`. That is
the common practice for this baseline in the multi-task ranking literature, and it keeps
one model (one directory, one preprocessing state) for all tasks; the tasks are coupled only
through the embeddings' gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.models.base import MultiTaskModel
from mtrec.models.registry import register_model
from mtrec.nn.experts import ExpertGroup
from mtrec.schema import InputLayout

__all__ = ["SingleTaskModel", "TaskNetworks", "single_task"]


class TaskNetworks(nn.Module):
    """``T`` independent ReLU MLPs on the same input, one per task.

    Evaluated as one batched :class:`~mtrec.nn.ExpertGroup` whose expert ``t`` is task
    ``t``'s network.

    Shapes:
        ``(B, in_dim) -> (B, T, H)``; ``out[:, t]`` depends on network ``t`` only.

    Example:
        >>> TaskNetworks(8, num_tasks=2, hidden=(16, 4))(torch.zeros(3, 8)).shape
        torch.Size([3, 2, 4])
    """

    def __init__(self, in_dim: int, *, num_tasks: int, hidden: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        self.networks = ExpertGroup(num_tasks, in_dim, hidden, dropout=dropout)
        self.out_dim = self.networks.out_dim

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """Nothing: no dense layer is shared between tasks."""
        return []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.networks(x)


class SingleTaskModel(MultiTaskModel):
    """A :class:`MultiTaskModel` whose backbone shares nothing between tasks."""

    def shared_parameters(self) -> list[nn.Parameter]:
        """Nothing: every dense parameter belongs to one task (the embeddings are not counted)."""
        return []


@register_model("single_task", "Single-task baseline: an independent MLP and tower per task (shared embeddings)")
def single_task(
    layout: InputLayout,
    task_names: tuple[str, ...],
    *,
    embedding_dim: int = 16,
    output_dims: tuple[int, ...] | None = None,
    hidden: tuple[int, ...] = (256, 128),
    tower_hidden: tuple[int, ...] = (64,),
    dropout: float = 0.0,
) -> SingleTaskModel:
    """Builds one independent network per task over shared embeddings."""
    return SingleTaskModel.assemble(
        layout,
        task_names,
        embedding_dim=embedding_dim,
        output_dims=output_dims,
        tower_hidden=tower_hidden,
        dropout=dropout,
        backbone=lambda in_dim: TaskNetworks(in_dim, num_tasks=len(task_names), hidden=hidden, dropout=dropout),
    )
