"""ESMM: Ma et al., "Entire Space Multi-Task Model: An Effective Approach for Estimating
Post-Click Conversion Rate", SIGIR 2018 — as a wrapper over any multi-task model.

The wrapped model's CTR and CVR towers give ``pCTR`` and ``pCVR``; the wrapper adds the
task ``pCTCVR = pCTR * pCVR``, returned like every other output as a logit so that the
losses and metrics need no special case. Trained with the CTR and CTCVR losses on every
impression, the CVR tower learns through the product and is defined on the entire space.
With ``esmm.cvr_loss_weight`` > 0 (see :class:`mtrec.schema.Esmm`) the CVR output also gets
its own BCE loss on the clicked rows (its task's sample space): the CVR task keeps its
tower and loss like any task, and :attr:`mtrec.schema.Schema.output_tasks` gives it that
weight (0 by default).

ESCM2 (Wang et al., "ESCM2: Entire Space Counterfactual Multi-Task Model for Post-Click
Conversion Rate Estimation", SIGIR 2022; ``esmm.counterfactual``) adds the wrapper's own
loss, the counterfactual CVR risk over the entire space: :func:`ips_risk` or :func:`dr_risk`
with an imputation tower (see :class:`EsmmModel`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from mtrec.batch import Batch
from mtrec.nn.mlp import Tower
from mtrec.weighting import SharedLayer

if TYPE_CHECKING:
    from mtrec.models.base import MultiTaskModel

__all__ = ["COUNTERFACTUAL", "EsmmModel", "dr_risk", "ips_risk", "product_logit"]

COUNTERFACTUAL = ("none", "ips", "dr")


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


def ips_risk(error: torch.Tensor, clicked: torch.Tensor, propensity: torch.Tensor) -> torch.Tensor:
    """Inverse propensity scoring: ``mean over all rows of o_i e_i / p_i``, an unbiased
    estimate of the mean CVR loss ``e`` over the entire space when ``p`` is the click
    probability (``error`` outside the clicked rows is ignored).

    Example:
        >>> e, o, p = torch.tensor([0.5, 9.0, 0.2]), torch.tensor([True, False, True]), torch.tensor([0.5, 0.1, 0.25])
        >>> round(ips_risk(e, o, p).item(), 4)  # (0.5 / 0.5 + 0.2 / 0.25) / 3
        0.6
    """
    return torch.where(clicked, error / propensity, 0.0).mean()


def dr_risk(
    error: torch.Tensor, imputed: torch.Tensor, clicked: torch.Tensor, propensity: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Doubly robust risk ``mean(ê_i + o_i (e_i - ê_i) / p_i)`` and the imputation loss
    ``mean(o_i (e_i - ê_i)^2 / p_i)``: unbiased when either the propensity ``p`` or the
    imputed errors ``ê`` are right. The risk holds ``ê`` fixed (it trains the CVR tower),
    the imputation loss holds ``e`` fixed (it trains the imputation tower)."""
    fixed = imputed.detach()
    risk = (fixed + torch.where(clicked, (error - fixed) / propensity, 0.0)).mean()
    imputation = torch.where(clicked, (error.detach() - imputed).square() / propensity, 0.0).mean()
    return risk, imputation


