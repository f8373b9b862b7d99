"""Multi-layer perceptrons and prediction towers."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MLP", "Tower", "batched_layers", "batched_linear"]


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
            # Not in place: a representation-gradient weighting taps a Linear's output by a
            # forward hook (mtrec.training.step), which an in-place ReLU would overwrite.
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


def batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``G`` linear maps held as ``weight (G, in, out)`` and ``bias (G, 1, out)`` (as
    :func:`batched_layers` makes them): ``x (B, in)``, which every map reads (one GEMM), or
    ``(G, B, in)``, map ``g`` reading ``x[g]`` (one ``baddbmm``) ``-> (B, G, out)``.

    Example:
        >>> w, b = torch.ones(3, 4, 2), torch.zeros(3, 1, 2)
        >>> batched_linear(torch.ones(5, 4), w, b).shape, batched_linear(torch.ones(3, 5, 4), w, b).shape
        (torch.Size([5, 3, 2]), torch.Size([5, 3, 2]))
    """
    if x.dim() == 2:
        flat = weight.permute(1, 0, 2).reshape(x.shape[1], -1)
        return torch.addmm(bias.reshape(1, -1), x, flat).view(x.shape[0], weight.shape[0], -1)
    return torch.baddbmm(bias, x, weight).transpose(0, 1)
