"""DBMTL: Ji et al., "Deep Bayesian Multi-Target Learning for Recommender Systems", 2019
(arXiv:1902.09154; the multi-task model of Alibaba's EasyRec).

A shared bottom (an MLP, or MMoE) feeds one tower per task; in a declared task order each
task's relation layer also reads the relation outputs of the tasks before it (e.g. CTR ->
CVR -> satisfaction), and a linear head makes its logit.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
from torch import nn

from mtrec.models.base import DEFAULT_EMBEDDING, EmbeddingSpec, MultiTaskModel, feature_input
from mtrec.models.registry import register_model
from mtrec.models.shared_bottom import SharedBottom
from mtrec.nn.experts import MMoELayer
from mtrec.nn.relation import RelationTowers
from mtrec.schema import InputLayout

__all__ = ["DBMTLBackbone", "GatedDBMTLBackbone", "dbmtl", "task_positions"]


def task_positions(task_order: tuple[str, ...], task_names: tuple[str, ...]) -> tuple[int, ...]:
    """The positions of ``task_order`` in ``task_names`` (empty: the config's order); raises
    ``ValueError`` naming an unknown or missing task."""
    if not task_order:
        return tuple(range(len(task_names)))
    unknown = [t for t in task_order if t not in task_names]
    if unknown:
        raise ValueError(f"task_order names unknown task(s) {unknown} (expected the tasks {list(task_names)})")
    if sorted(task_order) != sorted(task_names):
        missing = sorted(set(task_names) - set(task_order))
        raise ValueError(f"task_order must list every task once (missing or repeated: {missing or list(task_order)})")
    return tuple(task_names.index(t) for t in task_order)


class DBMTLBackbone(nn.Module):
    """The bottom (``(B, in) -> (B, T, H)``) and the :class:`~mtrec.nn.relation.RelationTowers`."""

    def __init__(self, bottom: nn.Module, relations: RelationTowers) -> None:
        super().__init__()
        self.bottom, self.relations = bottom, relations
        self.out_dim = relations.out_dim

    def last_shared_parameters(self) -> list[Any]:
        """The bottom's last shared layer (what GradNorm balances on)."""
        fn = getattr(self.bottom, "last_shared_parameters", None)
        return list(fn()) if fn is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relations(self.bottom(x))


class GatedDBMTLBackbone(DBMTLBackbone):
    """DBMTL over an MMoE bottom, whose gates the diagnostics report."""

    def gate_report(self, x: torch.Tensor, task_names: tuple[str, ...] | None = None) -> Any:
        return cast(MMoELayer, self.bottom).gate_report(x, task_names)


@register_model("dbmtl", "DBMTL: towers that read the earlier tasks' towers in a task order (Ji et al., 2019)")
def dbmtl(
    layout: InputLayout,
    task_names: tuple[str, ...],
    *,
    embedding: EmbeddingSpec = DEFAULT_EMBEDDING,
    output_dims: tuple[int, ...] | None = None,
    task_order: tuple[str, ...] = (),
    bottom: Literal["mlp", "mmoe"] = "mlp",
    bottom_hidden: tuple[int, ...] = (256, 128),
    num_experts: int = 4,
    expert_hidden: tuple[int, ...] = (256, 128),
    tower_hidden: tuple[int, ...] = (64,),
    relation_hidden: tuple[int, ...] = (32,),
    dropout: float = 0.0,
) -> MultiTaskModel:
    """Builds DBMTL: ``task_order`` (empty: the config's order) is the dependency order;
    ``bottom`` an MLP of ``bottom_hidden`` or MMoE (``num_experts``, ``expert_hidden``)."""
    order = task_positions(tuple(task_order), tuple(task_names))
    T = len(task_names)
    features = feature_input(layout, embedding, T)
    in_dim = int(features.out_dim)
    if bottom == "mmoe":
        net: nn.Module = MMoELayer(
            in_dim, num_tasks=T, num_experts=num_experts, expert_hidden=expert_hidden, dropout=dropout
        )
    else:
        net = SharedBottom(in_dim, num_tasks=T, hidden=bottom_hidden, dropout=dropout)
    width = int(net.out_dim)  # type: ignore[arg-type]
    relations = RelationTowers(
        width, order=order, tower_hidden=tower_hidden, relation_hidden=relation_hidden, dropout=dropout
    )
    return MultiTaskModel.assemble(
        layout,
        task_names,
        embedding=embedding,
        output_dims=output_dims,
        tower_hidden=(),  # the heads are linear: the towers are the relation towers
        dropout=dropout,
        backbone=(GatedDBMTLBackbone if bottom == "mmoe" else DBMTLBackbone)(net, relations),
        features=features,
    )
