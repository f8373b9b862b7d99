"""MultiTaskModel: feature embedding -> backbone -> one tower per task, logits by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mtrec.batch import Batch
from mtrec.nn.embedding import FusedEmbedding, masked_pool
from mtrec.nn.mlp import Tower
from mtrec.schema import InputLayout
from mtrec.weighting import SharedLayer

__all__ = ["FeatureInput", "MultiTaskModel"]


class FeatureInput(nn.Module):
    """Turns a :class:`~mtrec.batch.Batch` into one ``(B, out_dim)`` float tensor.

    Sparse features and list items are looked up together in one
    :class:`~mtrec.nn.FusedEmbedding` call; lists are masked-pooled; dense features
    are appended as they are.

    With ``copies=C > 1`` the fused table holds ``C`` independent sets of every table
    (copy ``c`` at its own offsets, still one lookup) and the output is ``(C, B, out_dim)``:
    input ``c`` reads only copy ``c``'s rows, so a loss on ``out[c]`` alone puts gradient
    on copy ``c`` alone (one table set per task for the independent baseline).
    """

    def __init__(self, layout: InputLayout, embedding_dim: int, *, copies: int = 1) -> None:
        super().__init__()
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        self.layout = layout
        self.copies = copies
        self.num_sparse = len(layout.sparse_tables)
        column_tables = list(layout.sparse_tables)
        for table, length in zip(layout.sequence_tables, layout.sequence_max_len, strict=True):
            column_tables += [table] * length
        n = len(layout.table_sizes)
        self.embedding = (
            FusedEmbedding(
                tuple(layout.table_sizes) * copies,
                embedding_dim,
                column_tables=tuple(c * n + t for c in range(copies) for t in column_tables),
            )
            if column_tables
            else None
        )
        num_embedded = self.num_sparse + len(layout.sequence_tables)
        self.out_dim = num_embedded * embedding_dim + layout.num_dense

    def forward(self, batch: Batch) -> torch.Tensor:
        C = self.copies
        B = batch.sparse.shape[0]
        parts = []
        if self.embedding is not None:
            ids = torch.cat([batch.sparse, *batch.sequences], dim=1) if batch.sequences else batch.sparse
            emb = self.embedding(ids.repeat(1, C) if C > 1 else ids)  # (B, C * (F + sum(L)), D)
            if C > 1:  # copies side by side -> stacked along the batch: (C * B, F + sum(L), D)
                emb = emb.view(B, C, ids.shape[1], -1).transpose(0, 1).reshape(C * B, ids.shape[1], -1)
            lengths = batch.seq_lengths.repeat(C, 1) if C > 1 else batch.seq_lengths
            F = self.num_sparse
            if F:
                parts.append(emb[:, :F].flatten(1))
            start = F
            for i, (length, mode) in enumerate(
                zip(self.layout.sequence_max_len, self.layout.sequence_pooling, strict=True)
            ):
                parts.append(masked_pool(emb[:, start : start + length], lengths[:, i], mode))
                start += length
        if self.layout.num_dense:
            parts.append(batch.dense.repeat(C, 1) if C > 1 else batch.dense)
        out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return out.view(C, B, -1) if C > 1 else out


class MultiTaskModel(nn.Module):
    """Feature input, a backbone returning one representation per task, and towers.

    Args:
        features: The batch-to-tensor input layer.
        task_names: Task names; towers and outputs are keyed by them.
        backbone: Module mapping ``(B, in_dim) -> (B, T, H)``. It may define
            ``last_shared_parameters()`` (for GradNorm) and ``gates(x)`` (diagnostics).
        backbone_out: ``H``.
        tower_hidden: Hidden widths of each task tower.
        output_dims: Outputs per task (1 for binary/regression, N for N classes).
        dropout: Tower dropout.

    ``forward(batch)`` returns ``{task_name: (B,) logits}`` (``(B, N)`` for N classes).
    """

    def __init__(
        self,
        *,
        features: FeatureInput,
        task_names: tuple[str, ...],
        backbone: nn.Module,
        backbone_out: int,
        tower_hidden: tuple[int, ...],
        output_dims: tuple[int, ...] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.features = features
        self.task_names = tuple(task_names)
        self.backbone = backbone
        dims = output_dims or (1,) * len(task_names)
        # Towers by position (in task_names order): task names are user text and need not be
        # valid module attribute names.
        self.towers = nn.ModuleList(Tower(backbone_out, tower_hidden, out_dim=d, dropout=dropout) for d in dims)

    @classmethod
    def assemble(
        cls,
        layout: InputLayout,
        task_names: tuple[str, ...],
        *,
        embedding_dim: int,
        output_dims: tuple[int, ...] | None,
        tower_hidden: tuple[int, ...],
        dropout: float,
        backbone: Callable[[int], nn.Module],
        embedding_copies: int = 1,
    ) -> MultiTaskModel:
        """The feature input for ``layout``, ``backbone(in_dim)`` on it and one tower per task
        on the backbone's ``out_dim``: what every registered architecture builds
        (``embedding_copies``: see :class:`FeatureInput`)."""
        features = FeatureInput(layout, embedding_dim, copies=embedding_copies)
        net = backbone(features.out_dim)
        return cls(
            features=features,
            task_names=task_names,
            backbone=net,
            backbone_out=net.out_dim,
            tower_hidden=tower_hidden,
            output_dims=output_dims,
            dropout=dropout,
        )

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        reps = self.backbone(self.features(batch))  # (B, T, H)
        return {
            name: tower(reps[:, i]) for i, (name, tower) in enumerate(zip(self.task_names, self.towers, strict=True))
        }

    def auxiliary_loss(self, logits: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor | None:
        """An architecture's own extra loss term (e.g. AITM's calibration); none by default."""
        return None

    def shared_parameters(self) -> list[nn.Parameter]:
        """Dense parameters shared by several tasks (the backbone), never embeddings."""
        return list(self.backbone.parameters())

    def last_shared_parameters(self) -> list[SharedLayer]:
        """The last shared layer, where GradNorm measures per-task gradient norms: parameters,
        or slices of batched ones (:class:`~mtrec.weighting.ParameterSlice`), every task reaches."""
        fn = getattr(self.backbone, "last_shared_parameters", None)
        return list(fn()) if fn is not None else []

    def embedding_table(self) -> nn.Parameter | None:
        """The fused embedding table (the rows of every feature), if the model has one."""
        emb = self.features.embedding
        return None if emb is None else emb.weight

    def use_sparse_embedding_grads(self, sparse: bool) -> None:
        """Whether the embedding lookup produces a sparse gradient (for ``SparseAdam``) or a
        dense one; the forward pass is the same either way."""
        if self.features.embedding is not None:
            self.features.embedding.sparse = sparse

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters with sparse gradients (the fused embedding table, unless it was set to
        dense gradients with :meth:`use_sparse_embedding_grads`)."""
        emb = self.features.embedding
        return [emb.weight] if emb is not None and emb.sparse else []

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the embedding table (MLPs, gates, towers), whichever
        gradient the table produces."""
        table = self.embedding_table()
        return [p for p in self.parameters() if p is not table]
