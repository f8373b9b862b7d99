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

from torch import nn

from mtrec.models.registry import register_backbone
from mtrec.nn.cross_stitch import CrossStitchNetwork

__all__ = ["cross_stitch"]


@register_backbone(
    "cross_stitch", "Cross-stitch: task MLP columns mixed by learnable T x T units (Misra et al., CVPR 2016)"
)
def cross_stitch(
    in_dim: int,
    num_tasks: int,
    *,
    hidden: tuple[int, ...] = (256, 128),
    stitch_self_weight: float = 0.9,
    dropout: float = 0.0,
) -> nn.Module:
    """Cross-stitch's backbone: one MLP column per task, mixed after every layer."""
    return CrossStitchNetwork(
        in_dim, num_tasks=num_tasks, hidden=hidden, self_weight=stitch_self_weight, dropout=dropout
    )
