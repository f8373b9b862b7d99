"""DIN's target attention (Zhou et al., "Deep Interest Network for Click-Through Rate
Prediction", KDD 2018), on plain tensors.

The candidate item attends over the user's behaviour sequence: each past item ``e_j``
gets the weight ``w_j = a(e_j, t)`` of a small MLP (the paper's activation unit) on
``[e_j, t, e_j - t, e_j * t]``, and the pooled vector is ``sum_{j < length} w_j e_j``.
The weights are not normalised by a softmax, as in the paper: their sum keeps how strongly
the history matches the candidate, not only which items match it best.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.nn.mlp import batched_layers

__all__ = ["TargetAttention"]


class TargetAttention(nn.Module):
    """DIN pooling of ``(C * B, L, D)`` histories by a ``(C * B, D)`` target, masked by length.

    Args:
        dim: ``D``, the embedding width.
        hidden: Hidden widths of the activation unit (ReLU); its output is one weight.
        copies: Independent sets of weights; rows ``c * B .. (c + 1) * B`` use set ``c`` (one
            unit per task table set, sharing nothing).

    Example:
        >>> att = TargetAttention(4, hidden=(8,))
        >>> att(torch.randn(3, 5, 4), torch.randn(3, 4), torch.tensor([5, 2, 0])).shape
        torch.Size([3, 4])
    """

    def __init__(self, dim: int, *, hidden: tuple[int, ...] = (36,), copies: int = 1) -> None:
        super().__init__()
        if dim < 1 or copies < 1:
            raise ValueError(f"target attention needs dim and copies >= 1, got {dim}, {copies}")
        self.copies = copies
        self.weights, self.biases = batched_layers(copies, 4 * dim, (*hidden, 1))

    def task_axes(self) -> dict[str, tuple[int, int]]:
        """With one set per task (``copies > 1``): set ``t`` is block ``t`` of every weight."""
        if self.copies == 1:
            return {}
        names = [f"weights.{i}" for i in range(len(self.weights))] + [f"biases.{i}" for i in range(len(self.biases))]
        return dict.fromkeys(names, (0, 1))

    def scores(self, history: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(C * B, L)`` the weight of every history item (0 past each row's length)."""
        CB, L, D = history.shape
        t = target.unsqueeze(1).expand(-1, L, -1)
        h = torch.cat([history, t, history - t, history * t], dim=-1).reshape(self.copies, -1, 4 * D)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = torch.relu(h)
        positions = torch.arange(L, device=history.device)
        valid = positions.unsqueeze(0) < lengths.unsqueeze(1)
        return torch.where(valid, h.reshape(CB, L), 0.0)

    def forward(self, history: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self.scores(history, target, lengths).unsqueeze(1), history).squeeze(1)
