"""The batch that flows from the data loaders to the models: column tensors, no rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Batch"]


@dataclass
class Batch:
    """A batch of encoded columns.

    Attributes:
        sparse: ``(B, F)`` int64 vocabulary indices of the sparse features (0 = unseen/null).
        dense: ``(B, Dn)`` float32 transformed dense features.
        sequences: One ``(B, L_i)`` int64 tensor per list feature, padded after ``seq_lengths``.
        seq_lengths: ``(B, S)`` int64 number of valid items per list feature.
        labels: ``(B, T)`` float32 labels (0 outside a task's sample space).
        label_mask: ``(B, T)`` bool, True where the row is in the task's sample space.
        sample_weight: ``(B, T)`` float32 per-row loss/metric weights, or ``None`` (all 1).
    """

    sparse: torch.Tensor
    dense: torch.Tensor
    sequences: tuple[torch.Tensor, ...]
    seq_lengths: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    sample_weight: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """Copies every tensor to ``device``."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Batch(
            move(self.sparse),
            move(self.dense),
            tuple(move(s) for s in self.sequences),
            move(self.seq_lengths),
            move(self.labels),
            move(self.label_mask),
            None if self.sample_weight is None else move(self.sample_weight),
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies, for asynchronous host-to-GPU transfers."""
        return Batch(
            self.sparse.pin_memory(),
            self.dense.pin_memory(),
            tuple(s.pin_memory() for s in self.sequences),
            self.seq_lengths.pin_memory(),
            self.labels.pin_memory(),
            self.label_mask.pin_memory(),
            None if self.sample_weight is None else self.sample_weight.pin_memory(),
        )

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the batch (for stream bookkeeping on CUDA)."""
        out = [self.sparse, self.dense, *self.sequences, self.seq_lengths, self.labels, self.label_mask]
        return out if self.sample_weight is None else [*out, self.sample_weight]
