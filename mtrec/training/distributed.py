"""Data-parallel training across processes: torchrun, DDP, sparse embedding gradients.

``torchrun --nproc-per-node N -m mtrec train --config ...`` starts N processes (ranks),
each with its own shard of the data and a full copy of the model. This module holds the
``torch.distributed`` pieces the trainer needs, so that the training loop only calls them:

- :func:`init_distributed` reads torchrun's environment, joins the process group (gloo on
  CPU, NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``) and says who this rank is;
- :func:`wrap_model` wraps the model in ``DistributedDataParallel`` for its dense weights
  and makes DDP *ignore* embedding tables with sparse gradients, which
  :func:`sync_sparse_grads` averages itself (see below); a table set to dense gradients
  (``train.embedding_optimizer: dense``, never chosen by ``auto`` under DDP) is an
  ordinary DDP parameter, all-reduced whole every step;
- :func:`all_reduce_grads` averages the gradients of parameters outside the model (the
  uncertainty weighting's log-variances);
- :func:`gather_rows` concatenates every rank's validation predictions so that metrics
  (AUC) are exact over the whole validation set, never an average of per-rank values;
- :func:`check_same`, :func:`all_reduce_scalar`, :func:`all_reduce_array` keep decisions
  (steps per epoch, early stopping, DWA's epoch losses) identical on every rank;
- :func:`fail_fast` ends a rank that raises with one line ``mtrec: error: rank R: ...`` and
  an immediate non-zero exit, which makes torchrun stop the other ranks at once instead of
  leaving them blocked in a collective.

Why DDP ignores the (sparse-gradient) embedding tables
------------------------------------------------------
The fused embedding table produces a sparse gradient (the rows a batch touched) that
``torch.optim.SparseAdam`` applies. DDP only reduces sparse gradients with gloo (NCCL has
no sparse all-reduce), and densifying them would all-reduce the whole table every step:
for a table of a few million rows that is hundreds of MB per step, more than the rest of
the step (see :func:`sync_sparse_grads` for figures). So the table is excluded from DDP
and its gradient is synchronised by an all-gather of each rank's coalesced rows, whose cost
follows the rows the batches touched, on any backend.

Every rank applies the same averaged gradients with the same optimiser state, so the
parameters stay identical on all ranks without ever being broadcast again. With equal
per-rank batch sizes, one step on N ranks equals one step of a single process on the
concatenated batch (a task's loss being the mean over its sample space, exact when each
rank's batch holds the same number of that task's rows, as for the full-sample-space CTR
task; otherwise the per-rank means are averaged, as with gradient accumulation).

Example:
    >>> ctx, device = init_distributed("cpu")  # without torchrun: a single process
    >>> ctx.enabled, ctx.is_main, device
    (False, True, device(type='cpu'))
    >>> gather_rows(np.arange(3), ctx).tolist()
    [0, 1, 2]
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import time
import traceback
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mtrec.errors import ConfigError, MtrecError

__all__ = [
    "SINGLE_PROCESS",
    "UNSUPPORTED_WEIGHTINGS",
    "DistContext",
    "all_reduce_array",
    "all_reduce_grads",
    "all_reduce_scalar",
    "barrier",
    "broadcast_parameters",
    "check_loss_weighting",
    "check_same",
    "fail_fast",
    "gather_rows",
    "global_mean_scale",
    "init_distributed",
    "shard_bounds",
    "shutdown",
    "sync_sparse_grads",
    "unwrap_model",
    "wrap_model",
]

# Whether this module created the default process group (and so may destroy it).
_OWNS_GROUP = False

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistContext:
    """Who this process is in a distributed job.

    Attributes:
        rank: Global rank, ``0 .. world_size - 1``.
        world_size: Number of processes in the job.
        local_rank: Rank on this node (the GPU index under NCCL).
        local_world_size: Processes on this node.
        backend: ``"gloo"`` or ``"nccl"``; ``None`` when not distributed.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether a process group is in use (more than one process)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes the model directory, logs and progress."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must live for this backend's collectives (NCCL: the rank's GPU)."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


SINGLE_PROCESS = DistContext()


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ConfigError(f"environment variable {name} is not set (start distributed training with torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}: expected an integer, got {raw!r}") from None


