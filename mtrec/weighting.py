"""Loss-balancing strategies, composed with the model rather than inherited by it.

A strategy owns the whole backward pass of a training step: it receives the per-task
losses (scalar, still attached to the graph) and leaves in every parameter's ``.grad``
what the optimisers should apply. Strategies that only rescale losses (``fixed``,
``uncertainty``, ``dwa``, ``rlw``, ``famo``) need one ordinary backward; the gradient-based ones
(``gradnorm``, ``pcgrad``) additionally take per-task gradients of the *shared dense*
parameters they are given, never of the embedding tables (see DESIGN.md). The
representation-gradient methods (``mgda``, ``cagrad``, ``nash_mtl``, ``aligned_mtl``,
``db_mtl``; :class:`RepresentationGradient`) take per-task gradients of the shared
*representation* instead, the last shared layer's output, and combine them there.

Every strategy expects the gradients to be zeroed (or ``None``) before
:meth:`LossWeighting.backward`, exactly as a plain ``loss.backward()`` would.

A task whose loss is exactly ``0`` in a batch (no row of its sample space) is treated as
absent from that batch: it contributes no gradient, is skipped by the gradient surgery and
by GradNorm's balancing, and does not move its uncertainty log-variance.

Example:
    >>> import torch
    >>> from torch import nn
    >>> shared, heads = nn.Linear(3, 4), nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])
    >>> h = shared(torch.randn(8, 3))
    >>> losses = {"ctr": heads[0](h).square().mean(), "cvr": heads[1](h).abs().mean()}
    >>> weighting = create_weighting("pcgrad", ("ctr", "cvr"), (1.0, 1.0), seed=0)
    >>> total = weighting.backward(losses, shared=list(shared.parameters()), last_shared=[])
    >>> shared.weight.grad.shape
    torch.Size([4, 3])
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import nn

from mtrec import repgrad
from mtrec.typed import parameter_spec

__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "MGDA",
    "WEIGHTINGS",
    "parameter_grads",
    "FixedWeighting",
    "AlignedMTL",
    "CAGrad",
    "GradNorm",
    "LossWeighting",
    "NashMTL",
    "PCGrad",
    "ParameterSlice",
    "RandomLossWeighting",
    "Representation",
    "RepresentationGradient",
    "SharedLayer",
    "UncertaintyWeighting",
    "create_weighting",
    "register_weighting",
    "weighting_parameters",
]


class ParameterSlice(NamedTuple):
    """Part of a batched parameter: the entries ``param[rows]`` along its first dimension.

    A model's ``last_shared_parameters()`` returns one where only some blocks of a batched
    tensor are shared, e.g. the shared experts of a CGC/PLE expert group stored with the
    task-specific ones in one ``(E, in, H)`` tensor. GradNorm differentiates w.r.t. the
    whole ``param`` (a leaf, so :func:`torch.autograd.grad` applies) and takes the norm of
    ``grad[rows]`` only: exactly the gradient w.r.t. those blocks' weights.
    """

    param: nn.Parameter
    rows: slice


SharedLayer = nn.Parameter | ParameterSlice
"""An entry of ``last_shared``: a whole parameter or a :class:`ParameterSlice` of one."""


class Representation(NamedTuple):
    """The shared representation of one training forward pass: the output(s) of the layer
    that holds the model's last shared parameters (every task's loss depends on it).

    ``rows``, for a ``(B, E, H)`` expert-group output whose first experts only are shared (a
    :class:`ParameterSlice` of its weights), selects those experts along dimension 1; the
    representation-gradient methods then combine the gradients there and leave the
    task-specific experts' gradients as they are.
    """

    tensors: tuple[torch.Tensor, ...]
    rows: slice | None = None


# Strategy name -> class, filled by @register_weighting in the order the classes are defined.
WEIGHTINGS: dict[str, type[LossWeighting]] = {}
_FIXED_ARGS = ("task_names", "base_weights")
_W = TypeVar("_W", bound="type[LossWeighting]")


def register_weighting(name: str) -> Callable[[_W], _W]:
    """Registers a :class:`LossWeighting` subclass as ``train.loss_weighting.name: NAME``; the
    keyword parameters of its ``__init__`` (after the task names and base weights), with their
    annotations and defaults, are the strategy's config keys."""

    def wrap(cls: _W) -> _W:
        if name in WEIGHTINGS:
            raise ValueError(f"loss weighting {name!r} is registered twice")
        WEIGHTINGS[name] = cls
        return cls

    return wrap


def weighting_parameters(name: str) -> dict[str, tuple[Any, Any]]:
    """The strategy's keyword parameters: ``{name: (annotation, default)}``."""
    return parameter_spec(WEIGHTINGS[name].__init__, skip=_FIXED_ARGS)


