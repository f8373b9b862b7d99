"""PLE: Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
(MTL) Model for Personalized Recommendations", RecSys 2020.

``num_levels`` stacked CGC extraction layers with shared and task-specific experts; the
last level feeds the task gates only. ``num_levels=1`` is CGC.
"""

from __future__ import annotations

from mtrec.models.base import DEFAULT_EMBEDDING, EmbeddingSpec, MultiTaskModel
from mtrec.models.registry import register_model
from mtrec.nn.experts import PLE
from mtrec.schema import InputLayout

__all__ = ["ple"]


@register_model("ple", "PLE: stacked CGC levels of shared and task-specific experts (Tang et al., RecSys 2020)")
def ple(
    layout: InputLayout,
    task_names: tuple[str, ...],
    *,
    embedding: EmbeddingSpec = DEFAULT_EMBEDDING,
    output_dims: tuple[int, ...] | None = None,
    num_levels: int = 2,
    num_shared_experts: int = 2,
    num_task_experts: int = 1,
    expert_hidden: tuple[int, ...] = (256, 128),
    tower_hidden: tuple[int, ...] = (64,),
    dropout: float = 0.0,
) -> MultiTaskModel:
    """Builds a PLE multi-task model."""
    return MultiTaskModel.assemble(
        layout,
        task_names,
        embedding=embedding,
        output_dims=output_dims,
        tower_hidden=tower_hidden,
        dropout=dropout,
        backbone=lambda in_dim: PLE(
            in_dim,
            num_tasks=len(task_names),
            num_levels=num_levels,
            num_shared=num_shared_experts,
            num_specific=num_task_experts,
            expert_hidden=expert_hidden,
            dropout=dropout,
        ),
    )
