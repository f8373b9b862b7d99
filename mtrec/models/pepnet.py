"""PEPNet: Chang et al., "PEPNet: Parameter and Embedding Personalized Network for Infusing with
Personalized Prior Information", KDD 2023 (Kuaishou).

Prior features (sparse IDs such as user, item and author id) personalise the network through
Gate NUs (:mod:`mtrec.nn.pepnet`), ``delta = gamma * sigmoid(relu(x W1 + b1) W2 + b2)``:

* EPNet scales each column of the general input ``E`` (every embedded feature, then the dense
  ones) by ``GateNU(E_domain ⊕ stopgrad(E))``: ``O_ep = delta_domain * E``.
* PPNet gives every task its own tower; the input of each of its layers (and of its linear
  head) is scaled by the task's own ``GateNU(E_prior ⊕ stopgrad(O_ep))``.

``E_prior`` and ``E_domain`` are the vectors of the named sparse features from the model's one
fused table (the rows ``E`` holds for them, looked up again without embedding dropout). The
gates' prior and domain vectors get gradient through the gates; ``E`` and ``O_ep`` in a gate's
input do not (the paper's stop-gradient).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from mtrec.batch import Batch
from mtrec.models.base import DEFAULT_EMBEDDING, EmbeddingSpec, FeatureInput, MultiTaskModel
from mtrec.models.registry import register_model
from mtrec.nn.embedding import FusedEmbedding
from mtrec.nn.pepnet import EPNet, PEPNet, PPNet
from mtrec.schema import InputLayout

__all__ = ["PEPNetModel", "feature_columns", "pepnet"]


def feature_columns(names: tuple[str, ...], sparse_names: tuple[str, ...]) -> tuple[int, ...]:
    """The ``Batch.sparse`` columns of the sparse features ``names``; raises ``ValueError``
    naming a name that is no sparse feature, or one listed twice."""
    for name in names:
        if name not in sparse_names:
            raise ValueError(f"{name!r} is not a sparse feature (expected names from {list(sparse_names)})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{twice[0]!r} is listed twice")
    return tuple(sparse_names.index(n) for n in names)


class PEPNetModel(MultiTaskModel):
    """The feature input, the prior and domain lookups, :class:`~mtrec.nn.pepnet.PEPNet` and
    one linear head per task (the towers are PPNet's).

    Args:
        features: The shared :class:`~mtrec.models.base.FeatureInput` (``E``).
        task_names: Task names.
        backbone: EPNet then PPNet.
        prior_columns: The ``Batch.sparse`` columns whose vectors PPNet's gates read.
        domain_columns: Those EPNet's gate reads.
        output_dims: Outputs per task.
    """

    prior_columns: torch.Tensor  # buffers
    domain_columns: torch.Tensor

    def __init__(
        self,
        *,
        features: FeatureInput,
        task_names: tuple[str, ...],
        backbone: PEPNet,
        prior_columns: tuple[int, ...],
        domain_columns: tuple[int, ...],
        output_dims: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(
            features=features,
            task_names=task_names,
            backbone=backbone,
            backbone_out=backbone.out_dim,
            tower_hidden=(),  # linear heads: the towers are PPNet's
            output_dims=output_dims,
        )
        # Not saved: the columns follow from the config, so the weights are those of the network alone.
        self.register_buffer("prior_columns", torch.tensor(prior_columns, dtype=torch.int64), persistent=False)
        self.register_buffer("domain_columns", torch.tensor(domain_columns, dtype=torch.int64), persistent=False)
        self.same_columns = tuple(prior_columns) == tuple(domain_columns)

    def _vectors(self, batch: Batch, columns: torch.Tensor) -> torch.Tensor:
        """``(B, K * D)``: the embeddings of sparse columns ``columns``, concatenated."""
        table = cast(FusedEmbedding, cast(FeatureInput, self.features).embedding)
        return table.lookup_columns(batch.sparse.index_select(1, columns), columns).flatten(1)

    def representations(self, batch: Batch) -> torch.Tensor:
        """``(B, T, H)``: each task's PPNet tower output (gated), what its head reads."""
        prior = self._vectors(batch, self.prior_columns)
        domain = prior if self.same_columns else self._vectors(batch, self.domain_columns)
        return self.backbone(self.features(batch), domain, prior)

    def shared_parameters(self) -> list[nn.Parameter]:
        """EPNet's gate: the only dense layers every task shares (the towers and their gates are
        each task's own)."""
        return list(cast(PEPNet, self.backbone).epnet.parameters())


@register_model(
    "pepnet",
    "PEPNet: prior-feature gates on the embedding (EPNet) and on every layer of each task's tower (PPNet) "
    "(Chang et al., KDD 2023)",
    fixed_embedding="its gates personalise the one shared table set, which its prior features are read from",
)
def pepnet(
    layout: InputLayout,
    task_names: tuple[str, ...],
    *,
    embedding: EmbeddingSpec = DEFAULT_EMBEDDING,
    output_dims: tuple[int, ...] | None = None,
    prior_features: tuple[str, ...] = (),
    domain_features: tuple[str, ...] = (),
    tower_hidden: tuple[int, ...] = (128, 64),
    gate_hidden: int = 64,
    gate_scale: float = 2.0,
    dropout: float = 0.0,
) -> PEPNetModel:
    """Builds PEPNet: ``prior_features`` (sparse feature names; empty: every sparse feature)
    feed PPNet's gates, ``domain_features`` (empty: the prior features) EPNet's; each task's
    tower has ``tower_hidden`` ReLU layers; the gates have ``gate_hidden`` hidden units and
    output in ``(0, gate_scale)``."""
    if embedding.mode != "shared":
        raise ValueError(f"pepnet takes embedding: shared only, got {embedding.mode!r}")
    priors = _columns("prior_features", tuple(prior_features), layout)
    domain = _columns("domain_features", tuple(domain_features), layout) if domain_features else priors
    features = FeatureInput(layout, embedding.dim, dropout=embedding.dropout, **embedding.cross)
    in_dim, width = int(features.out_dim), embedding.dim
    net = PEPNet(
        EPNet(in_dim, len(domain) * width, hidden=gate_hidden, gamma=gate_scale),
        PPNet(
            in_dim,
            len(priors) * width,
            len(task_names),
            hidden=tuple(tower_hidden),
            gate_hidden=gate_hidden,
            gamma=gate_scale,
            dropout=dropout,
        ),
    )
    return PEPNetModel(
        features=features,
        task_names=tuple(task_names),
        backbone=net,
        prior_columns=priors,
        domain_columns=domain,
        output_dims=output_dims,
    )


def _columns(key: str, names: tuple[str, ...], layout: InputLayout) -> tuple[int, ...]:
    """The sparse columns ``key`` names (empty: every one); ``ValueError`` if there are none."""
    if not layout.sparse_tables:
        raise ValueError("pepnet's gates read sparse (ID) features, and the input has none")
    if not names:
        return tuple(range(len(layout.sparse_tables)))
    if not layout.sparse_names:
        raise ValueError(f"{key} names features, but the layout carries no sparse feature names (sparse_names)")
    try:
        return feature_columns(names, layout.sparse_names)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
