"""Multi-layer perceptrons and prediction towers."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MLP", "Tower", "batched_layers"]


class MLP(nn.Sequential):
    """Linear -> ReLU (-> Dropout) blocks.

    Args:
        in_dim: Input width.
        hidden: Widths of the hidden layers; empty means identity.
        dropout: Dropout after each activation.

    Shapes:
        ``(B, in_dim) -> (B, hidden[-1])`` (or ``(B, in_dim)`` when ``hidden`` is empty).

    Example:
        >>> MLP(8, (16, 4))(torch.zeros(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (), *, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        super().__init__(*layers)
        self.out_dim = width


class Tower(nn.Module):
    """A task tower: an MLP followed by a linear output, returning logits.

    Shapes:
        ``(B, in_dim) -> (B,)`` with ``out_dim=1``, else ``(B, out_dim)`` (e.g. class logits).

    Example:
        >>> Tower(8, (4,))(torch.zeros(3, 8)).shape
        torch.Size([3])
        >>> Tower(8, (4,), out_dim=5)(torch.zeros(3, 8)).shape
        torch.Size([3, 5])
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (64,), *, out_dim: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden, dropout=dropout)
        self.out = nn.Linear(self.mlp.out_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.out(self.mlp(x))
        return out.squeeze(-1) if self.out_dim == 1 else out


def batched_layers(copies: int, in_dim: int, hidden: tuple[int, ...]) -> tuple[nn.ParameterList, nn.ParameterList]:
    """``copies`` stacks of linear layers ``in_dim -> hidden[0] -> ... -> hidden[-1]`` held as
    batched weights ``(copies, width, h)`` and biases ``(copies, 1, h)`` (for one ``bmm`` per
    layer instead of ``copies`` matmuls), drawn layer by layer from ``U(-1/sqrt(width),
    1/sqrt(width))`` as ``nn.Linear`` bounds them."""
    weights, biases = nn.ParameterList(), nn.ParameterList()
    width = in_dim
    for h in hidden:
        bound = 1.0 / math.sqrt(width)
        weights.append(nn.Parameter(torch.empty(copies, width, h).uniform_(-bound, bound)))
        biases.append(nn.Parameter(torch.empty(copies, 1, h).uniform_(-bound, bound)))
        width = h
    return weights, biases