def init_distributed(
    device: torch.device | str = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[DistContext, torch.device]:
    """Joins the process group that torchrun describes, or does nothing for one process.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT``; with ``WORLD_SIZE`` unset or 1 there is no process
    group and ``device`` is returned unchanged. Otherwise the backend follows the device:
    NCCL for CUDA (each rank on ``cuda:LOCAL_RANK``, made the current device), gloo for CPU.

    Args:
        device: The resolved training device (``mtrec.training.resolve_device``): ``cpu``,
            ``cuda`` or ``cuda:N`` (an explicit index is only accepted with one process per
            node, since several ranks on one GPU break NCCL).
        timeout_s: How long a collective may wait for the other ranks before it fails. It
            is the backstop for a rank that hangs without exiting (a rank that exits is
            noticed at once: torchrun stops the others); it must exceed the longest work one
            rank does while the others wait (loading data, rank 0 saving the model).

    Returns:
        The context and the torch device this rank trains on.

    Raises:
        ConfigError: Incomplete torchrun environment, an unsupported device, or a process
            group that cannot be joined.
    """
    device = torch.device(device)
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return SINGLE_PROCESS, device
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    backend, device = _backend_and_device(device, rank, local_rank, local_world_size)
    _join_group(backend, device, rank, world_size, timeout_s)
    ctx = DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=local_world_size,
        backend=backend,
    )
    if ctx.world_size != world_size or ctx.rank != rank:
        raise ConfigError(
            f"the process group has rank {ctx.rank} of {ctx.world_size}, the environment says {rank} of {world_size}"
        )
    return ctx, device


