"""STEM-Net (Su et al., "STEM: Unleashing the Power of Embeddings for Multi-task
Recommendation", AAAI 2024): shared and task-specific embeddings *and* experts, gated "all
forward, task-specific backward".

A shared table set feeds ``num_shared_experts`` shared experts; task ``t``'s own table set
feeds its ``num_task_experts`` experts. Task ``t``'s gate mixes every expert, the other
tasks' experts detached (:class:`~mtrec.nn.AFTBLayer`): a task's loss trains the shared
set and experts, its own set and experts, and nothing of another task's. So each task
keeps what the independent baseline has (its own tables and network on its own sample
space) and may add what the other tasks learnt, on their own rows, without pulling on it.

Unlike ``embedding: stem`` under another backbone (which runs that backbone once per
task), the network runs once: task experts read only their own table set.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.batch import Batch
from mtrec.models.base import DEFAULT_EMBEDDING, EmbeddingSpec, FeatureInput, MultiTaskModel
from mtrec.models.registry import register_model
from mtrec.nn.experts import AFTBLayer
from mtrec.schema import InputLayout

__all__ = ["StemInput", "stem_net"]


class StemInput(nn.Module):
    """The shared set's input ``(B, dim)`` (``None`` without one) and the per-task sets'
    inputs ``(T, B, task_dim)``, dense features in both."""

    def __init__(self, layout: InputLayout, spec: EmbeddingSpec, num_tasks: int, *, shared: bool) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.shared = FeatureInput(layout, spec.dim, dropout=spec.dropout, **spec.cross) if shared else None
        self.tasks = FeatureInput(layout, spec.per_task_dim, copies=num_tasks, dropout=spec.dropout, **spec.cross)
        self.shared_dim = self.shared.out_dim if self.shared is not None else 0
        self.task_dim = self.tasks.out_dim

    def forward(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor]:
        own = self.tasks(batch)
        if self.num_tasks == 1:
            own = own.unsqueeze(0)
        return (self.shared(batch) if self.shared is not None else None), own


@register_model(
    "stem_net",
    "STEM-Net: shared + per-task embeddings and experts, all-forward task-specific-backward gates (AAAI 2024)",
    fixed_embedding="it always has a shared table set and one per task, both embedding_dim wide",
)
def stem_net(
    layout: InputLayout,
    task_names: tuple[str, ...],
    *,
    embedding: EmbeddingSpec = DEFAULT_EMBEDDING,
    output_dims: tuple[int, ...] | None = None,
    num_shared_experts: int = 1,
    num_task_experts: int = 1,
    expert_hidden: tuple[int, ...] = (256, 128),
    tower_hidden: tuple[int, ...] = (64,),
    dropout: float = 0.0,
) -> MultiTaskModel:
    """Builds a STEM-Net model."""
    T = len(task_names)
    features = StemInput(layout, embedding, T, shared=num_shared_experts > 0)
    backbone = AFTBLayer(
        features.shared_dim,
        features.task_dim,
        num_tasks=T,
        num_shared=num_shared_experts,
        num_specific=num_task_experts,
        expert_hidden=expert_hidden,
        dropout=dropout,
    )
    return MultiTaskModel.assemble(
        layout,
        task_names,
        embedding=embedding,
        output_dims=output_dims,
        tower_hidden=tower_hidden,
        dropout=dropout,
        backbone=backbone,
        features=features,
    )
