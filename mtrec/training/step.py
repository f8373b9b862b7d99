"""One optimisation step: forward (under autocast), the task losses, the weighted backward, the
gradient exchange between ranks, clipping and the optimiser and schedule steps."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtrec.batch import Batch
from mtrec.schema import Task
from mtrec.training.distributed import DistContext, all_reduce_grads, global_mean_scale, sync_sparse_grads
from mtrec.training.losses import task_losses
from mtrec.training.policy import resolve_precision
from mtrec.training.profiling import STEP_RANGE
from mtrec.weighting import LossWeighting, Representation

__all__ = ["RepresentationTap", "TrainStep"]


class RepresentationTap:
    """Records the shared representation of each training forward pass: a forward hook on
    the model's :meth:`~mtrec.models.MultiTaskModel.representation_layer`, read by the
    representation-gradient loss weightings. Evaluation passes (eval mode or no grad) are
    not recorded."""

    def __init__(self, module: nn.Module, rows: slice | None = None) -> None:
        self.rows = rows
        self._seen: list[torch.Tensor] = []
        self._handle = module.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training and torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            self._seen.append(output)

    def take(self) -> Representation:
        """What the forward passes since the last call recorded (and forget it)."""
        seen, self._seen = self._seen, []
        return Representation(tuple(seen), self.rows)

    def remove(self) -> None:
        self._handle.remove()
        self._seen = []


class TrainStep:
    """Trains ``model`` on one batch per call; the loss comes back on the device (no host read).

    ``forward`` is what runs the batch (the DDP replica under torchrun, else the model);
    ``scaler`` is the fp16 grad scaler (``None`` otherwise), part of the resume state.
    """

    def __init__(
        self,
        model: Any,
        forward: nn.Module,
        weighting: LossWeighting,
        optimizers: list[torch.optim.Optimizer],
        schedulers: list[Any],
        *,
        tasks: tuple[Task, ...],
        train: Any,
        ctx: DistContext,
        device: torch.device,
    ) -> None:
        self.model, self.forward, self.weighting = model, forward, weighting
        self.optimizers, self.schedulers = optimizers, schedulers
        self.tasks, self.ctx, self.device = tasks, ctx, device
        self.normalization, self.grad_clip = train.loss_normalization, train.grad_clip
        amp_dtype = resolve_precision(train.precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        self.autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else None
        self.dense_params = model.dense_parameters()  # what grad_clip clips (never the table)
        # Frozen parameters (train.freeze) take no gradient: GradNorm and PCGrad work on the rest.
        self.shared_params = [p for p in model.shared_parameters() if p.requires_grad]
        self.last_shared = [e for e in model.last_shared_parameters() if getattr(e, "param", e).requires_grad]
        self.embedding_params = model.embedding_parameters()
        layer = model.representation_layer() if weighting.needs_representation else None
        self.tap = RepresentationTap(*layer) if layer is not None else None

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's weighted loss and its task losses (both on the device)."""
        with torch.profiler.record_function(STEP_RANGE):  # see mtrec.training.profiling
            if self.tap is not None:
                self.tap.take()  # nothing from an earlier pass that never reached backward
            parts, aux = self._losses(batch)
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            loss = self._backward(parts, aux)
            sync_sparse_grads(self.embedding_params, self.ctx)
            all_reduce_grads(self.weighting.extra_parameters(), self.ctx)
            self._update()
        return loss, parts

    def _losses(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        if self.autocast is not None:
            with self.autocast:
                logits = self.forward(batch)
        else:
            logits = self.forward(batch)
        parts = task_losses(logits, batch.labels, batch.label_mask, self.tasks, batch.sample_weight, self.normalization)
        if self.ctx.enabled:
            # Each task's loss becomes the mean over all ranks' rows of its sample space
            # (impressions: the sum over them divided by the global batch's rows).
            scale = global_mean_scale(loss_denominators(batch, self.normalization), self.ctx).to(torch.float32)
            parts = {name: part * scale[j] for j, (name, part) in enumerate(parts.items())}
        return parts, self.model.auxiliary_loss(logits, batch)

    def _backward(self, parts: dict[str, torch.Tensor], aux: torch.Tensor | None) -> torch.Tensor:
        shared: dict[str, Any] = {"shared": self.shared_params, "last_shared": self.last_shared}
        if self.tap is not None:
            shared["representation"] = self.tap.take()
        if self.scaler is None:
            return self.weighting.backward(parts, extra=aux, **shared)
        # fp16: the objective is linear in the losses (fixed/dwa weighting), so scaling each
        # loss is scaling the objective, as GradScaler.scale does.
        factor = self.scaler.scale(torch.ones((), device=self.device))
        scaled = {name: part * factor for name, part in parts.items()}
        extra = None if aux is None else aux * factor
        return self.weighting.backward(scaled, extra=extra, **shared) / factor

    def _update(self) -> None:
        if self.scaler is not None:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.dense_params, self.grad_clip)
        if self.scaler is None:
            for opt in self.optimizers:
                opt.step()
        else:
            for opt in self.optimizers:
                self.scaler.step(opt)  # skipped when a gradient overflowed
            self.scaler.update()
        for scheduler in self.schedulers:  # host arithmetic only: no device read
            scheduler.step()


def _space_weights(batch: Batch) -> torch.Tensor:
    """``(T,)`` the denominators of the task means of a batch (rows, or sample-weight sums)."""
    if batch.sample_weight is None:
        return batch.label_mask.sum(0).to(torch.float64)
    return torch.where(batch.label_mask, batch.sample_weight, 0.0).sum(0).to(torch.float64)


def loss_denominators(batch: Batch, normalization: str) -> torch.Tensor:
    """``(T,)`` what each task's loss of this rank's batch was divided by (see :mod:`mtrec.training.losses`):
    the sample-space weights, or the batch rows for every task (``impressions``), which
    :func:`mtrec.training.distributed.global_mean_scale` turns into the global batch's."""
    if normalization == "impressions":
        rows = float(len(batch))  # a host number: no device read
        return torch.full(batch.label_mask.shape[1:], rows, dtype=torch.float64, device=batch.labels.device)
    return _space_weights(batch)
