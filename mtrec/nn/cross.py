"""DCN-v2 cross layers (Wang et al., "DCN V2: Improved Deep & Cross Network and Practical
Lessons for Web-scale Learning to Rank Systems", WWW 2021), on plain tensors.

Each layer crosses the input ``x_0`` with the running ``x_l`` feature-wise,

    x_{l+1} = x_0 * (W_l x_l + b_l) + x_l,

with a full ``d x d`` matrix ``W_l`` or its low-rank form ``U_l V_l^T`` (``d x r`` each,
the paper's cost-saving variant). Stacked before a network, ``L`` layers give explicit
feature crosses up to degree ``L + 1`` that the network's ReLU layers learn only
approximately.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CrossNetwork"]


class CrossNetwork(nn.Module):
    """``layers`` DCN-v2 cross layers over ``dim`` features, in ``copies`` independent sets.

    Args:
        dim: ``d``, the input (and output) width.
        layers: ``L >= 1``.
        rank: ``None`` for full ``d x d`` matrices, else the rank ``r`` of ``U V^T``.
        copies: Independent sets of weights; input ``(C, B, d)`` uses set ``c`` for ``x[c]``
            (one cross network per task table set, sharing nothing).

    Shapes:
        ``(B, d)`` (``copies == 1``) or ``(C, B, d)`` ``->`` the same shape.

    Example:
        >>> CrossNetwork(6, layers=2, rank=3)(torch.randn(4, 6)).shape
        torch.Size([4, 6])
    """

    def __init__(self, dim: int, *, layers: int, rank: int | None = None, copies: int = 1) -> None:
        super().__init__()
        if dim < 1 or layers < 1 or copies < 1 or (rank is not None and not 1 <= rank):
            raise ValueError(
                f"cross layers need dim, layers, copies >= 1 and rank >= 1; got {dim}, {layers}, {copies}, {rank}"
            )
        self.dim, self.layers, self.rank, self.copies = dim, layers, rank, copies
        shapes = [(dim, dim)] if rank is None else [(dim, rank), (rank, dim)]
        # Layer l's factors (C, in, out), applied as x @ w, drawn as nn.Linear bounds them.
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(copies, fan_in, out).uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in)))
            for _ in range(layers)
            for fan_in, out in shapes
        )
        bound = 1.0 / math.sqrt(dim if rank is None else rank)
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(copies, 1, dim).uniform_(-bound, bound)) for _ in range(layers)
        )

    def task_axes(self) -> dict[str, tuple[int, int]]:
        """With one set per task (``copies > 1``): set ``t`` is block ``t`` of every weight."""
        if self.copies == 1:
            return {}
        names = [f"weights.{i}" for i in range(len(self.weights))] + [f"biases.{i}" for i in range(len(self.biases))]
        return dict.fromkeys(names, (0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = x.dim() == 2
        x0 = x.unsqueeze(0) if single else x  # (C, B, d)
        h = x0
        per_layer = 1 if self.rank is None else 2
        for layer in range(self.layers):
            ws = self.weights[layer * per_layer : (layer + 1) * per_layer]
            z = torch.bmm(h, ws[0]) if per_layer == 1 else torch.bmm(torch.bmm(h, ws[0]), ws[1])
            h = x0 * (z + self.biases[layer]) + h
        return h.squeeze(0) if single else h
