"""Shared-Bottom: hard parameter sharing (Caruana, "Multitask Learning", Machine Learning 1997).

One MLP shared by all tasks feeds every task tower.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.models.registry import register_backbone
from mtrec.nn.mlp import MLP

__all__ = ["SharedBottom", "shared_bottom"]


class SharedBottom(nn.Module):
    """``(B, in_dim) -> (B, T, H)``: one MLP whose output every task reads."""

    def __init__(self, in_dim: int, *, num_tasks: int, hidden: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden, dropout=dropout)
        self.num_tasks = num_tasks
        self.out_dim = self.mlp.out_dim

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last linear layer of the shared MLP."""
        linears = [m for m in self.mlp if isinstance(m, nn.Linear)]
        return list(linears[-1].parameters()) if linears else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).unsqueeze(1).expand(-1, self.num_tasks, -1)


@register_backbone("shared_bottom", "Shared-Bottom: one MLP shared by all task towers (hard sharing)")
def shared_bottom(
    in_dim: int, num_tasks: int, *, bottom_hidden: tuple[int, ...] = (256, 128), dropout: float = 0.0
) -> nn.Module:
    """Shared-Bottom's backbone: one MLP whose output every task tower reads."""
    return SharedBottom(in_dim, num_tasks=num_tasks, hidden=bottom_hidden, dropout=dropout)
