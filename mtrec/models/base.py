"""MultiTaskModel: feature embedding -> backbone -> one tower per task, logits by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch import nn

from mtrec.batch import Batch
from mtrec.nn.attention import TargetAttention
from mtrec.nn.cross import CrossNetwork
from mtrec.nn.embedding import FusedEmbedding, masked_pool
from mtrec.nn.gates import take_penalties
from mtrec.nn.mlp import Tower
from mtrec.schema import InputLayout
from mtrec.weighting import ParameterSlice, SharedLayer

__all__ = [
    "DEFAULT_EMBEDDING",
    "EMBEDDING_MODES",
    "EmbeddingSpec",
    "FeatureInput",
    "MultiTaskModel",
    "TaskAwareInput",
    "feature_input",
]

EMBEDDING_MODES = ("shared", "per_task", "stem")

_M = TypeVar("_M", bound="MultiTaskModel")


@dataclass(frozen=True)
class EmbeddingSpec:
    """How a model embeds its input (the ``model:`` keys ``embedding_dim``, ``embedding``,
    ``task_embedding_dim`` and ``embedding_dropout``).

    Args:
        dim: Width of the shared table set (``shared``, ``stem``).
        mode: ``shared``: one table set read by every task. ``per_task``: one table set per
            task; task ``t``'s path (backbone and tower) reads only its own. ``stem``
            (STEM-Net, Su et al., AAAI 2024): a shared set plus one set per task; every task
            reads all of them ("all forward"), but task ``t``'s loss reaches only the shared
            set and set ``t`` ("task-specific backward"). See :class:`TaskAwareInput`.
        task_dim: Width of the per-task sets (``None``: ``dim``).
        dropout: Per-feature embedding dropout: in training each row drops each embedded
            feature's whole vector with this probability (the rest scaled by ``1 / (1 - p)``).
        cross_layers: DCN-v2 cross layers (:class:`~mtrec.nn.cross.CrossNetwork`) on each
            concatenated input before the backbone (``features.interaction``); 0: none. Every
            table set's input gets its own, so per-task inputs still share nothing.
        cross_rank: Their rank (``None``: full ``d x d`` matrices).
    """

    dim: int = 16
    mode: str = "shared"
    task_dim: int | None = None
    dropout: float = 0.0
    cross_layers: int = 0
    cross_rank: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in EMBEDDING_MODES:
            raise ValueError(f"embedding must be one of {', '.join(EMBEDDING_MODES)}, got {self.mode!r}")
        if self.dim < 1 or (self.task_dim is not None and self.task_dim < 1):
            raise ValueError(f"embedding widths must be >= 1, got {self.dim} and {self.task_dim}")
        if self.task_dim is not None and self.mode == "shared":
            raise ValueError("task_embedding_dim needs embedding per_task or stem (shared has no per-task tables)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"embedding_dropout must be in [0, 1), got {self.dropout}")
        if self.cross_layers < 0 or (self.cross_rank is not None and self.cross_rank < 1):
            raise ValueError(
                f"cross layers must be >= 0 and their rank >= 1, got {self.cross_layers}, {self.cross_rank}"
            )

    @property
    def per_task_dim(self) -> int:
        return self.dim if self.task_dim is None else self.task_dim

    @property
    def cross(self) -> dict[str, Any]:
        """The cross-layer keywords of :class:`FeatureInput`."""
        return {"cross_layers": self.cross_layers, "cross_rank": self.cross_rank}


DEFAULT_EMBEDDING = EmbeddingSpec()
"""The builders' default: one shared table set, 16 wide, no dropout (frozen, so one is enough)."""


