"""Optimisers for embedding tables.

``torch.optim.SparseAdam`` updates only the rows a batch looked up, which keeps a step's
cost proportional to the batch, but it must ``coalesce`` the sparse gradient first, and on
a GPU that reads the number of distinct rows back to the host: every step waits for the
device to drain. :class:`LazyAdam` computes the same update from a dense gradient with
masked element-wise operations, which never read a device value on the host, at the cost
of a few passes over the whole table per step (cheap on a GPU for tables up to tens of
millions of values, costly on a CPU for large tables).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

__all__ = ["LazyAdam"]


class LazyAdam(torch.optim.Optimizer):
    """Adam that moves only the rows whose gradient is nonzero: SparseAdam's update, dense.

    Rows with an all-zero gradient (not looked up by the batch) keep their values and both
    moment estimates, exactly as under ``torch.optim.SparseAdam``; the step count and bias
    correction are per parameter, as there. The update of a row that has a gradient is
    SparseAdam's: ``m += (1 - b1) (g - m)``, ``v += (1 - b2) (g^2 - v)``,
    ``p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``. (A row looked up with
    an exactly zero gradient is the one difference: SparseAdam would decay its moments.)

    Args:
        params: Parameters whose first dimension indexes rows (e.g. an embedding table).
        lr: Learning rate.
        betas: Decay rates of the first and second moment estimates.
        eps: Added to the square root of the second moment.

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
    ) -> None:
        if lr <= 0 or eps <= 0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LazyAdam: invalid lr={lr}, betas={betas} or eps={eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

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
                m.lerp_(grad, touched * (1 - beta1))  # m += (1 - b1) (g - m) on touched rows
                v.lerp_(grad.square(), touched * (1 - beta2))
                step = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                p.addcdiv_(m * touched, v.sqrt().add_(group["eps"]), value=-step_size)
        return loss
