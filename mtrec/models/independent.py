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

from mtrec.models.base import DEFAULT_EMBEDDING, EmbeddingSpec, MultiTaskModel
from mtrec.models.registry import register_model
from mtrec.models.shared_embedding import TaskNetworks
from mtrec.schema import InputLayout

__all__ = ["IndependentModel", "independent"]


class IndependentModel(MultiTaskModel):
    """A :class:`MultiTaskModel` that shares nothing: tables, networks and towers per task."""

    def shared_parameters(self) -> list[nn.Parameter]:
        """Nothing is shared between tasks."""
        return []


@register_model(
    "independent",
    "Single-task baseline: own embedding tables, MLP and tower per task (nothing shared)",
    fixed_embedding="it already has its own table set per task, read by that task's network alone",
)
def independent(
    layout: InputLayout,
    task_names: tuple[str, ...],
    *,
    embedding: EmbeddingSpec = DEFAULT_EMBEDDING,
    output_dims: tuple[int, ...] | None = None,
    hidden: tuple[int, ...] = (256, 128),
    tower_hidden: tuple[int, ...] = (64,),
    dropout: float = 0.0,
) -> IndependentModel:
    """Builds one independent model per task (own tables, MLP and tower)."""
    return IndependentModel.assemble(
        layout,
        task_names,
        embedding=embedding,
        output_dims=output_dims,
        tower_hidden=tower_hidden,
        dropout=dropout,
        embedding_copies=len(task_names),
        backbone=lambda in_dim: TaskNetworks(in_dim, num_tasks=len(task_names), hidden=hidden, dropout=dropout),
    )