class FeatureInput(nn.Module):
    """Turns a :class:`~mtrec.batch.Batch` into one ``(B, out_dim)`` float tensor.

    Sparse features and list items are looked up together in one
    :class:`~mtrec.nn.FusedEmbedding` call; lists are masked-pooled (mean or sum), or pooled
    by DIN target attention with their candidate's embedding
    (:class:`~mtrec.nn.attention.TargetAttention`); dense features are appended as they are.

    With ``copies=C > 1`` the fused table holds ``C`` independent sets of every table
    (copy ``c`` at its own offsets, still one lookup) and the output is ``(C, B, out_dim)``:
    input ``c`` reads only copy ``c``'s rows, so a loss on ``out[c]`` alone puts gradient
    on copy ``c`` alone (one table set per task for the independent baseline).

    ``dropout`` is per-feature embedding dropout (training only): each row loses each
    embedded feature's whole vector (a sparse feature or a pooled list) with probability
    ``dropout``, the kept ones scaled by ``1 / (1 - dropout)``; dense features are kept.
    ``dense=False`` leaves the dense features out of the output. ``cross_layers > 0`` puts
    DCN-v2 cross layers (rank ``cross_rank``) on the concatenated output, one set per copy.
    """

    def __init__(
        self,
        layout: InputLayout,
        embedding_dim: int,
        *,
        copies: int = 1,
        dropout: float = 0.0,
        dense: bool = True,
        cross_layers: int = 0,
        cross_rank: int | None = None,
    ) -> None:
        super().__init__()
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"embedding dropout must be in [0, 1), got {dropout}")
        self.layout = layout
        self.copies = copies
        self.dropout = dropout
        self.use_dense = dense and layout.num_dense > 0
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
        # DIN target attention, one unit per attending list (and per copy: copies share nothing).
        targets = layout.sequence_targets or (-1,) * len(layout.sequence_tables)
        self.targets = targets
        self.attention = nn.ModuleDict(
            {
                str(i): TargetAttention(embedding_dim, copies=copies)
                for i, pooling in enumerate(layout.sequence_pooling)
                if pooling == "target_attention"
            }
        )
        num_embedded = self.num_sparse + len(layout.sequence_tables)
        self.out_dim = num_embedded * embedding_dim + (layout.num_dense if self.use_dense else 0)
        if not self.out_dim:
            raise ValueError("the input has no embedded feature (and dense features were left out)")
        self.cross = (
            CrossNetwork(self.out_dim, layers=cross_layers, rank=cross_rank, copies=copies) if cross_layers else None
        )

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
            embedded = [emb[:, :F]] if F else []
            start = F
            for i, (length, mode) in enumerate(
                zip(self.layout.sequence_max_len, self.layout.sequence_pooling, strict=True)
            ):
                items = emb[:, start : start + length]
                if mode == "target_attention":
                    pooled = self.attention[str(i)](items, emb[:, self.targets[i]], lengths[:, i])
                else:
                    pooled = masked_pool(items, lengths[:, i], mode)
                embedded.append(pooled.unsqueeze(1))
                start += length
            vectors = torch.cat(embedded, dim=1) if len(embedded) > 1 else embedded[0]  # (C * B, K, D)
            if self.training and self.dropout > 0:
                keep = torch.rand(vectors.shape[:2], device=vectors.device) >= self.dropout
                vectors = vectors * (keep.unsqueeze(-1).to(vectors.dtype) / (1.0 - self.dropout))
            parts.append(vectors.flatten(1))
        if self.use_dense:
            parts.append(batch.dense.repeat(C, 1) if C > 1 else batch.dense)
        out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if self.cross is not None:
            out = self.cross(out.view(C, B, -1) if C > 1 else out)
        return out.view(C, B, -1) if C > 1 else out


class TaskAwareInput(nn.Module):
    """One backbone input per task, ``(T, B, out_dim)``: the ``per_task`` and ``stem`` modes
    of :class:`EmbeddingSpec`.

    * ``per_task``: input ``t`` is task ``t``'s own table set (plus the dense features).
    * ``stem``: input ``t`` is ``[shared set + dense | set 0 | ... | set T-1]`` — the same
      values for every task, in the same slots ("all forward") — with every set but
      ``t`` detached, so task ``t``'s loss trains the shared set and set ``t`` only ("task-
      specific backward", the stop-gradient of STEM-Net's gate, Su et al., AAAI 2024).

    The per-task sets share one fused table (``T`` copies at their own offsets); the
    shared set of ``stem`` is a second table, so the two may differ in width.
    """

    own: torch.Tensor  # buffer (``stem`` only)

    def __init__(self, layout: InputLayout, spec: EmbeddingSpec, num_tasks: int) -> None:
        super().__init__()
        if spec.mode not in ("per_task", "stem"):
            raise ValueError(f"TaskAwareInput is for embedding per_task or stem, not {spec.mode!r}")
        self.mode = spec.mode
        self.num_tasks = num_tasks
        stem = spec.mode == "stem"
        self.shared = FeatureInput(layout, spec.dim, dropout=spec.dropout, **spec.cross) if stem else None
        self.tasks = FeatureInput(
            layout, spec.per_task_dim, copies=num_tasks, dropout=spec.dropout, dense=not stem, **spec.cross
        )
        self.out_dim = self.tasks.out_dim * (num_tasks if stem else 1) + (self.shared.out_dim if self.shared else 0)
        if stem:
            own = torch.eye(num_tasks, dtype=torch.bool).view(num_tasks, num_tasks, 1, 1)
            self.register_buffer("own", own, persistent=False)

    def forward(self, batch: Batch) -> torch.Tensor:
        T = self.num_tasks
        own = self.tasks(batch)
        if T == 1:
            own = own.unsqueeze(0)  # FeatureInput returns (B, d) for a single copy
        if self.shared is None:
            return own
        # sets[t, s] = set s as task t reads it: live on the diagonal, detached elsewhere.
        sets = torch.where(self.own, own.unsqueeze(0), own.detach().unsqueeze(0))  # (T, T, B, d)
        B = own.shape[1]
        sets = sets.permute(0, 2, 1, 3).reshape(T, B, -1)
        return torch.cat([self.shared(batch).unsqueeze(0).expand(T, -1, -1), sets], dim=2)


