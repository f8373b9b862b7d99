"""Optimisers for embedding tables.

``torch.optim.SparseAdam`` updates only the rows a batch looked up, which keeps a step's
cost proportional to the batch, but it must ``coalesce`` the sparse gradient first, and on
a GPU that reads the number of distinct rows back to the host: every step waits for the
device to drain. :class:`LazyAdam` computes the same update from a dense gradient with
masked element-wise operations, which never read a device value on the host, at the cost
of a few passes over the whole table per step (cheap on a GPU for tables up to tens of
millions of values, costly on a CPU for large tables).

Both take ``weight_decay`` (``train.embedding_weight_decay``): AdamW's decoupled decay
``p -= lr * wd * p`` applied, before the Adam update, to the rows the batch touched only
(:class:`SparseAdamW` wraps ``torch.optim.SparseAdam``, which has none); an untouched row
stays bit-identical, so a rare id is not shrunk towards 0 while it is absent from the data.

:func:`lr_factor` and :func:`make_lr_schedulers` give the learning-rate warm-up and decay
(``train.warmup_steps``, ``train.lr_decay``, ``train.min_lr_ratio``); :func:`make_optimizers`
builds a run's optimisers from its config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

from mtrec.errors import ConfigError

if TYPE_CHECKING:
    from mtrec.config import Config

__all__ = ["LR_DECAYS", "LazyAdam", "SparseAdamW", "lr_factor", "make_lr_schedulers", "make_optimizers"]

LR_DECAYS = ("none", "cosine", "linear")


class LazyAdam(torch.optim.Optimizer):
    """Adam that moves only the rows whose gradient is nonzero: SparseAdam's update, dense.

    Rows with an all-zero gradient (not looked up by the batch) keep their values and both
    moment estimates, exactly as under ``torch.optim.SparseAdam``; the step count and bias
    correction are per parameter, as there. The update of a row that has a gradient is
    SparseAdam's: ``m += (1 - b1) (g - m)``, ``v += (1 - b2) (g^2 - v)``,
    ``p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``. (A row looked up with
    an exactly zero gradient is the one difference: SparseAdam would decay its moments.)
    With ``weight_decay`` a touched row first shrinks, ``p *= 1 - lr * weight_decay``
    (AdamW's decoupled decay, on touched rows only, as :class:`SparseAdamW`).

    Args:
        params: Parameters whose first dimension indexes rows (e.g. an embedding table).
        lr: Learning rate.
        betas: Decay rates of the first and second moment estimates.
        eps: Added to the square root of the second moment.
        weight_decay: Decoupled weight decay of the touched rows (0: none).

    Example:
        >>> table = torch.nn.Parameter(torch.zeros(4, 2))
        >>> opt = LazyAdam([table], lr=0.1)
        >>> table.grad = torch.tensor([[1.0, -1.0], [0.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
        >>> opt.step()
        >>> [round(x, 4) for x in table.detach()[:, 0].tolist()]  # rows 1 and 2 had no gradient
        [-0.1, 0.0, 0.0, -0.1]
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or eps <= 0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LazyAdam: invalid lr={lr}, betas={betas} or eps={eps}")
        if not weight_decay >= 0:
            raise ValueError(f"LazyAdam: invalid weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("LazyAdam takes dense gradients; use torch.optim.SparseAdam for sparse ones")
                if p.dtype == torch.float16:
                    # eps (1e-8) rounds to 0 in fp16: untouched rows would divide 0 by 0.
                    raise RuntimeError("LazyAdam keeps fp32 (or bf16) weights; got a float16 parameter")
                state = self.state[p]
                if not state:
                    state["step"] = 0  # a host counter: the bias correction needs no device read
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                # 1 where the row has a gradient, shaped (rows, 1, ...) to broadcast over a row.
                rows = grad.shape[0]
                touched = grad.ne(0).reshape(rows, -1).any(dim=1).to(p.dtype)
                touched = touched.view(rows, *([1] * (p.dim() - 1)))
                # The moments update in place (lerp_) and the weights in one addcdiv_; g^2,
                # m * touched and sqrt(v) are temporaries: ~20 table-sized reads and writes.
                # (A state saved before weight_decay existed has no such key: it had none.)
                weight_decay = group.get("weight_decay", 0.0)
                if weight_decay:
                    # Untouched rows are multiplied by exactly 1: bit-identical.
                    p.mul_(1 - touched * (group["lr"] * weight_decay))
                m.lerp_(grad, touched * (1 - beta1))  # m += (1 - b1) (g - m) on touched rows
                v.lerp_(grad.square(), touched * (1 - beta2))
                step = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                p.addcdiv_(m * touched, v.sqrt().add_(group["eps"]), value=-step_size)
        return loss


class SparseAdamW(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` with AdamW's decoupled weight decay on the touched rows.

    Before SparseAdam's update, each row present in the (coalesced) sparse gradient is
    multiplied by ``1 - lr * weight_decay``; rows absent from it are not touched at all.
    That is :class:`LazyAdam`'s ``weight_decay`` (the dense-gradient path), so both paths
    apply the same update. (The alternative, an L2 term ``wd/2 * sum of squared looked-up
    rows`` in the loss, would pass the decay through Adam's normalisation and count a row
    looked up twice in a batch twice; the decoupled form is the same in both paths.)
    With ``weight_decay=0`` it is SparseAdam.

    Example:
        >>> table = torch.nn.Parameter(torch.ones(3, 2))
        >>> opt = SparseAdamW([table], lr=0.1, weight_decay=1.0)
        >>> table.grad = torch.sparse_coo_tensor([[0]], torch.zeros(1, 2), (3, 2), check_invariants=True)
        >>> opt.step()
        >>> [round(x, 4) for x in table.detach()[:, 0].tolist()]  # row 0 looked up (gradient 0), 1 and 2 not
        [0.9, 1.0, 1.0]
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not weight_decay >= 0:
            raise ValueError(f"SparseAdamW: invalid weight_decay={weight_decay}")
        self._weight_decay = weight_decay  # read by add_param_group, which __init__ calls
        super().__init__(params, lr=lr, betas=betas, eps=eps)
        self.defaults["weight_decay"] = weight_decay

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("weight_decay", self._weight_decay)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            weight_decay = group.get("weight_decay", 0.0)
            if not weight_decay:
                continue
            for p in group["params"]:
                if p.grad is None or not p.grad.is_sparse:
                    continue  # SparseAdam refuses a dense gradient itself
                # Coalesced once here; SparseAdam's own coalesce() is then a no-op.
                grad = p.grad.coalesce()
                p.grad = grad
                rows = grad.indices()[0]
                p.index_copy_(0, rows, p.index_select(0, rows) * (1 - group["lr"] * weight_decay))
        super().step()
        return loss


def lr_factor(step: int, *, warmup_steps: int, decay: str, total_steps: int, min_lr_ratio: float) -> float:
    """The multiple of the base learning rate for the update after ``step`` earlier ones.

    Warm-up: the first ``warmup_steps`` updates ramp up linearly, the ``k``-th (1-based)
    at ``k / warmup_steps`` of the rate. Then ``decay`` over the remaining
    ``total_steps - warmup_steps`` updates: ``none`` keeps 1; ``cosine`` goes from 1 to
    ``min_lr_ratio`` along half a cosine; ``linear`` along a straight line; after
    ``total_steps`` the factor stays at ``min_lr_ratio``.

    Example:
        >>> [lr_factor(s, warmup_steps=2, decay="linear", total_steps=6, min_lr_ratio=0.0) for s in range(7)]
        [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if decay not in LR_DECAYS:
        raise ValueError(f"decay: expected one of {', '.join(LR_DECAYS)}, got {decay!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "none":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def make_lr_schedulers(
    optimizers: Iterable[torch.optim.Optimizer],
    *,
    warmup_steps: int,
    decay: str,
    total_steps: int,
    min_lr_ratio: float,
) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One :class:`~torch.optim.lr_scheduler.LambdaLR` per optimiser following :func:`lr_factor`
    (every parameter group alike), to be stepped once per training step after the
    optimisers; none (``[]``) when there is neither warm-up nor decay.

    The factor is a host computation and the new rates are Python floats in the parameter
    groups: a scheduler step reads nothing from the device.
    """
    if warmup_steps == 0 and decay == "none":
        return []

    def factor(step: int) -> float:
        return lr_factor(
            step, warmup_steps=warmup_steps, decay=decay, total_steps=total_steps, min_lr_ratio=min_lr_ratio
        )

    return [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers]


class HasEmbeddingTables(Protocol):
    """What training asks of a model about its embedding tables (as :class:`mtrec.models.base.MultiTaskModel`)."""

    def embedding_tables(self) -> list[nn.Parameter]: ...
    def embedding_parameters(self) -> list[nn.Parameter]: ...
    def dense_parameters(self) -> list[nn.Parameter]: ...
    def use_sparse_embedding_grads(self, sparse: bool) -> None: ...


def make_optimizers(model: nn.Module, config: Config, loaded: set[int] | None = None) -> list[torch.optim.Optimizer]:
    """Adam (fused where supported) for dense weights, Adam on touched rows for the embedding.

    Sparse Adam updates only the rows a batch touched, so its cost follows the batch, not
    the size of the tables (a dense Adam step over millions of embedding rows costs more
    than the whole MLP on a CPU). With a dense table gradient (``model.features.embedding``
    built with ``sparse=False``), :class:`mtrec.training.optim.LazyAdam` applies the same update.
    ``train.embedding_weight_decay`` decays the touched rows in both (decoupled, AdamW-style:
    :class:`mtrec.training.optim.SparseAdamW` and ``LazyAdam(weight_decay=...)``).

    Frozen parameters (``requires_grad`` off, ``train.freeze``) are left out; the parameters
    whose ids are in ``loaded`` (a warm start's) learn at ``train.init_lr_scale`` times the rate,
    in a param group of their own.
    """
    t = config.train
    embedded = cast(HasEmbeddingTables, model)  # a built model (build_model) has these methods
    tables = [p for p in embedded.embedding_tables() if p.requires_grad]
    dense = [p for p in embedded.dense_parameters() if p.requires_grad]
    if not dense and not tables:
        raise ConfigError("train.freeze: every parameter is frozen, nothing would train")
    opt = _adam(_groups(dense, loaded, t.lr, t.init_lr_scale), t.weight_decay)
    optimizers: list[torch.optim.Optimizer] = [opt]
    if tables:
        lr = t.embedding_lr or t.lr
        sparse = any(p.requires_grad for p in embedded.embedding_parameters())
        embedding_opt = SparseAdamW if sparse else LazyAdam
        optimizers.append(
            embedding_opt(_groups(tables, loaded, lr, t.init_lr_scale), weight_decay=t.embedding_weight_decay)
        )
    return optimizers


def _groups(params: list[nn.Parameter], loaded: set[int] | None, lr: float, scale: float) -> list[dict[str, Any]]:
    """One param group at ``lr``, or the ``loaded`` ones at ``lr * scale`` and the rest at ``lr``
    (an empty group is kept: the first is always the loaded one, the second the new one, so a
    resumed run finds the same groups)."""
    if loaded is None:
        return [{"params": params, "lr": lr}]
    return [
        {"params": [p for p in params if id(p) in loaded], "lr": lr * scale},
        {"params": [p for p in params if id(p) not in loaded], "lr": lr},
    ]


def _adam(groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(groups, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(groups, weight_decay=weight_decay)
