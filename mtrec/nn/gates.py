"""Gates of mixture-of-experts layers, and the penalties that keep them healthy.

* :class:`Gate`: ``G`` softmax gates from one linear layer (MMoE, Ma et al., KDD 2018).
* :class:`DSelectKGate`: DSelect-k (Hazimeh et al., "DSelect-k: Differentiable Selection in
  the Mixture of Experts with Applications to Multi-Task Learning", NeurIPS 2021), a smooth
  gate that learns to select at most ``k`` experts: each of its ``k`` selectors maps
  ``m = ceil(log2 E)`` smooth-step bits to a distribution over the experts' binary codes,
  which becomes exactly one-hot once every bit leaves the smooth-step's transition band;
  the gate mixes the ``k`` selections with softmax weights. An entropy penalty on the
  selectors pushes them there.
* :func:`importance_cv2`: the squared coefficient of variation of the experts' importance
  (the summed gate weight each expert gets over a batch), the balancing loss of sparse
  mixture-of-experts layers (Shazeer et al., ICLR 2017), for dense gates that collapse onto
  one expert.

A penalty is training-time only: a layer records it in its :class:`Penalty` during a training
forward pass, and the model's ``auxiliary_loss`` takes it (see
:meth:`mtrec.models.base.MultiTaskModel.auxiliary_loss`); evaluation and exported graphs
compute none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mtrec.nn.mlp import batched_linear

__all__ = [
    "GATES",
    "DSelectKGate",
    "Gate",
    "GateSpec",
    "Penalty",
    "gate_blocks",
    "importance_cv2",
    "make_gate",
    "prefixed",
    "smooth_step",
    "take_penalties",
]

GATES = ("softmax", "dselect_k")


@dataclass(frozen=True)
class GateSpec:
    """How a mixture layer's gates are built (the ``model:`` keys ``gate``, ``gate_k``,
    ``gate_gamma``, ``gate_entropy`` and ``expert_balance`` of mmoe, cgc and ple).

    Args:
        kind: ``softmax`` or ``dselect_k``.
        k: DSelect-k's number of selectors (experts a gate ends up using), at most the
            experts the gate mixes.
        gamma: Width of DSelect-k's smooth-step transition band.
        entropy: Weight of DSelect-k's selector-entropy penalty (0: none).
        balance: Weight of the :func:`importance_cv2` load-balancing penalty (0: none).
    """

    kind: str = "softmax"
    k: int = 2
    gamma: float = 1.0
    entropy: float = 0.0
    balance: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, got {self.kind!r}")
        if self.k < 1 or not self.gamma > 0 or self.entropy < 0 or self.balance < 0:
            raise ValueError(
                f"gate_k must be >= 1, gate_gamma > 0, gate_entropy and expert_balance >= 0; got {self.k}, "
                f"{self.gamma}, {self.entropy}, {self.balance}"
            )
        if self.kind == "softmax" and self.entropy > 0:
            raise ValueError("gate_entropy is DSelect-k's selector penalty: it needs gate: dselect_k")


SOFTMAX = GateSpec()


class Penalty(nn.Module):
    """Holds the penalty of its layer's last training forward pass until the model takes it
    (no parameters, no state: a model directory holds none of it)."""

    def __init__(self) -> None:
        super().__init__()
        self._pending: torch.Tensor | None = None

    def record(self, value: torch.Tensor) -> None:
        """The penalty of this forward pass (replacing one from an earlier pass not taken)."""
        self._pending = value

    def take(self) -> torch.Tensor | None:
        """The penalty recorded since the last call (``None`` if none), then forgotten."""
        value, self._pending = self._pending, None
        return value


def take_penalties(module: nn.Module) -> torch.Tensor | None:
    """The sum of the penalties every :class:`Penalty` in ``module`` collected since it was last
    taken (``None`` if none did), each then forgotten."""
    total = None
    for m in module.modules():
        if isinstance(m, Penalty):
            value = m.take()
            if value is not None:
                total = value if total is None else total + value
    return total


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """DSelect-k's smooth step: 0 for ``t <= -gamma/2``, 1 for ``t >= gamma/2``, and the cubic
    ``-2 (t/gamma)^3 + 1.5 t/gamma + 0.5`` between (continuous, with a continuous first
    derivative, so it reaches exactly 0 and 1 and its gradient vanishes there).

    Example:
        >>> smooth_step(torch.tensor([-1.0, 0.0, 0.25, 1.0]), 1.0).tolist()
        [0.0, 0.5, 0.84375, 1.0]
    """
    x = (t / gamma).clamp(-0.5, 0.5)
    return x * (1.5 - 2.0 * x * x) + 0.5


def importance_cv2(gates: torch.Tensor) -> torch.Tensor:
    """``(G,)`` squared coefficient of variation over experts of each gate's importance
    ``sum over rows of gates[:, g, e]``, for gates ``(B, G, E)``: 0 when every expert gets the
    same total weight, ``E - 1`` when one expert gets all of it.

    Example:
        >>> importance_cv2(torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])).tolist()
        [0.0, 1.0]
    """
    importance = gates.sum(0)  # (G, E)
    mean = importance.mean(-1)
    return importance.var(-1, unbiased=False) / (mean * mean).clamp_min(1e-12)


class Gate(nn.Module):
    """``G`` softmax gates over ``E`` experts computed by one linear layer.

    Shapes:
        ``(B, in_dim) -> (B, G, E)``, each row summing to 1.
    """

    def __init__(self, in_dim: int, num_experts: int, num_gates: int = 1) -> None:
        super().__init__()
        self.num_gates = num_gates
        self.num_experts = num_experts
        self.linear = nn.Linear(in_dim, num_gates * num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).view(-1, self.num_gates, self.num_experts).softmax(dim=-1)


class DSelectKGate(nn.Module):
    """``G`` per-example DSelect-k gates over ``E`` experts (Hazimeh et al., NeurIPS 2021).

    Gate ``g`` has ``k`` selectors; selector ``i`` reads ``m = max(1, ceil(log2 E))`` logits
    ``z`` and puts weight ``prod_l (S(z_l) if bit l of j else 1 - S(z_l))`` on binary code
    ``j`` (:func:`smooth_step` ``S``), a distribution over the ``2^m`` codes; code ``j`` is
    expert ``j mod E`` (when ``E`` is not a power of two some experts have two codes, so that
    no code leads nowhere and every selector's weights sum to 1). ``k`` more logits mix the
    selectors by softmax. A selector whose bits have all left the band ``|z| < gamma/2``
    picks one code exactly, so a trained gate puts non-zero weight on at most ``k`` experts.
    All the gates' logits come from one linear layer (one GEMM), or one per gate when each
    gate has its own input.

    With ``entropy > 0``, each training forward records ``entropy`` times the mean (over rows)
    of the selectors' summed entropies in :attr:`penalty`.

    Shapes:
        ``x (B, in_dim)`` (every gate reads it) or ``(G, B, in_dim)`` (gate ``g`` reads
        ``x[g]``) ``-> (B, G, E)``, each row summing to 1.

    Example:
        >>> gate = DSelectKGate(8, num_experts=5, num_gates=2, k=2)
        >>> w = gate(torch.randn(4, 8))
        >>> w.shape, bool(torch.allclose(w.sum(-1), torch.ones(4, 2)))
        (torch.Size([4, 2, 5]), True)
    """

    # Buffers: bit l of code j (2^m, m), and which expert code j is (2^m, E) one-hot.
    codes: torch.Tensor
    owner: torch.Tensor

    def __init__(
        self, in_dim: int, *, num_experts: int, num_gates: int, k: int, gamma: float = 1.0, entropy: float = 0.0
    ) -> None:
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"dselect_k needs 1 <= k <= the experts the gate mixes ({num_experts}), got k={k}")
        m = max(1, math.ceil(math.log2(num_experts)))
        self.num_gates, self.num_experts, self.k, self.bits = num_gates, num_experts, k, m
        self.gamma, self.entropy = gamma, entropy
        codes = torch.arange(2**m).view(-1, 1)
        self.register_buffer("codes", ((codes >> torch.arange(m).view(1, -1)) & 1).bool(), persistent=False)
        owner = nn.functional.one_hot(codes.view(-1) % num_experts, num_experts).float()
        self.register_buffer("owner", owner, persistent=False)
        # Per gate: k * m selector logits, then k mixing logits. The selector logits start deep
        # inside the smooth-step band (|z| << gamma / 2, every code about equally likely): a
        # bit that starts saturated has no gradient and would never be learnt.
        bound = 1.0 / math.sqrt(in_dim)
        scale = torch.cat([torch.full((k * m,), _START * gamma), torch.ones(k)])
        self.weight = nn.Parameter(torch.empty(num_gates, in_dim, k * (m + 1)).uniform_(-bound, bound) * scale)
        self.bias = nn.Parameter(torch.empty(num_gates, 1, k * (m + 1)).uniform_(-bound, bound) * scale)
        self.penalty = Penalty()

    def selectors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixing weights ``(B, G, k)`` and selector distributions ``(B, G, k, E)``."""
        G, k, m = self.num_gates, self.k, self.bits
        raw = batched_linear(x, self.weight, self.bias)  # (B, G, k * (m + 1))
        B = raw.shape[0]
        s = smooth_step(raw[..., : k * m].reshape(B, G, k, 1, m), self.gamma)
        chosen = torch.where(self.codes, s, 1.0 - s).prod(-1)  # (B, G, k, 2^m) over the codes
        if self.num_experts != 2**m:
            chosen = chosen @ self.owner  # (B, G, k, E) over the experts
        return raw[..., k * m :].softmax(-1), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix, chosen = self.selectors(x)
        if self.training and self.entropy > 0:
            h = -(chosen * chosen.clamp_min(1e-12).log()).sum(-1)  # (B, G, k)
            self.penalty.record(self.entropy * h.sum((1, 2)).mean())
        return (mix.unsqueeze(-1) * chosen).sum(2)


_START = 0.05
"""DSelect-k's selector logits are drawn 20x narrower than a linear layer's (times ``gamma``)."""


def gate_blocks(gate: nn.Module) -> dict[str, tuple[int, int]]:
    """A :func:`make_gate` module's parameters as one block per gate along dim 0
    (``{name: (0, rows per gate)}``): how a layer whose gates are one per task declares them
    in its ``task_axes``."""
    if isinstance(gate, DSelectKGate):
        return {"weight": (0, 1), "bias": (0, 1)}
    if isinstance(gate, Gate):
        return {"linear.weight": (0, gate.num_experts), "linear.bias": (0, gate.num_experts)}
    raise TypeError(f"not a gate: {type(gate).__name__}")


def prefixed(prefix: str, axes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """``axes`` with parameter names relative to the child module ``prefix``."""
    return {f"{prefix}.{name}": value for name, value in axes.items()}


def make_gate(spec: GateSpec, in_dim: int, num_experts: int, num_gates: int) -> nn.Module:
    """The ``(B, in_dim) -> (B, G, E)`` gates ``spec`` asks for (softmax: :class:`Gate`)."""
    if spec.kind == "dselect_k":
        return DSelectKGate(
            in_dim, num_experts=num_experts, num_gates=num_gates, k=spec.k, gamma=spec.gamma, entropy=spec.entropy
        )
    return Gate(in_dim, num_experts, num_gates)
