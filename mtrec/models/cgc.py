"""CGC: Customized Gate Control, the single-level form of PLE (Tang et al., "Progressive
Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized
Recommendations", RecSys 2020).

Shared experts plus ``num_task_experts`` experts per task; task ``t``'s gate mixes its own
experts and the shared ones, so a task-specific expert only ever reaches its own task.
Identical to ``ple`` with ``num_levels=1`` (same parameters, same outputs for the same seed).
"""

from __future__ import annotations

from torch import nn

from mtrec.models.registry import register_backbone
from mtrec.nn.experts import PLE
from mtrec.nn.gates import SOFTMAX, GateSpec

__all__ = ["cgc"]


@register_backbone(
    "cgc", "CGC: shared and task-specific experts, one extraction level (Tang et al., RecSys 2020)", gated=True
)
def cgc(
    in_dim: int,
    num_tasks: int,
    *,
    num_shared_experts: int = 2,
    num_task_experts: int = 1,
    expert_hidden: tuple[int, ...] = (256, 128),
    gate: GateSpec = SOFTMAX,
    expert_norm: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    """CGC's backbone: PLE with one level.

    ``gate`` and ``expert_norm``: the gate keys (:func:`~mtrec.models.registry.gate_keys`).
    """
    return PLE(
        in_dim,
        num_tasks=num_tasks,
        num_levels=1,
        num_shared=num_shared_experts,
        num_specific=num_task_experts,
        expert_hidden=expert_hidden,
        dropout=dropout,
        gate=gate,
        expert_norm=expert_norm,
    )