def feature_input(
    layout: InputLayout, embedding: EmbeddingSpec, num_tasks: int, *, copies: int = 1
) -> FeatureInput | TaskAwareInput:
    """The input layer ``embedding`` asks for: one :class:`FeatureInput` (``shared``; ``copies``
    table sets) or a :class:`TaskAwareInput` with one input per task (``per_task``, ``stem``)."""
    if embedding.mode == "shared":
        return FeatureInput(layout, embedding.dim, copies=copies, dropout=embedding.dropout, **embedding.cross)
    return TaskAwareInput(layout, embedding, num_tasks)


class MultiTaskModel(nn.Module):
    """Feature input, a backbone returning one representation per task, and towers.

    Args:
        features: The batch-to-tensor input layer (any module: its output is what the backbone
            takes, e.g. ``stem_net``'s pair of shared and per-task inputs).
        task_names: Task names; towers and outputs are keyed by them.
        backbone: Module mapping ``features(batch)`` (``(B, in_dim)``) to ``(B, T, H)``. It may
            define ``last_shared_parameters()`` (for GradNorm) and ``gate_report(x, task_names)``
            (diagnostics).
        backbone_out: ``H``.
        tower_hidden: Hidden widths of each task tower.
        output_dims: Outputs per task (1 for binary/regression, N for N classes).
        dropout: Tower dropout.

    ``forward(batch)`` returns ``{task_name: (B,) logits}`` (``(B, N)`` for N classes).

    With a :class:`TaskAwareInput` (one input per task, ``(T, B, in_dim)``), the backbone
    runs on all ``T`` inputs as one ``(T * B, in_dim)`` batch and task ``t`` keeps its output
    on input ``t``: task ``t``'s path reads its own input, and its loss reaches no other
    task's input. It costs ``T`` backbone passes.
    """

    def __init__(
        self,
        *,
        features: nn.Module,
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
        self.backbone_out = backbone_out
        dims = output_dims or (1,) * len(task_names)
        # Towers by position (in task_names order): task names are user text and need not be
        # valid module attribute names.
        self.towers = nn.ModuleList(Tower(backbone_out, tower_hidden, out_dim=d, dropout=dropout) for d in dims)

    @classmethod
    def assemble(
        cls: type[_M],
        layout: InputLayout,
        task_names: tuple[str, ...],
        *,
        embedding: EmbeddingSpec,
        output_dims: tuple[int, ...] | None,
        tower_hidden: tuple[int, ...],
        dropout: float,
        backbone: Callable[[int], nn.Module] | nn.Module,
        embedding_copies: int = 1,
        features: nn.Module | None = None,
    ) -> _M:
        """The feature input for ``layout`` (as ``embedding`` says), ``backbone(in_dim)`` on it
        and one tower per task on the backbone's ``out_dim``: what every registered
        architecture builds (``embedding_copies``: see :class:`FeatureInput`; shared mode only).

        An architecture with its own input module (e.g. STEM-Net's table sets) passes it as
        ``features`` with its ``backbone`` already built on it."""
        if features is None:
            features = feature_input(layout, embedding, len(task_names), copies=embedding_copies)
        net = backbone if isinstance(backbone, nn.Module) else backbone(cast(int, features.out_dim))
        return cls(
            features=features,
            task_names=task_names,
            backbone=net,
            backbone_out=cast(int, net.out_dim),
            tower_hidden=tower_hidden,
            output_dims=output_dims,
            dropout=dropout,
        )

    def representations(self, batch: Batch) -> torch.Tensor:
        """``(B, T, H)``: what each task's tower reads."""
        x = self.features(batch)
        if isinstance(self.features, TaskAwareInput):
            T, B = x.shape[0], x.shape[1]
            out = self.backbone(x.reshape(T * B, -1)).view(T, B, T, -1)  # [input t, row, task, H]
            return torch.diagonal(out, dim1=0, dim2=2).permute(0, 2, 1)  # (B, T, H): task t on input t
        return self.backbone(x)  # (B, T, H)

    def heads(self, reps: torch.Tensor) -> dict[str, torch.Tensor]:
        """The towers on :meth:`representations`: ``{task: logits}``."""
        return {
            name: tower(reps[:, i]) for i, (name, tower) in enumerate(zip(self.task_names, self.towers, strict=True))
        }

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.heads(self.representations(batch))

    def auxiliary_loss(self, logits: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor | None:
        """The extra loss terms of the last training forward pass: the penalties the layers
        collected (gate load balance, DSelect-k's selector entropy; :mod:`mtrec.nn.gates`),
        plus an architecture's own (e.g. AITM's calibration); ``None`` if there is none, and
        always ``None`` in evaluation mode (a penalty left over from training is dropped)."""
        total = take_penalties(self)
        return total if self.training else None

    def shared_parameters(self) -> list[nn.Parameter]:
        """Dense parameters shared by several tasks (the backbone), never embeddings."""
        return list(self.backbone.parameters())

    def last_shared_parameters(self) -> list[SharedLayer]:
        """The last shared layer, where GradNorm measures per-task gradient norms: parameters,
        or slices of batched ones (:class:`~mtrec.weighting.ParameterSlice`), every task reaches."""
        fn = getattr(self.backbone, "last_shared_parameters", None)
        return list(fn()) if fn is not None else []

    def representation_layer(self) -> tuple[nn.Module, slice | None] | None:
        """Where the representation-gradient loss weightings take the task gradients
        (:class:`~mtrec.weighting.RepresentationGradient`): the module whose output is the
        shared representation, and the experts of that output that are shared.

        It is the smallest computing module that holds all of :meth:`last_shared_parameters`
        (an expert group, whose ``(B, E, H)`` output is sliced along ``E`` to the shared
        experts of a :class:`~mtrec.weighting.ParameterSlice`; the shared bottom's last
        linear layer), so the gradients are taken where GradNorm measures them. A model
        without a shared dense layer whose one input layer all tasks read (``shared_embedding``)
        gets that input layer. ``None`` where no representation is shared: separate table sets
        per task (``independent``, ``embedding: per_task | stem``: the backbone runs on each
        task's own input, so the tasks' gradients fall on different rows), or a last shared layer that is the
        whole backbone, whose output is one slice per task (``cross_stitch``).
        """
        if isinstance(self.features, TaskAwareInput):
            return None  # the backbone runs once per task's input: each task's rows are its own
        entries = self.last_shared_parameters()
        wanted = {id(e.param if isinstance(e, ParameterSlice) else e) for e in entries}
        rows = next((e.rows for e in entries if isinstance(e, ParameterSlice)), None)
        best: nn.Module | None = None
        if wanted:
            for module in self.modules():
                if type(module).forward is nn.Module.forward:  # containers (ModuleList, ParameterList)
                    continue
                held = {id(p) for p in module.parameters()}
                if wanted <= held and (best is None or len(held) < len(list(best.parameters()))):
                    best = module
        if best is None:
            shared_input = isinstance(self.features, FeatureInput) and self.features.copies == 1
            return (self.features, None) if shared_input else None
        return None if best is self.backbone else (best, rows)

    def _embeddings(self) -> list[FusedEmbedding]:
        return [m for m in self.features.modules() if isinstance(m, FusedEmbedding)]

    def embedding_tables(self) -> list[nn.Parameter]:
        """The fused embedding tables (one, or two with ``stem``: shared and per-task sets)."""
        return [emb.weight for emb in self._embeddings()]

    def use_sparse_embedding_grads(self, sparse: bool) -> None:
        """Whether the embedding lookups produce sparse gradients (for ``SparseAdam``) or
        dense ones; the forward pass is the same either way."""
        for emb in self._embeddings():
            emb.sparse = sparse

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters with sparse gradients (the fused embedding tables, unless they were set
        to dense gradients with :meth:`use_sparse_embedding_grads`)."""
        return [emb.weight for emb in self._embeddings() if emb.sparse]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the embedding tables (MLPs, gates, towers), whichever
        gradient the tables produce."""
        tables = {id(t) for t in self.embedding_tables()}
        return [p for p in self.parameters() if id(p) not in tables]