def _backend_and_device(
    device: torch.device, rank: int, local_rank: int, local_world_size: int
) -> tuple[str, torch.device]:
    """The backend for ``device`` and this rank's device (a CUDA one is made current)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {device} requested but no CUDA device is available")
        if device.index is not None and local_world_size > 1 and device.index != local_rank:
            raise ConfigError(
                f"train.device: {device} would put all {local_world_size} ranks of this node on one GPU; "
                "use 'cuda' or 'auto' (rank r trains on cuda:LOCAL_RANK)"
            )
        count = torch.cuda.device_count()
        # One process per node may pick its GPU (cuda:N); otherwise rank r uses cuda:LOCAL_RANK.
        index = device.index if device.index is not None and local_world_size == 1 else local_rank
        if index >= count:
            raise ConfigError(
                f"rank {rank}: GPU {index} requested but only {count} CUDA device(s) are visible; "
                f"start at most {count} processes per node (--nproc-per-node)"
            )
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        backend = "nccl"
        available = dist.is_nccl_available()
    elif device.type == "cpu":
        backend = "gloo"
        available = dist.is_gloo_available()
    else:
        raise ConfigError(f"train.device: distributed training runs on cpu or cuda, not {device.type}")
    if not available:
        raise ConfigError(f"this torch build has no {backend} backend, needed for distributed training on {device}")
    return backend, device


def _join_group(backend: str, device: torch.device, rank: int, world_size: int, timeout_s: float) -> None:
    """Joins the default process group, or checks the backend of one already joined."""
    global _OWNS_GROUP
    if dist.is_initialized():
        # Someone (a test, a notebook, an outer framework) already joined: reuse its group.
        if dist.get_backend() != backend:
            raise ConfigError(f"the process group uses {dist.get_backend()}, but training on {device} needs {backend}")
        return
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ConfigError(f"WORLD_SIZE={world_size} but {name} is not set (start with torchrun)")
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # network/store errors of every kind: one clear line instead
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise ConfigError(f"rank {rank}: could not join the {backend} process group at {where}: {exc}") from None
    _OWNS_GROUP = True


def shutdown(ctx: DistContext) -> None:
    """Leaves the process group if :func:`init_distributed` created it (else nothing)."""
    global _OWNS_GROUP
    if ctx.enabled and _OWNS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
        _OWNS_GROUP = False


def barrier(ctx: DistContext) -> None:
    """Waits until every rank gets here (e.g. until rank 0 has written the model)."""
    if not ctx.enabled:
        return
    if ctx.backend == "nccl":
        # Without device_ids NCCL guesses the GPU from the rank, which is wrong across nodes.
        dist.barrier(device_ids=[ctx.local_rank])
    else:
        dist.barrier()


def shard_bounds(num_rows: int, ctx: DistContext) -> tuple[int, int]:
    """This rank's contiguous slice ``[start, stop)`` of ``num_rows`` rows.

    Shards are in rank order and differ in size by at most one row, so
    ``gather_rows(values[start:stop], ctx)`` rebuilds the rows in their original order.

    Example:
        >>> [shard_bounds(10, DistContext(rank=r, world_size=3, backend="gloo")) for r in range(3)]
        [(0, 4), (4, 7), (7, 10)]
    """
    base, extra = divmod(num_rows, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return start, start + base + (ctx.rank < extra)


# --------------------------------------------------------------------------- model


def _embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    fn = getattr(model, "embedding_parameters", None)
    if fn is not None:
        return list(fn())
    # Any other module: the weights of lookups declared sparse (nn.Embedding(sparse=True), ...).
    return [
        cast(nn.Parameter, m.weight)
        for m in model.modules()
        if getattr(m, "sparse", False) is True and hasattr(m, "weight")
    ]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (the model itself otherwise).

    Use it for everything but the training forward: the model's own methods
    (``dense_parameters``, ``auxiliary_loss``), prediction, saving (no ``module.`` prefix).
    """
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_model(
    model: nn.Module,
    ctx: DistContext,
    device: torch.device,
    *,
    sparse_params: Sequence[nn.Parameter] | None = None,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """``DistributedDataParallel`` over the dense weights, with the sparse tables left out.

    DDP broadcasts rank 0's dense weights and all-reduces (averages) their gradients during
    the backward pass. The parameters with sparse gradients are excluded from DDP (see the
    module docstring); they are broadcast from rank 0 here, after checking that every rank
    built tables of the same shapes, and their gradients must be averaged with
    :func:`sync_sparse_grads` after each backward.

    Args:
        model: The model, already on ``device``.
        ctx: The distributed context; when not enabled the model is returned unchanged.
        device: The rank's device (from :func:`init_distributed`).
        sparse_params: The parameters with sparse gradients; default
            ``model.embedding_parameters()``.
        find_unused_parameters: DDP's option, for models where some dense parameter gets no
            gradient in some step. mtrec's losses keep every task attached to the graph
            (a task absent from a batch contributes ``0 * logits``), so it is not needed.

    Returns:
        The wrapped model (call it for the training forward), or ``model``.

    Raises:
        MtrecError: The ranks built embedding tables of different shapes.
    """
    if not ctx.enabled:
        return model
    sparse = list(sparse_params) if sparse_params is not None else _embedding_parameters(model)
    ids = {id(p) for p in sparse}
    names = [name for name, p in model.named_parameters() if id(p) in ids]
    if len(names) != len(ids):
        raise ValueError("sparse_params must be parameters of the model")
    check_same(
        [(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()],
        ctx,
        "the model's parameter shapes (every rank must fit the same preprocessing and config)",
    )
    # Private but the documented way since torch 1.7 (pytorch#43690) and what torchrec uses;
    # it sets module._ddp_params_and_buffers_to_ignore, which DDP reads in its constructor.
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    kwargs: dict[str, Any] = {"find_unused_parameters": find_unused_parameters}
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index]
        kwargs["output_device"] = device.index
    if not any(b.is_floating_point() for b in model.buffers()):
        # The buffers are index constants (embedding offsets, expert maps), identical on every
        # rank by construction: re-broadcasting them before every forward is one wasted
        # collective per step. (Floating buffers, e.g. BatchNorm statistics, keep DDP's sync.)
        params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    wrapped = nn.parallel.DistributedDataParallel(model, **kwargs)
    # DDP's constructor broadcast skips ignored parameters: without this, ranks seeded
    # differently would train different tables forever.
    broadcast_parameters(sparse, ctx)
    return wrapped


def broadcast_parameters(tensors: nn.Module | Iterable[torch.Tensor], ctx: DistContext, *, src: int = 0) -> None:
    """Overwrites ``tensors`` (a module's parameters and buffers) on every rank with ``src``'s.

    Args:
        tensors: A module, or parameters/buffers, in the same order on every rank.
        ctx: The distributed context (nothing happens when not enabled).
        src: The rank whose values win.

    Raises:
        MtrecError: The ranks hold tensors of different shapes.
    """
    if not ctx.enabled:
        return
    if isinstance(tensors, nn.Module):
        tensors = [*tensors.parameters(), *tensors.buffers()]
    items = list(tensors)
    check_same([(tuple(t.shape), str(t.dtype)) for t in items], ctx, "the shapes of the tensors to broadcast")
    with torch.no_grad():
        for t in items:
            if t.device == ctx.comm_device:
                dist.broadcast(t.detach(), src)
            else:
                buf = t.detach().to(ctx.comm_device)
                dist.broadcast(buf, src)
                t.detach().copy_(buf)


# --------------------------------------------------------------------------- gradients


def sync_sparse_grads(params: Sequence[nn.Parameter], ctx: DistContext) -> None:
    """Replaces each parameter's sparse gradient by the average over all ranks.

    Call it after every backward pass, before the optimiser steps, with the parameters
    :func:`wrap_model` left out of DDP (``model.embedding_parameters()``). Each rank
    contributes its coalesced gradient rows; the result, ``sum_r grad_r / world_size``, is a
    coalesced sparse gradient over the union of the rows, identical bit for bit on every
    rank (the rows of each rank are added in rank order, each row at most once per rank,
    so no atomics decide the order of additions), which keeps the tables identical under
    ``SparseAdam``. The division by ``world_size`` matches DDP's averaging of the dense
    gradients: the step equals one on the ranks' concatenated batch.

    Cost: one all-gather of the row counts of all parameters, then two per parameter (row
    ids, values), moving ``rows x (8 + 4 D)`` bytes per rank, where ``rows`` is the number of distinct rows
    the rank's batch touched. The alternative, densifying and all-reducing the table, moves
    the whole table every step. Measured with gloo, 2 CPU processes of 1 thread, a
    1024-row batch of 40 Zipf-distributed lookups per row (~36k distinct rows) into a
    16-wide table: this function takes 19 ms (1M-row table) and 29 ms (5M rows), densifying
    and all-reducing the gradient 157 ms and 893 ms - it grows with the table, not the batch.

    A parameter whose gradient is ``None`` contributes no rows (its gradient stays ``None``
    on every rank only if no rank has rows); a dense gradient on any rank (a table built
    with ``sparse=False``) makes every rank fall back to an all-reduce of dense gradients.

    Args:
        params: Parameters with sparse gradients, in the same order on every rank.
        ctx: The distributed context (nothing happens when not enabled).
    """
    if not ctx.enabled or not params:
        return
    dev = ctx.comm_device
    # Per parameter: [kind (0 none, 1 sparse, 2 dense), number of rows].
    meta = torch.zeros(len(params), 2, dtype=torch.int64)
    coalesced: list[torch.Tensor | None] = []
    for i, p in enumerate(params):
        g = p.grad
        if g is None:
            coalesced.append(None)
        elif g.is_sparse:
            if g.sparse_dim() != 1:
                raise ValueError(f"expected row-sparse gradients (sparse_dim 1), got sparse_dim {g.sparse_dim()}")
            g = g.coalesce()
            coalesced.append(g)
            meta[i] = torch.tensor([1, g.indices().shape[1]])
        else:
            coalesced.append(g)
            meta[i, 0] = 2
    metas = _all_gather_same_shape(meta.to(dev), ctx).cpu()  # (world, P, 2)
    for i, p in enumerate(params):
        kinds = metas[:, i, 0]
        if bool((kinds == 2).any()):
            _average_dense(p, coalesced[i], ctx)
            continue
        counts = metas[:, i, 1].tolist()
        if sum(counts) == 0:
            p.grad = None  # no rank touched the table: the optimiser skips it everywhere
            continue
        g = coalesced[i]
        row_shape = tuple(p.shape[1:])
        width = max(counts)
        ids = torch.zeros(width, dtype=torch.int64, device=dev)
        values = torch.zeros((width, *row_shape), dtype=p.dtype, device=dev)
        if g is not None:
            n = counts[ctx.rank]
            ids[:n] = g.indices()[0].to(dev)
            values[:n] = g.values().to(device=dev, dtype=p.dtype)
        all_ids = _all_gather_same_shape(ids, ctx)
        all_values = _all_gather_same_shape(values, ctx)
        pieces = [(all_ids[r, :n], all_values[r, :n]) for r, n in enumerate(counts) if n]
        rows, inverse = torch.unique(torch.cat([r_ids for r_ids, _ in pieces]), sorted=True, return_inverse=True)
        summed = torch.zeros((len(rows), *row_shape), dtype=p.dtype, device=dev)
        start = 0
        for ids_r, values_r in pieces:
            # Each rank's rows are distinct (coalesced): no two additions hit one row here.
            summed.index_add_(0, inverse[start : start + len(ids_r)], values_r)
            start += len(ids_r)
        summed.div_(ctx.world_size)
        p.grad = _coalesced_sparse(rows.unsqueeze(0).to(p.device), summed.to(p.device), p.shape)


def _coalesced_sparse(indices: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A sparse COO tensor from sorted, distinct row ids, flagged coalesced (SparseAdam then skips a sort)."""
    try:
        # check_invariants=False: the ids are valid by construction (and it silences torch's
        # "invariant checks are implicitly disabled" warning).
        return torch.sparse_coo_tensor(indices, values, shape, check_invariants=False, is_coalesced=True)
    except TypeError:  # a torch without is_coalesced=: coalesce() then only confirms the order
        return torch.sparse_coo_tensor(indices, values, shape, check_invariants=False).coalesce()


def _average_dense(p: nn.Parameter, g: torch.Tensor | None, ctx: DistContext) -> None:
    if g is None:
        g = torch.zeros_like(p)
    elif g.is_sparse:
        g = g.to_dense()
    buf = g.to(ctx.comm_device, copy=True)
    dist.all_reduce(buf)
    p.grad = buf.div_(ctx.world_size).to(p.device)


def all_reduce_grads(params: Sequence[nn.Parameter], ctx: DistContext) -> None:
    """Averages the dense gradients of parameters DDP does not own, in one collective.

    For parameters outside the wrapped model, e.g. the uncertainty weighting's
    log-variances (``weighting.extra_parameters()``): without this each rank would step
    them with its own batch's gradient and they would drift apart. A parameter whose
    gradient is ``None`` on every rank keeps ``None``; on some ranks only, it counts as 0.

    Args:
        params: Dense parameters, in the same order on every rank.
        ctx: The distributed context (nothing happens when not enabled).
    """
    if not ctx.enabled or not params:
        return
    dev = ctx.comm_device
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=dev)
    flat = torch.cat(
        [flags]
        + [(p.grad if p.grad is not None else torch.zeros_like(p)).to(dev, torch.float64).reshape(-1) for p in params]
    )
    dist.all_reduce(flat)
    start = len(params)
    for i, p in enumerate(params):
        n = p.numel()
        if flat[i] > 0:
            p.grad = flat[start : start + n].div(ctx.world_size).view_as(p).to(device=p.device, dtype=p.dtype)
        start += n


def global_mean_scale(weight_sums: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Per-task factors that turn per-rank mean losses into the global-batch mean under DDP.

    A task's loss is the mean over the batch rows of its sample space, and DDP averages the
    ranks' gradients. When the ranks hold different numbers of a task's rows (CVR is defined
    on clicked rows only), the average of the per-rank means weighs a row on a rank with few
    such rows more than one on a rank with many. Multiplying rank r's loss of task t by
    ``world_size * n_rt / sum_r n_rt`` makes the DDP average exactly the mean over all ranks'
    rows, as in one process on the concatenated batch. Costs one all-reduce of ``T`` numbers
    per step; optional (without it each rank's rows are weighted by its batch alone, like
    gradient accumulation over micro-batches).

    Args:
        weight_sums: ``(T,)`` this rank's denominators of the task means: the number of rows in
            each task's sample space (``label_mask.sum(0)``), or their sample-weight sums.
        ctx: The distributed context (when not enabled: ones).

    Returns:
        ``(T,)`` float factors on ``weight_sums``' device; 0 where no rank has a row of the task.

    Example:
        >>> global_mean_scale(torch.tensor([8.0, 3.0]), SINGLE_PROCESS).tolist()
        [1.0, 1.0]
    """
    local = weight_sums.detach().to(torch.float64)
    if not ctx.enabled:
        return torch.ones_like(local, dtype=torch.float32)
    total = local.to(ctx.comm_device, copy=True)
    dist.all_reduce(total)
    total = total.to(local.device)
    scale = torch.where(total > 0, ctx.world_size * local / total.clamp(min=1e-300), 0.0)
    return scale.to(torch.float32)


# --------------------------------------------------------------------------- values


def _all_gather_same_shape(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """``(world, *t.shape)``: every rank's ``t`` (same shape on every rank), stacked by rank."""
    out = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


class _AgreedError(MtrecError):
    """An error every rank raises identically (so only rank 0 needs to print it)."""


def gather_rows(array: np.ndarray, ctx: DistContext) -> np.ndarray:
    """Every rank's rows, concatenated in rank order, returned on every rank.

    For exact validation metrics: each rank predicts its shard, and AUC is computed on the
    concatenation of all shards (never an average of per-rank AUCs). The result is on every
    rank so that every rank takes the same decisions from it (best epoch, early stopping)
    without another round of messages. The bytes are copied unchanged, so any fixed-size
    dtype (bool, int64, float32, ...) comes back exactly.

    Args:
        array: ``(n_r, ...)``; ``n_r`` may differ between ranks (0 included), the trailing
            shape and the dtype may not.
        ctx: The distributed context (when not enabled, ``array`` is returned as is).

    Returns:
        ``(sum_r n_r, ...)`` with rank 0's rows first.

    Raises:
        MtrecError: The ranks disagree on dtype or trailing shape.
        ValueError: A 0-d array or an object dtype.
    """
    if not ctx.enabled:
        return array
    a = np.asarray(array)
    if a.ndim == 0:
        raise ValueError("gather_rows needs an array with a row axis, got a scalar")
    if a.dtype.hasobject:
        raise ValueError(f"gather_rows copies bytes and cannot send an {a.dtype} array")
    a = np.ascontiguousarray(a)
    trailing = a.shape[1:]
    signature = zlib.crc32(repr((a.dtype.str, trailing)).encode())  # not hash(): salted per process
    row_items = int(np.prod(trailing, dtype=np.int64))
    row_bytes = row_items * a.dtype.itemsize
    meta = torch.tensor([a.shape[0], signature], dtype=torch.int64, device=ctx.comm_device)
    metas = _all_gather_same_shape(meta, ctx).cpu()
    if bool((metas[:, 1] != signature).any()):
        kinds = _gather_text(f"{a.dtype} rows of shape {trailing}", ctx)
        raise _AgreedError(f"ranks disagree on the arrays to gather: {'; '.join(kinds)}")
    counts = metas[:, 0].tolist()
    total = sum(counts)
    if row_bytes == 0:
        return np.empty((total, *trailing), dtype=a.dtype)
    buf = np.zeros((max(counts), row_bytes), dtype=np.uint8)
    buf[: a.shape[0]] = a.reshape(a.shape[0], row_items).view(np.uint8)
    gathered = _all_gather_same_shape(torch.from_numpy(buf).to(ctx.comm_device), ctx).cpu().numpy()
    joined = np.concatenate([gathered[r, :n] for r, n in enumerate(counts)])
    return joined.view(a.dtype).reshape(total, *trailing)


def _gather_text(text: str, ctx: DistContext) -> list[str]:
    """Every rank's ``text`` (truncated to 200 characters), for error messages."""
    data = np.frombuffer(text[:200].encode(), dtype=np.uint8)
    raw = gather_rows(data.reshape(-1, 1), ctx).reshape(-1)
    lengths = gather_rows(np.array([len(data)], dtype=np.int64), ctx).tolist()
    out, start = [], 0
    for r, n in enumerate(lengths):
        out.append(f"rank {r}: {raw[start : start + n].tobytes().decode(errors='replace')}")
        start += n
    return out


_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN", "mean": "SUM"}


def all_reduce_array(values: np.ndarray | Sequence[float], ctx: DistContext, op: str = "sum") -> np.ndarray:
    """The element-wise ``sum`` / ``mean`` / ``max`` / ``min`` over ranks, in float64, on every rank.

    For sums the trainer needs over the whole epoch (rows, per-task loss sums for DWA).

    Args:
        values: Numbers, the same count on every rank.
        ctx: The distributed context (when not enabled, ``values`` as float64).
        op: ``sum``, ``mean``, ``max`` or ``min``.
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"op must be one of {', '.join(_REDUCE_OPS)}, got {op!r}")
    arr = np.asarray(values, dtype=np.float64)
    if not ctx.enabled:
        return arr.copy()
    t = torch.from_numpy(arr.copy()).to(ctx.comm_device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]))
    out = t.cpu().numpy()
    return out / ctx.world_size if op == "mean" else out


def all_reduce_scalar(x: float, ctx: DistContext, op: str = "sum") -> float:
    """:func:`all_reduce_array` of one number (e.g. ``op="min"`` of the steps per epoch)."""
    return float(all_reduce_array([x], ctx, op)[0])


def check_same(value: Any, ctx: DistContext, what: str) -> None:
    """Raises on every rank if the ranks hold different ``value``.

    ``value`` is compared through its ``repr`` (JSON for dicts and lists, keys sorted), so
    use plain data: numbers, strings, tuples, lists, dicts. Every rank raises the same
    error, so no rank is left waiting in a later collective.

    Args:
        value: What must agree (steps per epoch, a config or vocabulary digest, shapes).
        ctx: The distributed context (nothing happens when not enabled).
        what: What it is, for the message.

    Raises:
        MtrecError: ``"ranks disagree on {what}: rank 0: ...; rank 1: ..."``.
    """
    if not ctx.enabled:
        return
    try:
        text = json.dumps(value, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    digest = zlib.crc32(text.encode())
    digests = _all_gather_same_shape(torch.tensor([digest], dtype=torch.int64, device=ctx.comm_device), ctx)
    if bool((digests != digest).any()):
        raise _AgreedError(f"ranks disagree on {what}: {'; '.join(_gather_text(text, ctx))}")


# --------------------------------------------------------------------------- weighting

# Loss weightings whose gradient-based balancing is computed on each rank's batch alone.
UNSUPPORTED_WEIGHTINGS = {
    # PCGrad adds its surgery correction to .grad after DDP has averaged it; the
    # correction comes from the rank's own per-task gradients, so the shared weights get
    # different gradients on different ranks and the replicas drift apart.
    "pcgrad": "its gradient surgery uses each rank's own per-task gradients, so the replicas would drift apart",
    # GradNorm steps its task weights from the rank's own gradient norms and losses: the
    # weights differ per rank (the model stays in sync, but trains on a mix of them).
    "gradnorm": "its task weights would be balanced on each rank's batch alone and differ between ranks",
    # FAMO steps its task logits from the rank's own task losses.
    "famo": "its task logits would step from each rank's own losses and differ between ranks",
    # The representation-gradient methods solve their combination on the rank's own batch.
    **{
        name: "it combines the task gradients of each rank's own batch, not of the global batch"
        for name in ("mgda", "cagrad", "nash_mtl", "aligned_mtl", "db_mtl")
    },
}


def check_loss_weighting(name: str, ctx: DistContext) -> None:
    """Refuses the loss weightings that are not correct under data parallelism.

    ``fixed``, ``uncertainty`` (with :func:`all_reduce_grads` on its log-variances) and
    ``dwa`` (with the epoch losses summed over ranks) are exact; ``gradnorm``, ``famo``,
    ``pcgrad`` and the representation-gradient methods are not (see
    :data:`UNSUPPORTED_WEIGHTINGS`).

    Raises:
        ConfigError: ``name`` is not supported with more than one process.
    """
    if ctx.enabled and name in UNSUPPORTED_WEIGHTINGS:
        raise ConfigError(
            f"train.loss_weighting: {name} is not supported with {ctx.world_size} processes: "
            f"{UNSUPPORTED_WEIGHTINGS[name]}; use fixed, uncertainty, dwa or rlw, or train in one process"
        )


# --------------------------------------------------------------------------- failures


def _is_comm_error(exc: BaseException) -> bool:
    kinds = tuple(getattr(dist, n) for n in ("DistError", "DistBackendError") if hasattr(dist, n))
    if kinds and isinstance(exc, kinds):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset", "Timed out")
    )


@contextlib.contextmanager
def fail_fast(ctx: DistContext, *, debug: bool = False) -> Iterator[None]:
    """Ends this process at once, with one clear line, when the block raises under torchrun.

    A rank that dies makes torchrun's agent stop the other ranks within its monitor
    interval (0.1 s by default) and exit non-zero, so the job ends instead of leaving the
    survivors blocked in their next collective; peers of a gloo group also see the closed
    connection at once. Exiting with ``os._exit`` (after flushing) skips the interpreter's
    teardown, which could itself wait on the process group.

    What is printed on stderr (and written to torchrun's error file, so that its failure
    summary shows the same line):

    - an :class:`~mtrec.errors.MtrecError` (bad input): ``mtrec: error: rank R: <message>``,
      exit code 2 - printed by rank 0 only when every rank raised it identically
      (:func:`check_same`, :func:`gather_rows`);
    - a failed collective (another rank died or the process-group timeout expired):
      ``mtrec: error: rank R: lost contact with the other ranks ...``, exit code 1;
    - any other exception: its traceback, then ``mtrec: error: rank R: <Type>: <message>``,
      exit code 1; ``KeyboardInterrupt``: ``mtrec: interrupted (rank R)``, exit code 130.

    ``debug`` prints the traceback for every exception. When ``ctx`` is not enabled the
    block runs unchanged and exceptions propagate (the CLI reports them as usual).
    """
    if not ctx.enabled:
        yield
        return
    try:
        yield
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        code = exc.code if isinstance(exc.code, int) else 1
        _die(ctx, f"mtrec: error: rank {ctx.rank}: exited with code {exc.code}", code, exc, debug)
    except KeyboardInterrupt as exc:
        _die(ctx, f"mtrec: interrupted (rank {ctx.rank})", 130, exc, debug)
    except MtrecError as exc:
        quiet = isinstance(exc, _AgreedError) and not ctx.is_main
        _die(ctx, None if quiet else f"mtrec: error: rank {ctx.rank}: {exc}", 2, exc, debug)
    except BaseException as exc:
        if _is_comm_error(exc):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            line = (
                f"mtrec: error: rank {ctx.rank}: lost contact with the other ranks (another rank failed - see its "
                f"error - or the process-group timeout expired): {first}"
            )
            _die(ctx, line, 1, exc, debug, consequence=True)
        _die(ctx, f"mtrec: error: rank {ctx.rank}: {type(exc).__name__}: {exc}", 1, exc, True)


def _die(
    ctx: DistContext, line: str | None, code: int, exc: BaseException, show_traceback: bool, consequence: bool = False
) -> NoReturn:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) if show_traceback else ""
    if line is not None:
        print(text + line, file=sys.stderr, flush=True)
        _write_elastic_error_file(line, text, consequence)
    else:
        # A rank that leaves the report of an error every rank raised to rank 0 waits a
        # moment, so that torchrun does not stop rank 0 before it has printed the line.
        time.sleep(2.0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _write_elastic_error_file(line: str, tb: str, consequence: bool) -> None:
    """Records the failure where torchrun's agent looks for it (its summary then shows ``line``).

    The format is torch.distributed.elastic's error-file JSON (what its ``@record``
    decorator writes); without it torchrun's summary only says "To enable traceback see...".
    torchrun names as root cause the failure with the earliest timestamp, in whole seconds,
    the lowest rank on a tie: a rank that only lost contact with the failed one (gloo notices
    the closed connection within milliseconds) stamps itself a second later, so that the
    summary names the rank that actually failed.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    stamp = str(int(time.time()) + (1 if consequence else 0))
    data = {"message": {"message": line, "extraInfo": {"py_callstack": tb + line, "timestamp": stamp}}}
    with contextlib.suppress(OSError), open(path, "w") as fh:
        json.dump(data, fh)
