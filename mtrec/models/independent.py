"""The single-task baseline: one independent model per task, trained in one run.

The reference every multi-task result is judged against (the "single-task" models of the
MMoE and PLE papers: Ma et al., KDD 2018; Tang et al., RecSys 2020): task ``t`` has its
own embedding tables, its own MLP and its own tower, and sees only its own loss, on its
own sample space (CVR on clicked rows). Nothing is shared, so no gradient crosses tasks.

The ``T`` table sets live in one fused table with per-task offsets (one lookup, sparse
Adam on the touched rows), and the ``T`` networks are one batched
:class:`~mtrec.nn.ExpertGroup` whose network ``t`` reads task ``t``'s embeddings. It costs
``T`` times the embedding memory of a shared model.
"""

from __future__ import annotations

from torch import nn

from mtrec.models.base import MultiTaskModel
from mtrec.models.registry import register_backbone
from mtrec.models.shared_embedding import TaskNetworks

__all__ = ["IndependentModel", "independent"]


class IndependentModel(MultiTaskModel):
    """A :class:`MultiTaskModel` that shares nothing: tables, networks and towers per task."""

    def shared_parameters(self) -> list[nn.Parameter]:
        """Nothing is shared between tasks."""
        return []


@register_backbone(
    "independent",
    "Single-task baseline: own embedding tables, MLP and tower per task (nothing shared)",
    fixed_embedding="it already has its own table set per task, read by that task's network alone",
    model=IndependentModel,
    table_set_per_task=True,
)
def independent(
    in_dim: int, num_tasks: int, *, hidden: tuple[int, ...] = (256, 128), dropout: float = 0.0
) -> nn.Module:
    """One MLP per task, each on its own task's table set."""
    return TaskNetworks(in_dim, num_tasks=num_tasks, hidden=hidden, dropout=dropout)
