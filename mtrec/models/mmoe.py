"""MMoE: Ma et al., "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018.

Experts shared by all tasks; each task mixes them with its own softmax gate.
"""

from __future__ import annotations

from torch import nn

from mtrec.models.registry import register_backbone
from mtrec.nn.experts import MMoELayer
from mtrec.nn.gates import SOFTMAX, GateSpec

__all__ = ["mmoe"]


@register_backbone("mmoe", "MMoE: shared experts, one gate per task (Ma et al., KDD 2018)", gated=True)
def mmoe(
    in_dim: int,
    num_tasks: int,
    *,
    num_experts: int = 4,
    expert_hidden: tuple[int, ...] = (256, 128),
    gate: GateSpec = SOFTMAX,
    expert_norm: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    """MMoE's backbone: ``num_experts`` MLP experts and one softmax gate per task.

    ``gate`` and ``expert_norm``: the gate keys (:func:`~mtrec.models.registry.gate_keys`).
    """
    return MMoELayer(
        in_dim,
        num_tasks=num_tasks,
        num_experts=num_experts,
        expert_hidden=expert_hidden,
        dropout=dropout,
        gate=gate,
        expert_norm=expert_norm,
    )
