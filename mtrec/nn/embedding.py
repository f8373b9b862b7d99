"""One embedding table for many features, looked up in a single call.

Instead of one ``nn.Embedding`` per feature (20 lookups, 20 backward kernels, 20 dense
gradients), all tables are rows of one weight matrix and each input column carries the
offset of its table. The lookup produces a sparse gradient, so with a sparse optimiser
(``torch.optim.SparseAdam``) the cost of an update follows the rows a batch touches, not
the size of the tables.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["FusedEmbedding", "masked_pool"]


class FusedEmbedding(nn.Module):
    """Several embedding tables stored as one ``(sum(table_sizes), dim)`` matrix.

    Args:
        table_sizes: Rows of each logical table.
        dim: Embedding width ``D``.
        column_tables: For each input column, the index of the table it reads. Two
            columns may share a table (e.g. ``item_id`` and the recent-items list).
        sparse: Produce sparse gradients (pair with ``torch.optim.SparseAdam``).
        init_std: Standard deviation of the normal initialisation.

    Shapes:
        ``ids (B, K) int64 -> (B, K, D)`` where column ``k`` indexes table
        ``column_tables[k]`` with ids in ``[0, table_sizes[column_tables[k]])``.

    Example:
        >>> emb = FusedEmbedding((10, 5), 4, column_tables=(0, 1, 0))
        >>> emb(torch.tensor([[1, 2, 9]])).shape
        torch.Size([1, 3, 4])
    """

    column_offsets: torch.Tensor  # buffer

    def __init__(
        self,
        table_sizes: tuple[int, ...],
        dim: int,
        *,
        column_tables: tuple[int, ...],
        sparse: bool = True,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if not table_sizes or min(table_sizes) < 1:
            raise ValueError(f"table_sizes must be positive, got {table_sizes}")
        if any(not 0 <= t < len(table_sizes) for t in column_tables):
            raise ValueError(f"column_tables {column_tables} refer to a table outside 0..{len(table_sizes) - 1}")
        self.table_sizes = tuple(table_sizes)
        self.column_tables = tuple(column_tables)
        self.dim = dim
        self.sparse = sparse
        starts = [0]
        for size in table_sizes[:-1]:
            starts.append(starts[-1] + size)
        self.weight = nn.Parameter(torch.empty(sum(table_sizes), dim))
        nn.init.normal_(self.weight, std=init_std)
        offsets = torch.tensor([starts[t] for t in column_tables], dtype=torch.int64)
        self.register_buffer("column_offsets", offsets, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids + self.column_offsets, self.weight, sparse=self.sparse)

    def lookup_columns(self, ids: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The lookup of some input columns only: ``ids (B, K)`` holds the values of input
        columns ``columns`` (``(K,)`` int64) ``-> (B, K, D)``, from the same rows as
        :meth:`forward` reads them.

        Example:
            >>> emb = FusedEmbedding((10, 5), 4, column_tables=(0, 1))
            >>> ids = torch.tensor([[3, 2]])
            >>> torch.equal(emb.lookup_columns(ids[:, 1:], torch.tensor([1])), emb(ids)[:, 1:])
            True
        """
        return F.embedding(ids + self.column_offsets.index_select(0, columns), self.weight, sparse=self.sparse)


def masked_pool(emb: torch.Tensor, lengths: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Pools the first ``lengths[b]`` of ``L`` embeddings of each row.

    Args:
        emb: ``(B, L, D)`` embeddings, padding anywhere after ``lengths``.
        lengths: ``(B,)`` number of valid items per row (0 gives a zero vector).
        mode: ``mean`` or ``sum``.

    Returns:
        ``(B, D)``.

    Example:
        >>> masked_pool(torch.ones(2, 3, 1), torch.tensor([2, 0])).squeeze(-1).tolist()
        [1.0, 0.0]
    """
    positions = torch.arange(emb.shape[1], device=emb.device)
    mask = (positions.unsqueeze(0) < lengths.unsqueeze(1)).to(emb.dtype)
    pooled = torch.bmm(mask.unsqueeze(1), emb).squeeze(1)
    if mode == "sum":
        return pooled
    if mode == "mean":
        return pooled / lengths.clamp(min=1).unsqueeze(1).to(emb.dtype)
    raise ValueError(f"pooling mode must be 'mean' or 'sum', got {mode!r}")
