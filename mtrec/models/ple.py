"""PLE: Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
(MTL) Model for Personalized Recommendations", RecSys 2020.

``num_levels`` stacked CGC extraction layers with shared and task-specific experts; the
last level feeds the task gates only. ``num_levels=1`` is CGC.
"""

from __future__ import annotations

from torch import nn

from mtrec.models.registry import register_backbone
from mtrec.nn.experts import PLE
from mtrec.nn.gates import SOFTMAX, GateSpec

__all__ = ["ple"]


@register_backbone(
    "ple", "PLE: stacked CGC levels of shared and task-specific experts (Tang et al., RecSys 2020)", gated=True
)
def ple(
    in_dim: int,
    num_tasks: int,
    *,
    num_levels: int = 2,
    num_shared_experts: int = 2,
    num_task_experts: int = 1,
    expert_hidden: tuple[int, ...] = (256, 128),
    gate: GateSpec = SOFTMAX,
    expert_norm: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    """PLE's backbone: ``num_levels`` extraction levels of shared and task-specific experts.

    ``gate`` and ``expert_norm``: the gate keys (:func:`~mtrec.models.registry.gate_keys`).
    """
    return PLE(
        in_dim,
        num_tasks=num_tasks,
        num_levels=num_levels,
        num_shared=num_shared_experts,
        num_specific=num_task_experts,
        expert_hidden=expert_hidden,
        dropout=dropout,
        gate=gate,
        expert_norm=expert_norm,
    )
