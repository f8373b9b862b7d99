"""Cross-stitch network: Misra, Shrivastava, Gupta and Hebert, "Cross-stitch Networks for
Multi-task Learning", CVPR 2016.

One MLP column per task; after each hidden layer a learnable ``T x T`` cross-stitch matrix
mixes the columns' activations, ``h'_t = sum_s alpha[t, s] h_s``, so the network learns how
much to share at every depth (identity = independent tasks, uniform = hard sharing).
``alpha`` starts at ``stitch_self_weight`` on the diagonal and ``(1 - stitch_self_weight) /
(T - 1)`` off it (the paper's 0.9 / 0.1 for two tasks). The paper also raised the
learning rate of ``alpha`` by 10^2-10^3; here it trains with the other dense parameters.
"""

from __future__ import annotations

from mtrec.models.base import DEFAULT_EMBEDDING, EmbeddingSpec, MultiTaskModel
from mtrec.models.registry import register_model
from mtrec.nn.cross_stitch import CrossStitchNetwork
from mtrec.schema import InputLayout

__all__ = ["cross_stitch"]


@register_model(
    "cross_stitch", "Cross-stitch: task MLP columns mixed by learnable T x T units (Misra et al., CVPR 2016)"
)
def cross_stitch(
    layout: InputLayout,
    task_names: tuple[str, ...],
    *,
    embedding: EmbeddingSpec = DEFAULT_EMBEDDING,
    output_dims: tuple[int, ...] | None = None,
    hidden: tuple[int, ...] = (256, 128),
    stitch_self_weight: float = 0.9,
    tower_hidden: tuple[int, ...] = (64,),
    dropout: float = 0.0,
) -> MultiTaskModel:
    """Builds a cross-stitch multi-task model."""
    return MultiTaskModel.assemble(
        layout,
        task_names,
        embedding=embedding,
        output_dims=output_dims,
        tower_hidden=tower_hidden,
        dropout=dropout,
        backbone=lambda in_dim: CrossStitchNetwork(
            in_dim,
            num_tasks=len(task_names),
            hidden=hidden,
            self_weight=stitch_self_weight,
            dropout=dropout,
        ),
    )
