"""Task towers that read the earlier tasks' towers: the dependency structure of DBMTL
(Ji et al., "Deep Bayesian Multi-Target Learning for Recommender Systems", 2019; Alibaba's
EasyRec ships it), on plain tensors.

In the declared task order, task ``t``'s relation layer reads its own tower's output and
the relation outputs of every task before it, so the network factorises the joint as
``p(y_1 | x) p(y_2 | y_1, x) p(y_3 | y_1, y_2, x) ...`` in its hidden states.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.nn.mlp import MLP

__all__ = ["RelationTowers"]


class RelationTowers(nn.Module):
    """Per-task towers then relation layers in ``order``.

    Args:
        in_dim: Width of each task's representation.
        order: The task positions in dependency order (a permutation of ``range(T)``).
        tower_hidden: Each task's tower (may be empty: the representation itself).
        relation_hidden: Each task's relation MLP (non-empty); its last width ``R`` is the
            output width.
        dropout: Dropout after each activation.

    Shapes:
        ``(B, T, in_dim) -> (B, T, R)``, in task position order (not dependency order).
    """

    def __init__(
        self,
        in_dim: int,
        *,
        order: tuple[int, ...],
        tower_hidden: tuple[int, ...],
        relation_hidden: tuple[int, ...],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if sorted(order) != list(range(len(order))):
            raise ValueError(f"order must be a permutation of the task positions, got {order}")
        if not relation_hidden:
            raise ValueError("relation_hidden needs at least one layer")
        self.order = tuple(order)
        self.towers = nn.ModuleList(MLP(in_dim, tower_hidden, dropout=dropout) for _ in order)
        width = tower_hidden[-1] if tower_hidden else in_dim
        self.out_dim = relation_hidden[-1]
        # relations[k] belongs to the k-th task in dependency order: it reads k earlier outputs.
        self.relations = nn.ModuleList(
            MLP(width + k * self.out_dim, relation_hidden, dropout=dropout) for k in range(len(order))
        )

    def ordered_parts(self) -> tuple[str, ...]:
        """The lists whose entries follow the task order (what a warm start carries over only to
        the same tasks in the same order)."""
        return ("towers", "relations")

    def forward(self, reps: torch.Tensor) -> torch.Tensor:
        done: list[torch.Tensor] = []
        out: list[torch.Tensor | None] = [None] * len(self.order)
        for k, t in enumerate(self.order):
            h = self.towers[t](reps[:, t])
            rel = self.relations[k](torch.cat([h, *done], dim=1) if done else h)
            done.append(rel)
            out[t] = rel
        return torch.stack([o for o in out if o is not None], dim=1)
