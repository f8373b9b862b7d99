"""AITM: Xi et al., "Modeling the Sequential Dependence among Audience Multi-step
Conversions with Multi-task Learning in Targeted Display Advertising", KDD 2021.

The tasks, in config order, are the steps of one conversion chain (task 0 -> task 1 ->
...). The tasks share the embedding layer only; each has its own tower ``q_t``. Task
``t - 1``'s representation is transferred, ``p_{t-1} = g_{t-1}(z_{t-1})`` with an MLP ``g``,
and merged with ``q_t`` by the Adaptive Information Transfer attention to give ``z_t``
(``z_0 = q_0``); a final linear layer turns ``z_t`` into task ``t``'s logit. See
:mod:`mtrec.nn.aitm` for the equations.

The behavioural expectation calibrator, ``calibration_weight * mean_rows sum_{t>=1}
relu(sigmoid(z_t) - sigmoid(z_{t-1}))`` (the paper's ``alpha * L_lc``, alpha = 0.6), is
returned by :meth:`AITM.auxiliary_loss`; the trainer adds it to the task losses.

AITM expects every task on the full impression space, each label being the end of the
chain up to that step (e.g. ``click``, then ``purchase`` per impression = click and
purchase), with no ``where`` sample space: the calibrator compares probabilities on every
row and is only meaningful if ``P(step t) <= P(step t-1)`` holds on every row. Every task
must be binary (one logit): multiclass outputs are rejected.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from mtrec.batch import Batch
from mtrec.models.base import (
    DEFAULT_EMBEDDING,
    EmbeddingSpec,
    FeatureInput,
    MultiTaskModel,
    TaskAwareInput,
    feature_input,
)
from mtrec.models.registry import register_model
from mtrec.nn.aitm import AITMLayer, expectation_calibration
from mtrec.schema import InputLayout

__all__ = ["AITM", "aitm"]


class AITM(MultiTaskModel):
    """A :class:`MultiTaskModel` over an :class:`~mtrec.nn.aitm.AITMLayer` with the calibrator.

    Args:
        features: The batch-to-tensor input layer (the only part shared by all tasks).
        task_names: Task names in chain order.
        backbone: The towers, transfers and AIT modules, ``(B, in) -> (B, T, k)``.
        calibration_weight: Weight of the behavioural expectation calibrator.
        dropout: Head dropout (unused: the heads are single linear layers).
    """

    def __init__(
        self,
        *,
        features: FeatureInput | TaskAwareInput,
        task_names: tuple[str, ...],
        backbone: AITMLayer,
        calibration_weight: float,
        dropout: float = 0.0,
    ) -> None:
        # The heads are the paper's final linear layer on z_t: the towers live in the backbone.
        super().__init__(
            features=features,
            task_names=task_names,
            backbone=backbone,
            backbone_out=backbone.out_dim,
            tower_hidden=(),
            dropout=dropout,
        )
        self.calibration_weight = calibration_weight

    def auxiliary_loss(self, logits: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor | None:
        """``calibration_weight * mean_rows sum_{t>=1} relu(p_t - p_{t-1})`` over all rows.

        Args:
            logits: ``{task: (B,)}`` as returned by ``forward``.
            batch: Unused: the calibrator needs no label and covers every row.

        Returns:
            A scalar, or ``None`` with a single task (no chain to calibrate) and no layer penalty.
        """
        layers = super().auxiliary_loss(logits, batch)
        if len(self.task_names) < 2 or self.calibration_weight == 0:
            return layers
        stacked = torch.stack([logits[name] for name in self.task_names], dim=1)  # (B, T)
        own = self.calibration_weight * expectation_calibration(stacked)
        return own if layers is None else own + layers

    def shared_parameters(self) -> list[nn.Parameter]:
        """Towers, transfers and attentions whose output reaches more than one task."""
        return cast(AITMLayer, self.backbone).shared_parameters()


@register_model("aitm", "AITM: per-task towers chained by adaptive information transfer (Xi et al., KDD 2021)")
def aitm(
    layout: InputLayout,
    task_names: tuple[str, ...],
    *,
    embedding: EmbeddingSpec = DEFAULT_EMBEDDING,
    output_dims: tuple[int, ...] | None = None,
    info_hidden: int = 64,
    calibration_weight: float = 0.6,
    tower_hidden: tuple[int, ...] = (128, 64),
    dropout: float = 0.0,
) -> AITM:
    """Builds an AITM model; ``task_names`` are the conversion steps in chain order.

    ``tower_hidden`` are the per-task towers producing ``q_t`` (its last width is the AIT
    width ``k``); ``info_hidden`` is the hidden width of each transfer MLP ``g_t``.

    Raises:
        ValueError: If a task has more than one output (multiclass).
    """
    if output_dims is not None and any(d != 1 for d in output_dims):
        raise ValueError(f"aitm: every task must be binary with one output, got output_dims={tuple(output_dims)}")
    if calibration_weight < 0:
        raise ValueError(f"aitm: calibration_weight must be >= 0, got {calibration_weight}")
    features = feature_input(layout, embedding, len(task_names))
    backbone = AITMLayer(
        features.out_dim,
        num_tasks=len(task_names),
        tower_hidden=tower_hidden,
        info_hidden=info_hidden,
        dropout=dropout,
    )
    return AITM(
        features=features,
        task_names=task_names,
        backbone=backbone,
        calibration_weight=calibration_weight,
        dropout=dropout,
    )
