"""Experts, gates and the MMoE / CGC / PLE layers, on plain tensors.

All experts of a layer are evaluated together as batched matrix products instead of a
Python loop over ``nn.Module`` experts: one GEMM for the first layer when the experts
share their input, then one ``baddbmm`` per further layer.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from mtrec.nn.gates import (
    SOFTMAX,
    DSelectKGate,
    Gate,
    GateSpec,
    Penalty,
    gate_blocks,
    importance_cv2,
    make_gate,
    prefixed,
)
from mtrec.nn.mlp import batched_layers, batched_linear
from mtrec.weighting import ParameterSlice, SharedLayer

__all__ = [
    "PLE",
    "AFTBLayer",
    "AdaTT",
    "AdaTTLayer",
    "CGCLayer",
    "ExpertGroup",
    "Gate",
    "MMoELayer",
    "bf16_gemms_supported",
    "use_bf16_gemms",
]


def _expert_labels(shared: int, specific: int, tasks: int, task_names: tuple[str, ...] | None) -> list[str]:
    """Names of experts ordered ``[shared (S) | task 0 (K) | task 1 (K) | ...]`` for diagnostics."""
    names = task_names or tuple(f"task {t}" for t in range(tasks))
    return [f"shared {i}" for i in range(shared)] + [f"{names[t]} {k}" for t in range(tasks) for k in range(specific)]


class ExpertGroup(nn.Module):
    """``E`` independent MLPs of identical shape, evaluated as one batched op.

    Args:
        num_experts: ``E``.
        in_dim: Input width.
        hidden: Hidden widths of each expert; the last is the output width ``H``.
        dropout: Dropout after each activation.
        norm: HoME's expert normalisation (Wang et al., "HoME: Hierarchy of Multi-Gate
            Experts for Multi-Task Learning at Kuaishou", 2024): every layer is
            ``Swish(BatchNorm(x W + b))``, each expert with its own batch statistics, so all
            experts' outputs share one scale and few units die (against the ReLU experts
            whose outputs differ in scale and are mostly zero, which lets a gate collapse
            onto one of them). Off: ``ReLU(x W + b)``.

    Shapes:
        ``x (B, in_dim)`` (every expert reads it) or ``(E, B, in_dim)`` (expert ``e``
        reads ``x[e]``) ``-> (B, E, H)``.

    Example:
        >>> ExpertGroup(3, 8, (16, 4))(torch.zeros(5, 8)).shape
        torch.Size([5, 3, 4])
    """

    def __init__(
        self, num_experts: int, in_dim: int, hidden: tuple[int, ...], *, dropout: float = 0.0, norm: bool = False
    ) -> None:
        super().__init__()
        if num_experts < 1 or not hidden:
            raise ValueError("an expert group needs num_experts >= 1 and at least one hidden layer")
        self.num_experts = num_experts
        self.out_dim = hidden[-1]
        self.weights, self.biases = batched_layers(num_experts, in_dim, hidden)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norms = nn.ModuleList(nn.BatchNorm1d(num_experts * h) for h in hidden) if norm else None

    def stacked(self, per_block: int = 1, shared: int = 0) -> dict[str, tuple[int, int]]:
        """The expert weights as blocks along dim 0: ``{name: (shared, per_block)}``, the first
        ``shared`` experts common to all blocks, then ``per_block`` experts per block (what the
        layers' ``task_axes`` declarations are made of), the HoME norms' channels included."""
        names = [f"weights.{i}" for i in range(len(self.weights))] + [f"biases.{i}" for i in range(len(self.biases))]
        axes = {name: (shared, per_block) for name in names}
        for i, norm in enumerate(self.norms or ()):
            # Channels are laid out expert by expert (``_activate``): expert e owns e*h .. (e+1)*h.
            width = cast(nn.BatchNorm1d, norm).num_features // self.num_experts
            for buffer in ("weight", "bias", "running_mean", "running_var"):
                axes[f"norms.{i}.{buffer}"] = (shared * width, per_block * width)
        return axes

    def _activate(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """``(E, B, h)`` pre-activations (a fresh GEMM output, overwritten) -> activations."""
        if self.norms is None:
            # In place: addmm/baddbmm do not keep their output for backward, and a 4096-row
            # batch of 4 x 256 activations is 16 MB less to allocate and fault in per layer.
            return self.dropout(h.relu_())
        E, B, width = h.shape
        norm, x = cast(nn.BatchNorm1d, self.norms[layer]), h.transpose(0, 1).reshape(B, E * width)
        if norm.training and B == 1:
            # One row has no batch statistics (BatchNorm raises): a last batch of one row is
            # normalised by the running ones, which it leaves as they are.
            flat = nn.functional.batch_norm(
                x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps
            )
        else:
            flat = norm(x)
        return self.dropout(nn.functional.silu(flat.view(B, E, width).transpose(0, 1)))

    # Inference only (set by :func:`use_bf16_gemms`, never saved): the experts' matrix products
    # take bfloat16 inputs and weights (accumulated in fp32 by oneDNN, rounded to bf16 on the
    # way out); the bias, activations and everything after them stay fp32.
    bf16_gemms = False

    def _gemm(self, bias: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``bias + x @ w`` (batched when ``x`` is 3-d)."""
        if self.bf16_gemms and not self.training and x.dtype == torch.float32:
            low = torch.mm if x.dim() == 2 else torch.bmm
            return low(x.bfloat16(), w.bfloat16()).float().add_(bias)
        return torch.addmm(bias, x, w) if x.dim() == 2 else torch.baddbmm(bias, x, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        E = self.num_experts
        w0, b0 = self.weights[0], self.biases[0]
        if x.dim() == 2:
            # Shared input: one (B, in) x (in, E*H) GEMM for all experts.
            B = x.shape[0]
            h = self._gemm(b0.reshape(1, -1), x, w0.permute(1, 0, 2).reshape(x.shape[1], -1))
            h = h.view(B, E, -1).transpose(0, 1)
        else:
            h = self._gemm(b0, x, w0)
        h = self._activate(h, 0)
        for layer, (w, b) in enumerate(zip(self.weights[1:], self.biases[1:], strict=True), start=1):
            h = self._activate(self._gemm(b, h, w), layer)
        return h.transpose(0, 1)


def bf16_gemms_supported(device: torch.device) -> bool:
    """Whether bf16 matrix products are native on ``device``: a CPU with AVX512-BF16 or AMX, a
    CUDA GPU that supports bf16 (Ampere and later); elsewhere they are emulated or unsupported."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    return False


def use_bf16_gemms(module: nn.Module, on: bool = True) -> int:
    """Switches every :class:`ExpertGroup` in ``module`` to bf16 matrix products in evaluation
    mode (or back); returns how many there are. Training is never affected."""
    groups = [m for m in module.modules() if isinstance(m, ExpertGroup)]
    for g in groups:
        g.bf16_gemms = on
    return len(groups)


class MMoELayer(nn.Module):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018): shared experts, one gate per task.

    ``gate`` chooses the gates (softmax or DSelect-k, see :mod:`mtrec.nn.gates`) and their
    penalties; ``expert_norm`` is :class:`ExpertGroup`'s ``norm``.

    Shapes:
        ``(B, in_dim) -> (B, T, H)``; with ``return_gates`` also ``(B, T, E)``.

    Example:
        >>> layer = MMoELayer(8, num_tasks=2, num_experts=3, expert_hidden=(4,))
        >>> layer(torch.zeros(5, 8)).shape
        torch.Size([5, 2, 4])
    """

    def __init__(
        self,
        in_dim: int,
        *,
        num_tasks: int,
        num_experts: int,
        expert_hidden: tuple[int, ...],
        dropout: float = 0.0,
        gate: GateSpec = SOFTMAX,
        expert_norm: bool = False,
    ) -> None:
        super().__init__()
        self.experts = ExpertGroup(num_experts, in_dim, expert_hidden, dropout=dropout, norm=expert_norm)
        self.gates = make_gate(gate, in_dim, num_experts, num_tasks)
        self.balance = gate.balance
        self.penalty = Penalty()
        self.out_dim = self.experts.out_dim

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The experts' output layer (shared by every task)."""
        return [self.experts.weights[-1], self.experts.biases[-1]]

    def task_axes(self) -> dict[str, tuple[int, int]]:
        """Parameters stacked by task along dim 0 (``{name: (shared, per_task)}``): the gates."""
        return prefixed("gates", gate_blocks(self.gates))

    def forward(self, x: torch.Tensor, return_gates: bool = False):  # noqa: ANN201 - tensor or pair
        gates = self.gates(x)
        if self.training and self.balance > 0:
            self.penalty.record(self.balance * importance_cv2(gates).sum())
        out = torch.bmm(gates, self.experts(x))
        return (out, gates) if return_gates else out

    def gate_report(
        self, x: torch.Tensor, task_names: tuple[str, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[list[int]]]:
        """For diagnostics: gates ``(B, T, E)``, expert outputs ``(B, E, H)``, expert labels,
        and for each task the experts its gate covers."""
        E = self.experts.num_experts
        gates = self.gates(x)
        return gates, self.experts(x), [f"expert {e}" for e in range(E)], [list(range(E))] * gates.shape[1]


class CGCLayer(nn.Module):
    """Customized Gate Control (Tang et al., RecSys 2020): shared plus task-specific experts.

    Experts are ordered ``[shared (S) | task 0 (K) | task 1 (K) | ...]``. Task ``t``'s gate
    mixes its own ``K`` experts and the ``S`` shared ones, so a task-specific expert only
    ever reaches its own task; an optional shared gate mixes all experts to feed the
    next level's shared experts.

    Args:
        in_dim: Input width.
        num_tasks: ``T``.
        num_shared: ``S`` shared experts.
        num_specific: ``K`` experts per task.
        expert_hidden: Hidden widths of every expert (output ``H``).
        shared_gate: Also produce the shared output (all levels of PLE but the last).
        gate: The gates (softmax or DSelect-k) and their penalties, see :mod:`mtrec.nn.gates`.
        expert_norm: :class:`ExpertGroup`'s ``norm``.

    Shapes:
        ``x (B, in_dim)`` (all experts read the same input) or ``(T + 1, B, in_dim)``
        (task ``t`` experts read ``x[t]``, shared experts ``x[T]``) ``->``
        ``(B, T, H)`` task outputs and ``(B, H)`` shared output (or ``None``).
    """

    # Buffers (registered in __init__).
    expert_input: torch.Tensor
    task_experts: torch.Tensor

    def __init__(
        self,
        in_dim: int,
        *,
        num_tasks: int,
        num_shared: int,
        num_specific: int,
        expert_hidden: tuple[int, ...],
        shared_gate: bool,
        dropout: float = 0.0,
        gate: GateSpec = SOFTMAX,
        expert_norm: bool = False,
    ) -> None:
        super().__init__()
        if num_shared < 0 or num_specific < 0 or num_shared + num_specific < 1:
            raise ValueError("CGC needs at least one shared or task-specific expert per task")
        T, S, K = num_tasks, num_shared, num_specific
        self.num_tasks, self.num_shared, self.num_specific = T, S, K
        self.experts = ExpertGroup(S + T * K, in_dim, expert_hidden, dropout=dropout, norm=expert_norm)
        self.out_dim = self.experts.out_dim
        expert_input = [T] * S + [t for t in range(T) for _ in range(K)]
        self.register_buffer("expert_input", torch.tensor(expert_input, dtype=torch.int64), persistent=False)
        task_experts = [list(range(S + t * K, S + (t + 1) * K)) + list(range(S)) for t in range(T)]
        self.register_buffer("task_experts", torch.tensor(task_experts, dtype=torch.int64), persistent=False)
        self.dselect: DSelectKGate | None = None
        if gate.kind == "dselect_k":  # (its own parameters: a softmax CGC's keep their names)
            self.dselect = DSelectKGate(
                in_dim, num_experts=K + S, num_gates=T, k=gate.k, gamma=gate.gamma, entropy=gate.entropy
            )
        else:
            # One weight block per task gate: (T, in_dim, K + S).
            bound = 1.0 / math.sqrt(in_dim)
            self.gate_weight = nn.Parameter(torch.empty(T, in_dim, K + S).uniform_(-bound, bound))
            self.gate_bias = nn.Parameter(torch.empty(T, 1, K + S).uniform_(-bound, bound))
        self.shared_gate = make_gate(gate, in_dim, S + T * K, 1) if shared_gate else None
        self.balance = gate.balance
        self.penalty = Penalty()

    def task_axes(self) -> dict[str, tuple[int, int]]:
        """Parameters stacked by task along dim 0 (``{name: (shared, per_task)}``): the
        experts (``S`` shared, then ``K`` per task) and the task gates."""
        axes = prefixed("experts", self.experts.stacked(self.num_specific, self.num_shared))
        if self.dselect is not None:
            return {**axes, **prefixed("dselect", gate_blocks(self.dselect))}
        return {**axes, "gate_weight": (0, 1), "gate_bias": (0, 1)}

    def _task_gates(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, K + S)`` from ``x (B, in_dim)`` or the task inputs ``(T, B, in_dim)``."""
        if self.dselect is not None:
            return self.dselect(x)
        return batched_linear(x, self.gate_weight, self.gate_bias).softmax(dim=-1)  # all task gates at once

    def forward(self, x: torch.Tensor, return_gates: bool = False):  # noqa: ANN201 - tuple
        T = self.num_tasks
        if x.dim() == 2:
            expert_out = self.experts(x)
            gates = self._task_gates(x)
            shared_in = x
        else:
            expert_out = self.experts(x.index_select(0, self.expert_input))
            gates = self._task_gates(x[:T])
            shared_in = x[T]
        # Mixing as K + S broadcast multiply-adds: an einsum here lowers to B*T tiny
        # matrix products, which measured ~2x slower on CPU.
        task_out = gates[..., 0:1] * expert_out[:, self.task_experts[:, 0]]
        for k in range(1, self.task_experts.shape[1]):
            task_out = task_out + gates[..., k : k + 1] * expert_out[:, self.task_experts[:, k]]
        shared_out = None
        shared_gates = None
        if self.shared_gate is not None:
            shared_gates = self.shared_gate(shared_in)  # (B, 1, E)
            shared_out = torch.bmm(shared_gates, expert_out).squeeze(1)
        if self.training and self.balance > 0:
            cv2 = importance_cv2(gates).sum()
            if shared_gates is not None:
                cv2 = cv2 + importance_cv2(shared_gates).sum()
            self.penalty.record(self.balance * cv2)
        if return_gates:
            return task_out, shared_out, gates, shared_gates
        return task_out, shared_out


class PLE(nn.Module):
    """Progressive Layered Extraction (Tang et al., RecSys 2020): ``num_levels`` stacked CGC
    layers; every level but the last also has a shared gate feeding the next level's
    shared experts. ``gate`` and ``expert_norm`` apply to every level (see :class:`CGCLayer`).

    Shapes:
        ``(B, in_dim) -> (B, T, H)``.

    Example:
        >>> ple = PLE(8, num_tasks=2, num_levels=2, num_shared=1, num_specific=1, expert_hidden=(4,))
        >>> ple(torch.zeros(3, 8)).shape
        torch.Size([3, 2, 4])
    """

    def __init__(
        self,
        in_dim: int,
        *,
        num_tasks: int,
        num_levels: int,
        num_shared: int,
        num_specific: int,
        expert_hidden: tuple[int, ...],
        dropout: float = 0.0,
        gate: GateSpec = SOFTMAX,
        expert_norm: bool = False,
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        levels = []
        width = in_dim
        for level in range(num_levels):
            cgc = CGCLayer(
                width,
                num_tasks=num_tasks,
                num_shared=num_shared,
                num_specific=num_specific,
                expert_hidden=expert_hidden,
                shared_gate=level < num_levels - 1,
                dropout=dropout,
                gate=gate,
                expert_norm=expert_norm,
            )
            levels.append(cgc)
            width = cgc.out_dim
        self.levels = nn.ModuleList(levels)
        self.out_dim = width

    def last_shared_parameters(self) -> list[SharedLayer]:
        """The output layer of the last level's *shared* experts, the only experts every task's
        gate mixes (a task-specific expert reaches its own task alone).

        The experts are one batched tensor ordered ``[shared (S) | task experts]``, so this is
        the first ``S`` rows of its weight and bias (:class:`~mtrec.weighting.ParameterSlice`);
        nothing (GradNorm then falls back to fixed weights) without shared experts.
        """
        last = cast(CGCLayer, self.levels[-1])
        if last.num_shared == 0:
            return []
        rows = slice(0, last.num_shared)
        return [ParameterSlice(last.experts.weights[-1], rows), ParameterSlice(last.experts.biases[-1], rows)]

    def gate_report(
        self, x: torch.Tensor, task_names: tuple[str, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[list[int]]]:
        """For diagnostics, of the last level: task gates ``(B, T, K + S)``, expert outputs
        ``(B, E, H)``, expert labels, and for each task the experts its gate covers."""
        h = x
        for cgc in self.levels[:-1]:
            task_out, shared_out = cgc(h)
            h = torch.cat([task_out.transpose(0, 1), shared_out.unsqueeze(0)], dim=0)
        last = cast(CGCLayer, self.levels[-1])
        _, _, gates, _ = last(h, return_gates=True)
        experts = last.experts(h if h.dim() == 2 else h.index_select(0, last.expert_input))
        labels = _expert_labels(last.num_shared, last.num_specific, last.num_tasks, task_names)
        return gates, experts, labels, last.task_experts.tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for cgc in self.levels:
            task_out, shared_out = cgc(h)
            if shared_out is None:
                return task_out
            h = torch.cat([task_out.transpose(0, 1), shared_out.unsqueeze(0)], dim=0)
        raise AssertionError("the last PLE level has no shared gate")


class AFTBLayer(nn.Module):
    """STEM-Net's experts and gates (Su et al., "STEM: Unleashing the Power of Embeddings for
    Multi-task Recommendation", AAAI 2024): "all forward, task-specific backward".

    ``S`` shared experts read the shared input; task ``t``'s ``K`` experts read task ``t``'s
    own input. Task ``t``'s gate mixes *every* expert (all forward), but the experts of the
    other tasks enter its mixture detached, so task ``t``'s loss trains the shared experts,
    its own experts and its gate, and never another task's experts (task-specific backward).
    With ``S = 0`` each task is its own network that may also read, without training them,
    the other tasks' expert outputs.

    Experts are ordered ``[shared (S) | task 0 (K) | task 1 (K) | ...]``; gate ``t`` reads
    ``[shared input | input t]`` (input ``t`` alone when ``S = 0``).

    Shapes:
        ``(shared (B, shared_dim) or None, tasks (T, B, task_dim)) -> (B, T, H)``.

    Example:
        >>> layer = AFTBLayer(4, 6, num_tasks=2, num_shared=1, num_specific=1, expert_hidden=(8,))
        >>> layer((torch.zeros(3, 4), torch.zeros(2, 3, 6))).shape
        torch.Size([3, 2, 8])
    """

    # Buffers (registered in __init__).
    expert_input: torch.Tensor
    live: torch.Tensor

    def __init__(
        self,
        shared_dim: int,
        task_dim: int,
        *,
        num_tasks: int,
        num_shared: int,
        num_specific: int,
        expert_hidden: tuple[int, ...],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_shared < 0 or num_specific < 1:
            raise ValueError("STEM-Net needs num_shared_experts >= 0 and num_task_experts >= 1")
        T, S, K = num_tasks, num_shared, num_specific
        self.num_tasks, self.num_shared, self.num_specific = T, S, K
        self.shared_experts = ExpertGroup(S, shared_dim, expert_hidden, dropout=dropout) if S else None
        self.task_experts = ExpertGroup(T * K, task_dim, expert_hidden, dropout=dropout)
        self.out_dim = self.task_experts.out_dim
        self.register_buffer("expert_input", torch.arange(T).repeat_interleave(K), persistent=False)
        # live[t, e]: expert e trains on task t's loss (shared, or one of task t's own).
        owner = torch.tensor([-1] * S + [t for t in range(T) for _ in range(K)])
        live = (owner.view(1, -1) == torch.arange(T).view(-1, 1)) | (owner.view(1, -1) < 0)
        self.register_buffer("live", live.view(1, T, S + T * K, 1), persistent=False)
        gate_in = (shared_dim if S else 0) + task_dim
        bound = 1.0 / math.sqrt(gate_in)
        self.gate_weight = nn.Parameter(torch.empty(T, gate_in, S + T * K).uniform_(-bound, bound))
        self.gate_bias = nn.Parameter(torch.empty(T, 1, S + T * K).uniform_(-bound, bound))

    def task_axes(self) -> dict[str, tuple[int, int]]:
        """Parameters stacked by task along dim 0: the task experts (the gates' last axis
        counts every task's experts, so they are not)."""
        return prefixed("task_experts", self.task_experts.stacked(self.num_specific))

    def ordered_parts(self) -> tuple[str, ...]:
        """The gates, indexed by task on both axes (task ``t``'s gate over every task's experts):
        carried over only to the same tasks in the same order."""
        return ("gate_weight", "gate_bias")

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The shared experts' output layer (nothing without shared experts)."""
        if self.shared_experts is None:
            return []
        return [self.shared_experts.weights[-1], self.shared_experts.biases[-1]]

    def _gates_and_experts(self, x: tuple[torch.Tensor | None, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        shared, tasks = x
        T = self.num_tasks
        experts = self.task_experts(tasks.index_select(0, self.expert_input))  # (B, T * K, H)
        gate_in = tasks
        if self.shared_experts is not None:
            if shared is None:
                raise ValueError("this STEM-Net layer has shared experts and needs the shared input")
            experts = torch.cat([self.shared_experts(shared), experts], dim=1)
            gate_in = torch.cat([shared.unsqueeze(0).expand(T, -1, -1), tasks], dim=2)
        gates = batched_linear(gate_in, self.gate_weight, self.gate_bias).softmax(dim=-1)
        return gates, experts  # (B, T, E), (B, E, H)

    def forward(self, x: tuple[torch.Tensor | None, torch.Tensor]) -> torch.Tensor:
        gates, experts = self._gates_and_experts(x)
        # (B, T, E, H): expert e as task t's mixture sees it, live or detached.
        seen = torch.where(self.live, experts.unsqueeze(1), experts.detach().unsqueeze(1))
        return (gates.unsqueeze(-1) * seen).sum(dim=2)

    def gate_report(
        self, x: tuple[torch.Tensor | None, torch.Tensor], task_names: tuple[str, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[list[int]]]:
        """For diagnostics: gates ``(B, T, E)``, expert outputs ``(B, E, H)``, expert labels,
        and for each task the experts its gate covers (all of them)."""
        gates, experts = self._gates_and_experts(x)
        S, K, T = self.num_shared, self.num_specific, self.num_tasks
        return gates, experts, _expert_labels(S, K, T, task_names), [list(range(S + T * K))] * T


class AdaTTLayer(nn.Module):
    """One AdaTT fusion level (Li et al., "AdaTT: Adaptive Task-to-Task Fusion Network for
    Multitask Learning in Recommendations", KDD 2023; the AdaTT-sp form, task experts only).

    Every task has ``K`` experts. Task ``t``'s fusion unit mixes *all* ``T * K`` experts with
    its own softmax gate (task-to-task fusion) and adds a learned linear combination of its
    own ``K`` experts (the residual that keeps the task's native experts in reach however
    the gate moves): ``f_t = sum_e g_t(x_t)_e E_e + sum_k v_{t,k} E_{t,k}``, ``v`` starting at 1.

    Shapes:
        ``x (B, in_dim)`` (the first level: every expert and gate reads it) or
        ``(T, B, in_dim)`` (task ``t``'s experts and gate read ``x[t]``) ``-> (B, T, H)``.

    Example:
        >>> AdaTTLayer(8, num_tasks=2, num_specific=2, expert_hidden=(4,))(torch.zeros(3, 8)).shape
        torch.Size([3, 2, 4])
    """

    expert_input: torch.Tensor  # buffer

    def __init__(
        self, in_dim: int, *, num_tasks: int, num_specific: int, expert_hidden: tuple[int, ...], dropout: float = 0.0
    ) -> None:
        super().__init__()
        if num_specific < 1:
            raise ValueError(f"AdaTT needs num_task_experts >= 1, got {num_specific}")
        T, K = num_tasks, num_specific
        self.num_tasks, self.num_specific = T, K
        self.experts = ExpertGroup(T * K, in_dim, expert_hidden, dropout=dropout)
        self.out_dim = self.experts.out_dim
        self.register_buffer("expert_input", torch.arange(T).repeat_interleave(K), persistent=False)
        bound = 1.0 / math.sqrt(in_dim)
        self.gate_weight = nn.Parameter(torch.empty(T, in_dim, T * K).uniform_(-bound, bound))
        self.gate_bias = nn.Parameter(torch.empty(T, 1, T * K).uniform_(-bound, bound))
        self.own_weight = nn.Parameter(torch.ones(T, K, 1))

    def task_axes(self) -> dict[str, tuple[int, int]]:
        """Parameters stacked by task along dim 0: the experts and the residual weights (the
        gates' last axis counts every task's experts, so they are not)."""
        return {**prefixed("experts", self.experts.stacked(self.num_specific)), "own_weight": (0, 1)}

    def ordered_parts(self) -> tuple[str, ...]:
        """The gates, indexed by task on both axes (task ``t``'s gate over every task's experts):
        carried over only to the same tasks in the same order."""
        return ("gate_weight", "gate_bias")

    def gates_and_experts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates ``(B, T, T * K)`` and expert outputs ``(B, T * K, H)``."""
        experts = self.experts(x if x.dim() == 2 else x.index_select(0, self.expert_input))
        return batched_linear(x, self.gate_weight, self.gate_bias).softmax(dim=-1), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates, experts = self.gates_and_experts(x)
        B, T, K = experts.shape[0], self.num_tasks, self.num_specific
        fused = torch.bmm(gates, experts)  # (B, T, H)
        own = (experts.view(B, T, K, -1) * self.own_weight).sum(2)  # (B, T, H)
        return fused + own

    def labels(self, task_names: tuple[str, ...] | None = None) -> list[str]:
        return _expert_labels(0, self.num_specific, self.num_tasks, task_names)


class AdaTT(nn.Module):
    """``num_levels`` stacked :class:`AdaTTLayer`: level ``l + 1``'s task ``t`` experts and gate
    read task ``t``'s fusion output of level ``l``.

    Shapes:
        ``(B, in_dim) -> (B, T, H)``.
    """

    def __init__(
        self,
        in_dim: int,
        *,
        num_tasks: int,
        num_levels: int,
        num_specific: int,
        expert_hidden: tuple[int, ...],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        levels, width = [], in_dim
        for _ in range(num_levels):
            level = AdaTTLayer(
                width, num_tasks=num_tasks, num_specific=num_specific, expert_hidden=expert_hidden, dropout=dropout
            )
            levels.append(level)
            width = level.out_dim
        self.levels = nn.ModuleList(levels)
        self.out_dim = width

    def _last_input(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for level in self.levels[:-1]:
            h = level(h).transpose(0, 1)  # (T, B, H): task t's next level reads its own fusion
        return h

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last level's expert output layer: every task's gate mixes every expert."""
        last = cast(AdaTTLayer, self.levels[-1])
        return [last.experts.weights[-1], last.experts.biases[-1]]

    def gate_report(
        self, x: torch.Tensor, task_names: tuple[str, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[list[int]]]:
        """For diagnostics, of the last level: gates ``(B, T, T * K)``, expert outputs, expert
        labels, and for each task the experts its gate covers (all of them)."""
        last = cast(AdaTTLayer, self.levels[-1])
        gates, experts = last.gates_and_experts(self._last_input(x))
        E = experts.shape[1]
        return gates, experts, last.labels(task_names), [list(range(E))] * last.num_tasks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.levels[-1](self._last_input(x))
