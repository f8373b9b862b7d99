"""Cross-stitch units and a cross-stitch network of task columns, on plain tensors.

Misra, Shrivastava, Gupta and Hebert, "Cross-stitch Networks for Multi-task Learning",
CVPR 2016: every task has its own column; after each layer a learnable ``T x T`` matrix
``alpha`` replaces task ``t``'s activation by ``h'_t = sum_s alpha[t, s] h_s``.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.nn.mlp import batched_layers

__all__ = ["CrossStitch", "CrossStitchNetwork"]


class CrossStitch(nn.Module):
    """One cross-stitch unit: a learnable linear mix of the ``T`` task activations.

    ``alpha`` starts with ``self_weight`` on the diagonal and ``(1 - self_weight) / (T - 1)``
    elsewhere, so every row sums to 1: each task starts mostly as itself and the mix keeps
    the activations' scale (the paper found a strong diagonal, e.g. 0.9 / 0.1 for two
    tasks, to train best).

    Args:
        num_tasks: ``T`` (at least 2: with one task there is nothing to mix).
        self_weight: Initial diagonal value, in ``[0, 1]``.

    Shapes:
        ``(T, B, H) -> (T, B, H)``.

    Example:
        >>> unit = CrossStitch(2, self_weight=0.9)
        >>> unit(torch.ones(2, 3, 4)).shape
        torch.Size([2, 3, 4])
    """

    def __init__(self, num_tasks: int, *, self_weight: float = 0.9) -> None:
        super().__init__()
        if num_tasks < 2:
            raise ValueError(f"a cross-stitch unit mixes at least 2 tasks, got {num_tasks}")
        if not 0.0 <= self_weight <= 1.0:
            raise ValueError(f"self_weight must be in [0, 1], got {self_weight}")
        off = (1.0 - self_weight) / (num_tasks - 1)
        alpha = torch.full((num_tasks, num_tasks), off)
        alpha.fill_diagonal_(self_weight)
        self.alpha = nn.Parameter(alpha)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        T = h.shape[0]
        # One (T, T) x (T, B * H) matmul instead of an einsum, which would batch over B. In
        # fp32 even under autocast: its backward reduces over all B * H values, and the CPU
        # bf16 GEMM of torch 2.13 dies of SIGFPE on one thread once that reaches 2^19
        # (a batch of 2048 rows of 256 units); the mix is T^2 multiply-adds per value anyway.
        work = torch.promote_types(h.dtype, self.alpha.dtype)  # (float64 stays float64)
        with torch.autocast(h.device.type, enabled=False):
            mixed = torch.mm(self.alpha.to(work), h.reshape(T, -1).to(work))
        return mixed.view(h.shape).to(h.dtype)


class CrossStitchNetwork(nn.Module):
    """``T`` ReLU MLP columns of identical shape with a cross-stitch unit after every layer.

    All columns read the same input. Each layer of all columns is one batched product
    (a single GEMM for the shared first layer, ``baddbmm`` after), with weights stored as
    ``(T, in, out)`` so that no Python loop runs over tasks.

    Args:
        in_dim: Input width.
        num_tasks: ``T``; with one task the network is a plain MLP with no stitch units.
        hidden: Hidden widths of each column; the last is the output width ``H``.
        self_weight: Initial diagonal of every ``alpha`` (see :class:`CrossStitch`).
        dropout: Dropout after each activation, before the stitch.

    Shapes:
        ``(B, in_dim) -> (B, T, H)``.

    Example:
        >>> CrossStitchNetwork(8, num_tasks=3, hidden=(16, 4))(torch.zeros(5, 8)).shape
        torch.Size([5, 3, 4])
    """

    def __init__(
        self,
        in_dim: int,
        *,
        num_tasks: int,
        hidden: tuple[int, ...],
        self_weight: float = 0.9,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_tasks < 1 or not hidden:
            raise ValueError("a cross-stitch network needs num_tasks >= 1 and at least one hidden layer")
        self.num_tasks = num_tasks
        self.out_dim = hidden[-1]
        self.weights, self.biases = batched_layers(num_tasks, in_dim, hidden)
        self.stitches = nn.ModuleList(CrossStitch(num_tasks, self_weight=self_weight) for _ in hidden if num_tasks > 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last layer of every column (weights and biases): the input of the last stitch.

        Task ``t``'s output is ``sum_s alpha[t, s] h_s`` of that layer's activations, so every
        task's gradient reaches every column's last layer (through ``alpha[t, s] != 0``). The
        last ``alpha`` itself is not shared: its row ``t`` is reached by task ``t`` alone.
        Nothing with one task (no stitch units, no coupling).
        """
        return [self.weights[-1], self.biases[-1]] if len(self.stitches) else []

    def task_axes(self) -> dict[str, tuple[int, int]]:
        """Column ``t`` is block ``t`` of every stacked weight (``{name: (shared, per_task)}``;
        the ``alpha`` units mix all tasks, so they are not)."""
        return {f"{kind}.{i}": (0, 1) for kind in ("weights", "biases") for i in range(len(self.weights))}

    def ordered_parts(self) -> tuple[str, ...]:
        """The ``alpha`` units, indexed by task on both axes: carried over only to the same tasks
        in the same order."""
        return ("stitches",)

    def _stitch(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.stitches[i](h) if len(self.stitches) else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B = self.num_tasks, x.shape[0]
        w0, b0 = self.weights[0], self.biases[0]
        # Shared input: one (B, in) x (in, T * H0) GEMM for the first layer of every column.
        h = torch.addmm(b0.reshape(1, -1), x, w0.permute(1, 0, 2).reshape(x.shape[1], -1))
        h = h.view(B, T, -1).transpose(0, 1).contiguous()  # (T, B, H0)
        h = self._stitch(0, self.dropout(torch.relu(h)))
        for i, (w, b) in enumerate(zip(self.weights[1:], self.biases[1:], strict=True), start=1):
            h = self._stitch(i, self.dropout(torch.relu(torch.baddbmm(b, h, w))))
        return h.transpose(0, 1)  # (B, T, H)