class LossWeighting(nn.Module):
    """Base class: task names and the config's fixed per-task weights.

    Args:
        task_names: Task names, in the order the weights refer to.
        base_weights: The config's per-task weights ``w_t`` (one per task, finite, >= 0).

    Subclasses override :meth:`_combine` (a loss-rescaling strategy) or :meth:`backward`.
    """

    needs_representation = False
    """Whether :meth:`backward` needs the shared representation (the trainer then records it)."""

    def __init__(self, task_names: tuple[str, ...], base_weights: tuple[float, ...]) -> None:
        super().__init__()
        task_names = tuple(task_names)
        base_weights = tuple(float(w) for w in base_weights)
        if not task_names:
            raise ValueError("loss weighting needs at least one task")
        if len(set(task_names)) != len(task_names):
            raise ValueError(f"duplicate task names in {task_names}")
        if len(base_weights) != len(task_names):
            raise ValueError(f"{len(base_weights)} base weights given for {len(task_names)} tasks")
        if any(not math.isfinite(w) or w < 0 for w in base_weights):
            raise ValueError(f"base weights must be finite and >= 0, got {base_weights}")
        self.task_names = task_names
        self.base_weights = base_weights

    @property
    def num_tasks(self) -> int:
        """``T``, the number of tasks."""
        return len(self.task_names)

    def _stack(self, losses: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The losses in task order, checked to be exactly the expected scalar tasks."""
        if set(losses) != set(self.task_names):
            raise ValueError(f"losses are for tasks {sorted(losses)}, expected {sorted(self.task_names)}")
        out = []
        for name in self.task_names:
            loss = losses[name]
            if loss.dim() != 0:
                raise ValueError(f"loss of task {name!r} must be a scalar, got shape {tuple(loss.shape)}")
            out.append(loss)
        return out

    def _combine(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The objective to backpropagate, from the losses in task order (extra excluded)."""
        return sum((w * loss for w, loss in zip(self.base_weights, losses, strict=True)), losses[0].new_zeros(()))

    def backward(
        self,
        losses: Mapping[str, torch.Tensor],
        *,
        shared: Sequence[nn.Parameter],
        last_shared: Sequence[SharedLayer],
        extra: torch.Tensor | None = None,
        representation: Representation | None = None,
    ) -> torch.Tensor:
        """Computes every parameter's gradient and returns the objective, detached.

        Args:
            losses: ``{task: scalar loss}`` for every task, attached to the graph (a task with
                no row in the batch may be a constant ``0``).
            shared: Dense parameters shared by the tasks (the backbone), never embeddings.
            last_shared: The last shared layer (used by GradNorm): parameters, or slices of
                them (:class:`ParameterSlice`), that every task's gradient reaches.
            extra: An additional scalar term (e.g. an architecture's auxiliary loss), added
                with weight 1 and never rebalanced.
            representation: What the last shared layer output in this forward pass (see
                :class:`Representation`); only the representation-gradient methods
                (:attr:`needs_representation`) read it.

        Returns:
            The scalar objective whose gradient was taken (for logging), detached.
        """
        total = self._combine(self._stack(losses))
        if extra is not None:
            total = total + extra
        _backward_if_needed(total)
        return total.detach()

    def epoch_end(self, epoch_losses: Mapping[str, float]) -> None:
        """Receives the epoch's mean training loss per task (used by DWA)."""

    def weights(self) -> dict[str, float]:
        """The current effective per-task weights, for logs."""
        return dict(zip(self.task_names, self.base_weights, strict=True))

    def extra_parameters(self) -> list[nn.Parameter]:
        """Learnable parameters the trainer's optimiser must update; ``[]`` if none."""
        return []


def _backward_if_needed(total: torch.Tensor) -> None:
    # A batch where every loss is a constant (no task has a row) has nothing to
    # differentiate; backward() would raise, and leaving the gradients unset is right.
    if total.requires_grad:
        total.backward()


def _present(loss: torch.Tensor) -> torch.Tensor:
    """1.0 where a task has a loss this batch, 0.0 where it is exactly 0 (no row); no sync."""
    return (loss.detach() != 0).to(loss.dtype)


@register_weighting("fixed")
class FixedWeighting(LossWeighting):
    """``total = sum_t w_t * L_t (+ extra)``: the config's weights, unchanged."""


@register_weighting("uncertainty")
class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    Each task has a learnable log-variance ``s_t = log sigma_t^2`` (initialised to 0) and

        total = sum_t  m_t * ( exp(-s_t) * w_t * L_t  +  s_t / 2 )

    which is the paper's classification form ``L / sigma^2 + log sigma`` (its eq. 10
    approximation) applied to every task. It is chosen because the tasks here are mostly
    binary (CTR, CVR) and because at ``s = 0`` it equals ``fixed`` exactly. The paper's
    Gaussian-regression form ``L / (2 sigma^2) + log sigma`` differs only by a constant
    factor 1/2 on the loss term; to reproduce it for a regression task, halve that task's
    base weight. ``w_t`` is the config's weight; ``m_t`` is 0 for a task whose loss is
    exactly 0 in the batch (no row of its sample space), else 1 - without it the
    regulariser alone would drive ``s_t`` down on every batch that lacks the task.

    Gradients: ``d total / d s_t = m_t * (1/2 - w_t * exp(-s_t) * L_t)``, so at
    equilibrium ``s_t = log(2 * w_t * L_t)``; the effective weight ``w_t * exp(-s_t)``
    (see :meth:`weights`) falls as the task's loss grows. The ``s_t`` are returned by
    :meth:`extra_parameters`: add them to the dense optimiser, ideally in a group without
    weight decay (decay would pull ``s_t`` to 0).
    """

    _w: torch.Tensor  # buffer

    def __init__(self, task_names: tuple[str, ...], base_weights: tuple[float, ...]) -> None:
        super().__init__(task_names, base_weights)
        self.log_vars = nn.Parameter(torch.zeros(self.num_tasks))
        # Built once and moved with the module: a tensor made from Python numbers in every
        # step would be a blocking host-to-device copy on a GPU. Not part of the state.
        self.register_buffer("_w", torch.tensor(self.base_weights), persistent=False)

    def _combine(self, losses: list[torch.Tensor]) -> torch.Tensor:
        dtype = self.log_vars.dtype
        stacked = torch.stack([loss.to(dtype) for loss in losses])
        w = self._w.to(dtype)
        s = self.log_vars
        # A task whose configured weight is 0 (e.g. ESMM's CVR) takes no part: its s_t term
        # alone would drive s_t to -inf.
        return (_present(stacked) * (w > 0) * (torch.exp(-s) * w * stacked + 0.5 * s)).sum()

    def weights(self) -> dict[str, float]:
        eff = torch.exp(-self.log_vars.detach()).cpu().tolist()
        return {n: w * e for n, w, e in zip(self.task_names, self.base_weights, eff, strict=True)}

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.log_vars]


@register_weighting("gradnorm")
class GradNorm(LossWeighting):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018).

    Learnable task weights ``w_t`` start at the config's weights normalised to sum ``T``.
    At each step, for the tasks present in the batch (loss not exactly 0; the others get
    ``G_t = 0`` and are left out of the balancing):

        G_t      = || d (w_t L_t) / d W ||_2         W = the ``last_shared`` parameters (or slices)
        r_t      = (L_t / L_t(0)) / mean_s (L_s / L_s(0))
        target_t = mean_s(G_s) * r_t ** alpha        (a constant: no gradient flows into it)
        L_grad   = sum_t | G_t - target_t |

    ``L_t(0)`` is the task's loss at the first step where it is present. The model's
    parameters get the gradient of ``sum_t w_t L_t (+ extra)`` with ``w`` held constant;
    ``w`` gets the gradient of ``L_grad`` only and is stepped by an Adam optimiser owned by
    this module (so the trainer needs no extra parameter group, its grad clipping never
    touches ``w``, and the renormalisation can follow the step at once). After the step
    ``w`` is clamped to >= 1e-4 (Adam may overshoot past 0) and rescaled so ``sum w = T``.

    Since ``G_t = w_t * ||d L_t / d W||`` is linear in ``w_t``, the norm
    ``||d L_t / d W||`` is computed without ``create_graph`` and ``d L_grad / d w`` is taken
    through that product: the same gradient as differentiating through the graph of the
    gradient, without the double backward. The per-task gradients are taken on
    ``last_shared`` only, never on the embeddings, so they stop at that layer. ``W`` must be
    what every task shares (e.g. only the shared experts of a CGC/PLE level, given as a
    :class:`ParameterSlice`): a block that one task reaches alone would make that task's
    norm incomparable with the others'.

    With an empty ``last_shared`` (e.g. a model without a shared layer) GradNorm has
    nothing to measure: it warns once and behaves exactly like ``fixed``.

    Args:
        task_names: Task names.
        base_weights: The config's per-task weights (the initial ``w``, normalised).
        alpha: Asymmetry: how strongly tasks that train slower are pushed.
        lr: Learning rate of the Adam optimiser that updates ``w``.
    """

    _MIN_WEIGHT = 1e-4

    # Buffers (registered in __init__).
    enabled: torch.Tensor
    initial_losses: torch.Tensor

    def __init__(
        self,
        task_names: tuple[str, ...],
        base_weights: tuple[float, ...],
        *,
        alpha: float = 1.5,
        lr: float = 0.025,
    ) -> None:
        super().__init__(task_names, base_weights)
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"gradnorm: alpha must be >= 0, got {alpha}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"gradnorm: lr must be > 0, got {lr}")
        if sum(self.base_weights) <= 0:
            raise ValueError("gradnorm: the base weights must not all be 0")
        self.alpha = float(alpha)
        self.lr = float(lr)
        init = torch.tensor(self.base_weights, dtype=torch.float32)
        # Tasks configured with weight 0 (ESMM's CVR) stay at 0: balancing must not give
        # them a loss of their own. The others share a total of their count.
        self.register_buffer("enabled", init > 0, persistent=False)
        self.num_enabled = int((init > 0).sum())
        self.task_weights = nn.Parameter(init * self.num_enabled / init.sum())
        # 0 = not recorded yet (a recorded L_t(0) is > 0 by construction).
        self.register_buffer("initial_losses", torch.zeros(self.num_tasks))
        self._optimizer: torch.optim.Optimizer | None = None
        self._warned = False

    def backward(
        self,
        losses: Mapping[str, torch.Tensor],
        *,
        shared: Sequence[nn.Parameter],
        last_shared: Sequence[SharedLayer],
        extra: torch.Tensor | None = None,
        representation: Representation | None = None,
    ) -> torch.Tensor:
        stacked = self._stack(losses)
        entries = [e if isinstance(e, ParameterSlice) else ParameterSlice(e, slice(None)) for e in last_shared]
        last = [e for e in entries if e.param.requires_grad]
        if not last:
            if not self._warned:
                warnings.warn("gradnorm: the model has no last shared layer; using fixed weights", stacklevel=2)
                self._warned = True
            return super().backward(losses, shared=shared, last_shared=last_shared, extra=extra)

        # Per-task gradient norms on the last shared layer; the graph is kept for the
        # model's backward below.
        norms = []
        params = [e.param for e in last]
        for loss in stacked:
            grads = parameter_grads(loss, params, what="gradnorm: last_shared")
            squares = [g[e.rows].float().square().sum() for e, g in zip(last, grads, strict=True)]
            norms.append(torch.stack(squares).sum().sqrt())
        w = self.task_weights
        values = torch.stack([loss.detach().float() for loss in stacked]).to(w.device)
        norms_t = torch.stack(norms).to(w.device)

        # The model's gradient: sum_t w_t L_t with w constant.
        w_const = w.detach()
        total = sum((w_const[i].to(loss.dtype) * loss for i, loss in enumerate(stacked)), stacked[0].new_zeros(()))
        if extra is not None:
            total = total + extra
        _backward_if_needed(total)

        self._update_weights(values, norms_t)
        return total.detach()

    @torch.no_grad()
    def _record_initial(self, values: torch.Tensor, present: torch.Tensor) -> None:
        new = present & (self.initial_losses == 0)
        self.initial_losses.copy_(torch.where(new, values, self.initial_losses))

    def _update_weights(self, values: torch.Tensor, norms: torch.Tensor) -> None:
        """One Adam step of ``w`` on ``L_grad``, then clamp and renormalise to sum ``T``."""
        w = self.task_weights
        present = (values != 0) & torch.isfinite(values)
        self._record_initial(values, present)
        # Present tasks only: an absent task's ratio and norm are undefined, not 0.
        active = present & (self.initial_losses > 0) & self.enabled
        mask = active.float()
        count = mask.sum().clamp(min=1)
        ratios = torch.where(active, values / self.initial_losses.clamp(min=1e-30), 0.0)
        rel = ratios / (ratios * mask).sum().div(count).clamp(min=1e-30)
        G = w * norms  # differentiable in w only
        target = ((G.detach() * mask).sum() / count) * rel.pow(self.alpha)
        loss_grad = ((G - target).abs() * mask).sum()
        if self._optimizer is None:
            # Created lazily so that it holds w on the device the module was moved to.
            self._optimizer = torch.optim.Adam([w], lr=self.lr, foreach=False)
        (grad,) = torch.autograd.grad(loss_grad, [w])
        w.grad = grad
        self._optimizer.step()
        w.grad = None
        with torch.no_grad():
            w.copy_(torch.where(self.enabled, w.clamp(min=self._MIN_WEIGHT), 0.0))
            w.mul_(self.num_enabled / w.sum())

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.task_weights.detach().cpu().tolist(), strict=True))

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": None if self._optimizer is None else self._optimizer.state_dict(), "warned": self._warned}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._warned = bool(state["warned"])
        if state["optimizer"] is not None:
            self._optimizer = torch.optim.Adam([self.task_weights], lr=self.lr, foreach=False)
            self._optimizer.load_state_dict(state["optimizer"])


