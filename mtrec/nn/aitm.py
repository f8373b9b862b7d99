"""Adaptive Information Transfer Multi-task (AITM) blocks, on plain tensors.

Xi, Chen, Yan, He, Luo, Wang, Xu and Jiang, "Modeling the Sequential Dependence among
Audience Multi-step Conversions with Multi-task Learning in Targeted Display
Advertising", KDD 2021.

Tasks form a chain of conversion steps (impression -> click -> purchase ...). Every task
``t`` has its own tower giving ``q_t``. From the first task on, the information of task
``t - 1`` is transferred as ``p_{t-1} = g_{t-1}(z_{t-1})`` and merged with ``q_t`` by the
Adaptive Information Transfer (AIT) attention:

    z_t = sum_{u in {p_{t-1}, q_t}} w_u h_1(u),
    w_u = softmax_u(<h_2(u), h_3(u)> / sqrt(k)),

with ``z_0 = q_0``; task ``t`` is predicted from ``z_t``. The behavioural expectation
calibrator penalises a later step predicted more likely than the step before it.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from mtrec.nn.mlp import MLP

__all__ = ["AITMLayer", "AdaptiveInformationTransfer", "expectation_calibration"]


class AdaptiveInformationTransfer(nn.Module):
    """The AIT attention over the transferred vector ``p`` and the task's own ``q``.

    ``h_1`` (value), ``h_2`` and ``h_3`` are linear projections ``k -> k`` as in the
    paper's released code, computed together as one ``k -> 3k`` linear layer. Each vector's
    weight comes from the dot product of its own two projections (not from a query of one
    vector against the keys of the others) and the two weights are softmax-normalised.

    Args:
        dim: ``k``, the width of ``p`` and ``q``.

    Shapes:
        ``p (B, k), q (B, k) -> (B, k)``; with ``return_weights`` also ``(B, 2)`` (the
        weights of ``p`` and ``q``, summing to 1).

    Example:
        >>> AdaptiveInformationTransfer(4)(torch.zeros(3, 4), torch.ones(3, 4)).shape
        torch.Size([3, 4])
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(dim, 3 * dim)

    def forward(self, p: torch.Tensor, q: torch.Tensor, return_weights: bool = False):  # noqa: ANN201 - tensor or pair
        u = torch.stack([p, q], dim=1)  # (B, 2, k)
        h1, h2, h3 = self.proj(u).split(self.dim, dim=-1)
        weights = ((h2 * h3).sum(-1) / math.sqrt(self.dim)).softmax(dim=-1)  # (B, 2)
        z = (weights.unsqueeze(-1) * h1).sum(dim=1)
        return (z, weights) if return_weights else z


class AITMLayer(nn.Module):
    """Per-task towers chained by information transfer and AIT: ``(B, in) -> (B, T, k)``.

    Task ``t``'s representation depends on towers ``0..t`` only, never on a later task.

    Args:
        in_dim: Input width (the shared embeddings).
        num_tasks: ``T``, in chain order.
        tower_hidden: Hidden widths of each task tower; the last is ``k``.
        info_hidden: Hidden width of each transfer MLP ``g_t: k -> info_hidden -> k``.
        dropout: Dropout after each activation of towers and transfer MLPs.

    Shapes:
        ``(B, in_dim) -> (B, T, k)`` (``z_t`` for every task); with ``return_weights``
        also ``(B, T - 1, 2)``, the AIT weights of ``(p_{t-1}, q_t)`` for ``t >= 1``.

    Example:
        >>> AITMLayer(8, num_tasks=2, tower_hidden=(16, 4), info_hidden=4)(torch.zeros(5, 8)).shape
        torch.Size([5, 2, 4])
    """

    def __init__(
        self, in_dim: int, *, num_tasks: int, tower_hidden: tuple[int, ...], info_hidden: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if num_tasks < 1 or not tower_hidden or info_hidden < 1:
            raise ValueError("AITM needs num_tasks >= 1, at least one tower layer and info_hidden >= 1")
        self.num_tasks = num_tasks
        self.out_dim = tower_hidden[-1]
        # Separate modules rather than one batched group: a tower's parameters must be its
        # own tensors so that "shared by several tasks" can name tower 0 without tower T-1.
        self.towers = nn.ModuleList(MLP(in_dim, tower_hidden, dropout=dropout) for _ in range(num_tasks))
        # g_t for t < T - 1: the last task has no successor to transfer to.
        self.transfers = nn.ModuleList(
            MLP(self.out_dim, (info_hidden, self.out_dim), dropout=dropout) for _ in range(num_tasks - 1)
        )
        # attentions[t - 1] merges into task t, for t >= 1.
        self.attentions = nn.ModuleList(AdaptiveInformationTransfer(self.out_dim) for _ in range(num_tasks - 1))

    def ordered_parts(self) -> tuple[str, ...]:
        """The lists whose entries follow the task chain (what a warm start carries over only to
        the same tasks in the same order)."""
        return ("towers", "transfers", "attentions")

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters that reach more than one task: everything not on the last task's path only."""
        T = self.num_tasks
        if T == 1:
            return []
        modules = [*self.towers[: T - 1], *self.transfers, *self.attentions[: T - 2]]
        return [p for m in modules for p in m.parameters()]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last layer of task 0's tower, the one layer whose output every task reads."""
        if self.num_tasks == 1:
            return []
        last = [m for m in cast(MLP, self.towers[0]) if isinstance(m, nn.Linear)][-1]
        return list(last.parameters())

    def forward(self, x: torch.Tensor, return_weights: bool = False):  # noqa: ANN201 - tensor or pair
        z = self.towers[0](x)
        outputs = [z]
        weights = []
        for t in range(1, self.num_tasks):
            p = self.transfers[t - 1](z)
            z, w = self.attentions[t - 1](p, self.towers[t](x), return_weights=True)
            outputs.append(z)
            weights.append(w)
        out = torch.stack(outputs, dim=1)
        if not return_weights:
            return out
        w_all = torch.stack(weights, dim=1) if weights else x.new_zeros(x.shape[0], 0, 2)
        return out, w_all


def expectation_calibration(logits: torch.Tensor) -> torch.Tensor:
    """The behavioural expectation calibrator, ``mean_rows sum_{t>=1} relu(y_t - y_{t-1})``.

    ``y_t = sigmoid(logits[:, t])``. As in the paper's ``L_lc`` the penalties of the chain's
    steps are summed and averaged over rows; it is zero when the predicted probabilities
    never increase along the chain.

    Args:
        logits: ``(B, T)`` binary logits in chain order.

    Returns:
        A scalar (0 for ``T < 2``).

    Example:
        >>> float(expectation_calibration(torch.tensor([[0.0, 1.0]])))  # doctest: +ELLIPSIS
        0.231...
    """
    probs = torch.sigmoid(logits)
    return torch.relu(probs[:, 1:] - probs[:, :-1]).sum(dim=1).mean()
