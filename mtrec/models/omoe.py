"""OMoE: One-gate Mixture-of-Experts, the baseline of Ma et al., "Modeling Task
Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018.

Experts shared by all tasks, mixed by ONE softmax gate shared by all tasks: every task
tower reads the same mixture. MMoE differs only in having one gate per task.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.models.registry import register_backbone
from mtrec.nn.experts import ExpertGroup, Gate

__all__ = ["OMoELayer", "omoe"]


class OMoELayer(nn.Module):
    """Shared experts mixed by a single gate; the mixture is every task's representation.

    Shapes:
        ``(B, in_dim) -> (B, T, H)`` with ``out[:, t]`` identical for every ``t``; with
        ``return_gates`` also ``(B, T, E)`` (the one gate, repeated per task).

    Example:
        >>> OMoELayer(8, num_tasks=2, num_experts=3, expert_hidden=(4,))(torch.zeros(5, 8)).shape
        torch.Size([5, 2, 4])
    """

    def __init__(
        self, in_dim: int, *, num_tasks: int, num_experts: int, expert_hidden: tuple[int, ...], dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.experts = ExpertGroup(num_experts, in_dim, expert_hidden, dropout=dropout)
        self.gate = Gate(in_dim, num_experts, 1)
        self.out_dim = self.experts.out_dim

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The experts' output layer (shared by every task); nothing with a single task."""
        return [self.experts.weights[-1], self.experts.biases[-1]] if self.num_tasks > 1 else []

    def gate_report(
        self, x: torch.Tensor, task_names: tuple[str, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[list[int]]]:
        """For diagnostics: the one gate repeated per task ``(B, T, E)``, expert outputs
        ``(B, E, H)``, expert labels, and the experts each task's (shared) gate covers."""
        E = self.experts.num_experts
        gates = self.gate(x).expand(-1, self.num_tasks, -1)
        return gates, self.experts(x), [f"expert {e}" for e in range(E)], [list(range(E))] * self.num_tasks

    def forward(self, x: torch.Tensor, return_gates: bool = False):  # noqa: ANN201 - tensor or pair
        gate = self.gate(x)  # (B, 1, E)
        # The mixture is computed once and viewed T times; the towers' gradients add up in it.
        out = torch.bmm(gate, self.experts(x)).expand(-1, self.num_tasks, -1)
        return (out, gate.expand(-1, self.num_tasks, -1)) if return_gates else out


@register_backbone("omoe", "OMoE: shared experts mixed by one gate for all tasks (Ma et al., KDD 2018 baseline)")
def omoe(
    in_dim: int,
    num_tasks: int,
    *,
    num_experts: int = 4,
    expert_hidden: tuple[int, ...] = (256, 128),
    dropout: float = 0.0,
) -> nn.Module:
    """OMoE's backbone: ``num_experts`` MLP experts mixed by one gate that all tasks read."""
    return OMoELayer(in_dim, num_tasks=num_tasks, num_experts=num_experts, expert_hidden=expert_hidden, dropout=dropout)