@register_weighting("dwa")
class DWA(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019).

    With ``L_t(e)`` the mean training loss of task t in epoch e (from :meth:`epoch_end`),
    the weights used during epoch ``e`` are

        lambda_t(e) = T * softmax_t( r_t(e - 1) / temperature ),  r_t(e - 1) = L_t(e - 1) / L_t(e - 2)

    and ``lambda_t = 1`` for the first two epochs (before two epochs of history exist).
    The objective is ``sum_t w_t * lambda_t * L_t (+ extra)``, ``w_t`` the config's weights,
    so the ``lambda`` sum to ``T`` (the effective weights do when all ``w_t = 1``). A ratio
    whose denominator is 0 or not finite (a task with no row in a whole epoch) counts as 1.

    Args:
        task_names: Task names.
        base_weights: The config's per-task weights.
        temperature: Softmax temperature; larger is closer to uniform weights.
    """

    def __init__(
        self, task_names: tuple[str, ...], base_weights: tuple[float, ...], *, temperature: float = 2.0
    ) -> None:
        super().__init__(task_names, base_weights)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"dwa: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self._history: list[tuple[float, ...]] = []
        self._lambdas: tuple[float, ...] = (1.0,) * self.num_tasks

    def epoch_end(self, epoch_losses: Mapping[str, float]) -> None:
        if set(epoch_losses) != set(self.task_names):
            raise ValueError(f"epoch losses are for tasks {sorted(epoch_losses)}, expected {sorted(self.task_names)}")
        self._history.append(tuple(float(epoch_losses[n]) for n in self.task_names))
        if len(self._history) < 2:
            return
        prev2, prev1 = self._history[-2], self._history[-1]
        ratios = [
            b / a if a > 0 and math.isfinite(a) and math.isfinite(b) else 1.0 for a, b in zip(prev2, prev1, strict=True)
        ]
        # Softmax with the max subtracted, so large ratios cannot overflow exp(); over the
        # tasks with a non-zero configured weight only (ESMM's CVR has weight 0).
        on = [w > 0 for w in self.base_weights]
        top = max(r / self.temperature for r, o in zip(ratios, on, strict=True) if o)
        e = [math.exp(r / self.temperature - top) if o else 0.0 for r, o in zip(ratios, on, strict=True)]
        self._lambdas = tuple(sum(on) * v / sum(e) for v in e)

    def get_extra_state(self) -> dict[str, Any]:
        # Part of state_dict(), so that `mtrec train --resume` continues the same weights.
        return {"history": [list(h) for h in self._history], "lambdas": list(self._lambdas)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._history = [tuple(float(x) for x in h) for h in state["history"]]
        self._lambdas = tuple(float(x) for x in state["lambdas"])

    def _combine(self, losses: list[torch.Tensor]) -> torch.Tensor:
        weights = [w * lam for w, lam in zip(self.base_weights, self._lambdas, strict=True)]
        return sum((w * loss for w, loss in zip(weights, losses, strict=True)), losses[0].new_zeros(()))

    def weights(self) -> dict[str, float]:
        return {n: w * lam for n, w, lam in zip(self.task_names, self.base_weights, self._lambdas, strict=True)}


def parameter_grads(
    loss: torch.Tensor,
    params: Sequence[nn.Parameter],
    *,
    what: str,
    retain_graph: bool = True,
    sparse: bool = False,
) -> list[torch.Tensor]:
    """``d loss / d params`` (zeros where unused), keeping the graph alive: the per-task
    gradients of GradNorm, PCGrad and the task-affinity report (:mod:`mtrec.training.affinity`).

    A sparse gradient (an embedding table's) is refused, or with ``sparse=True`` returned
    coalesced."""
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss, list(params), retain_graph=retain_graph, allow_unused=True)
    out = []
    for p, g in zip(params, grads, strict=True):
        if g is not None and g.is_sparse:
            if not sparse:
                raise ValueError(f"{what} must be dense parameters; embedding tables are never shared parameters")
            g = g.coalesce()
        out.append(torch.zeros_like(p) if g is None else g)
    return out


@register_weighting("rlw")
class RandomLossWeighting(LossWeighting):
    """Random loss weighting (Lin, Ye, Xu, Shi and Zhang, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022).

    Every step draws ``lambda = softmax(z)`` with ``z ~ N(0, I_T)`` (the paper's normal
    variant) and backpropagates

        total = sum_t T * lambda_t * w_t * L_t (+ extra)

    The factor ``T`` keeps the objective on fixed weighting's scale: ``E[T lambda_t] = 1``, so
    in expectation the step is fixed weighting's; the noise is what the paper finds to help
    escape sharp minima, and the litmus test is whether a balancing method beats it. One
    pass: no extra backward, no parameters. The draws come from a CPU generator seeded by
    ``seed`` (the same on every device and every DDP rank, whose step counts agree, and
    restored on resume) and enter the graph as Python floats, so the step never makes the
    host wait for the device.

    Args:
        task_names: Task names.
        base_weights: The config's per-task weights.
        seed: Seed of the weight draws.
    """

    def __init__(self, task_names: tuple[str, ...], base_weights: tuple[float, ...], *, seed: int = 0) -> None:
        super().__init__(task_names, base_weights)
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._last = tuple(self.base_weights)

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"])

    def draw(self) -> tuple[float, ...]:
        """The next step's ``T * lambda_t`` (positive, summing to ``T``)."""
        # One read of a CPU tensor (never a device wait); the softmax in Python floats.
        z = torch.randn(self.num_tasks, generator=self._generator, dtype=torch.float64).tolist()
        top = max(z)
        e = [math.exp(v - top) for v in z]
        total = sum(e)
        return tuple(self.num_tasks * v / total for v in e)

    def _combine(self, losses: list[torch.Tensor]) -> torch.Tensor:
        scale = self.draw()
        self._last = tuple(s * w for s, w in zip(scale, self.base_weights, strict=True))
        return sum((w * loss for w, loss in zip(self._last, losses, strict=True)), losses[0].new_zeros(()))

    def weights(self) -> dict[str, float]:
        """The weights of the last step (the base weights before the first)."""
        return dict(zip(self.task_names, self._last, strict=True))


@register_weighting("famo")
class FAMO(LossWeighting):
    """Fast adaptive multitask optimisation (Liu, Feng, Stone and Liu, "FAMO: Fast Adaptive
    Multitask Optimization", NeurIPS 2023): balances the tasks so that their losses fall at
    the same *rate*, with one backward per step and no per-task gradient.

    Task logits ``xi`` give ``z = softmax(xi)``; the step descends

        sum_t c z_t w_t log L_t,   c = 1 / sum_t (z_t / L_t),

    the same gradient as ``sum_t W_t L_t`` with ``W_t = c z_t w_t / L_t`` (what is
    backpropagated and logged; scaled by the number of tasks present so that the weights sum
    to it, as fixed weighting's do). After each step the logits move by Adam (``lr``, weight
    decay ``decay``) along ``J_softmax(xi)^T delta``, ``delta_t = log L_t(before) - log
    L_t(after)``: a task whose loss fell less than the others gains weight.

    One pass, as the paper's name promises, by lagging the update one step: ``delta`` compares
    a task's loss at this step with its loss at the previous step (on the previous batch)
    rather than recomputing the loss of the same batch after the update (the paper's extra
    forward pass). The logits and their Adam state are part of the resume state; everything
    stays on the device (no host read).

    Args:
        task_names: Task names.
        base_weights: The config's per-task weights ``w_t``.
        lr: Adam's step size for the task logits (the paper's 0.025).
        decay: Weight decay on the task logits (the paper's 0.001), pulling them towards equal.
    """

    # Buffers: each task's last log-loss and whether it has one; the base weights.
    previous: torch.Tensor
    seen: torch.Tensor
    base: torch.Tensor

    def __init__(
        self, task_names: tuple[str, ...], base_weights: tuple[float, ...], *, lr: float = 0.025, decay: float = 0.001
    ) -> None:
        super().__init__(task_names, base_weights)
        if not (math.isfinite(lr) and lr > 0) or not (math.isfinite(decay) and decay >= 0):
            raise ValueError(f"famo needs lr > 0 and decay >= 0, got lr={lr}, decay={decay}")
        T = self.num_tasks
        # float64: rates differ by little from step to step, and Adam's update divides by them.
        self.logits = nn.Parameter(torch.zeros(T, dtype=torch.float64))
        self._optimizer = torch.optim.Adam([self.logits], lr=lr, weight_decay=decay)
        self.register_buffer("previous", torch.zeros(T, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(T, dtype=torch.bool))
        self.register_buffer("base", torch.tensor(self.base_weights, dtype=torch.float64), persistent=False)
        self._last: torch.Tensor | None = None
        self._started = False

    def get_extra_state(self) -> dict[str, Any]:
        # A copy: the optimiser's state_dict holds its live moment tensors.
        return {"optimizer": copy.deepcopy(self._optimizer.state_dict()), "started": self._started}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self._started = bool(state["started"])

    def task_weights(self, values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``W_t`` for the detached losses ``values (T,)`` of the tasks ``present``."""
        z = torch.softmax(self.logits.detach(), 0) * present
        loss = values.clamp_min(_FAMO_EPS)
        c = 1.0 / (z / loss).sum().clamp_min(_FAMO_EPS)
        return present.sum() * self.base * c * z / loss

    @torch.no_grad()
    def _step_logits(self, log_now: torch.Tensor, present: torch.Tensor) -> None:
        if self._started:  # (the first step has no earlier loss to compare with)
            # Over the tasks with a loss now and before, S: the softmax of xi restricted to S and
            # its Jacobian's product with delta; the other tasks' logits get no gradient. delta is
            # shifted by its largest entry (J^T 1 = 0), so that equal rates give exactly 0.
            both = present & self.seen
            delta = torch.where(both, self.previous - log_now, -math.inf)
            delta = torch.where(both, delta - delta.max().clamp_min(-1e30), 0.0)
            z = torch.where(both, torch.exp(self.logits - self.logits.max()), 0.0)
            z = z / z.sum().clamp_min(1e-30)
            self.logits.grad = z * (delta - (z * delta).sum())
            self._optimizer.step()
            self.logits.grad = None
        self._started = True
        self.previous.copy_(torch.where(present, log_now, self.previous))
        self.seen |= present

    def _combine(self, losses: list[torch.Tensor]) -> torch.Tensor:
        values = torch.stack([loss.detach().double() for loss in losses])
        present = values != 0  # exactly 0: no row of the task's sample space this batch
        self._step_logits(values.clamp_min(_FAMO_EPS).log(), present)
        self._last = self.task_weights(values, present)
        weights = self._last.to(losses[0].dtype)
        return sum((weights[t] * loss for t, loss in enumerate(losses)), losses[0].new_zeros(()))

    def weights(self) -> dict[str, float]:
        """The weights ``W_t`` of the last step (the base weights before the first)."""
        if self._last is None:
            return super().weights()
        return dict(zip(self.task_names, self._last.tolist(), strict=True))


_FAMO_EPS = 1e-8


@register_weighting("pcgrad")
class PCGrad(LossWeighting):
    """Projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task
    Learning", NeurIPS 2020), on the shared dense parameters.

    With ``g_t = d (w_t L_t) / d shared`` (all shared parameters flattened into one
    vector), each task t in turn starts from ``g_t' = g_t`` and, for every other task s in
    a random order (drawn per task from a generator seeded by ``seed``), if
    ``g_t' . g_s < 0``:

        g_t' <- g_t' - (g_t' . g_s) / ||g_s||^2 * g_s        (g_s the ORIGINAL gradient)

    A task with a zero gradient (absent from the batch) is never projected onto. The shared
    parameters get ``sum_t g_t'`` plus the unprojected gradient of ``extra``. Every other
    parameter (towers, embeddings, anything not in ``shared``) gets the plain gradient of
    ``sum_t w_t L_t + extra``.

    Cost: ``T`` extra backward passes from the losses to the shared parameters (through the
    towers and the backbone only; the embeddings are not reached) plus the usual full
    backward, which also produces the sparse embedding gradient. The surgery itself works
    on the ``(T, T)`` Gram matrix of the task gradients: each ``g_t'`` is tracked as
    coefficients over the original ``g_s``, so only one ``(T, P) x (P, T)`` product and one
    ``(T,) x (T, P)`` product touch the ``P`` shared weights.

    Args:
        task_names: Task names.
        base_weights: The config's per-task weights.
        seed: Seed of the generator for the projection order.
    """

    def __init__(self, task_names: tuple[str, ...], base_weights: tuple[float, ...], *, seed: int = 0) -> None:
        super().__init__(task_names, base_weights)
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"])

    def surgery_coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        """``(T,)`` coefficients ``a`` with ``sum_t g_t' = sum_s a_s g_s``, from the Gram matrix.

        Args:
            gram: ``(T, T)`` matrix of dot products ``g_t . g_s`` of the original gradients.
        """
        T = gram.shape[0]
        G = gram.detach().to(torch.float64).cpu()
        coef = torch.eye(T, dtype=torch.float64)
        for t in range(T):
            for s in torch.randperm(T, generator=self._generator).tolist():
                if s == t or G[s, s] <= 0:
                    continue
                dot = coef[t] @ G[:, s]  # g_t' . g_s
                if dot < 0:
                    coef[t, s] -= dot / G[s, s]
        return coef.sum(dim=0)

    def backward(
        self,
        losses: Mapping[str, torch.Tensor],
        *,
        shared: Sequence[nn.Parameter],
        last_shared: Sequence[SharedLayer],
        extra: torch.Tensor | None = None,
        representation: Representation | None = None,
    ) -> torch.Tensor:
        stacked = self._stack(losses)
        params = [p for p in shared if p.requires_grad]
        weighted = [w * loss for w, loss in zip(self.base_weights, stacked, strict=True)]
        flat = None
        if params and self.num_tasks > 1:
            # Per-task gradients first, while the graph is alive; the full backward frees it.
            per_task = [parameter_grads(loss, params, what="pcgrad: shared") for loss in weighted]
            flat = torch.stack([torch.cat([g.reshape(-1) for g in grads]) for grads in per_task])
            del per_task  # the flat copy is all that is needed; free the per-parameter tensors
        total = sum(weighted, stacked[0].new_zeros(()))
        if extra is not None:
            total = total + extra
        _backward_if_needed(total)
        if flat is None:
            return total.detach()

        coef = self.surgery_coefficients(flat @ flat.T)
        if bool((coef == 1).all()):
            return total.detach()  # no conflict: the plain gradient is already in place
        # The full backward left sum_t g_t (+ extra's gradient) in .grad; adding
        # sum_t g_t' - sum_t g_t swaps the task part for the surgery and keeps extra's.
        delta = (coef - 1).to(device=flat.device, dtype=flat.dtype) @ flat
        offset = 0
        for p in params:
            n = p.numel()
            d = delta[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
            if p.grad is None:
                p.grad = d.clone()
            else:
                p.grad.add_(d)
        return total.detach()


class RepresentationGradient(LossWeighting):
    """Base of the methods that combine the task gradients *on the shared representation*
    (the "rep-grad" mode of LibMTL and MultiBalance; the "upper bound" of MGDA-UB).

    ``z`` is the output of the layer holding the model's last shared parameters (the shared
    experts, the shared bottom's last layer; see :class:`Representation`). Each step:

    1. ``g_t = d (w_t L_t) / d z`` for every task, by ``T`` backward passes from the losses to
       ``z`` only (through the towers and gates; neither the layers below ``z`` nor the
       embedding tables are reached), flattened over the batch;
    2. the ``(T, T)`` Gram matrix ``g_t . g_s`` (one host read) goes to the method's solver
       (:mod:`mtrec.repgrad`), which returns coefficients ``a`` over the tasks present
       (a task with a zero gradient, e.g. no row of its sample space, or weight 0, keeps
       ``a_t = 1``: it has nothing to combine);
    3. one backward of ``sum_t w_t L_t + extra`` together with ``z`` given the extra gradient
       ``sum_t (a_t - 1) g_t``: everything below ``z`` gets ``sum_t a_t g_t`` (plus ``extra``'s
       gradient), everything above it (towers, gates, anything beside ``z``) the plain
       gradient of the weighted sum.

    Cost per step: ``T`` partial backward passes from the losses to ``z`` and a ``(T, D)``
    product (``D`` = ``z``'s size), on top of the usual backward. A model that records no
    representation (none was given) is trained as ``fixed``, with one warning.
    """

    needs_representation = True

    def __init__(self, task_names: tuple[str, ...], base_weights: tuple[float, ...]) -> None:
        super().__init__(task_names, base_weights)
        self._last: list[float] | None = None
        self._warned = False

    def coefficients(self, gram: np.ndarray, losses: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        """``(n,)`` coefficients for the ``n`` present tasks (their positions ``tasks``), from
        their gradients' Gram matrix and their weighted losses ``w_t L_t`` (float64)."""
        raise NotImplementedError

    def backward(
        self,
        losses: Mapping[str, torch.Tensor],
        *,
        shared: Sequence[nn.Parameter],
        last_shared: Sequence[SharedLayer],
        extra: torch.Tensor | None = None,
        representation: Representation | None = None,
    ) -> torch.Tensor:
        stacked = self._stack(losses)
        weighted = [w * loss for w, loss in zip(self.base_weights, stacked, strict=True)]
        total = sum(weighted, stacked[0].new_zeros(()))
        if extra is not None:
            total = total + extra
        if representation is None or not representation.tensors:
            if not self._warned:
                warnings.warn(
                    f"{type(self).__name__}: the model recorded no shared representation; using fixed weights",
                    stacklevel=2,
                )
                self._warned = True
            _backward_if_needed(total)
            return total.detach()
        z = list(representation.tensors)
        if not total.requires_grad:
            return total.detach()
        rows = representation.rows
        per_task = []
        for loss in weighted:
            grads: Sequence[torch.Tensor | None] = (
                torch.autograd.grad(loss, z, retain_graph=True, allow_unused=True)
                if loss.requires_grad
                else [None] * len(z)
            )
            per_task.append(
                torch.cat(
                    [
                        (torch.zeros_like(t) if g is None else g)[(slice(None), rows) if rows else ...].reshape(-1)
                        for t, g in zip(z, grads, strict=True)
                    ]
                )
            )
        flat = torch.stack(per_task).float()  # (T, D)
        # The Gram in float64: near-parallel gradients have an eigenvalue far below float32's
        # rounding of the others, and Aligned-MTL divides by its square root.
        exact = flat.double()
        read = torch.cat([(exact @ exact.T).reshape(-1), torch.stack([w.detach().double() for w in weighted])])
        host = read.double().cpu().numpy()  # the one read of the step
        T = self.num_tasks
        gram, values = host[: T * T].reshape(T, T), host[T * T :]
        present = (np.diag(gram) > 0) & np.isfinite(values) & (values != 0)
        coef = np.ones(T)
        if present.sum() >= 1:
            idx = np.flatnonzero(present)
            coef[idx] = self.coefficients(gram[np.ix_(idx, idx)], values[idx], idx)
        self._last = (coef * np.asarray(self.base_weights)).tolist()
        if np.all(coef == 1.0):
            total.backward()
            return total.detach()
        delta = torch.from_numpy(coef - 1.0).to(device=flat.device, dtype=flat.dtype) @ flat
        extra_grads, offset = [], 0
        for t in z:
            part = t[(slice(None), rows)] if rows else t
            d = delta[offset : offset + part.numel()].view_as(part).to(t.dtype)
            offset += part.numel()
            if rows:
                full = torch.zeros_like(t)
                full[(slice(None), rows)] = d
                d = full
            extra_grads.append(d)
        torch.autograd.backward([total, *z], [torch.ones_like(total), *extra_grads])
        return total.detach()

    def weights(self) -> dict[str, float]:
        """The last step's effective weights ``a_t w_t`` (the base weights before the first)."""
        if self._last is None:
            return super().weights()
        return dict(zip(self.task_names, self._last, strict=True))


@register_weighting("mgda")
class MGDA(RepresentationGradient):
    """MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018): the step is the point of minimum norm in the convex hull of the task
    gradients on the shared representation, a direction that decreases every task (or none,
    at a Pareto-stationary point). Solved exactly (:func:`~mtrec.repgrad.min_norm_coefficients`)
    and scaled by the number of tasks present, so that agreeing tasks get ``fixed``'s step.
    At most :data:`~mtrec.repgrad.MAX_MIN_NORM_TASKS` tasks.
    """

    def __init__(self, task_names: tuple[str, ...], base_weights: tuple[float, ...]) -> None:
        super().__init__(task_names, base_weights)
        if self.num_tasks > repgrad.MAX_MIN_NORM_TASKS:
            raise ValueError(f"mgda takes at most {repgrad.MAX_MIN_NORM_TASKS} tasks, got {self.num_tasks}")

    def coefficients(self, gram: np.ndarray, losses: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        return len(gram) * repgrad.min_norm_coefficients(gram)


@register_weighting("cagrad")
class CAGrad(RepresentationGradient):
    """CAGrad (Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task
    Learning", NeurIPS 2021) on the shared representation: the direction within ``c ||g0||``
    of the average gradient ``g0`` that improves the worst task most, rescaled by
    ``T / (1 + c)`` (:func:`~mtrec.repgrad.cagrad_coefficients`); ``c = 0`` is ``fixed``.

    Args:
        task_names: Task names.
        base_weights: The config's per-task weights.
        c: The radius of the ball around the average gradient (the paper's 0.4 for MTL).
    """

    def __init__(self, task_names: tuple[str, ...], base_weights: tuple[float, ...], *, c: float = 0.4) -> None:
        super().__init__(task_names, base_weights)
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"cagrad: c must be >= 0, got {c}")
        self.c = float(c)

    def coefficients(self, gram: np.ndarray, losses: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        return repgrad.cagrad_coefficients(gram, self.c)


@register_weighting("nash_mtl")
class NashMTL(RepresentationGradient):
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022) on the
    shared representation: the Nash bargaining solution ``d = sum_t alpha_t g_t`` with
    ``g_t . d = 1 / alpha_t`` (:func:`~mtrec.repgrad.nash_coefficients`): invariant to each
    task's loss scale, and ``||d||^2 = T`` whatever the gradients' size (the paper's scale;
    an adaptive optimiser such as Adam absorbs it). Solved at every step (the paper's
    cvxpy iterations are replaced by Newton steps on the equivalent concave problem).
    """

    def coefficients(self, gram: np.ndarray, losses: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        return repgrad.nash_coefficients(gram)


@register_weighting("aligned_mtl")
class AlignedMTL(RepresentationGradient):
    """Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023), its upper-bound form on the shared representation: the task
    gradients are rotated and rescaled so that their matrix has condition number 1
    (:func:`~mtrec.repgrad.aligned_coefficients`), removing both the conflict and the
    dominance of the larger gradients; the step is the sum of the aligned gradients.
    """

    def coefficients(self, gram: np.ndarray, losses: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        return repgrad.aligned_coefficients(gram)


@register_weighting("db_mtl")
class DBMTL(RepresentationGradient):
    """DB-MTL (Lin, Ye, Xu, Shi & Zhang, "Dual-Balancing Multi-Task Learning", 2023) on the
    shared representation.

    Loss-scale balancing: each task descends ``log L_t``, whose gradient is ``h_t = g_t / (w_t
    L_t)`` (a task's loss scale cancels). Gradient-magnitude balancing: every ``h_t`` is
    scaled to the largest norm, ``max_s n_s / n_t``, where ``n_t`` is an exponential moving
    average of ``||h_t||`` (``n <- ||h|| + beta / k ** beta_sigma * (n - ||h||)`` at a task's
    ``k``-th step, the paper's schedule). The step is ``sum_t w_t (max_s n_s / n_t) h_t``.

    The paper averages the gradient *vectors* over steps; on the representation a batch's
    rows are new samples, so the average of vectors would mix different rows, and only
    their norms are averaged here. The losses must be positive (a log is taken).

    Args:
        task_names: Task names.
        base_weights: The config's per-task weights.
        beta: The moving average's weight on the past (0: this step's norms only).
        beta_sigma: Its decay with the step count.
    """

    norms: torch.Tensor
    steps: torch.Tensor

    def __init__(
        self,
        task_names: tuple[str, ...],
        base_weights: tuple[float, ...],
        *,
        beta: float = 0.9,
        beta_sigma: float = 0.5,
    ) -> None:
        super().__init__(task_names, base_weights)
        if not (math.isfinite(beta) and 0 <= beta < 1) or not (math.isfinite(beta_sigma) and beta_sigma >= 0):
            raise ValueError(f"db_mtl needs 0 <= beta < 1 and beta_sigma >= 0, got {beta}, {beta_sigma}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.register_buffer("norms", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros(self.num_tasks, dtype=torch.int64))

    def coefficients(self, gram: np.ndarray, losses: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        if (losses <= 0).any():
            raise ValueError(f"db_mtl takes the log of the task losses, which must be > 0, got {losses.tolist()}")
        log_norms = np.sqrt(np.diag(gram)) / losses  # ||h_t||
        norms = self.norms.cpu().numpy()
        steps = self.steps.cpu().numpy()
        for j, t in enumerate(tasks):
            steps[t] += 1
            decay = self.beta / steps[t] ** self.beta_sigma
            norms[t] = log_norms[j] if steps[t] == 1 else log_norms[j] + decay * (norms[t] - log_norms[j])
        self.norms.copy_(torch.from_numpy(norms))
        self.steps.copy_(torch.from_numpy(steps))
        mine = norms[tasks]
        base = np.asarray(self.base_weights)[tasks]
        return base * (mine.max() / mine) / losses


def create_weighting(
    name: str, task_names: tuple[str, ...], base_weights: tuple[float, ...], **params: Any
) -> LossWeighting:
    """Builds a loss-weighting strategy by name.

    Args:
        name: One of :data:`WEIGHTINGS` (``fixed``, ``uncertainty``, ``gradnorm``, ``dwa``,
            ``rlw``, ``famo``, ``pcgrad``, and on the shared representation ``mgda``,
            ``cagrad``, ``nash_mtl``, ``aligned_mtl``, ``db_mtl``).
        task_names: Task names.
        base_weights: The config's per-task weights.
        **params: The strategy's keyword parameters (e.g. ``alpha`` for ``gradnorm``).

    Raises:
        ValueError: An unknown name or parameter, or an invalid value.

    Example:
        >>> create_weighting("dwa", ("ctr", "cvr"), (1.0, 1.0), temperature=2.0).weights()
        {'ctr': 1.0, 'cvr': 1.0}
    """
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {name!r} (expected one of {', '.join(sorted(WEIGHTINGS))})")
    cls = WEIGHTINGS[name]
    accepted = list(weighting_parameters(name))
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) if accepted else "none"
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for loss weighting {name!r} (accepted: {allowed})")
    return cls(tuple(task_names), tuple(base_weights), **params)