class EsmmModel(nn.Module):
    """Adds ``ctcvr`` to a multi-task model's outputs, and ESCM2's counterfactual risk.

    Args:
        inner: A model returning logits for (at least) ``ctr`` and ``cvr``.
        ctr: Name of the click task.
        cvr: Name of the conversion task.
        name: Name of the product task.
        counterfactual: ``none``, ``ips`` or ``dr`` (ESCM2). Its risk is
            :meth:`auxiliary_loss`, on the batch's rows: ``e`` the CVR BCE on the clicked rows
            (the CVR task's sample space), ``p`` the CTR tower's probability, detached (a
            weight, not a target) and clipped below at ``propensity_clip``. ``dr`` adds an
            imputation tower on the CVR task's representation (of an inner
            :class:`~mtrec.models.base.MultiTaskModel`) predicting ``e`` on every row
            (softplus, >= 0), and its imputation loss.
        counterfactual_weight: Weight of the risk (and of the imputation loss).
        propensity_clip: Lower bound of ``p``.
        columns: The label columns of the click and the conversion task in ``batch.labels``.
    """

    def __init__(
        self,
        inner: nn.Module,
        *,
        ctr: str,
        cvr: str,
        name: str = "ctcvr",
        counterfactual: str = "none",
        counterfactual_weight: float = 1.0,
        propensity_clip: float = 0.05,
        columns: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if counterfactual not in COUNTERFACTUAL:
            raise ValueError(f"counterfactual must be one of {', '.join(COUNTERFACTUAL)}, got {counterfactual!r}")
        if counterfactual != "none" and columns is None:
            raise ValueError("the counterfactual risk needs the label columns of the click and conversion tasks")
        # Every registered builder returns a MultiTaskModel; its interface is what is delegated to.
        model = cast("MultiTaskModel", inner)
        self.inner = model
        self.ctr, self.cvr, self.name = ctr, cvr, name
        self.task_names = (*model.task_names, name)
        self.counterfactual, self.weight, self.clip = counterfactual, counterfactual_weight, propensity_clip
        self.columns = columns
        self.imputation = Tower(model.backbone_out, (32,)) if counterfactual == "dr" else None
        self._imputed: torch.Tensor | None = None

    @property
    def features(self) -> nn.Module:
        return self.inner.features

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.imputation is not None and self.training:
            reps = self.inner.representations(batch)
            logits = self.inner.heads(reps)
            self._imputed = nn.functional.softplus(self.imputation(reps[:, self.inner.task_names.index(self.cvr)]))
        else:
            logits = self.inner(batch)
        logits[self.name] = product_logit(logits[self.ctr], logits[self.cvr])
        return logits

    def counterfactual_risk(self, logits: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor | None:
        """ESCM2's risk (and DR's imputation loss) on ``batch``, weighted; ``None`` without."""
        if self.counterfactual == "none" or self.columns is None:
            return None
        ctr_col, cvr_col = self.columns
        clicked = batch.label_mask[:, cvr_col]
        target = torch.where(clicked, batch.labels[:, cvr_col], 0.0).float()
        z = logits[self.cvr].float()
        error = nn.functional.binary_cross_entropy_with_logits(z, target, reduction="none")
        propensity = torch.sigmoid(logits[self.ctr].float().detach()).clamp_min(self.clip)
        if self.counterfactual == "ips":
            return self.weight * ips_risk(error, clicked, propensity)
        imputed, self._imputed = self._imputed, None
        if imputed is None:  # (a training forward records it; nothing to weigh without one)
            return None
        risk, imputation = dr_risk(error, imputed.float(), clicked, propensity)
        return self.weight * (risk + imputation)

    def auxiliary_loss(self, logits: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor | None:
        inner = self.inner.auxiliary_loss(logits, batch)
        own = self.counterfactual_risk(logits, batch) if self.training else None
        if own is None or inner is None:
            return own if inner is None else inner
        return inner + own

    def shared_parameters(self) -> list[nn.Parameter]:
        return self.inner.shared_parameters()

    def last_shared_parameters(self) -> list[SharedLayer]:
        return self.inner.last_shared_parameters()

    def representation_layer(self) -> tuple[nn.Module, slice | None] | None:
        return self.inner.representation_layer()

    def embedding_tables(self) -> list[nn.Parameter]:
        return self.inner.embedding_tables()

    def use_sparse_embedding_grads(self, sparse: bool) -> None:
        self.inner.use_sparse_embedding_grads(sparse)

    def embedding_parameters(self) -> list[nn.Parameter]:
        return self.inner.embedding_parameters()

    def dense_parameters(self) -> list[nn.Parameter]:
        own = list(self.imputation.parameters()) if self.imputation is not None else []
        return self.inner.dense_parameters() + own
