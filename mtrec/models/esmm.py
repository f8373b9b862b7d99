"""ESMM: Ma et al., "Entire Space Multi-Task Model: An Effective Approach for Estimating
Post-Click Conversion Rate", SIGIR 2018 — as a wrapper over any multi-task model.

The wrapped model's CTR and CVR towers give ``pCTR`` and ``pCVR``; the wrapper adds the
task ``pCTCVR = pCTR * pCVR``, returned like every other output as a logit so that the
losses and metrics need no special case. Trained with the CTR and CTCVR losses on every
impression, the CVR tower learns through the product and is defined on the entire space.
With ``esmm.cvr_loss_weight`` > 0 (see :class:`mtrec.schema.Esmm`) the CVR output also gets
its own BCE loss on the clicked rows (its task's sample space): the CVR task keeps its
tower and loss like any task, and :attr:`mtrec.schema.Schema.output_tasks` gives it that
weight (0 by default), so the wrapper needs no loss of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from mtrec.batch import Batch
from mtrec.weighting import SharedLayer

if TYPE_CHECKING:
    from mtrec.models.base import MultiTaskModel

__all__ = ["EsmmModel", "product_logit"]


def product_logit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``logit(sigmoid(a) * sigmoid(b))``, exactly and without overflow.

    With ``p = 1 / ((1 + e^-a)(1 + e^-b))``, ``(1 - p) / p = e^-a + e^-b + e^-(a+b)``, so
    the logit is ``-logsumexp(-a, -b, -(a + b))``: one stable reduction, no clamping,
    and exportable to ONNX.

    Example:
        >>> a, b = torch.tensor([0.3]), torch.tensor([-1.2])
        >>> p = torch.sigmoid(a) * torch.sigmoid(b)
        >>> torch.allclose(product_logit(a, b), torch.log(p / (1 - p)))
        True
    """
    a, b = a.float(), b.float()
    return -torch.logsumexp(torch.stack([-a, -b, -(a + b)], dim=-1), dim=-1)


class EsmmModel(nn.Module):
    """Adds ``ctcvr`` to a multi-task model's outputs.

    Args:
        inner: A model returning logits for (at least) ``ctr`` and ``cvr``.
        ctr: Name of the click task.
        cvr: Name of the conversion task.
        name: Name of the product task.
    """

    def __init__(self, inner: nn.Module, *, ctr: str, cvr: str, name: str = "ctcvr") -> None:
        super().__init__()
        # Every registered builder returns a MultiTaskModel; its interface is what is delegated to.
        model = cast("MultiTaskModel", inner)
        self.inner = model
        self.ctr, self.cvr, self.name = ctr, cvr, name
        self.task_names = (*model.task_names, name)

    @property
    def features(self) -> nn.Module:
        return self.inner.features

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        logits = self.inner(batch)
        logits[self.name] = product_logit(logits[self.ctr], logits[self.cvr])
        return logits

    def auxiliary_loss(self, logits: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor | None:
        return self.inner.auxiliary_loss(logits, batch)

    def shared_parameters(self) -> list[nn.Parameter]:
        return self.inner.shared_parameters()

    def last_shared_parameters(self) -> list[SharedLayer]:
        return self.inner.last_shared_parameters()

    def embedding_tables(self) -> list[nn.Parameter]:
        return self.inner.embedding_tables()

    def use_sparse_embedding_grads(self, sparse: bool) -> None:
        self.inner.use_sparse_embedding_grads(sparse)

    def embedding_parameters(self) -> list[nn.Parameter]:
        return self.inner.embedding_parameters()

    def dense_parameters(self) -> list[nn.Parameter]:
        return self.inner.dense_parameters()
