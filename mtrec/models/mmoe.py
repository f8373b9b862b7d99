"""MMoE: Ma et al., "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018.

Experts shared by all tasks; each task mixes them with its own softmax gate.
"""

from __future__ import annotations

from mtrec.models.base import DEFAULT_EMBEDDING, EmbeddingSpec, MultiTaskModel
from mtrec.models.registry import register_model
from mtrec.nn.experts import MMoELayer
from mtrec.schema import InputLayout

__all__ = ["mmoe"]


@register_model("mmoe", "MMoE: shared experts, one softmax gate per task (Ma et al., KDD 2018)")
def mmoe(
    layout: InputLayout,
    task_names: tuple[str, ...],
    *,
    embedding: EmbeddingSpec = DEFAULT_EMBEDDING,
    output_dims: tuple[int, ...] | None = None,
    num_experts: int = 4,
    expert_hidden: tuple[int, ...] = (256, 128),
    tower_hidden: tuple[int, ...] = (64,),
    dropout: float = 0.0,
) -> MultiTaskModel:
    """Builds an MMoE multi-task model."""
    return MultiTaskModel.assemble(
        layout,
        task_names,
        embedding=embedding,
        output_dims=output_dims,
        tower_hidden=tower_hidden,
        dropout=dropout,
        backbone=lambda in_dim: MMoELayer(
            in_dim,
            num_tasks=len(task_names),
            num_experts=num_experts,
            expert_hidden=expert_hidden,
            dropout=dropout,
        ),
    )
