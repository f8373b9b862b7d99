"""AdaTT: Li et al., "AdaTT: Adaptive Task-to-Task Fusion Network for Multitask Learning in
Recommendations", KDD 2023 (the AdaTT-sp form: task-specific experts only).

Each task has its own experts; at every level, each task's fusion unit mixes all tasks'
experts with its own gate and adds a learned linear combination of its own experts (a
residual), so a task can draw on the others where that helps and keep its own where it
does not.
"""

from __future__ import annotations

from torch import nn

from mtrec.models.registry import register_backbone
from mtrec.nn.experts import AdaTT

__all__ = ["adatt"]


@register_backbone("adatt", "AdaTT: per-task fusion of all tasks' experts plus a residual to its own (KDD 2023)")
def adatt(
    in_dim: int,
    num_tasks: int,
    *,
    num_levels: int = 2,
    num_task_experts: int = 2,
    expert_hidden: tuple[int, ...] = (256, 128),
    dropout: float = 0.0,
) -> nn.Module:
    """AdaTT's backbone: ``num_levels`` fusion levels of ``num_task_experts`` experts per task."""
    return AdaTT(
        in_dim,
        num_tasks=num_tasks,
        num_levels=num_levels,
        num_specific=num_task_experts,
        expert_hidden=expert_hidden,
        dropout=dropout,
    )
