"""CGC: Customized Gate Control, the single-level form of PLE (Tang et al., "Progressive
Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized
Recommendations", RecSys 2020).

Shared experts plus ``num_task_experts`` experts per task; task ``t``'s gate mixes its own
experts and the shared ones, so a task-specific expert only ever reaches its own task.
Identical to ``ple`` with ``num_levels=1`` (same parameters, same outputs for the same seed).
"""

from __future__ import annotations

from mtrec.models.base import DEFAULT_EMBEDDING, EmbeddingSpec, MultiTaskModel
from mtrec.models.registry import register_model
from mtrec.nn.experts import PLE
from mtrec.schema import InputLayout

__all__ = ["cgc"]


@register_model("cgc", "CGC: shared and task-specific experts, one extraction level (Tang et al., RecSys 2020)")
def cgc(
    layout: InputLayout,
    task_names: tuple[str, ...],
    *,
    embedding: EmbeddingSpec = DEFAULT_EMBEDDING,
    output_dims: tuple[int, ...] | None = None,
    num_shared_experts: int = 2,
    num_task_experts: int = 1,
    expert_hidden: tuple[int, ...] = (256, 128),
    tower_hidden: tuple[int, ...] = (64,),
    dropout: float = 0.0,
) -> MultiTaskModel:
    """Builds a CGC multi-task model (PLE with one level)."""
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
            num_levels=1,
            num_shared=num_shared_experts,
            num_specific=num_task_experts,
            expert_hidden=expert_hidden,
            dropout=dropout,
        ),
    )
