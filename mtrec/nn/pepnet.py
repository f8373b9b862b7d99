"""PEPNet's blocks (Chang et al., "PEPNet: Parameter and Embedding Personalized Network for
Infusing with Personalized Prior Information", KDD 2023), on plain tensors.

* :class:`GateNU`: the Gate Neural Unit, ``delta = gamma * sigmoid(relu(x W1 + b1) W2 + b2)``,
  a per-unit scale in ``(0, gamma)`` (``gamma = 2``: 1 where the second layer's output is 0,
  so a gate can damp or amplify what it scales).
* :class:`EPNet`: the Embedding Personalized Network, ``O_ep = delta_domain * E`` with
  ``delta_domain = GateNU(E_domain ⊕ stopgrad(E))``, one scale per column of the general
  input ``E``.
* :class:`PPNet`: the Parameter Personalized Network, one tower per task whose every layer's
  input is scaled by the task's own Gate NU on ``E_prior ⊕ stopgrad(O_ep)``.
* :class:`PEPNet`: EPNet, then PPNet on its output.

The stop-gradients are the paper's: a gate's input carries no gradient back into the
representation it scales (the gate learns from what it scales, it does not reshape it), while
the prior and domain vectors in a gate's input do receive gradient through the gate.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.nn.mlp import batched_layers, batched_linear

__all__ = ["EPNet", "GateNU", "PEPNet", "PPNet"]


class GateNU(nn.Module):
    """``copies`` Gate Neural Units reading one input, as one matrix product per layer.

    Args:
        in_dim: Input width.
        out_dim: Width of each gate's output (of what it scales).
        hidden: Width of each gate's ReLU layer.
        gamma: The scaling factor: outputs are in ``(0, gamma)`` (the paper's 2).
        copies: Independent gates (one per task in :class:`PPNet`).

    Shapes:
        ``(B, in_dim) -> (B, copies, out_dim)``.

    Example:
        >>> gate = GateNU(6, 4, hidden=8, copies=3)
        >>> delta = gate(torch.randn(5, 6))
        >>> tuple(delta.shape), bool(((delta > 0) & (delta < 2)).all())
        ((5, 3, 4), True)
    """

    def __init__(self, in_dim: int, out_dim: int, *, hidden: int = 64, gamma: float = 2.0, copies: int = 1) -> None:
        super().__init__()
        if min(in_dim, out_dim, hidden, copies) < 1 or not gamma > 0:
            raise ValueError(
                f"GateNU needs in_dim, out_dim, hidden, copies >= 1 and gamma > 0; "
                f"got {in_dim}, {out_dim}, {hidden}, {copies}, {gamma}"
            )
        self.in_dim, self.out_dim, self.copies, self.gamma = in_dim, out_dim, copies, float(gamma)
        # Layer 1 (C, in, hidden) and layer 2 (C, hidden, out), drawn as nn.Linear bounds them.
        self.weights, self.biases = batched_layers(copies, in_dim, (hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(batched_linear(x, self.weights[0], self.biases[0]))  # (B, C, hidden): one GEMM
        z = batched_linear(h.transpose(0, 1), self.weights[1], self.biases[1])  # (B, C, out)
        return self.gamma * torch.sigmoid(z)


class EPNet(nn.Module):
    """The Embedding Personalized Network: scales each column of the general input ``E`` by a
    Gate NU on the domain vectors and ``E`` itself, detached.

    Args:
        in_dim: Width of ``E`` (the gate's output width: one scale per column).
        domain_dim: Width of the domain vectors.
        hidden, gamma: The gate's (:class:`GateNU`).

    Shapes:
        ``e (B, in_dim)``, ``domain (B, domain_dim) -> (B, in_dim)``.

    Example:
        >>> EPNet(6, 4, hidden=8)(torch.randn(5, 6), torch.randn(5, 4)).shape
        torch.Size([5, 6])
    """

    def __init__(self, in_dim: int, domain_dim: int, *, hidden: int = 64, gamma: float = 2.0) -> None:
        super().__init__()
        self.gate = GateNU(domain_dim + in_dim, in_dim, hidden=hidden, gamma=gamma)
        self.out_dim = in_dim

    def forward(self, e: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        delta = self.gate(torch.cat([domain, e.detach()], dim=1)).squeeze(1)
        return delta * e


class PPNet(nn.Module):
    """The Parameter Personalized Network: one ReLU tower per task; the input of every layer of
    task ``t``'s tower is scaled element-wise by task ``t``'s own Gate NU on ``prior ⊕
    stopgrad(x)``:

        H^0 = x,  H^{l+1} = ReLU((delta_t^l * H^l) W_t^l + b_t^l),  output delta_t^L * H^L,

    so with ``L`` hidden layers each task has ``L + 1`` gates (the last scales what its linear
    head reads), each as wide as the layer input it scales.

    Args:
        in_dim: Width of ``x`` (EPNet's output).
        prior_dim: Width of the prior vectors.
        num_tasks: ``T``.
        hidden: Each tower's hidden widths (may be empty: one gate on ``x``).
        gate_hidden, gamma: The gates' (:class:`GateNU`).
        dropout: Dropout after each activation.

    Shapes:
        ``x (B, in_dim)``, ``prior (B, prior_dim) -> (B, T, out_dim)`` (``out_dim``: the last
        hidden width, or ``in_dim``).

    Example:
        >>> PPNet(6, 4, 3, hidden=(8, 5), gate_hidden=8)(torch.randn(2, 6), torch.randn(2, 4)).shape
        torch.Size([2, 3, 5])
    """

    def __init__(
        self,
        in_dim: int,
        prior_dim: int,
        num_tasks: int,
        *,
        hidden: tuple[int, ...],
        gate_hidden: int = 64,
        gamma: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        widths = (in_dim, *hidden)
        self.num_tasks = num_tasks
        # gates[l]: every task's gate on layer l's input, one GateNU with a copy per task.
        self.gates = nn.ModuleList(
            GateNU(prior_dim + in_dim, w, hidden=gate_hidden, gamma=gamma, copies=num_tasks) for w in widths
        )
        self.weights, self.biases = batched_layers(num_tasks, in_dim, tuple(hidden))  # (T, in, out) per layer
        self.drop = nn.Dropout(dropout)
        self.out_dim = widths[-1]

    def task_axes(self) -> dict[str, tuple[int, int]]:
        """Task ``t``'s tower and gates are block ``t`` of every stacked weight
        (``{name: (shared, per_task)}``)."""
        names = [f"{kind}.{i}" for kind in ("weights", "biases") for i in range(len(self.weights))]
        for layer in range(len(self.gates)):
            names += [
                f"gates.{layer}.{kind}.{i}" for kind in ("weights", "biases") for i in range(2)
            ]  # GateNU: 2 layers
        return dict.fromkeys(names, (0, 1))

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        gate_in = torch.cat([prior, x.detach()], dim=1)
        h = x.unsqueeze(0).expand(self.num_tasks, -1, -1)  # (T, B, in): task t's tower input
        for layer, gate in enumerate(self.gates):
            h = h * gate(gate_in).transpose(0, 1)  # (T, B, w): task t's own scale
            if layer < len(self.weights):
                h = self.drop(torch.relu(torch.baddbmm(self.biases[layer], h, self.weights[layer])))
        return h.transpose(0, 1)


class PEPNet(nn.Module):
    """:class:`EPNet` on the general input, then :class:`PPNet` on its output.

    Shapes:
        ``e (B, in_dim)``, ``domain (B, domain_dim)``, ``prior (B, prior_dim) -> (B, T, out_dim)``.

    Example:
        >>> net = PEPNet(EPNet(6, 4, hidden=8), PPNet(6, 2, 3, hidden=(5,), gate_hidden=8))
        >>> net(torch.randn(2, 6), torch.randn(2, 4), torch.randn(2, 2)).shape
        torch.Size([2, 3, 5])
    """

    def __init__(self, epnet: EPNet, ppnet: PPNet) -> None:
        super().__init__()
        self.epnet, self.ppnet = epnet, ppnet
        self.out_dim = ppnet.out_dim

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """EPNet's gate output layer: the one dense layer every task's loss reaches (the towers
        and their gates are per task)."""
        gate = self.epnet.gate
        return [gate.weights[-1], gate.biases[-1]]

    def forward(self, e: torch.Tensor, domain: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        return self.ppnet(self.epnet(e, domain), prior)
